//! Command-line flags, validated once into a [`Config`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use vhost_user_common::cli::{lookup_group, parse_mode, CliError};
use vhost_user_common::{ListenArgs, ListenConfig};

use crate::endpoint::{EndpointSpec, FileAccess};

/// Most ports a device offers (port 0 included): queue indices must fit a 64-bit thread mask.
pub const MAX_PORTS: usize = 31;
/// Longest port name accepted (the guest shows it in sysfs).
pub const MAX_NAME_LEN: usize = 255;

/// vhost-user virtio-console backend: the guest's /dev/hvc0 (and named /dev/vportNpM ports)
/// on a pseudo-terminal, a UNIX socket or a TCP socket.
#[derive(Parser, Debug, Clone)]
#[command(name = "vhost-user-console", version)]
pub struct Args {
    #[command(flatten)]
    pub listen: ListenArgs,

    /// Connect the console (port 0) to a new pseudo-terminal (the default).
    #[arg(long)]
    pub pty: bool,

    /// Create a symlink to the console's pseudo-terminal at PATH (implies --pty).
    #[arg(long, value_name = "PATH")]
    pub pty_link: Option<PathBuf>,

    /// Listen for one console client at a time on this UNIX socket.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Listen for one console client at a time on TCP [ADDR:]PORT (ADDR defaults to 127.0.0.1).
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub tcp: Option<String>,

    /// Append everything the guest writes to the console to FILE.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// KiB of guest output kept per port and replayed to each client that connects.
    #[arg(long, value_name = "KIB", default_value_t = 64)]
    pub history: usize,

    /// Permissions of the UNIX endpoints' socket files, in octal [default: 0660].
    #[arg(long, value_name = "MODE")]
    pub endpoint_mode: Option<String>,

    /// Group owning the UNIX endpoints' socket files [default: the daemon's group].
    #[arg(long, value_name = "GROUP")]
    pub endpoint_group: Option<String>,

    /// Permissions of the --log files, in octal [default: 0640].
    #[arg(long, value_name = "MODE")]
    pub log_mode: Option<String>,

    /// Group owning the --log files [default: the daemon's group].
    #[arg(long, value_name = "GROUP")]
    pub log_group: Option<String>,

    /// Add a named port: name=NAME,(unix=PATH|tcp=[ADDR:]PORT|pty[=LINK])[,log=FILE].
    /// Repeatable; ports appear in the guest as /dev/vport0p1, /dev/vport0p2, ...
    #[arg(long = "port", value_name = "SPEC")]
    pub ports: Vec<String>,
}

/// One port's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub name: Option<String>,
    pub endpoint: EndpointSpec,
    pub log: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    /// Port 0 (the console) first, then the named ports.
    pub ports: Vec<PortConfig>,
    /// History kept per port, in bytes.
    pub history: usize,
    /// Mode and group of the log files.
    pub log_access: FileAccess,
}

/// Why the flags were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Listen(#[from] CliError),
    #[error("--pty, --unix and --tcp are exclusive: pass at most one of them")]
    ExclusiveEndpoints,
    #[error("--pty-link needs the console on a pseudo-terminal; drop --unix/--tcp or --pty-link")]
    LinkWithoutPty,
    #[error("{0:?}: not a TCP address; expected PORT or ADDR:PORT such as 127.0.0.1:4555")]
    BadTcp(String),
    #[error("--port {spec:?}: {reason}")]
    BadPort { spec: String, reason: String },
    #[error("--port: the name {0:?} is used twice")]
    DuplicateName(String),
    #[error("too many ports: at most {} named ports", MAX_PORTS - 1)]
    TooManyPorts,
    #[error("--history {0}: too large (at most 16384 KiB)")]
    HistoryTooLarge(usize),
    #[error("{flag} {text:?}: not an octal mode such as 0660")]
    BadMode { flag: &'static str, text: String },
    #[error("{flag} {text:?}: no such group on this system (check /etc/group)")]
    NoSuchGroup { flag: &'static str, text: String },
}

/// `--X-mode` and `--X-group` into a [`FileAccess`].
fn file_access(
    mode: Option<&str>,
    group: Option<&str>,
    default: FileAccess,
    flags: (&'static str, &'static str),
) -> Result<FileAccess, ConfigError> {
    let mode = match mode {
        Some(text) => parse_mode(text).map_err(|_| ConfigError::BadMode {
            flag: flags.0,
            text: text.to_string(),
        })?,
        None => default.mode,
    };
    let gid = match group {
        Some(text) => Some(lookup_group(text).map_err(|_| ConfigError::NoSuchGroup {
            flag: flags.1,
            text: text.to_string(),
        })?),
        None => default.gid,
    };
    Ok(FileAccess { mode, gid })
}

fn parse_tcp(text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        Err(_) => Err(ConfigError::BadTcp(text.to_string())),
    }
}

