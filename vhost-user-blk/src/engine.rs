//! How requests are executed: an io_uring engine with many requests in flight per queue, and a
//! synchronous engine (the fallback where io_uring is unavailable, and the path for the rare
//! operations io_uring gains nothing on: GET_ID, DISCARD, WRITE_ZEROES).
//!
//! Both report [`Completion`]s; the vhost glue writes the status and fills the used ring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vhost_user_common::GuestMemory;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::Disk;
use crate::request::{
    execute_sync, IoBuffers, Operation, Request, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};

/// Which engine runs reads, writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring: asynchronous, batched submission and completion.
    #[value(name = "io_uring", alias = "uring")]
    IoUring,
    /// preadv/pwritev in the queue's worker thread.
    Sync,
}

/// A finished request, ready to be returned to the guest.
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
}

/// Writes the status byte of `request` into guest memory; a failure (memory changed under us)
/// is logged, the chain is still returned.
pub fn write_status(mem: &GuestMemory, request: &Request, status: u8) {
    if let Err(e) = mem.write_obj(status, request.status) {
        log::warn!("cannot write request status: {e}");
    }
}

struct InFlight {
    head: u16,
    request: Request,
    buffers: Option<IoBuffers>,
    /// Keeps the guest memory the iovecs point into mapped until the kernel is done with them.
    mem: Arc<GuestMemory>,
    expected: usize,
}

/// One io_uring per queue; its eventfd wakes the queue's worker thread on completions.
pub struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    unsubmitted: usize,
}

impl UringEngine {
    pub fn new(queue_size: u16) -> io::Result<UringEngine> {
        let entries = u32::from(queue_size).next_power_of_two().clamp(8, 32768);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let mut slots = Vec::new();
        slots.resize_with(usize::from(queue_size).max(1), || None);
        Ok(UringEngine {
            ring,
            eventfd,
            slots,
            in_flight: 0,
            unsubmitted: 0,
        })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a read, write or flush; other operations run synchronously right away.
    /// Returns a completion when the request finished (or failed) without going to the ring.
    pub fn push(
        &mut self,
        head: u16,
        request: Request,
        disk: &Disk,
        mem: Arc<GuestMemory>,
        serial: &[u8],
        write_through: bool,
    ) -> Option<Completion> {
        let used_len = request.used_len();
        let finish_now = |status: u8| {
            write_status(&mem, &request, status);
            Some(Completion { head, used_len })
        };
        let slot = usize::from(head);
        if slot >= self.slots.len() || self.slots[slot].is_some() {
            // A head can only be in flight once; a guest that reuses it is broken or hostile.
            log::warn!("descriptor {head} made available again while in flight; ignored");
            return None;
        }
        let fd = types::Fd(disk.raw_fd());
        let (entry, buffers, expected) = match &request.op {
            Operation::Read { offset, data, len } | Operation::Write { offset, data, len } => {
                let is_write = matches!(request.op, Operation::Write { .. });
                let buffers = match IoBuffers::new(disk, &mem, data, *len, is_write) {
                    Ok(b) => b,
                    Err(e) => {
                        log::warn!("cannot map request buffers: {e}");
                        return finish_now(VIRTIO_BLK_S_IOERR);
                    }
                };
                let iov = buffers.iovecs.as_ptr();
                let count = buffers.iovecs.len() as u32;
                let entry = if is_write {
                    let flags = if write_through { libc::RWF_DSYNC } else { 0 };
                    opcode::Writev::new(fd, iov, count)
                        .offset(*offset)
                        .rw_flags(flags)
                        .build()
                } else {
                    opcode::Readv::new(fd, iov, count).offset(*offset).build()
                };
                (entry, Some(buffers), *len as usize)
            }
            Operation::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
                0,
            ),
            _ => {
                let status = execute_sync(&request, disk, &mem, serial, write_through);
                return finish_now(status);
            }
        };
        let entry = entry.user_data(u64::from(head));
        // SAFETY: the iovecs and the buffers they point to (guest memory kept mapped by `mem`,
        // or the bounce buffer) are owned by the slot below and live until the completion for
        // this entry is reaped (also on drop, which waits for all completions).
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() }
            || (self.submit().is_ok()
            // SAFETY: as above.
                && unsafe { self.ring.submission().push(&entry).is_ok() });
        if !pushed {
            log::warn!("io_uring submission queue full; failing request");
            return finish_now(VIRTIO_BLK_S_IOERR);
        }
        self.slots[slot] = Some(InFlight {
            head,
            request,
            buffers,
            mem,
            expected,
        });
        self.in_flight += 1;
        self.unsubmitted += 1;
        None
    }

    /// One io_uring_enter for everything queued since the last call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        // EBUSY/EAGAIN mean completion-queue pressure: the caller reaps, then submits again.
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
            }
        }
    }

    /// Whether completions are waiting to be reaped (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Resets the completion eventfd, so that epoll reports only completions after this.
    pub fn clear_eventfd(&self) {
        let _ = self.eventfd.read();
    }

    /// Collects finished requests into `out`.
    pub fn reap(
        &mut self,
        disk: &Disk,
        serial: &[u8],
        write_through: bool,
        out: &mut Vec<Completion>,
    ) {
        // Borrows only the ring, so the slots can be updated while iterating: no allocation.
        for cqe in self.ring.completion() {
            let (user_data, result) = (cqe.user_data(), cqe.result());
            let Some(entry) = usize::try_from(user_data)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
                .and_then(Option::take)
            else {
                log::error!("io_uring completion for unknown request {user_data}");
                continue;
            };
            self.in_flight -= 1;
            let status = if result < 0 {
                log::warn!(
                    "{}: io_uring request failed: {}",
                    disk.path().display(),
                    io::Error::from_raw_os_error(-result)
                );
                VIRTIO_BLK_S_IOERR
            } else if (result as usize) < entry.expected {
                // Short transfer (rare: signals, some filesystems): redo it synchronously,
                // which continues until complete or fails for real.
                execute_sync(&entry.request, disk, &entry.mem, serial, write_through)
            } else {
                match (&entry.request.op, &entry.buffers) {
                    (Operation::Read { data, .. }, Some(buffers)) => {
                        match buffers.finish_read(&entry.mem, data) {
                            Ok(()) => VIRTIO_BLK_S_OK,
                            Err(e) => {
                                log::warn!("cannot copy read data to the guest: {e}");
                                VIRTIO_BLK_S_IOERR
                            }
                        }
                    }
                    _ => VIRTIO_BLK_S_OK,
                }
            };
            write_status(&entry.mem, &entry.request, status);
            out.push(Completion {
                head: entry.head,
                used_len: entry.request.used_len(),
            });
        }
    }

    /// Waits until every submitted request has completed, collecting them into `out`.
    pub fn drain(
        &mut self,
        disk: &Disk,
        serial: &[u8],
        write_through: bool,
        out: &mut Vec<Completion>,
    ) {
        let _ = self.submit();
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring wait failed while draining: {e}");
                    break;
                }
            }
            self.clear_eventfd();
            self.reap(disk, serial, write_through, out);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory or bounce buffers owned by the slots:
        // wait for it before they are freed.
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => break,
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for user_data in done {
                if let Some(slot) = usize::try_from(user_data)
                    .ok()
                    .and_then(|i| self.slots.get_mut(i))
                {
                    if slot.take().is_some() {
                        self.in_flight -= 1;
                    }
                }
            }
        }
    }
}
