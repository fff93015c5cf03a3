//! How requests are executed, chosen once per queue ([`Executor`]):
//! - io_uring: many requests in flight, one `io_uring_enter` per batch, completions through an
//!   eventfd in the queue's epoll;
//! - inline: on memory file systems, where the kernel cannot do nonblocking I/O (io_uring would
//!   punt every request to a worker thread), requests run in the queue's thread, with large
//!   batches of reads shared with copy threads ([`crate::pool`]);
//! - sync: preadv/pwritev in the queue's thread (`--io-engine sync`, or no io_uring).
//!
//! Operations io_uring gains nothing on (GET_ID, DISCARD, WRITE_ZEROES) always run
//! synchronously. Every engine answers with [`Completion`]s, through [`Request::finish`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vhost_user_common::chain::{host_iovecs, Segment};
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_common::GuestMemory;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{AlignedBuf, Disk};
use crate::pool::{CopyPool, Offload, SPLIT_MIN_BYTES};
use crate::request::{
    Completion, Operation, Request, ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::store::Store;

/// Which engine runs reads, writes and flushes (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring: asynchronous, batched submission and completion.
    #[value(name = "io_uring", alias = "uring")]
    IoUring,
    /// preadv/pwritev in the queue's worker thread.
    Sync,
}

/// What every request of a device executes against: the backing store, the serial GET_ID
/// answers, and the write-cache mode the guest chose.
#[derive(Debug)]
pub struct ExecContext {
    store: Store,
    serial: Vec<u8>,
    /// Write-back cache on (the guest flushes); when off, every write is made durable.
    writeback: AtomicBool,
    /// Failed requests are logged through this: a guest can fail them at will (a qcow2
    /// image's metadata error fails every request that touches it).
    errors: RateLimit,
}

impl ExecContext {
    pub fn new(disk: Arc<Disk>, serial: Vec<u8>) -> ExecContext {
        ExecContext::with_store(Store::File(disk), serial)
    }

    pub fn with_store(store: Store, serial: Vec<u8>) -> ExecContext {
        ExecContext {
            store,
            serial,
            writeback: AtomicBool::new(true),
            errors: RateLimit::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// Whether `head` may start: its slot exists and is free. A head can only be in flight
    /// once; a guest that makes one available again is broken or hostile (logged at a bounded
    /// rate, the chain ignored).
    pub(crate) fn slot_is_free<T>(&self, slots: &[Option<T>], head: u16) -> bool {
        let free = slots.get(usize::from(head)).is_some_and(Option::is_none);
        if !free {
            self.errors.warn(format_args!(
                "descriptor {head} made available again while in flight; ignored"
            ));
        }
        free
    }

    pub fn write_through(&self) -> bool {
        !self.writeback()
    }
}

/// Host buffers for a read or write: the guest's own memory, or an aligned bounce buffer when
/// O_DIRECT needs alignment the guest's buffers don't have.
pub struct IoBuffers {
    pub iovecs: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
}

// SAFETY: the iovecs point into guest memory (kept mapped by the owner of this value, which
// holds an Arc of it) or into the owned bounce buffer; moving them between threads is fine.
unsafe impl Send for IoBuffers {}

impl IoBuffers {
    /// Prepares `data` (`len` bytes) for I/O on `disk`. For a write through a bounce buffer the
    /// guest data is copied in here.
    pub fn new(
        disk: &Disk,
        mem: &GuestMemory,
        data: &[Segment],
        len: u64,
        is_write: bool,
    ) -> std::io::Result<IoBuffers> {
        let mut iovecs = Vec::with_capacity(data.len());
        host_iovecs(mem, data.iter().copied(), &mut iovecs)?;
        let align = disk.direct_alignment();
        let aligned = iovecs.iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align)
        });
        if !disk.direct() || aligned {
            return Ok(IoBuffers {
                iovecs,
                bounce: None,
            });
        }
        let mut bounce = AlignedBuf::new(len as usize, align.max(4096))?;
        if is_write {
            let mut at = 0usize;
            for seg in data {
                let n = seg.len as usize;
                // The segments add up to `len`, the bounce buffer's size.
                let Some(dst) = bounce.as_mut_slice().get_mut(at..at + n) else {
                    break;
                };
                mem.read_slice(dst, seg.addr)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                at += n;
            }
        }
        let iovecs = vec![libc::iovec {
            iov_base: bounce.as_ptr().cast(),
            iov_len: len as usize,
        }];
        Ok(IoBuffers {
            iovecs,
            bounce: Some(bounce),
        })
    }

    /// After a read through a bounce buffer, copies the data out to the guest.
    pub fn finish_read(&self, mem: &GuestMemory, data: &[Segment]) -> std::io::Result<()> {
        let Some(bounce) = &self.bounce else {
            return Ok(());
        };
        let mut at = 0usize;
        for seg in data {
            let n = seg.len as usize;
            let Some(src) = bounce.as_slice().get(at..at + n) else {
                break;
            };
            mem.write_slice(src, seg.addr)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            at += n;
        }
        Ok(())
    }

    pub fn bounced(&self) -> bool {
        self.bounce.is_some()
    }
}

