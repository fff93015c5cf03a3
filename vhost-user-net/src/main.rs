//! vhost-user-net: parse, validate, open the tap, serve.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_user_net::stats::Stats;
use vhost_user_net::tap::Tap;
use vhost_user_net::{Args, Config, NetBackend};

fn run(args: Args) -> Result<(), String> {
    let config = Config::try_from(args).map_err(|e| e.to_string())?;
    let tap = Tap::open(&config.tap, usize::from(config.queue_pairs)).map_err(|e| {
        format!(
            "--tap {}: cannot open or create the tap: {e} (needs CAP_NET_ADMIN; an existing tap must be a tap with vnet_hdr, and multi_queue for --queue-pairs > 1)",
            config.tap
        )
    })?;
    tap.configure_link(&config.link)
        .map_err(|e| format!("--tap {}: cannot configure the link: {e}", config.tap))?;
    log::info!(
        "tap {} ready: {} queue pair(s){}",
        tap.name,
        config.queue_pairs,
        if tap.multi_queue { ", multi-queue" } else { "" }
    );
    let tap = Arc::new(tap);
    let stats = Arc::new(Stats::default());
    vhost_user_common::run(
        "vhost-user-net",
        &config.listen,
        // The tap stays in the host's network namespace, and so does the daemon: its tap
        // fds would work from an empty one, but /proc/PID/net (the benchmark's counters) and
        // operators' tools look at the daemon's namespace.
        vhost_user_common::Needs {
            host_network: true,
            ..vhost_user_common::Needs::new(vhost_user_common::Profile::Net)
        },
        || {},
        || Ok(NetBackend::new(config.clone(), tap.clone(), stats.clone())),
    )
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.listen.print_capabilities {
        println!(
            "{}",
            vhost_user_common::caps::capabilities_json("net", vhost_user_net::CAPABILITIES)
        );
        return ExitCode::SUCCESS;
    }
    vhost_user_common::logging::init(args.listen.log_level);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