fn parse_port(spec: &str, access: FileAccess) -> Result<PortConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::BadPort {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut name = None;
    let mut endpoint = None;
    let mut log = None;
    for item in spec.split(',') {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let new_endpoint = match (key, value) {
            ("name", Some(v)) => {
                name = Some(v.to_string());
                None
            }
            ("log", Some(v)) => {
                log = Some(PathBuf::from(v));
                None
            }
            ("unix", Some(v)) => Some(EndpointSpec::Unix {
                path: PathBuf::from(v),
                access,
            }),
            ("tcp", Some(v)) => Some(EndpointSpec::Tcp(parse_tcp(v)?)),
            ("pty", link) => Some(EndpointSpec::Pty {
                link: link.map(PathBuf::from),
            }),
            _ => {
                return Err(bad(&format!(
                    "unknown item {item:?} (expected name=, unix=, tcp=, pty, log=)"
                )))
            }
        };
        if let Some(e) = new_endpoint {
            if endpoint.replace(e).is_some() {
                return Err(bad("give exactly one of unix=, tcp=, pty"));
            }
        }
    }
    let name = name.ok_or_else(|| bad("a name= is required"))?;
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(['\0', '/']) {
        return Err(bad("the name must be 1 to 255 characters, without '/'"));
    }
    let endpoint = endpoint.ok_or_else(|| bad("give one of unix=PATH, tcp=[ADDR:]PORT, pty"))?;
    Ok(PortConfig {
        name: Some(name),
        endpoint,
        log,
    })
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        let listen = args.listen.listen_config()?;
        let chosen = usize::from(args.pty)
            + usize::from(args.unix.is_some())
            + usize::from(args.tcp.is_some());
        if chosen > 1 {
            return Err(ConfigError::ExclusiveEndpoints);
        }
        if args.pty_link.is_some() && (args.unix.is_some() || args.tcp.is_some()) {
            return Err(ConfigError::LinkWithoutPty);
        }
        let access = file_access(
            args.endpoint_mode.as_deref(),
            args.endpoint_group.as_deref(),
            FileAccess::ENDPOINT_DEFAULT,
            ("--endpoint-mode", "--endpoint-group"),
        )?;
        let log_access = file_access(
            args.log_mode.as_deref(),
            args.log_group.as_deref(),
            FileAccess::LOG_DEFAULT,
            ("--log-mode", "--log-group"),
        )?;
        let endpoint = match (args.unix, args.tcp) {
            (Some(path), _) => EndpointSpec::Unix { path, access },
            (None, Some(tcp)) => EndpointSpec::Tcp(parse_tcp(&tcp)?),
            (None, None) => EndpointSpec::Pty {
                link: args.pty_link,
            },
        };
        let mut ports = vec![PortConfig {
            name: None,
            endpoint,
            log: args.log,
        }];
        for spec in &args.ports {
            let port = parse_port(spec, access)?;
            if ports.iter().any(|p| p.name == port.name) {
                return Err(ConfigError::DuplicateName(port.name.unwrap_or_default()));
            }
            ports.push(port);
        }
        if ports.len() > MAX_PORTS {
            return Err(ConfigError::TooManyPorts);
        }
        if args.history > 16 * 1024 {
            return Err(ConfigError::HistoryTooLarge(args.history));
        }
        Ok(Config {
            listen,
            ports,
            history: args.history * 1024,
            log_access,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["vhost-user-console", "--socket-path", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| ConfigError::BadTcp(e.to_string()))?;
        Config::try_from(args)
    }

    #[test]
    fn defaults_to_a_pty_console() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].endpoint, EndpointSpec::Pty { link: None });
        assert_eq!(c.history, 64 * 1024);
    }

    #[test]
    fn tcp_defaults_to_localhost() {
        let c = config(&["--tcp", "4555"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.ports[0].endpoint,
            EndpointSpec::Tcp("127.0.0.1:4555".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert!(config(&["--tcp", "nowhere"]).is_err());
    }

    #[test]
    fn endpoints_are_exclusive() {
        assert!(matches!(
            config(&["--unix", "/a", "--tcp", "1"]),
            Err(ConfigError::ExclusiveEndpoints)
        ));
        assert!(matches!(
            config(&["--unix", "/a", "--pty-link", "/b"]),
            Err(ConfigError::LinkWithoutPty)
        ));
    }

    #[test]
    fn endpoint_and_log_access() {
        let c = config(&["--unix", "/a"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.ports[0].endpoint,
            EndpointSpec::Unix {
                path: "/a".into(),
                access: FileAccess {
                    mode: 0o660,
                    gid: None
                }
            }
        );
        assert_eq!(c.log_access.mode, 0o640);
        let c = config(&[
            "--unix",
            "/a",
            "--endpoint-mode",
            "0600",
            "--endpoint-group",
            "0",
            "--log-mode",
            "600",
            "--log-group",
            "root",
            "--port",
            "name=p,unix=/b",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let access = FileAccess {
            mode: 0o600,
            gid: Some(0),
        };
        assert_eq!(
            c.ports[1].endpoint,
            EndpointSpec::Unix {
                path: "/b".into(),
                access
            }
        );
        assert_eq!(c.log_access, access);
        assert!(matches!(
            config(&["--log-mode", "rw"]),
            Err(ConfigError::BadMode {
                flag: "--log-mode",
                ..
            })
        ));
        assert!(matches!(
            config(&["--endpoint-group", "no-such-group-here"]),
            Err(ConfigError::NoSuchGroup { .. })
        ));
    }

    #[test]
    fn named_ports_parse() {
        let c = config(&[
            "--port",
            "name=org.example.agent,unix=/run/agent.sock,log=/tmp/a.log",
            "--port",
            "name=b,tcp=127.0.0.1:0",
            "--port",
            "name=c,pty=/tmp/c",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.ports.len(), 4);
        assert_eq!(c.ports[1].name.as_deref(), Some("org.example.agent"));
        assert_eq!(
            c.ports[1].endpoint,
            EndpointSpec::Unix {
                path: "/run/agent.sock".into(),
                access: FileAccess::ENDPOINT_DEFAULT
            }
        );
        assert_eq!(c.ports[1].log, Some(PathBuf::from("/tmp/a.log")));
        assert_eq!(
            c.ports[3].endpoint,
            EndpointSpec::Pty {
                link: Some("/tmp/c".into())
            }
        );
        for bad in [
            "unix=/x",
            "name=a",
            "name=a,unix=/x,tcp=1",
            "name=a,bogus=1",
            "name=,pty",
        ] {
            assert!(
                matches!(config(&["--port", bad]), Err(ConfigError::BadPort { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            config(&["--port", "name=a,pty", "--port", "name=a,pty"]),
            Err(ConfigError::DuplicateName(_))
        ));
    }
}
