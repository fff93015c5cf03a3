//! Command-line flags every daemon shares, following QEMU's "vhost-user backend conventions"
//! (docs/interop/vhost-user.rst): `--socket-path` or `--fd`, `--print-capabilities`, no
//! daemonizing. Parsed with clap, validated once into a [`ListenConfig`].

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Args;

use crate::sandbox::{RunAs, SandboxConfig, SandboxMode};
use crate::seccomp::SeccompMode;

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
    #[error("--user {0:?}: no such user on this system (check /etc/passwd)")]
    NoSuchUser(String),
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

    /// Confinement once set up: new namespaces with an empty root, or chroot into an empty
    /// directory, or none; capabilities are dropped in every case [default: namespace,
    /// or none with a warning when namespaces are not permitted].
    #[arg(long, value_enum, value_name = "MODE")]
    pub sandbox: Option<SandboxMode>,

    /// System calls outside the daemon's allowlist: kill the process, log them (dmesg), or
    /// no filter.
    #[arg(long, value_enum, value_name = "ACTION", default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,

    /// Run as this user (name or uid) once the socket, files and devices are open.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run as this group (name or gid) [default: the --user's primary group].
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
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
    pub sandbox: SandboxConfig,
    pub seccomp: SeccompMode,
}

impl ListenConfig {
    /// A socket with the daemons' default sandbox and seccomp settings (both on: a program that
    /// embeds [`crate::run`] next to threads of its own sets `sandbox.mode` to
    /// `Some(SandboxMode::None)` and `seccomp` to `SeccompMode::None`).
    pub fn new(source: ListenSource) -> ListenConfig {
        ListenConfig {
            source,
            sandbox: SandboxConfig::default(),
            seccomp: SeccompMode::default(),
        }
    }
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

/// `--user` / `--group` → the ids to switch to (looked up now: the sandbox has no /etc).
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, CliError> {
    let user = match user {
        None => None,
        Some(name) => match name.parse::<u32>() {
            Ok(uid) => Some((uid, nix::unistd::User::from_uid(uid.into()).ok().flatten())),
            Err(_) => match nix::unistd::User::from_name(name) {
                Ok(Some(entry)) => Some((entry.uid.as_raw(), Some(entry))),
                _ => return Err(CliError::NoSuchUser(name.to_string())),
            },
        },
    };
    let gid = group.map(lookup_group).transpose()?;
    Ok(match (user, gid) {
        (None, None) => None,
        (Some((uid, entry)), gid) => Some(RunAs {
            uid,
            gid: gid
                .or(entry.map(|e| e.gid.as_raw()))
                .unwrap_or_else(|| nix::unistd::getgid().as_raw()),
        }),
        (None, Some(gid)) => Some(RunAs {
            uid: nix::unistd::getuid().as_raw(),
            gid,
        }),
    })
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
        Ok(ListenConfig {
            source,
            sandbox: SandboxConfig {
                mode: self.sandbox,
                run_as: run_as(self.user.as_deref(), self.group.as_deref())?,
            },
            seccomp: self.seccomp,
        })
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
            Some(ListenConfig::new(ListenSource::Fd(7)))
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
    fn sandbox_and_seccomp_flags() {
        let parse = |extra: &[&str]| {
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                listen: ListenArgs,
            }
            let mut argv = vec!["d", "--socket-path", "/x"];
            argv.extend_from_slice(extra);
            <Cli as clap::Parser>::try_parse_from(argv)
                .map_err(|e| e.to_string())
                .and_then(|cli| cli.listen.listen_config().map_err(|e| e.to_string()))
        };
        let defaults = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.seccomp, SeccompMode::Kill);
        assert_eq!(defaults.sandbox, SandboxConfig::default());
        let set = parse(&["--sandbox", "chroot", "--seccomp", "log", "--user", "0"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.sandbox.mode, Some(SandboxMode::Chroot));
        assert_eq!(set.sandbox.run_as, Some(RunAs { uid: 0, gid: 0 }));
        assert_eq!(set.seccomp, SeccompMode::Log);
        assert!(parse(&["--seccomp", "maybe"]).is_err_and(|e| e.contains("--seccomp")));
        assert!(parse(&["--user", "no-such-user-here"]).is_err_and(|e| e.contains("--user")));
    }

    #[test]
    fn group_by_name_or_number() {
        assert_eq!(lookup_group("0").ok(), Some(0));
        assert_eq!(lookup_group("root").ok(), Some(0));
        assert!(lookup_group("no-such-group-here").is_err());
    }
}
