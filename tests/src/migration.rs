//! Live migration from the VMM's side: the dirty-page log a frontend shares with a backend
//! (SET_LOG_BASE with a memfd, as QEMU does), the SEND_RARP request, and two QEMUs migrating a
//! guest between them over QMP ([`MigratingVm`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use crate::Result;

/// The page size of the vhost-user dirty log: one bit per 4 KiB page of guest memory.
pub const LOG_PAGE: u64 = 0x1000;
/// `VHOST_F_LOG_ALL`: the frontend acks it while a migration runs.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// A dirty-page log in a memfd, as QEMU shares it with SET_LOG_BASE.
pub struct DirtyLog {
    file: File,
    len: u64,
}

impl DirtyLog {
    /// A zeroed log covering `ram_size` bytes of guest memory (QEMU sizes it in u64 words).
    pub fn new(ram_size: u64) -> Result<DirtyLog> {
        let pages = ram_size.div_ceil(LOG_PAGE);
        let len = pages.div_ceil(64) * 8;
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-user-test-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        file.set_len(len)?;
        Ok(DirtyLog { file, len })
    }

    /// Sends SET_LOG_BASE with this log (the backend must have LOG_SHMFD acked).
    pub fn attach(&self, frontend: &Frontend) -> Result<()> {
        frontend.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: self.len,
                mmap_offset: 0,
                mmap_handle: self.file.as_raw_fd(),
            }),
        )?;
        Ok(())
    }

    /// The guest page numbers marked dirty.
    pub fn dirty_pages(&self) -> Result<BTreeSet<u64>> {
        let mut bytes = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        let mut pages = BTreeSet::new();
        for (i, byte) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        Ok(pages)
    }

    /// Clears every mark (what QEMU does after each pass over the log).
    pub fn clear(&self) -> Result<()> {
        self.file.write_all_at(&vec![0u8; self.len as usize], 0)?;
        Ok(())
    }
}

/// The guest pages `[gpa, gpa + len)` touches.
pub fn pages(gpa: u64, len: u64) -> std::ops::Range<u64> {
    let first = gpa / LOG_PAGE;
    if len == 0 {
        return first..first;
    }
    first..(gpa + len - 1) / LOG_PAGE + 1
}

/// Sends `VHOST_USER_SEND_RARP` for `mac` on the frontend's connection, with NEED_REPLY, and
/// returns the backend's answer (0: done). `vhost`'s frontend has no method for it: the message
/// is written by hand (header: request 19, flags version 1 | NEED_REPLY, size 8; payload: the
/// MAC in the first 6 bytes of a u64), with nothing else in flight on the connection.
pub fn send_rarp(frontend: &Frontend, mac: [u8; 6]) -> Result<u64> {
    const SEND_RARP: u32 = 19;
    const VERSION: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&SEND_RARP.to_le_bytes());
    msg.extend_from_slice(&(VERSION | NEED_REPLY).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&mac);
    msg.extend_from_slice(&[0, 0]);
    let fd = frontend.as_raw_fd();
    // SAFETY: `msg` is valid for reads of its length during the call.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if sent != msg.len() as isize {
        return Err(format!("SEND_RARP: send: {}", std::io::Error::last_os_error()).into());
    }
    let mut reply = [0u8; 20];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < reply.len() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        // SAFETY: the rest of `reply` is valid for writes of its length during the call.
        let n = unsafe {
            libc::recv(
                fd,
                reply[got..].as_mut_ptr().cast(),
                reply.len() - got,
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return Err("SEND_RARP: the backend closed the connection".into());
        }
        if n > 0 {
            got += n as usize;
        } else if Instant::now() > deadline {
            return Err("SEND_RARP: no reply within 5 s".into());
        }
    }
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) != SEND_RARP || word(4) & REPLY == 0 || word(8) != 8 {
        return Err(format!("SEND_RARP: unexpected reply header {:?}", &reply[..12]).into());
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..]);
    Ok(u64::from_le_bytes(value))
}
