//! One virtio-blk queue's worker: the path of a guest request from the kick to the used ring.
//!
//! [`QueueWorker::process`] takes every available chain through the queue's [`Ring`], walks
//! it into the worker's scratch [`ChainBuffers`], parses it ([`request::parse`]) and starts it
//! on the queue's [`Executor`]; what finished goes back to the guest with one used-index update
//! and at most one interrupt per batch ([`QueueWorker::complete`]). Requests that finish later
//! (io_uring, copy threads) come back through the executor's eventfd
//! ([`QueueWorker::reap`]). With `--poll-us`, the worker keeps looking for work for a while
//! before it sleeps.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_common::Vring;

use vhost_user_common::chain::{ChainBuffers, ChainError};
use vhost_user_common::inflight::{self, QueueTracker};
use vhost_user_common::ring::{Ring, RingHooks};
use vhost_user_common::{GuestMemory, GuestMemoryAtomic};
use vm_memory::GuestAddressSpace;

use crate::executor::{ExecContext, Executor};
use crate::request::{self, Completion, Limits};

/// Longest a queue thread keeps polling without returning to its event loop.
const POLL_SESSION_MAX: Duration = Duration::from_millis(20);
/// Passes over the ring per event (each takes at most a ring's worth of chains) before the
/// worker lets its thread's other events (exit) run, and comes back through its own kick.
const PASSES_PER_EVENT: usize = 64;

/// A queue's ring, with inflight tracking when the frontend set up a region for it.
type BlkRing = Ring<Option<QueueTracker>>;

/// Per-queue state, touched only by that queue's worker thread (and by GET_VRING_BASE).
pub struct QueueWorker {
    index: u16,
    ctx: Arc<ExecContext>,
    limits: Limits,
    poll: Duration,
    executor: Executor,
    mem: Option<GuestMemoryAtomic>,
    ring: Option<BlkRing>,
    /// Inflight tracking set up before the ring exists; it goes into the ring's hooks.
    inflight: Option<QueueTracker>,
    /// Chains a previous backend left in flight, to execute before anything new.
    resubmit: Vec<(u16, Result<ChainBuffers, ChainError>)>,
    /// The chain being parsed: reused, so that taking a chain allocates nothing.
    scratch: ChainBuffers,
    completions: Vec<Completion>,
    /// The longest chain accepted: what the config space's `seg_max` allows (the device's
    /// largest queue size), also when the frontend set up a smaller ring (QEMU's default is
    /// 128): a driver follows `seg_max`, and an indirect table is not bounded by the ring.
    max_chain: usize,
}

impl QueueWorker {
    pub fn new(
        index: u16,
        ctx: Arc<ExecContext>,
        limits: Limits,
        poll: Duration,
        executor: Executor,
        queue_size: u16,
    ) -> QueueWorker {
        QueueWorker {
            index,
            ctx,
            limits,
            poll,
            executor,
            mem: None,
            ring: None,
            inflight: None,
            resubmit: Vec::new(),
            scratch: ChainBuffers::default(),
            completions: Vec::with_capacity(usize::from(queue_size)),
            max_chain: usize::from(queue_size),
        }
    }

    pub fn set_memory(&mut self, mem: GuestMemoryAtomic) {
        self.mem = Some(mem);
    }

    /// The eventfd that tells this queue's thread that requests completed, if any.
    pub fn completion_eventfd(&self) -> Option<RawFd> {
        self.executor.eventfd()
    }

    /// SET_INFLIGHT_FD: this queue's region of the inflight buffer.
    pub fn set_inflight(&mut self, tracker: QueueTracker) {
        match self.ring.as_mut() {
            Some(ring) => *ring.hooks_mut() = Some(tracker),
            None => self.inflight = Some(tracker),
        }
    }

    /// The worker's ring, made on the first event for it.
    fn attach(&mut self, vring: &Vring) {
        if self.ring.is_none() {
            let label = format!("queue {}", self.index);
            self.ring = Some(Ring::with_hooks(vring.clone(), label, self.inflight.take()));
        }
    }

    /// With inflight tracking, the first event after the ring started finds where the ring
    /// really is and what a previous backend left in flight (QEMU's SET_VRING_BASE carries a
    /// rewound guess after a crash).
    fn recover_inflight(&mut self, ring: &mut BlkRing, mem: &GuestMemory) {
        if let Some(tracker) = ring.hooks_mut() {
            if tracker.needs_recovery() {
                let vring = ring.vring().clone();
                if let Some(tracker) = ring.hooks_mut() {
                    self.resubmit = inflight::start_ring(tracker, &vring, mem);
                }
            }
        }
    }

