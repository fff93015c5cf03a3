//! `vhost-user-bench`: starts a backend (ours or a peer), drives it through its socket with a real
//! frontend, and prints throughput, latency percentiles and backend CPU time per operation, with
//! the ratio of ours to the peer measured in the same run.

mod blk;
mod console;
mod net;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Benchmarks the vhost-user daemons side by side with their peers.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    device: Device,

    #[command(flatten)]
    opts: Options,
}

/// Options every device benchmark takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Seconds each case runs (after a short warm-up).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,

    /// Short mode for CI: one second per case, smaller files.
    #[arg(long, global = true)]
    pub quick: bool,

    /// Directory holding our daemons' binaries [default: next to this program].
    #[arg(long, global = true, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Only run cases whose name contains this text.
    #[arg(long, global = true, value_name = "TEXT")]
    pub filter: Option<String>,
}

impl Options {
    /// How long each case runs.
    pub fn case_duration(&self) -> Duration {
        if self.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs_f64(self.duration.max(0.1))
        }
    }

    /// Path of one of our daemons: in `--bin-dir`, or next to this program.
    pub fn daemon(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => vhost_user_tests::binary_path(name),
        }
    }

    /// Whether the case named `name` was selected with `--filter`.
    pub fn selected(&self, name: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| name.contains(f.as_str()))
    }
}

#[derive(Subcommand, Debug)]
enum Device {
    /// vhost-user-blk vs qemu-storage-daemon (and fio io_uring on the host), driven by blkio.
    Blk(blk::BlkArgs),
    /// vhost-user-net vs DPDK's vhost PMD, driven by DPDK virtio_user (testpmd).
    Net(net::NetArgs),
    /// vhost-user-console vs vhost-device-console.
    Console(console::ConsoleArgs),
    /// Every device, with default settings.
    All,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.device {
        Device::Blk(args) => blk::run(&cli.opts, &args),
        Device::Net(args) => net::run(&cli.opts, &args),
        Device::Console(args) => console::run(&cli.opts, &args),
        Device::All => blk::run(&cli.opts, &blk::BlkArgs::default())
            .and_then(|()| net::run(&cli.opts, &net::NetArgs::default()))
            .and_then(|()| console::run(&cli.opts, &console::ConsoleArgs::default())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
