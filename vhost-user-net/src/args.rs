//! Command line → validated [`Config`]. Every check happens here, once.

use std::net::Ipv4Addr;

use clap::Parser;
use vhost_user_common::cli::CliError;
use vhost_user_common::{ListenArgs, ListenConfig};

use crate::tap::LinkSetup;

/// The most queue pairs we serve (each one is a worker thread and a tap queue).
pub const MAX_QUEUE_PAIRS: u16 = 64;

/// vhost-user virtio-net backend: guest frames go out through a tap interface.
#[derive(Parser, Debug, Clone, Default)]
#[command(version, about)]
pub struct Args {
    #[command(flatten)]
    pub listen: ListenArgs,

    /// Tap interface to attach to; created when it does not exist.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// Queue pairs (RX + TX), each served by its own thread and tap queue.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queue_pairs: u16,

    /// The guest's MAC address [default: a random locally administered one].
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU offered to the guest, and set on the tap [default: 1500, tap left as it is].
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u16>,

    /// Give the tap this IPv4 address (e.g. 192.168.100.1/24) and bring it up.
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub host_ip: Option<String>,

    /// Bring the tap up (without an address).
    #[arg(long)]
    pub up: bool,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: ListenConfig,
    pub tap: String,
    pub queue_pairs: u16,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub link: LinkSetup,
}

/// What is wrong with the command line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Listen(#[from] CliError),
    #[error("no tap interface given: pass --tap NAME (an existing tap, or one to create)")]
    NoTap,
    #[error("--tap {0:?}: interface names are 1 to 15 characters, without '/', ':' or spaces")]
    BadTapName(String),
    #[error("--queue-pairs {0}: must be between 1 and {MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("--mac {0:?}: expected six hex bytes such as 52:54:00:12:34:56, unicast")]
    BadMac(String),
    #[error("--mtu {0}: must be between 68 and 65535")]
    Mtu(u16),
    #[error(
        "--host-ip {0:?}: expected an IPv4 address with a prefix length, such as 192.168.100.1/24"
    )]
    HostIp(String),
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses are refused.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((addr, prefix))
}

/// A locally administered unicast MAC from the kernel's random pool (52:54:00 is QEMU's).
fn random_mac() -> [u8; 6] {
    let mut bytes = [0u8; 3];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the valid buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let pid = std::process::id().to_le_bytes();
        bytes.copy_from_slice(&pid[..3]);
    }
    [0x52, 0x54, 0x00, bytes[0], bytes[1], bytes[2]]
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        let listen = args.listen.listen_config()?;
        let tap = args.tap.ok_or(ConfigError::NoTap)?;
        if !valid_ifname(&tap) {
            return Err(ConfigError::BadTapName(tap));
        }
        if args.queue_pairs == 0 || args.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(args.queue_pairs));
        }
        let mac = match &args.mac {
            Some(text) => parse_mac(text).ok_or_else(|| ConfigError::BadMac(text.clone()))?,
            None => random_mac(),
        };
        if let Some(mtu) = args.mtu {
            if mtu < 68 {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let address = match &args.host_ip {
            Some(text) => Some(parse_cidr(text).ok_or_else(|| ConfigError::HostIp(text.clone()))?),
            None => None,
        };
        Ok(Config {
            listen,
            tap,
            queue_pairs: args.queue_pairs,
            mac,
            mtu: args.mtu.unwrap_or(1500),
            link: LinkSetup {
                up: args.up || address.is_some(),
                address,
                mtu: args.mtu,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["vhost-user-net", "--socket-path", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn full_command_line_validates() {
        let config = Config::try_from(args(&[
            "--tap",
            "tap0",
            "--queue-pairs",
            "4",
            "--mac",
            "52:54:00:ab:cd:ef",
            "--mtu",
            "9000",
            "--host-ip",
            "192.168.100.1/24",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.queue_pairs, 4);
        assert_eq!(config.mac, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(config.mtu, 9000);
        assert_eq!(
            config.link.address,
            Some((Ipv4Addr::new(192, 168, 100, 1), 24))
        );
        assert!(config.link.up);
    }

    #[test]
    fn bad_values_are_refused() {
        let err = |extra: &[&str]| Config::try_from(args(extra)).err();
        assert!(matches!(err(&[]), Some(ConfigError::NoTap)));
        assert!(matches!(
            err(&["--tap", "a-very-long-name-x"]),
            Some(ConfigError::BadTapName(_))
        ));
        assert!(matches!(
            err(&["--tap", "t", "--queue-pairs", "0"]),
            Some(ConfigError::QueuePairs(0))
        ));
        assert!(matches!(
            err(&["--tap", "t", "--mac", "01:00:5e:00:00:01"]),
            Some(ConfigError::BadMac(_))
        ));
        assert!(matches!(
            err(&["--tap", "t", "--mtu", "60"]),
            Some(ConfigError::Mtu(60))
        ));
        assert!(matches!(
            err(&["--tap", "t", "--host-ip", "10.0.0.1"]),
            Some(ConfigError::HostIp(_))
        ));
    }

    #[test]
    fn default_mac_is_local_unicast() {
        let config = Config::try_from(args(&["--tap", "t"])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.mac[0] & 1, 0);
        assert_eq!(config.mac[..3], [0x52, 0x54, 0x00]);
        assert_eq!(config.queue_pairs, 1);
    }
}