    /// The guest kicked (or the ring became ready): takes every available chain, executes or
    /// submits it, then completes what is done; with polling, keeps looking for more work for
    /// that long before going back to sleep.
    pub fn process(&mut self, vring: &Vring, event_idx: bool) {
        self.attach(vring);
        let (Some(atomic), Some(mut ring)) = (self.mem.clone(), self.ring.take()) else {
            return;
        };
        // Notifications are turned off while we work (and poll) and back on before we sleep.
        // With EVENT_IDX "off" is simply not moving avail_event forward.
        let suppress = event_idx || !self.poll.is_zero();
        let started = Instant::now();
        let mut last_work = started;
        let mut passes = 0;
        self.recover_inflight(&mut ring, &atomic.memory());
        loop {
            let mem: Arc<GuestMemory> = atomic.memory().into_inner();
            if suppress {
                ring.disable_notifications(&mem);
            }
            let mut work = self.take_available(&mut ring, &mem);
            work += self.executor.submit(&self.ctx, &mem, &mut self.completions);
            self.complete(&mut ring, &mem);
            if work == 0 && !ring.is_ready() {
                // Being stopped (GET_VRING_BASE): entries the guest made available after that
                // stay in the ring for the next owner; looping on them would never end.
                break;
            }
            passes += 1;
            if passes >= PASSES_PER_EVENT {
                // A guest that keeps the ring full must not keep this thread from its other
                // events: come back through the ring's own kick.
                ring.kick_self();
                break;
            }
            if !self.poll.is_zero() {
                // Busy-poll: while the guest keeps sending, it never has to notify us and this
                // thread never sleeps. A session ends after POLL_SESSION_MAX even under
                // constant load, so that the thread's other events (exit) are seen.
                let now = Instant::now();
                if work > 0 {
                    last_work = now;
                }
                let deadline = (last_work + self.poll).min(started + POLL_SESSION_MAX);
                if self.wait_for_work(&ring, &mem, deadline) {
                    continue;
                }
            }
            if !suppress || !ring.rearm(&mem) {
                break;
            }
        }
        self.ring = Some(ring);
    }

    /// Takes every available chain (after those left in flight by a previous backend) and
    /// starts it. Returns how many chains were taken.
    fn take_available(&mut self, ring: &mut BlkRing, mem: &Arc<GuestMemory>) -> usize {
        let mut taken = 0;
        for (head, parsed) in std::mem::take(&mut self.resubmit) {
            taken += 1;
            ring.hooks_mut().taken(head);
            self.start(ring, head, parsed.as_ref(), mem);
        }
        let max_descriptors = usize::from(ring.size()).max(self.max_chain).max(1);
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(chain) = ring.try_pop(mem) {
            taken += 1;
            let head = chain.head_index();
            let parsed = scratch.parse_into(chain, mem, max_descriptors);
            self.start(ring, head, parsed.as_ref().map(|()| &scratch), mem);
        }
        self.scratch = scratch;
        taken
    }

    /// Starts the request in chain `head`, or answers it when the chain or request is bad.
    fn start(
        &mut self,
        ring: &BlkRing,
        head: u16,
        chain: Result<&ChainBuffers, &ChainError>,
        mem: &Arc<GuestMemory>,
    ) {
        let buffers = match chain {
            Ok(buffers) => buffers,
            Err(e) => {
                ring.guest_error(format_args!("malformed chain {head}: {e}"));
                self.completions.push(Completion::unanswered(head));
                return;
            }
        };
        match request::parse(buffers, mem, &self.limits) {
            Ok(req) => self
                .executor
                .start(&self.ctx, head, req, mem, &mut self.completions),
            Err(rejection) => {
                ring.guest_error(format_args!("request {head}: {}", rejection.reason));
                self.completions.push(rejection.finish(head, mem));
            }
        }
    }

