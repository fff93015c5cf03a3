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
