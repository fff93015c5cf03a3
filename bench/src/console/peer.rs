//! The daemons on a TCP endpoint: ours (`--tcp`) or vhost-device-console (`-b network`),
//! started through the tests crate's [`Daemon`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use vhost_user_tests::guest::find_program;
use vhost_user_tests::Daemon;

use super::{NAMES, PEER};
use crate::report::{Result, Subject};

/// `--peer-bin`, or vhost-device-console from PATH, then ~/.cargo/bin.
pub(super) fn find_peer(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.exists().then(|| path.to_path_buf());
    }
    find_program(PEER).or_else(|| {
        let home = std::env::var_os("HOME")?;
        let path = Path::new(&home).join(".cargo/bin").join(PEER);
        path.exists().then_some(path)
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `subject`'s daemon `bin` with a TCP endpoint on a free port of 127.0.0.1, its socket
/// and log in a directory of their own inside `dir`; returns it with the port.
pub(super) fn start_daemon(subject: Subject, bin: &Path, dir: &Path) -> Result<(Daemon, u16)> {
    let port = free_port()?;
    let tag = format!("{}-{port}-", subject.tag());
    let daemon_dir = tempfile::Builder::new().prefix(&tag).tempdir_in(dir)?;
    let base = daemon_dir.path().join("vhost.sock");
    let mut command = Command::new(bin);
    let socket = match subject {
        Subject::Ours => {
            command
                .arg("--socket-path")
                .arg(&base)
                .args(["--tcp", &format!("127.0.0.1:{port}")])
                .args(["--log-level", "warn"]);
            base
        }
        Subject::Peer => {
            command.arg("--socket-path").arg(&base).args([
                "-b",
                "network",
                "-p",
                &port.to_string(),
            ]);
            // It appends the socket's index to the path.
            let mut socket = base.into_os_string();
            socket.push("0");
            PathBuf::from(socket)
        }
    };
    let daemon = Daemon::start_command(command, socket, daemon_dir)
        .map_err(|e| format!("{}: {e}", subject.name(NAMES)))?;
    Ok((daemon, port))
}
