//! Live migration as the VMM sees it: the dirty-page log a frontend shares with a backend
//! (SET_LOG_BASE, VHOST_F_LOG_ALL), and a QMP client to drive QEMU's own migration.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use crate::{Result, TestVmm};

/// `VHOST_F_LOG_ALL`: the frontend asks the backend to log its writes to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// The log's page (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// The dirty-page log as a frontend shares it: one bit per 4 KiB page of guest-physical
/// address space, in a memfd the backend maps.
pub struct DirtyLog {
    pub file: File,
    pub size: u64,
}

impl DirtyLog {
    /// A zeroed log covering guest-physical addresses `[0, covers)`.
    pub fn new(covers: u64) -> Result<DirtyLog> {
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-user-test-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        let size = covers.div_ceil(LOG_PAGE).div_ceil(8);
        file.set_len(size)?;
        Ok(DirtyLog { file, size })
    }

    /// SET_LOG_BASE's description of this log.
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The guest page numbers marked dirty, in order.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        let mut bits = vec![0u8; self.size as usize];
        self.file.read_exact_at(&mut bits, 0)?;
        let mut pages = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.push(i as u64 * 8 + bit);
                }
            }
        }
        Ok(pages)
    }

    /// Clears every bit (what QEMU does after each pass over the log).
    pub fn clear(&self) -> Result<()> {
        self.file.write_all_at(&vec![0u8; self.size as usize], 0)?;
        Ok(())
    }
}

/// The pages `[gpa, gpa + len)` touches.
pub fn pages_of(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    gpa / LOG_PAGE..=(gpa + len.max(1) - 1) / LOG_PAGE
}

impl TestVmm {
    /// Every later request waits for the backend's acknowledgement (REPLY_ACK must have been
    /// negotiated): a feature change is in force before the test kicks a queue.
    pub fn acknowledge_every_request(&mut self) {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    /// SET_LOG_BASE with `log`.
    pub fn set_log(&mut self, log: &DirtyLog) -> Result<()> {
        self.frontend.set_log_base(0, Some(log.region()))?;
        Ok(())
    }

    /// SET_FEATURES with or without VHOST_F_LOG_ALL (what QEMU sends when a migration starts
    /// and when it ends).
    pub fn log_all(&mut self, on: bool) -> Result<()> {
        if on {
            self.acked_features |= VHOST_F_LOG_ALL;
        } else {
            self.acked_features &= !VHOST_F_LOG_ALL;
        }
        self.frontend.set_features(self.acked_features)?;
        Ok(())
    }
}

/// A QMP connection to QEMU (`-qmp unix:PATH,server=on,wait=off`), capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path`, waiting up to `timeout` for QEMU to create it.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()).into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}").into());
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err("QEMU closed the QMP connection".into());
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` and returns its `return` value; events that arrive meanwhile are skipped.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command}: {error}").into());
            }
        }
    }
}

/// What QEMU's `query-migrate` reported for a completed migration.
#[derive(Debug, Clone)]
pub struct MigrationStats {
    /// How long the guest was stopped (ms): the last pass over dirty memory, device state,
    /// and stopping and starting the devices (the backends' GET_VRING_BASE drain included).
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// RAM sent, in bytes.
    pub transferred: u64,
    /// Passes over the dirty log.
    pub dirty_sync_count: u64,
}

/// How fast a migration may send (bytes/s) and how long it may stop the guest at the end.
#[derive(Debug, Clone, Copy)]
pub struct MigrationLimits {
    pub bandwidth: u64,
    pub downtime_ms: u64,
}

impl MigrationLimits {
    /// As fast as this machine goes (both QEMUs are here), with QEMU's default downtime limit.
    pub const FULL_SPEED: MigrationLimits = MigrationLimits {
        bandwidth: 4 << 30,
        downtime_ms: 300,
    };

    /// Sets the limits of `source`'s migrations (also while one runs).
    pub fn apply(self, source: &mut Qmp) -> Result<()> {
        source.execute(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": self.bandwidth, "downtime-limit": self.downtime_ms }),
        )?;
        Ok(())
    }
}

/// Starts migrating the VM behind `source` to `uri` within `limits`.
pub fn start_migration(source: &mut Qmp, uri: &str, limits: MigrationLimits) -> Result<()> {
    limits.apply(source)?;
    source.execute("migrate", serde_json::json!({ "uri": uri }))?;
    Ok(())
}

/// `query-migrate`, failing if the migration failed or was cancelled: (status, everything).
pub fn query_migrate(source: &mut Qmp) -> Result<(String, serde_json::Value)> {
    let info = source.execute("query-migrate", serde_json::json!({}))?;
    let status = info
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string();
    if status == "failed" || status == "cancelled" {
        return Err(format!("migration {status}: {info}").into());
    }
    Ok((status, info))
}

/// Waits until QEMU has made `passes` passes over the dirty log (the first pass over all of
/// memory is done when `passes` is 2).
pub fn wait_dirty_syncs(source: &mut Qmp, passes: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, info) = query_migrate(source)?;
        let syncs = info
            .get("ram")
            .and_then(|ram| ram.get("dirty-sync-count"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if syncs >= passes {
            return Ok(());
        }
        if status == "completed" {
            return Err(format!("the migration completed after {syncs} passes").into());
        }
        if Instant::now() > deadline {
            return Err(format!("{syncs} dirty-log passes after {timeout:?}: {info}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to `timeout`) until QEMU reports the migration completed.
pub fn wait_migrated(source: &mut Qmp, timeout: Duration) -> Result<MigrationStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, info) = query_migrate(source)?;
        if status == "completed" {
            let number = |key: &str| info.get(key).and_then(serde_json::Value::as_u64);
            let ram = |key: &str| {
                info.get("ram")
                    .and_then(|ram| ram.get(key))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            return Ok(MigrationStats {
                downtime_ms: number("downtime")
                    .ok_or_else(|| format!("query-migrate has no downtime: {info}"))?,
                total_ms: number("total-time").unwrap_or(0),
                transferred: ram("transferred"),
                dirty_sync_count: ram("dirty-sync-count"),
            });
        }
        if Instant::now() > deadline {
            return Err(format!("migration not completed after {timeout:?}: {info}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `-incoming`).
pub fn free_tcp_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
