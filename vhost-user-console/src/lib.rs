//! vhost-user-console: a virtio-console device (virtio id 3) whose ports are connected to
//! pseudo-terminals, UNIX sockets or TCP sockets on the host.
//!
//! Reading order: [`args`] (flags → [`args::Config`]), [`run`] (start-up), [`backend`] (the
//! vhost-user glue), [`pump`] (the device's loop: virtqueues ↔ ports), [`endpoint`] (host side
//! of a port), [`control`] (the virtio-console layouts and the MULTIPORT handshake).

pub mod args;
pub mod backend;
pub mod control;
pub mod endpoint;
pub mod pump;

use std::sync::{Arc, Mutex};

use clap::Parser;
use vhost_user_common::serve::ServeError;

pub use crate::args::{Args, Config};
use crate::backend::ConsoleBackend;
use crate::pump::Host;

/// What `--print-capabilities` reports (QEMU's vhost-user.json "console" type).
pub fn capabilities() -> String {
    let features = ["pty", "unix", "tcp", "history", "multiport"];
    vhost_user_common::caps::capabilities_json("console", &features)
}

/// The command line, or exit: a usage error is one line (`vhost-user-console: error: ...`)
/// with clap's exit code 2; `--help` and `--version` print and exit 0.
pub fn parse_args() -> Args {
    Args::try_parse().unwrap_or_else(|e| {
        if !e.use_stderr() {
            e.exit(); // --help, --version
        }
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("bad arguments");
        let message = first.strip_prefix("error: ").unwrap_or(first);
        vhost_user_common::logging::fatal("vhost-user-console", &format!("{message} (see --help)"));
        std::process::exit(2);
    })
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Endpoint(std::io::Error),
}

/// Opens the ports' endpoints, binds the vhost-user socket and serves frontends until a
/// signal ends the process.
pub fn run(config: Config) -> Result<(), RunError> {
    // The log files get their mode and group before the ports open them for appending.
    for log in config.ports.iter().filter_map(|p| p.log.as_deref()) {
        endpoint::prepare_log(log, config.log_access).map_err(RunError::Endpoint)?;
    }
    // Endpoints first: once the vhost-user socket exists, the console is ready to attach.
    let host = Host::open(&config).map_err(RunError::Endpoint)?;
    let cleanup = host.cleanup_paths();
    let needs = vhost_user_common::Needs {
        remove_at_exit: cleanup.clone(),
        ..vhost_user_common::Needs::new(vhost_user_common::Profile::Console)
    };
    let on_exit = move || {
        for path in &cleanup {
            let _ = std::fs::remove_file(path);
        }
    };
    let host = Arc::new(Mutex::new(host));
    vhost_user_common::run("vhost-user-console", &config.listen, needs, on_exit, || {
        Ok(ConsoleBackend::new(host.clone()))
    })?;
    Ok(())
}
