//! One queue's RBD requests, asynchronous through librbd: reads and writes go straight from
//! and to guest memory (`rbd_aio_readv` / `rbd_aio_writev`), flush, discard and write-zeroes
//! are librbd's own. No thread per request and no blocking call: librbd's completion thread
//! runs [`on_complete`], which only queues the completion in the queue's [`Mailbox`] and
//! writes the queue's eventfd; the queue's worker, woken by its epoll, collects and answers.
//!
//! Why a callback rather than `rbd_set_image_notification` + `rbd_poll_io_events`: the
//! notification belongs to an image handle, and the queues share one handle (one handle per
//! queue would make them take the exclusive lock from each other on every write); the poll
//! could hand one queue's completions to another queue's thread.
//!
//! Write-through (the guest turned its write cache off, or did not negotiate FLUSH): each
//! write is followed by `rbd_aio_flush` before the guest hears of it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost_user_common::chain::host_iovecs;
use vhost_user_common::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ffi;
use super::image::RbdImage;
use crate::executor::{answer_get_id, kind_name, ExecContext};
use crate::request::{Completion, Operation, Request, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// Completions librbd handed over, waiting for the queue's worker.
pub struct Mailbox {
    /// (tag, completion) pairs, as addresses.
    done: Mutex<Vec<(usize, usize)>>,
    waiting: AtomicUsize,
    eventfd: EventFd,
}

/// What librbd carries from submission to [`on_complete`]: whose request it is.
struct Tag {
    mailbox: Arc<Mailbox>,
    head: u16,
}

/// librbd's completion callback (its own thread): queue, wake the worker, nothing else.
///
/// # Safety
/// `arg` is a `Box<Tag>` leaked by [`RbdEngine::submit_one`], and `c` its completion; both
/// stay alive until the worker takes them from the mailbox.
unsafe extern "C" fn on_complete(c: ffi::RbdCompletionT, arg: *mut c_void) {
    // SAFETY: per the contract above, `arg` points to a live Tag that nobody frees before the
    // worker has taken this entry out of the mailbox. The Tag's Arc keeps the mailbox alive
    // only until then, so what is touched after the push is the mailbox through a clone.
    let tag = unsafe { &*(arg as *const Tag) };
    let mailbox = tag.mailbox.clone();
    let first = {
        let mut done = vhost_user_common::lock(&mailbox.done);
        done.push((arg as usize, c as usize));
        mailbox.waiting.fetch_add(1, Ordering::Release);
        done.len() == 1
    };
    // One wake-up per batch: the worker takes the whole list when it wakes, and a completion
    // that finds the list non-empty will be taken with it.
    if first {
        let _ = mailbox.eventfd.write(1);
    }
}

/// A request librbd is working on.
struct InFlight {
    request: Request,
    /// Keeps the guest memory the iovecs point into mapped until librbd is done with it.
    mem: Arc<GuestMemory>,
    /// Passed to librbd, which may read them until the request completes.
    iovecs: Vec<libc::iovec>,
    /// librbd operations not yet completed (one per discard / write-zeroes range).
    remaining: usize,
    /// The first error librbd returned.
    error: Option<i32>,
    /// A write in write-through mode: flush before answering.
    flush_after: bool,
}

/// One queue's requests on the shared image.
pub struct RbdEngine {
    image: Arc<RbdImage>,
    mailbox: Arc<Mailbox>,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// Swapped with the mailbox's list on each reap: no allocation per batch.
    scratch: Vec<(usize, usize)>,
}

// SAFETY: the iovecs in the slots point into guest memory kept mapped by the Arc next to them;
// the engine moves between threads only as a whole (inside the queue's worker).
unsafe impl Send for RbdEngine {}

impl RbdEngine {
    pub fn new(image: Arc<RbdImage>, queue_size: u16) -> std::io::Result<RbdEngine> {
        let mailbox = Arc::new(Mailbox {
            done: Mutex::new(Vec::with_capacity(usize::from(queue_size))),
            waiting: AtomicUsize::new(0),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        });
        let mut slots = Vec::new();
        slots.resize_with(usize::from(queue_size).max(1), || None);
        Ok(RbdEngine {
            image,
            mailbox,
            slots,
            in_flight: 0,
            scratch: Vec::with_capacity(usize::from(queue_size)),
        })
    }

    pub fn eventfd(&self) -> RawFd {
        self.mailbox.eventfd.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts one librbd operation for chain `head`. Returns whether librbd took it.
    fn submit_one(
        &self,
        head: u16,
        op: impl FnOnce(ffi::RbdCompletionT) -> i32,
        what: &str,
    ) -> bool {
        let tag = Box::into_raw(Box::new(Tag {
            mailbox: self.mailbox.clone(),
            head,
        }));
        let mut c: ffi::RbdCompletionT = std::ptr::null_mut();
        // SAFETY: `tag` stays alive until the completion is reaped (or freed below when
        // submission fails); `on_complete` has the signature librbd expects.
        let ret = unsafe { ffi::rbd_aio_create_completion(tag.cast(), Some(on_complete), &mut c) };
        let ret = if ret < 0 { ret } else { op(c) };
        if ret < 0 {
            log::warn!(
                "{}: cannot start {what}: {}",
                self.image.name(),
                std::io::Error::from_raw_os_error(-ret)
            );
            if !c.is_null() {
                // SAFETY: created above and never submitted, so librbd will not call back.
                unsafe { ffi::rbd_aio_release(c) };
            }
            // SAFETY: from Box::into_raw above; librbd never saw it (or never will call back).
            drop(unsafe { Box::from_raw(tag) });
            return false;
        }
        true
    }

    /// Starts `request` (chain `head`); returns its completion when it finished (or failed)
    /// without going to the cluster.
    pub fn push(
        &mut self,
        head: u16,
        request: Request,
        ctx: &ExecContext,
        mem: &Arc<GuestMemory>,
    ) -> Option<Completion> {
        if !ctx.slot_is_free(&self.slots, head) {
            return None;
        }
        let slot = usize::from(head);
        let image = self.image.raw();
        let mut iovecs = Vec::new();
        let mut started = 0;
        let mut flush_after = false;
        let mut error = None;
        match &request.op {
            Operation::Read { len, .. } | Operation::Write { len, .. } if *len == 0 => {
                return Some(request.finish(head, mem, VIRTIO_BLK_S_OK));
            }
            Operation::Read { offset, data, .. } | Operation::Write { offset, data, .. } => {
                let write = matches!(request.op, Operation::Write { .. });
                if let Err(e) = host_iovecs(mem, data.iter().copied(), &mut iovecs) {
                    log::warn!("cannot map request buffers: {e}");
                    return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
                }
                // At most one iovec per guest page of a chain of at most queue-size
                // descriptors of at most 4 GiB in total: bounded, but check the C int.
                let Ok(count) = i32::try_from(iovecs.len()) else {
                    return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
                };
                let (iov, offset) = (iovecs.as_ptr(), *offset);
                flush_after = write && !ctx.writeback();
                let submitted = self.submit_one(
                    head,
                    |c| {
                        // SAFETY: the iovecs point into guest memory that `mem` keeps mapped,
                        // and the vector holding them moves into the slot below (its heap
                        // buffer does not move) until the completion is reaped.
                        unsafe {
                            if write {
                                ffi::rbd_aio_writev(image, iov, count, offset, c)
                            } else {
                                ffi::rbd_aio_readv(image, iov, count, offset, c)
                            }
                        }
                    },
                    kind_name(&request.op),
                );
                started += usize::from(submitted);
            }
            Operation::Flush => {
                // SAFETY: open image; the completion is fresh.
                let submitted =
                    self.submit_one(head, |c| unsafe { ffi::rbd_aio_flush(image, c) }, "flush");
                started += usize::from(submitted);
            }
            Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
                let discard = matches!(request.op, Operation::Discard(_));
                for range in ranges {
                    let (offset, len) = (range.offset, range.len);
                    // Ranges are at most 1 GiB (the advertised limit, checked when parsing).
                    let Ok(len_usize) = usize::try_from(len) else {
                        continue;
                    };
                    let submitted = self.submit_one(
                        head,
                        |c| {
                            // SAFETY: open image, fresh completion, no buffers involved.
                            // Write-zeroes without flags may deallocate, which reads back as
                            // zeroes: right with or without the guest's UNMAP flag.
                            unsafe {
                                if discard {
                                    ffi::rbd_aio_discard(image, offset, len, c)
                                } else {
                                    ffi::rbd_aio_write_zeroes(image, offset, len_usize, c, 0, 0)
                                }
                            }
                        },
                        kind_name(&request.op),
                    );
                    started += usize::from(submitted);
                }
                if started < ranges.len() {
                    // Some ranges were not started: the answer is an error once the others
                    // are done (they must finish before the guest may reuse the chain).
                    error = Some(-libc::EIO);
                }
            }
            Operation::GetId { data, len } => {
                let status = match answer_get_id(ctx, mem, data, *len) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => {
                        log::warn!("get-id failed: {e}");
                        VIRTIO_BLK_S_IOERR
                    }
                };
                return Some(request.finish(head, mem, status));
            }
        }
        if started == 0 {
            return Some(request.finish(head, mem, VIRTIO_BLK_S_IOERR));
        }
        self.slots[slot] = Some(InFlight {
            request,
            mem: mem.clone(),
            iovecs,
            remaining: started,
            error,
            flush_after,
        });
        self.in_flight += 1;
        None
    }

    /// Whether completions wait to be collected (no system call, no lock).
    pub fn has_completions(&self) -> bool {
        self.mailbox.waiting.load(Ordering::Acquire) > 0
    }

    /// Collects what librbd completed into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.mailbox.eventfd.read();
        {
            let mut done = vhost_user_common::lock(&self.mailbox.done);
            std::mem::swap(&mut *done, &mut self.scratch);
            self.mailbox
                .waiting
                .fetch_sub(self.scratch.len(), Ordering::AcqRel);
        }
        let mut batch = std::mem::take(&mut self.scratch);
        for (tag, c) in batch.drain(..) {
            // SAFETY: leaked by `submit_one` for exactly this completion, which librbd has
            // finished with (it called back); taken out of the mailbox only once.
            let tag = unsafe { Box::from_raw(tag as *mut Tag) };
            let c = c as ffi::RbdCompletionT;
            // SAFETY: a completed completion; released once, here.
            let ret = unsafe {
                let ret = ffi::rbd_aio_get_return_value(c);
                ffi::rbd_aio_release(c);
                ret
            };
            self.completed(tag.head, ret, out);
        }
        self.scratch = batch;
    }

    /// One librbd operation of chain `head` finished with `ret`.
    fn completed(&mut self, head: u16, ret: isize, out: &mut Vec<Completion>) {
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            log::error!("RBD completion for unknown request {head}");
            return;
        };
        let Some(entry) = slot.as_mut() else {
            log::error!("RBD completion for request {head}, which is not in flight");
            return;
        };
        if ret < 0 && entry.error.is_none() {
            entry.error = Some(i32::try_from(ret).unwrap_or(-libc::EIO));
        }
        entry.remaining = entry.remaining.saturating_sub(1);
        if entry.remaining > 0 {
            return;
        }
        if entry.flush_after && entry.error.is_none() {
            entry.flush_after = false;
            let image = self.image.raw();
            // SAFETY: open image, fresh completion.
            if self.submit_one(head, |c| unsafe { ffi::rbd_aio_flush(image, c) }, "flush") {
                if let Some(entry) = self.slots[usize::from(head)].as_mut() {
                    entry.remaining = 1;
                }
                return;
            }
            if let Some(entry) = self.slots[usize::from(head)].as_mut() {
                entry.error = Some(-libc::EIO);
            }
        }
        let Some(entry) = self.slots[usize::from(head)].take() else {
            return;
        };
        self.in_flight -= 1;
        let status = match entry.error {
            // What librbd wrote into guest memory goes into the migration log with the
            // completion (`Completion::written`, marked by the queue before it publishes).
            None => VIRTIO_BLK_S_OK,
            Some(e) => {
                log::warn!(
                    "{}: {} failed: {}",
                    self.image.name(),
                    kind_name(&entry.request.op),
                    std::io::Error::from_raw_os_error(e.saturating_neg())
                );
                VIRTIO_BLK_S_IOERR
            }
        };
        drop(entry.iovecs);
        out.push(entry.request.finish(head, &entry.mem, status));
    }

    /// Waits until librbd completed every request started, collecting them into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        while self.in_flight > 0 {
            self.wait(Duration::from_secs(1));
            self.reap(out);
        }
    }

    /// Sleeps until the eventfd is readable or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout fits an int (at most a second here).
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    }
}

/// The executor of one queue on `image`: its engine, or, if the engine's eventfd cannot be
/// made, one that fails every request (logged once per queue).
pub fn executor(image: &Arc<RbdImage>, queue_size: u16) -> crate::executor::Executor {
    match RbdEngine::new(image.clone(), queue_size) {
        Ok(engine) => crate::executor::Executor::Rbd(Box::new(engine)),
        Err(e) => {
            log::error!(
                "{}: cannot create a completion eventfd ({e}); this queue fails its requests",
                image.name()
            );
            crate::executor::Executor::Sync
        }
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        // librbd may still write into guest memory the slots keep mapped, and will call back
        // with their tags: wait for it. (Requests that wait for a stopped cluster wait with
        // us; `--rbd-io-timeout` bounds them.)
        let mut discard = Vec::new();
        while self.in_flight > 0 {
            self.wait(Duration::from_secs(1));
            self.reap(&mut discard);
            discard.clear();
        }
    }
}
