//! SIGTERM / SIGINT: run the daemon's last words (flush the disk, remove the socket file) and exit
//! promptly with status 0, whatever the serve loop is blocked on.

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Spawns the thread that waits for SIGTERM or SIGINT, calls `on_exit`, then exits the process.
pub fn exit_on_termination<F>(on_exit: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let name = if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                log::info!("{name} received, shutting down");
                on_exit();
                std::process::exit(0);
            }
        })?;
    Ok(())
}
