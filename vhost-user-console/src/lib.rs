//! vhost-user-console: a virtio-console device (virtio id 3) whose ports are connected to
//! pseudo-terminals, UNIX sockets or TCP sockets on the host.
//!
//! Reading order: [`args`] (flags → [`args::Config`]), [`run`] (start-up), [`backend`] (the
//! vhost-user glue and the worker's pump), [`endpoint`] (host side of a port), [`control`]
//! (MULTIPORT control messages).

pub mod args;
pub mod backend;
pub mod control;
pub mod endpoint;

use std::sync::{Arc, Mutex};

use vhost_user_common::serve::ServeError;

use crate::args::Config;
use crate::backend::{ConsoleBackend, Host};

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Endpoint(std::io::Error),
}

/// Binds the vhost-user socket, opens the ports' endpoints and serves frontends until a
/// signal ends the process.
pub fn run(config: Config) -> Result<(), RunError> {
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