/// GET_ID: the serial into the guest's `len`-byte buffer `data`.
pub fn answer_get_id(
    ctx: &ExecContext,
    mem: &GuestMemory,
    data: &[Segment],
    len: u64,
) -> io::Result<()> {
    let mut id = [0u8; ID_BYTES];
    let n = ctx.serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&ctx.serial[..n]);
    let mut at = 0usize;
    for seg in data {
        let end = (at + seg.len as usize).min(len as usize);
        mem.write_slice(&id[at..end], seg.addr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        at = end;
    }
    Ok(())
}

/// Executes `request` synchronously and returns the status to report.
pub fn execute_sync(request: &Request, ctx: &ExecContext, mem: &GuestMemory) -> u8 {
    if let Operation::GetId { data, len } = &request.op {
        return match answer_get_id(ctx, mem, data, *len) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("get-id failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
    }
    let Some(disk) = ctx.store.file() else {
        // Only file stores have synchronous engines; others never come here.
        return VIRTIO_BLK_S_IOERR;
    };
    let result = match &request.op {
        Operation::Read { offset, data, len } => IoBuffers::new(disk, mem, data, *len, false)
            .and_then(|bufs| {
                // SAFETY: the iovecs point into `mem`'s guest regions (checked by the request
                // parser and `host_iovecs`) or into `bufs`' bounce buffer, all alive here.
                unsafe { disk.read_vectored_at(&bufs.iovecs, *offset)? };
                bufs.finish_read(mem, data)
            }),
        Operation::Write { offset, data, len } => IoBuffers::new(disk, mem, data, *len, true)
            .and_then(|bufs| {
                // SAFETY: as for reads.
                unsafe { disk.write_vectored_at(&bufs.iovecs, *offset, ctx.write_through()) }
            }),
        Operation::Flush => disk.flush(),
        Operation::GetId { .. } => Ok(()),
        Operation::Discard(ranges) => ranges
            .iter()
            .try_for_each(|r| disk.discard(r.offset, r.len)),
        Operation::WriteZeroes(ranges) => ranges
            .iter()
            .try_for_each(|r| disk.write_zeroes(r.offset, r.len, r.unmap)),
    };
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            ctx.errors.warn(format_args!(
                "{}: {:?} failed: {e}",
                disk.path().display(),
                kind_name(&request.op)
            ));
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// A short name for logs.
pub fn kind_name(op: &Operation) -> &'static str {
    match op {
        Operation::Read { .. } => "read",
        Operation::Write { .. } => "write",
        Operation::Flush => "flush",
        Operation::GetId { .. } => "get-id",
        Operation::Discard(_) => "discard",
        Operation::WriteZeroes(_) => "write-zeroes",
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
        ctx: &ExecContext,
        mem: &Arc<GuestMemory>,
    ) -> Option<Completion> {
        let Some(disk) = ctx.store.file() else {
            return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
        };
        if !ctx.slot_is_free(&self.slots, head) {
            return None;
        }
        let slot = usize::from(head);
        let (entry, buffers, expected) = match &request.op {
            Operation::Read { offset, data, len } | Operation::Write { offset, data, len } => {
                let is_write = matches!(request.op, Operation::Write { .. });
                // Where the bytes are on the host (a qcow2 image maps them); requests that need
                // the image's own code (cluster allocation, ...) run synchronously.
                let Some((fd, at)) = disk.direct_extent(*offset, *len, is_write) else {
                    let status = execute_sync(&request, ctx, mem);
                    return Some(request.finish(head, mem, status));
                };
                let fd = types::Fd(fd);
                let buffers = match IoBuffers::new(disk, mem, data, *len, is_write) {
                    Ok(b) => b,
                    Err(e) => {
                        log::warn!("cannot map request buffers: {e}");
                        return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
                    }
                };
                let iov = buffers.iovecs.as_ptr();
                let count = buffers.iovecs.len() as u32;
                let entry = if is_write {
                    let flags = if ctx.write_through() {
                        libc::RWF_DSYNC
                    } else {
                        0
                    };
                    opcode::Writev::new(fd, iov, count)
                        .offset(at)
                        .rw_flags(flags)
                        .build()
                } else {
                    opcode::Readv::new(fd, iov, count).offset(at).build()
                };
                (entry, Some(buffers), *len as usize)
            }
            Operation::Flush if !disk.flush_needs_sync_path() => (
                opcode::Fsync::new(types::Fd(disk.raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
                0,
            ),
            _ => {
                let status = execute_sync(&request, ctx, mem);
                return Some(request.finish(head, mem, status));
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
            return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
        }
        self.slots[slot] = Some(InFlight {
            head,
            request,
            buffers,
            mem: mem.clone(),
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
    pub fn reap(&mut self, ctx: &ExecContext, out: &mut Vec<Completion>) {
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
                    ctx.store.name(),
                    io::Error::from_raw_os_error(-result)
                );
                VIRTIO_BLK_S_IOERR
            } else if (result as usize) < entry.expected {
                // Short transfer (rare: signals, some filesystems): redo it synchronously,
                // which continues until complete or fails for real.
                execute_sync(&entry.request, ctx, &entry.mem)
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
            out.push(entry.request.finish(entry.head, &entry.mem, status));
        }
    }

    /// Waits until every submitted request has completed, collecting them into `out`.
    pub fn drain(&mut self, ctx: &ExecContext, out: &mut Vec<Completion>) {
        let _ = self.submit();
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring wait failed while draining: {e}");
                    break;
                }
            }
            self.clear_eventfd();
            self.reap(ctx, out);
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
                Err(e) => {
                    // Freeing the buffers now could let the kernel write into reused memory:
                    // leak them (and the guest memory mappings they hold) instead.
                    log::error!(
                        "io_uring: cannot wait for {} request(s) in flight ({e}); leaking their buffers",
                        self.in_flight
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
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

/// How one queue executes its requests, chosen once when the device is created.
pub enum Executor {
    /// io_uring: requests in flight, completions through [`Executor::eventfd`].
    Uring(Box<UringEngine>),
    /// On a memory file system, in the queue's thread; with copy threads, a large batch of
    /// reads is shared with them (`reads` collects the batch).
    Inline {
        offload: Option<Offload>,
        reads: Vec<(u16, Request)>,
    },
    /// preadv/pwritev in the queue's thread.
    Sync,
    /// librbd's asynchronous requests, completions through [`Executor::eventfd`].
    #[cfg(feature = "rbd")]
    Rbd(Box<crate::rbd::RbdEngine>),
}

/// Bytes `request` reads, if it is a read. (Only reads are shared with copy threads: writes
/// to one file take the inode's lock in the kernel, and measured slower when split.)
fn read_len(request: &Request) -> Option<u64> {
    match &request.op {
        Operation::Read { len, .. } => Some(*len),
        _ => None,
    }
}

impl Executor {
    /// The executor for one queue: `kind` as asked, or inline on memory file systems (with
    /// the device's copy threads, if any). Fails only when an io_uring cannot be set up.
    pub fn new(
        kind: EngineKind,
        memory_backed: bool,
        queue_size: u16,
        pool: Option<&Arc<CopyPool>>,
    ) -> io::Result<Executor> {
        Ok(match kind {
            EngineKind::Sync => Executor::Sync,
            EngineKind::IoUring if memory_backed => Executor::Inline {
                offload: pool.and_then(|pool| match Offload::new(pool.clone()) {
                    Ok(offload) => Some(offload),
                    Err(e) => {
                        log::warn!(
                            "cannot create a copy eventfd ({e}); reads run in the queue thread"
                        );
                        None
                    }
                }),
                reads: Vec::new(),
            },
            EngineKind::IoUring => Executor::Uring(Box::new(UringEngine::new(queue_size)?)),
        })
    }

    /// The eventfd that says completions are ready, for executors that have one.
    pub fn eventfd(&self) -> Option<RawFd> {
        match self {
            Executor::Uring(uring) => Some(uring.eventfd()),
            Executor::Inline {
                offload: Some(offload),
                ..
            } => Some(offload.eventfd()),
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => Some(rbd.eventfd()),
            _ => None,
        }
    }

    /// Starts `request` (chain `head`): queued on the io_uring, kept for the batch's shared
    /// reads, or executed right away. What finishes now goes to `out`.
    pub fn start(
        &mut self,
        ctx: &ExecContext,
        head: u16,
        request: Request,
        mem: &Arc<GuestMemory>,
        out: &mut Vec<Completion>,
    ) {
        match self {
            Executor::Uring(uring) => out.extend(uring.push(head, request, ctx, mem)),
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => out.extend(rbd.push(head, request, ctx, mem)),
            Executor::Inline {
                offload: Some(_),
                reads,
            } if read_len(&request).is_some() => reads.push((head, request)),
            Executor::Inline { .. } | Executor::Sync => {
                let status = execute_sync(&request, ctx, mem);
                out.push(request.finish(head, mem, status));
            }
        }
    }

    /// Ends a batch of [`Executor::start`]s: one `io_uring_enter` for what was queued, then
    /// whatever already completed (page-cache hits often have); or the batch's reads, shared
    /// with the copy threads when they are worth it. Returns how many requests completed.
    pub fn submit(
        &mut self,
        ctx: &Arc<ExecContext>,
        mem: &Arc<GuestMemory>,
        out: &mut Vec<Completion>,
    ) -> usize {
        let before = out.len();
        match self {
            Executor::Uring(uring) => {
                if uring.submit().is_err() {
                    // The completion queue is full: make room, then try once more.
                    uring.reap(ctx, out);
                    if let Err(e) = uring.submit() {
                        log::error!("io_uring submit failed: {e}");
                    }
                }
                if uring.has_completions() {
                    uring.reap(ctx, out);
                }
            }
            Executor::Inline {
                offload: Some(offload),
                reads,
            } => {
                share_reads(offload, reads, ctx, mem, out);
                if offload.has_finished() {
                    offload.reap(out);
                }
            }
            Executor::Inline { offload: None, .. } | Executor::Sync => {}
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => {
                if rbd.has_completions() {
                    rbd.reap(out);
                }
            }
        }
        out.len() - before
    }

    /// Whether completions wait to be reaped (no system call).
    pub fn has_completions(&mut self) -> bool {
        match self {
            Executor::Uring(uring) => uring.has_completions(),
            Executor::Inline {
                offload: Some(offload),
                ..
            } => offload.has_finished(),
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => rbd.has_completions(),
            _ => false,
        }
    }

    /// The completion eventfd fired: collects what finished.
    pub fn reap(&mut self, ctx: &ExecContext, out: &mut Vec<Completion>) {
        match self {
            Executor::Uring(uring) => {
                uring.clear_eventfd();
                uring.reap(ctx, out);
            }
            Executor::Inline {
                offload: Some(offload),
                ..
            } => offload.reap(out),
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => rbd.reap(out),
            _ => {}
        }
    }

    /// Waits until every request started has completed, collecting them into `out`.
    pub fn drain(&mut self, ctx: &ExecContext, out: &mut Vec<Completion>) {
        match self {
            Executor::Uring(uring) => uring.drain(ctx, out),
            Executor::Inline {
                offload: Some(offload),
                ..
            } => offload.drain(out),
            #[cfg(feature = "rbd")]
            Executor::Rbd(rbd) => rbd.drain(out),
            _ => {}
        }
    }
}

/// Runs a batch of reads: when they are worth it, an equal share (by bytes) goes to each copy
/// thread as one job while this thread copies its own share; else all run here.
fn share_reads(
    offload: &mut Offload,
    reads: &mut Vec<(u16, Request)>,
    ctx: &Arc<ExecContext>,
    mem: &Arc<GuestMemory>,
    out: &mut Vec<Completion>,
) {
    if reads.is_empty() {
        return;
    }
    let total: u64 = reads.iter().filter_map(|(_, r)| read_len(r)).sum();
    if reads.len() > 1 && total >= SPLIT_MIN_BYTES {
        let shares = offload.threads() as u64 + 1;
        let share = total / shares;
        for _ in 1..shares {
            // Take requests from the end until this share's bytes are reached.
            let mut bytes = 0;
            let mut cut = reads.len();
            while cut > 1 && bytes < share {
                cut -= 1;
                bytes += read_len(&reads[cut].1).unwrap_or(0);
            }
            offload.submit(reads.split_off(cut), mem.clone(), ctx);
        }
    }
    for (head, request) in reads.drain(..) {
        let status = execute_sync(&request, ctx, mem);
        out.push(request.finish(head, mem, status));
    }
}