    /// Spins until the guest makes a chain available, a request completes, or `deadline`
    /// passes; says whether there is work.
    fn wait_for_work(&mut self, ring: &BlkRing, mem: &GuestMemory, deadline: Instant) -> bool {
        loop {
            for _ in 0..64 {
                if self.executor.has_completions() || ring.has_available(mem) {
                    return true;
                }
                if !ring.is_ready() || ring.is_broken() {
                    return false;
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The executor's eventfd fired: collects completions and returns them to the guest.
    pub fn reap(&mut self, vring: &Vring) {
        self.attach(vring);
        self.executor.reap(&self.ctx, &mut self.completions);
        self.complete_now();
    }

    /// GET_VRING_BASE: every request taken from the ring is finished and returned before the
    /// frontend reads the ring's position (restart, migration, reconnect).
    pub fn drain(&mut self) {
        self.executor.drain(&self.ctx, &mut self.completions);
        self.complete_now();
        if let Some(ring) = self.ring.as_mut() {
            // The frontend sets the ring up anew before it is used again; with inflight
            // tracking, its next start recovers again (nothing is in flight now).
            ring.reset();
            if let Some(tracker) = ring.hooks_mut() {
                tracker.stopped();
            }
        }
    }

    fn complete_now(&mut self) {
        let (Some(atomic), Some(mut ring)) = (self.mem.clone(), self.ring.take()) else {
            return;
        };
        self.complete(&mut ring, &atomic.memory());
        self.ring = Some(ring);
    }

    /// Returns finished chains to the guest: one used-index update, at most one interrupt.
    fn complete(&mut self, ring: &mut BlkRing, mem: &GuestMemory) {
        if self.completions.is_empty() {
            return;
        }
        for done in self.completions.drain(..) {
            // In the migration log before the driver can see the chain: the kernel, an io_uring
            // or a copy thread wrote the data where vm-memory could not mark it, and marking
            // in the memory we publish with also covers a table that changed meanwhile.
            for (addr, len) in done.written.ranges() {
                ring.wrote(mem, addr, len);
            }
            ring.push_used(done.head, done.used_len);
        }
        ring.complete(mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::EngineKind;
    use crate::request::{VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
    use std::os::unix::fs::FileExt;
    use vhost_user_common::testing::{TestQueue, BUFFERS};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

    const SIZE: u16 = 64;
    const DISK: u64 = 1 << 20;

    struct Fixture {
        queue: TestQueue,
        worker: QueueWorker,
        file: tempfile::NamedTempFile,
    }

    fn fixture(kind: EngineKind, event_idx: bool) -> Fixture {
        let (file, disk) = crate::disk::temp_disk(DISK, false);
        let ctx = Arc::new(ExecContext::new(Arc::new(disk), b"serial".to_vec()));
        let limits = Limits {
            capacity_sectors: DISK >> 9,
            logical_block_size: 512,
            readonly: false,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
        };
        let executor =
            Executor::new(kind, false, SIZE, None).unwrap_or_else(|e| panic!("executor: {e}"));
        let queue = TestQueue::new(SIZE, 0x40_0000, event_idx);
        let mut worker = QueueWorker::new(0, ctx, limits, Duration::ZERO, executor, SIZE);
        worker.set_memory(queue.mem.clone());
        Fixture {
            queue,
            worker,
            file,
        }
    }

    /// A request chain: header, data, status. Returns (head, data address, status address).
    fn request(f: &mut Fixture, slot: u64, kind: u32, sector: u64, len: u32) -> (u16, u64, u64) {
        let base = BUFFERS + slot * 0x2_0000;
        let (hdr, data, status) = (base, base + 0x1000, base + 0x1_8000);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        f.queue.write(hdr, &header);
        f.queue.write(status, &[0xff]);
        let read = kind == VIRTIO_BLK_T_IN;
        let head = f
            .queue
            .add_chain(&[(hdr, 16, false), (data, len, read), (status, 1, true)]);
        (head, data, status)
    }

    /// Runs the queue until `count` used entries are there (completions may come later).
    fn run_until_used(f: &mut Fixture, count: u16) {
        let vring = f.queue.vring.clone();
        f.worker.process(&vring, true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.queue.used_idx() < count {
            assert!(Instant::now() < deadline, "requests did not complete");
            std::thread::sleep(Duration::from_millis(1));
            f.worker.reap(&vring);
        }
    }

    fn write_then_read(kind: EngineKind) {
        let mut f = fixture(kind, true);
        let (_, wdata, wstatus) = request(&mut f, 0, VIRTIO_BLK_T_OUT, 8, 4096);
        f.queue.write(wdata, &[0x5a; 4096]);
        run_until_used(&mut f, 1);
        assert_eq!(f.queue.read(wstatus, 1), vec![VIRTIO_BLK_S_OK]);
        assert_eq!(
            f.queue.used(0).1,
            1,
            "a write's used length is the status byte"
        );
        let mut on_disk = [0u8; 4096];
        f.file
            .as_file()
            .read_exact_at(&mut on_disk, 8 * 512)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk.iter().all(|&b| b == 0x5a));

        let (head, rdata, rstatus) = request(&mut f, 1, VIRTIO_BLK_T_IN, 8, 4096);
        run_until_used(&mut f, 2);
        assert_eq!(f.queue.read(rstatus, 1), vec![VIRTIO_BLK_S_OK]);
        assert_eq!(f.queue.used(1), (u32::from(head), 4097));
        assert!(f.queue.read(rdata, 4096).iter().all(|&b| b == 0x5a));
        assert!(f.queue.signalled());
    }

    #[test]
    fn write_then_read_with_synchronous_io() {
        write_then_read(EngineKind::Sync);
    }

    #[test]
    fn write_then_read_with_io_uring() {
        write_then_read(EngineKind::IoUring);
    }

    #[test]
    fn bad_chains_are_answered_and_the_queue_goes_on() {
        let mut f = fixture(EngineKind::Sync, true);
        // A descriptor outside guest memory: returned unanswered.
        let outside = f
            .queue
            .add_chain(&[(0x100_0000_0000, 16, false), (BUFFERS, 1, true)]);
        // An unknown request type: UNSUPP in its status byte.
        let (unsupported, _, status) = request(&mut f, 1, 77, 0, 512);
        let (good, _, good_status) = request(&mut f, 2, VIRTIO_BLK_T_IN, 0, 512);
        run_until_used(&mut f, 3);
        assert_eq!(f.queue.used(0), (u32::from(outside), 0));
        assert_eq!(f.queue.used(1), (u32::from(unsupported), 1));
        assert_eq!(f.queue.read(status, 1), vec![VIRTIO_BLK_S_UNSUPP]);
        assert_eq!(f.queue.used(2), (u32::from(good), 513));
        assert_eq!(f.queue.read(good_status, 1), vec![VIRTIO_BLK_S_OK]);
    }

    #[test]
    fn an_available_index_far_ahead_costs_one_event_not_a_spinning_thread() {
        let mut f = fixture(EngineKind::Sync, true);
        f.queue.set_avail_idx(SIZE + 7);
        let vring = f.queue.vring.clone();
        let started = Instant::now();
        f.worker.process(&vring, true);
        f.worker.process(&vring, true);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(f.queue.used_idx(), 0);
        // GET_VRING_BASE and a new set-up make the ring usable again.
        f.worker.drain();
        f.queue.set_avail_idx(0);
        let (_, _, status) = request(&mut f, 0, VIRTIO_BLK_T_IN, 0, 512);
        run_until_used(&mut f, 1);
        assert_eq!(f.queue.read(status, 1), vec![VIRTIO_BLK_S_OK]);
    }

    #[test]
    fn sixteen_requests_in_one_kick_all_complete() {
        let mut f = fixture(EngineKind::IoUring, true);
        for slot in 0..16 {
            request(&mut f, slot, VIRTIO_BLK_T_IN, slot * 8, 4096);
        }
        run_until_used(&mut f, 16);
        for i in 0..16 {
            assert_eq!(f.queue.used(i).1, 4097);
        }
    }

    #[test]
    fn completed_requests_are_marked_in_the_migration_log_before_they_are_used() {
        use vhost_user_common::testing::{TestLog, LOG_PAGE};
        for kind in [EngineKind::Sync, EngineKind::IoUring] {
            let mut f = fixture(kind, true);
            let (_, data, status) = request(&mut f, 0, VIRTIO_BLK_T_IN, 0, 8192);
            // After the driver's own writes: only the device's are of interest.
            let log = TestLog::attach(&f.queue.memory());
            run_until_used(&mut f, 1);
            let header = BUFFERS / LOG_PAGE;
            let expected = vec![
                0x8, // the used ring
                data / LOG_PAGE,
                data / LOG_PAGE + 1,
                status / LOG_PAGE,
            ];
            let marked = log.dirty_pages();
            assert_eq!(marked, expected, "{kind:?}");
            assert!(!marked.contains(&header));
        }
    }
}
