//! Command line → validated [`Config`]. All checks happen here, once.

use std::path::PathBuf;

use clap::Parser;
use vhost_user_common::cli::CliError;
use vhost_user_common::{ListenArgs, ListenConfig};

use crate::disk::DiskOptions;
use crate::executor::EngineKind;
use crate::qcow2::ImageFormat;
use crate::rbd::options::{parse_spec, RbdOptions};
use crate::request::ID_BYTES;

/// The longest `--poll-us` accepted.
pub const MAX_POLL_US: u32 = 10_000;

/// vhost-user virtio-blk backend: serves a file or block device to a VMM over a UNIX socket.
#[derive(Parser, Debug, Clone)]
#[command(name = "vhost-user-blk", version, about, long_about = None)]
pub struct Args {
    #[command(flatten)]
    pub listen: ListenArgs,

    /// Backing file or block device.
    #[arg(
        long,
        short = 'f',
        value_name = "PATH",
        required_unless_present_any = ["print_capabilities", "rbd"]
    )]
    pub file: Option<PathBuf>,

    /// What --file holds: raw (its bytes are the disk's) or a qcow2 image. Never guessed: a guest
    /// could write a qcow2 header into a raw disk and name host files as its backing file.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = ImageFormat::Raw)]
    pub format: ImageFormat,

    /// qcow2: use this backing file (opened read-only) instead of the one the image names.
    #[arg(long, value_name = "PATH")]
    pub backing: Option<PathBuf>,

    /// qcow2: the backing file's format, for images that do not record it (or to override it).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub backing_format: Option<ImageFormat>,

    /// A Ceph RBD image instead of a file, as rbd(8) names it; a snapshot (@SNAP) is served
    /// read-only. Needs a build with the `rbd` feature (the Debian package has it).
    #[arg(long, value_name = "POOL[/NAMESPACE]/IMAGE[@SNAP]", conflicts_with_all = ["file", "direct"])]
    pub rbd: Option<String>,

    /// The RBD cluster's ceph.conf [default: librados's search: $CEPH_CONF,
    /// /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf].
    #[arg(long, value_name = "PATH")]
    pub rbd_conf: Option<PathBuf>,

    /// The Ceph client id to connect as (`admin` is client.admin) [default: admin].
    #[arg(long, value_name = "ID")]
    pub rbd_id: Option<String>,

    /// Keyring holding the client's key [default: the configuration's `keyring`].
    #[arg(long, value_name = "PATH")]
    pub rbd_keyring: Option<PathBuf>,

    /// Give up starting when the cluster's monitors do not answer within this time.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub rbd_connect_timeout: u32,

    /// Fail a request that waited this long for the cluster (OSDs down) with an I/O error;
    /// 0 waits as long as it takes, as a local disk would.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub rbd_io_timeout: u32,

    /// Export the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    pub readonly: bool,

    /// Open the backing store with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Maximum size of each queue (a power of two, at most 32768).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes) [default: derived from the
    /// backing file's device and inode].
    #[arg(long, value_name = "S")]
    pub serial: Option<String>,

    /// Logical block size presented to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub logical_block_size: u32,

    /// I/O engine for reads, writes and flushes.
    #[arg(long, value_enum, default_value_t = EngineKind::IoUring)]
    pub io_engine: EngineKind,

    /// After serving requests, each queue thread busy-polls the queue (and its io_uring) for
    /// this many microseconds before it sleeps: lower latency without guest notifications, at
    /// the cost of up to one busy CPU per active queue. 0 disables polling.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    pub poll_us: u32,
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub disk: DiskOptions,
    /// `--rbd`: the image to serve instead of `disk`.
    pub rbd: Option<RbdOptions>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Option<String>,
    pub logical_block_size: u32,
    pub engine: EngineKind,
    /// Busy-poll time after work (zero: no polling).
    pub poll: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Listen(#[from] CliError),
    #[error("--file is required: the backing file or block device to export")]
    NoFile,
    #[error("--rbd {0:?}: {1}")]
    RbdSpec(String, String),
    #[error(
        "--rbd-conf, --rbd-id and --rbd-keyring describe the image of --rbd, which is missing"
    )]
    RbdOnly,
    #[error("--rbd-connect-timeout {0}: must be between 1 and 3600 seconds")]
    RbdConnectTimeout(u32),
    #[error("--num-queues {0}: must be between 1 and 64")]
    NumQueues(u16),
    #[error("--queue-size {0}: must be a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("--serial {0:?} is {1} bytes; virtio-blk serials are at most 20 bytes")]
    SerialTooLong(String, usize),
    #[error("--logical-block-size {0}: must be 512 or 4096")]
    LogicalBlockSize(u32),
    #[error("--poll-us {0}: must be at most {MAX_POLL_US} (10 ms)")]
    PollUs(u32),
    #[error("{0} applies to qcow2 images only: add --format qcow2")]
    QcowOnly(&'static str),
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        let rbd = args
            .rbd
            .as_deref()
            .map(|spec| rbd_options(spec, &args))
            .transpose()?;
        let rbd_flags =
            args.rbd_conf.is_some() || args.rbd_id.is_some() || args.rbd_keyring.is_some();
        if rbd.is_none() && rbd_flags {
            return Err(ConfigError::RbdOnly);
        }
        let path = match (args.file, &rbd) {
            (Some(path), _) => path,
            (None, Some(_)) => PathBuf::new(),
            (None, None) => return Err(ConfigError::NoFile),
        };
        if !(1..=64).contains(&args.num_queues) {
            return Err(ConfigError::NumQueues(args.num_queues));
        }
        if args.queue_size < 2 || !args.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        if let Some(serial) = &args.serial {
            if serial.len() > ID_BYTES {
                return Err(ConfigError::SerialTooLong(serial.clone(), serial.len()));
            }
        }
        if args.logical_block_size != 512 && args.logical_block_size != 4096 {
            return Err(ConfigError::LogicalBlockSize(args.logical_block_size));
        }
        if args.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(args.poll_us));
        }
        if args.format != ImageFormat::Qcow2 {
            if args.backing.is_some() {
                return Err(ConfigError::QcowOnly("--backing"));
            }
            if args.backing_format.is_some() {
                return Err(ConfigError::QcowOnly("--backing-format"));
            }
        }
        Ok(Config {
            listen: args.listen.listen_config()?,
            disk: DiskOptions {
                path,
                readonly: args.readonly,
                direct: args.direct,
                format: args.format,
                backing: args.backing,
                backing_format: args.backing_format,
            },
            rbd,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial: args.serial,
            logical_block_size: args.logical_block_size,
            engine: args.io_engine,
            poll: std::time::Duration::from_micros(u64::from(args.poll_us)),
        })
    }
}

