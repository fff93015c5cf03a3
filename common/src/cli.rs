//! Command-line flags every daemon shares, following QEMU's "vhost-user backend conventions"
//! (docs/interop/vhost-user.rst): `--socket-path` or `--fd`, `--print-capabilities`, no
//! daemonizing. Parsed with clap, validated once into a [`ListenConfig`].

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Args;

/// Errors found while validating the shared flags.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no socket given: pass --socket-path PATH or --fd N (or start under systemd socket activation)")]
    NoSocket,
    #[error("--socket-path and --fd are exclusive: pass only one of them")]
    BothSockets,
    #[error("--socket-mode {0:?} is not an octal mode such as 0600 or 660")]
    BadMode(String),
    #[error("--socket-group {0:?}: no such group on this system (check /etc/group)")]
    NoSuchGroup(String),
    #[error("--socket-mode and --socket-group apply to a socket we create: they cannot be used with --fd or socket activation")]
    ModeWithFd,
    #[error("systemd socket activation passed {0} sockets; exactly one is expected")]
    ActivationCount(usize),
    #[error("systemd socket activation: {0}")]
    Activation(std::io::Error),
}

/// Flags that choose and shape the vhost-user socket, and the ones every daemon answers.
#[derive(Args, Debug, Clone, Default)]
pub struct ListenArgs {
    /// Listen for the frontend (VMM) on this UNIX socket path.
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Serve on an already listening UNIX socket inherited as file descriptor N.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// Permissions of the socket file we create, in octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Group owning the socket file we create (e.g. the group QEMU runs as).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Print the backend's capabilities as JSON (QEMU vhost-user conventions) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Log level: off, error, warn, info, debug, trace [default: info; RUST_LOG also works].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

/// Where the listening socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSource {
    /// Bind a new socket at this path.
    Path {
        path: PathBuf,
        mode: u32,
        gid: Option<u32>,
    },
    /// A listening socket inherited as this descriptor (`--fd` or systemd's LISTEN_FDS).
    Fd(RawFd),
}

/// Validated listening configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub source: ListenSource,
}

/// Parses a file mode in octal (`0660`, `660`, `0o660`), at most 0777.
pub fn parse_mode(text: &str) -> Result<u32, CliError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(CliError::BadMode(text.to_string())),
    }
}

/// A group by name or number.
pub fn lookup_group(name: &str) -> Result<u32, CliError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(CliError::NoSuchGroup(name.to_string())),
    }
}

/// Sockets passed by systemd socket activation, if this process was started that way.
fn activated_socket() -> Result<Option<RawFd>, CliError> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()
        .map_err(CliError::Activation)?
        .collect();
    match fds.len() {
        0 => Ok(None),
        1 => Ok(Some(fds[0])),
        n => Err(CliError::ActivationCount(n)),
    }
}

impl ListenArgs {
    /// Validates the flags. systemd socket activation (LISTEN_FDS) counts as `--fd` when neither
    /// `--socket-path` nor `--fd` is given.
    pub fn listen_config(&self) -> Result<ListenConfig, CliError> {
        let source = match (&self.socket_path, self.fd) {
            (Some(_), Some(_)) => return Err(CliError::BothSockets),
            (Some(path), None) => {
                let mode = match &self.socket_mode {
                    Some(text) => parse_mode(text)?,
                    None => 0o600,
                };
                let gid = self.socket_group.as_deref().map(lookup_group).transpose()?;
                ListenSource::Path {
                    path: path.clone(),
                    mode,
                    gid,
                }
            }
            (None, fd) => {
                if self.socket_mode.is_some() || self.socket_group.is_some() {
                    return Err(CliError::ModeWithFd);
                }
                match fd {
                    Some(fd) => ListenSource::Fd(fd),
                    None => match activated_socket()? {
                        Some(fd) => ListenSource::Fd(fd),
                        None => return Err(CliError::NoSocket),
                    },
                }
            }
        };
        Ok(ListenConfig { source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(path: Option<&str>, fd: Option<RawFd>) -> ListenArgs {
        ListenArgs {
            socket_path: path.map(PathBuf::from),
            fd,
            ..Default::default()
        }
    }

    #[test]
    fn exactly_one_socket() {
        assert!(matches!(
            args(Some("/x"), Some(3)).listen_config(),
            Err(CliError::BothSockets)
        ));
        assert!(matches!(
            args(None, None).listen_config(),
            Err(CliError::NoSocket)
        ));
        assert_eq!(
            args(None, Some(7)).listen_config().ok(),
            Some(ListenConfig {
                source: ListenSource::Fd(7)
            })
        );
    }

    #[test]
    fn mode_defaults_to_owner_only() {
        let config = args(Some("/run/x.sock"), None).listen_config().ok();
        assert_eq!(
            config.map(|c| c.source),
            Some(ListenSource::Path {
                path: "/run/x.sock".into(),
                mode: 0o600,
                gid: None
            })
        );
    }

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0660").ok(), Some(0o660));
        assert_eq!(parse_mode("0o644").ok(), Some(0o644));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn group_by_name_or_number() {
        assert_eq!(lookup_group("0").ok(), Some(0));
        assert_eq!(lookup_group("root").ok(), Some(0));
        assert!(lookup_group("no-such-group-here").is_err());
    }
}