/// `--rbd` and its companions → where the image is and how to reach its cluster.
fn rbd_options(spec: &str, args: &Args) -> Result<RbdOptions, ConfigError> {
    let (pool, namespace, image, snap) =
        parse_spec(spec).map_err(|e| ConfigError::RbdSpec(spec.to_string(), e))?;
    if !(1..=3600).contains(&args.rbd_connect_timeout) {
        return Err(ConfigError::RbdConnectTimeout(args.rbd_connect_timeout));
    }
    Ok(RbdOptions {
        pool,
        namespace,
        image,
        snap,
        conf: args.rbd_conf.clone(),
        id: args.rbd_id.clone().unwrap_or_else(|| "admin".into()),
        keyring: args.rbd_keyring.clone(),
        readonly: args.readonly,
        connect_timeout: std::time::Duration::from_secs(args.rbd_connect_timeout.into()),
        io_timeout: std::time::Duration::from_secs(args.rbd_io_timeout.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec![
            "vhost-user-blk",
            "--socket-path",
            "/tmp/x.sock",
            "--file",
            "/tmp/d.img",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_sane() {
        let config = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.num_queues, 1);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.engine, EngineKind::IoUring);
        assert!(!config.disk.readonly);
        assert_eq!(config.disk.format, ImageFormat::Raw, "never guessed");
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        assert!(parse(&["--queue-size", "100"]).is_err_and(|e| e.contains("--queue-size")));
        assert!(parse(&["--num-queues", "0"]).is_err_and(|e| e.contains("--num-queues")));
        assert!(
            parse(&["--serial", "123456789012345678901"]).is_err_and(|e| e.contains("20 bytes"))
        );
        assert!(parse(&["--logical-block-size", "1024"]).is_err_and(|e| e.contains("512 or 4096")));
        assert!(parse(&["--io-engine", "sync"]).is_ok_and(|c| c.engine == EngineKind::Sync));
        assert!(parse(&["--poll-us", "20000"]).is_err_and(|e| e.contains("--poll-us")));
        assert!(parse(&["--backing", "/b"]).is_err_and(|e| e.contains("--format qcow2")));
        assert!(parse(&[
            "--format",
            "qcow2",
            "--backing",
            "/b",
            "--backing-format",
            "raw"
        ])
        .is_ok_and(|c| c.disk.backing_format == Some(ImageFormat::Raw)));
        assert!(parse(&["--format", "vmdk"]).is_err());
        assert!(parse(&["--poll-us", "50"])
            .is_ok_and(|c| c.poll == std::time::Duration::from_micros(50)));
    }

    fn parse_rbd(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["vhost-user-blk", "--socket-path", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn rbd_takes_the_place_of_the_file() {
        let config = parse_rbd(&["--rbd", "p/ns/img@s", "--rbd-id", "vm1"])
            .unwrap_or_else(|e| panic!("{e}"));
        let rbd = config.rbd.unwrap_or_else(|| panic!("no rbd options"));
        assert_eq!(rbd.name(), "p/ns/img@s");
        assert_eq!(rbd.id, "vm1");
        assert!(rbd.read_only(), "a snapshot is served read-only");
        assert!(parse_rbd(&["--rbd", "p/img", "--file", "/x"]).is_err());
        assert!(parse_rbd(&["--rbd", "p/img", "--direct"]).is_err());
        assert!(parse_rbd(&["--rbd-conf", "/etc/ceph/ceph.conf", "--file", "/x"]).is_err());
        assert!(parse_rbd(&["--rbd", "img"]).is_err_and(|e| e.contains("--rbd \"img\"")));
        assert!(parse_rbd(&["--rbd", "p/i", "--rbd-connect-timeout", "0"])
            .is_err_and(|e| e.contains("--rbd-connect-timeout")));
    }
}
