//! The vhost-user glue: features, config space, one worker thread per queue, and the path of a
//! guest request from the kick eventfd to the used ring:
//! `handle_event` → [`QueueWorker::process_queue`] (pop chains, [`request::parse`], hand to the
//! engine) → [`QueueWorker::complete`] (status written, used ring filled, one interrupt per batch).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhost_user_common::chain::pop_parsed;
use vhost_user_common::{exit_event_pair, lock, DaemonBackend, GuestMemory, GuestMemoryAtomic};

use crate::disk::Disk;
use crate::engine::{write_status, Completion, EngineKind, UringEngine};
use crate::pool::{CopyPool, Offload, SPLIT_MIN_BYTES};
use crate::request::{self, execute_sync, Limits, Operation, Request, SECTOR_SHIFT, SECTOR_SIZE};

/// Largest single discard / write-zeroes range we accept (1 GiB): bounds the time one request
/// can hold a worker.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
const MAX_DISCARD_SEG: u32 = 32;
/// Largest segment the guest may send (SIZE_MAX); larger I/O is simply split into more segments.
const SIZE_MAX: u32 = 1 << 20;
/// Config space as the frontend may read it (virtio_blk_config is 60 bytes; newer QEMU asks for
/// more fields, which read as zero).
const CONFIG_SPACE_MAX: usize = 256;
const CONFIG_WRITEBACK_OFFSET: u32 = 32;
/// Longest a queue thread keeps polling without returning to its event loop.
const POLL_SESSION_MAX: Duration = Duration::from_millis(20);

/// Device settings that outlive a frontend connection.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Vec<u8>,
    pub engine: EngineKind,
    pub logical_block_size: u32,
    /// How long a queue thread keeps polling for more work before it sleeps (0: never polls).
    pub poll: Duration,
}

/// A virtio-blk device served to one frontend connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    settings: DeviceSettings,
    limits: Limits,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// Write-back cache enabled (the guest flushes); when off, every write is made durable.
    writeback: AtomicBool,
    workers: Vec<Mutex<QueueWorker>>,
}

/// Per-queue state, touched only by that queue's worker thread (and GET_VRING_BASE).
struct QueueWorker {
    mem: Option<GuestMemoryAtomic>,
    uring: Option<UringEngine>,
    /// Copy threads for reads, when requests run inline (memory file systems).
    offload: Option<Offload>,
    /// Reads of the current batch, to be shared between this thread and the copy threads.
    reads: Vec<(u16, Request)>,
    vring: Option<VringRwLock>,
    completions: Vec<Completion>,
    rejected: u64,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, settings: DeviceSettings) -> BlkBackend {
        let readonly = disk.readonly();
        let limits = Limits {
            capacity_sectors: disk.size() >> SECTOR_SHIFT,
            logical_block_size: settings.logical_block_size,
            readonly,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        let mut warned = false;
        // On a memory file system the kernel cannot read or write without blocking (no
        // IOCB_NOWAIT), so io_uring would hand every request to one of its worker threads: two
        // more thread switches per request for what is a memory copy. Copying in the queue's
        // own thread is cheaper and faster.
        let inline = settings.engine == EngineKind::IoUring && disk.memory_backed();
        if inline {
            log::info!(
                "{}: on a memory file system; reads and writes run in the queue threads",
                disk.path().display()
            );
        }
        // Copy threads only use CPUs the queue threads leave idle.
        let spare_cpus = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(usize::from(settings.num_queues))
            .min(8);
        let pool = if inline && spare_cpus > 0 {
            match CopyPool::new(spare_cpus) {
                Ok(pool) => Some(Arc::new(pool)),
                Err(e) => {
                    log::warn!(
                        "cannot start copy threads ({e}); all reads run in the queue threads"
                    );
                    None
                }
            }
        } else {
            None
        };
        let workers = (0..settings.num_queues)
            .map(|_| {
                let offload = pool.clone().and_then(|pool| match Offload::new(pool) {
                    Ok(offload) => Some(offload),
                    Err(e) => {
                        log::warn!(
                            "cannot create a copy eventfd ({e}); reads run in the queue thread"
                        );
                        None
                    }
                });
                let uring = match settings.engine {
                    EngineKind::Sync => None,
                    EngineKind::IoUring if inline => None,
                    EngineKind::IoUring => match UringEngine::new(settings.queue_size) {
                        Ok(engine) => Some(engine),
                        Err(e) => {
                            if !warned {
                                log::warn!("io_uring unavailable ({e}); using synchronous I/O");
                                warned = true;
                            }
                            None
                        }
                    },
                };
                Mutex::new(QueueWorker {
                    mem: None,
                    uring,
                    offload,
                    reads: Vec::new(),
                    vring: None,
                    completions: Vec::with_capacity(usize::from(settings.queue_size)),
                    rejected: 0,
                })
            })
            .collect();
        BlkBackend {
            disk,
            settings,
            limits,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            workers,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        // A poisoned lock means a worker panicked; keep serving the other queues.
        self.workers.get(index).map(lock)
    }

    fn write_through(&self) -> bool {
        !self.writeback.load(Ordering::Relaxed)
    }

    /// virtio_blk_config, little-endian, as the guest sees it.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_SPACE_MAX];
        let put = |c: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            c[at..at + bytes.len()].copy_from_slice(bytes)
        };
        let lbs = self.settings.logical_block_size;
        let physical = self.disk.physical_block_size().max(lbs);
        put(&mut c, 0, &self.limits.capacity_sectors.to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        let seg_max = u32::from(self.settings.queue_size.saturating_sub(2).max(1));
        put(&mut c, 12, &seg_max.to_le_bytes());
        put(&mut c, 20, &lbs.to_le_bytes());
        // Topology: physical block exponent (in logical blocks), alignment, min and optimal I/O.
        c[24] = (physical / lbs).trailing_zeros() as u8;
        c[25] = 0;
        put(&mut c, 26, &1u16.to_le_bytes());
        put(&mut c, 28, &0u32.to_le_bytes());
        c[CONFIG_WRITEBACK_OFFSET as usize] = u8::from(self.writeback.load(Ordering::Relaxed));
        put(&mut c, 34, &self.settings.num_queues.to_le_bytes());
        put(&mut c, 36, &self.limits.max_discard_sectors.to_le_bytes());
        put(&mut c, 40, &self.limits.max_discard_seg.to_le_bytes());
        let discard_alignment = (lbs.max(4096) as u64 / SECTOR_SIZE) as u32;
        put(&mut c, 44, &discard_alignment.to_le_bytes());
        put(
            &mut c,
            48,
            &self.limits.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(&mut c, 52, &self.limits.max_write_zeroes_seg.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

/// Bytes `req` reads, if it is a read. (Only reads are shared with copy threads: writes to one
/// file take the inode's lock in the kernel, and measured slower when split.)
fn read_len(req: &Request) -> Option<u64> {
    match &req.op {
        Operation::Read { len, .. } => Some(*len),
        _ => None,
    }
}

/// Feature bits this device offers for a disk (read-only disks get RO and lose the write-only
/// operations).
pub fn device_features(readonly: bool) -> u64 {
    let mut features = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if readonly {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

impl QueueWorker {
    /// Takes every available chain, executes or submits it, then completes what is done; with
    /// `--poll-us`, keeps looking for more work for that long before going back to sleep.
    fn process_queue(&mut self, backend: &BlkBackend, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        let event_idx = backend.event_idx.load(Ordering::Relaxed);
        let poll = backend.settings.poll;
        // Notifications are turned off while we work (and poll) and back on before we sleep.
        // With EVENT_IDX "off" is simply not moving avail_event forward.
        let suppress = event_idx || !poll.is_zero();
        let started = Instant::now();
        let mut last_work = started;
        loop {
            if suppress {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mem: Arc<GuestMemory> = atomic.memory().into_inner();
            let mut work = self.take_available(backend, vring, &mem);
            work += self.submit_and_reap(backend);
            self.complete(vring)?;
            if work == 0 && !vring.get_ref().get_queue().ready() {
                // Being stopped (GET_VRING_BASE): entries the guest made available after that
                // stay in the ring for the next owner; looping on them would never end. Leave
                // notifications on, as the next owner expects.
                if suppress {
                    let _ = vring.enable_notification();
                }
                break;
            }
            if !poll.is_zero() {
                // Busy-poll: while the guest keeps sending, it never has to notify us and this
                // thread never sleeps. A session ends after POLL_SESSION_MAX even under
                // constant load, so that the thread's other events (exit) are seen.
                let now = Instant::now();
                if work > 0 {
                    last_work = now;
                }
                let deadline = (last_work + poll).min(started + POLL_SESSION_MAX);
                if self.wait_for_work(vring, &mem, deadline) {
                    continue;
                }
            }
            if !suppress || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Pops every available chain and executes it (inline) or queues it on the io_uring.
    /// Returns how many chains were taken.
    fn take_available(
        &mut self,
        backend: &BlkBackend,
        vring: &VringRwLock,
        mem: &Arc<GuestMemory>,
    ) -> usize {
        let write_through = backend.write_through();
        let serial = backend.settings.serial.as_slice();
        let mut taken = 0;
        while let Some((head, parsed)) = pop_parsed(vring, mem) {
            taken += 1;
            let buffers = match parsed {
                Ok(b) => b,
                Err(e) => {
                    self.reject(format_args!("malformed chain {head}: {e}"));
                    self.completions.push(Completion { head, used_len: 0 });
                    continue;
                }
            };
            match request::parse(&buffers, mem, &backend.limits) {
                Ok(req) => match self.uring.as_mut() {
                    Some(uring) => {
                        if let Some(done) =
                            uring.push(head, req, &backend.disk, mem.clone(), serial, write_through)
                        {
                            self.completions.push(done);
                        }
                    }
                    None if self.offload.is_some() && read_len(&req).is_some() => {
                        self.reads.push((head, req));
                    }
                    None => self.execute_inline(backend, mem, head, &req),
                },
                Err(rejection) => {
                    self.reject(format_args!("request {head}: {}", rejection.reason));
                    let used_len = match rejection.status {
                        Some((addr, code)) => {
                            if let Err(e) = mem.write_obj(code, addr) {
                                log::warn!("cannot write status: {e}");
                            }
                            1
                        }
                        None => 0,
                    };
                    self.completions.push(Completion { head, used_len });
                }
            }
        }
        self.run_reads(backend, mem);
        taken
    }

    /// Runs the batch's reads: when they are worth it, an equal share (by bytes) goes to each
    /// copy thread as one job while this thread copies its own share; else all run here.
    fn run_reads(&mut self, backend: &BlkBackend, mem: &Arc<GuestMemory>) {
        if self.reads.is_empty() {
            return;
        }
        let mut reads = std::mem::take(&mut self.reads);
        let total: u64 = reads.iter().filter_map(|(_, r)| read_len(r)).sum();
        if let Some(offload) = self.offload.as_mut() {
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
                    let job = reads.split_off(cut);
                    offload.submit(job, mem.clone(), &backend.disk, backend.write_through());
                }
            }
        }
        for (head, req) in reads.drain(..) {
            self.execute_inline(backend, mem, head, &req);
        }
        // Keep the allocation for the next batch.
        self.reads = reads;
    }

    fn execute_inline(
        &mut self,
        backend: &BlkBackend,
        mem: &GuestMemory,
        head: u16,
        req: &Request,
    ) {
        let serial = backend.settings.serial.as_slice();
        let status = execute_sync(req, &backend.disk, mem, serial, backend.write_through());
        write_status(mem, req, status);
        self.completions.push(Completion {
            head,
            used_len: req.used_len(),
        });
    }

    /// One io_uring_enter for what was queued, then collects whatever has already completed
    /// (page-cache hits often have). Returns how many requests completed.
    fn submit_and_reap(&mut self, backend: &BlkBackend) -> usize {
        if let Some(offload) = self.offload.as_mut() {
            let before = self.completions.len();
            if offload.has_finished() {
                offload.reap(&mut self.completions);
            }
            return self.completions.len() - before;
        }
        let Some(uring) = self.uring.as_mut() else {
            return 0;
        };
        let before = self.completions.len();
        let write_through = backend.write_through();
        let serial = backend.settings.serial.as_slice();
        if uring.submit().is_err() {
            // The completion queue is full: make room, then try once more.
            uring.reap(&backend.disk, serial, write_through, &mut self.completions);
            if let Err(e) = uring.submit() {
                log::error!("io_uring submit failed: {e}");
            }
        }
        if uring.has_completions() {
            uring.reap(&backend.disk, serial, write_through, &mut self.completions);
        }
        self.completions.len() - before
    }

    /// Spins until the guest makes a chain available, an io_uring request completes, or
    /// `deadline` passes; says whether there is work.
    fn wait_for_work(&mut self, vring: &VringRwLock, mem: &GuestMemory, deadline: Instant) -> bool {
        loop {
            for _ in 0..64 {
                if self.uring.as_mut().is_some_and(|u| u.has_completions())
                    || self.offload.as_ref().is_some_and(Offload::has_finished)
                {
                    return true;
                }
                let state = vring.get_ref();
                let queue = state.get_queue();
                if !queue.ready() {
                    // Stopping (GET_VRING_BASE): nothing more will be taken from this ring.
                    return false;
                }
                match queue.avail_idx(mem, Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    // A ring we cannot read: let the normal path find out and report it.
                    Err(_) => return true,
                }
                drop(state);
                std::hint::spin_loop();
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The io_uring's (or the copy threads') eventfd fired: collect completions and return
    /// them to the guest.
    fn reap(&mut self, backend: &BlkBackend, vring: &VringRwLock) -> io::Result<()> {
        if let Some(offload) = self.offload.as_mut() {
            offload.reap(&mut self.completions);
        }
        if let Some(uring) = self.uring.as_mut() {
            uring.clear_eventfd();
            uring.reap(
                &backend.disk,
                &backend.settings.serial,
                backend.write_through(),
                &mut self.completions,
            );
        }
        self.complete(vring)
    }

    /// Returns finished chains to the guest with one notification for the batch.
    fn complete(&mut self, vring: &VringRwLock) -> io::Result<()> {
        if self.completions.is_empty() {
            return Ok(());
        }
        {
            // One lock for the whole batch.
            let mut state = vring.get_mut();
            for done in self.completions.drain(..) {
                if let Err(e) = state.add_used(done.head, done.used_len) {
                    log::warn!(
                        "cannot return descriptor {} to the used ring: {e}",
                        done.head
                    );
                }
            }
        }
        if vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Logs a guest error, rate-limited: a hostile guest must not flood the host's logs.
    fn reject(&mut self, what: std::fmt::Arguments<'_>) {
        self.rejected += 1;
        if self.rejected <= 16 || self.rejected.is_power_of_two() {
            log::warn!("{what} (guest errors so far: {})", self.rejected);
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.disk.readonly())
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        // Without FLUSH the driver cannot ask for durability, so the device must write through.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.writeback.store(flush, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            // QEMU >= 8.2 then sends RESET_DEVICE on a virtio reset (driver unbind, reboot);
            // the library disables the rings, clears the features and calls reset_device().
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        // Rings and features are reset by the library; the next SET_FEATURES sets ours again.
        log::info!("device reset by the frontend");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => config[start..end].to_vec(),
            _ => {
                log::warn!("config read of {size} bytes at {offset} is outside the config space");
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 && wce_acked {
            let writeback = buf[0] != 0;
            if !writeback {
                // Switching to write-through: what was cached so far becomes durable now.
                self.disk.flush()?;
            }
            self.writeback.store(writeback, Ordering::Relaxed);
            log::info!(
                "guest set the write cache to {}",
                if writeback {
                    "write-back"
                } else {
                    "write-through"
                }
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "config write of {} bytes at {offset} is not allowed",
                buf.len()
            ),
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        vhost_user_common::memory::check_backing(&mem.memory())?;
        for index in 0..self.workers.len() {
            if let Some(mut worker) = self.worker(index) {
                worker.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.settings.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event_pair()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: every request taken from the ring must be finished before the
        // frontend reads the ring's position (restart, migration, reconnect).
        let Some(mut worker) = self.worker(queue_index as usize) else {
            return Ok(());
        };
        let worker = &mut *worker;
        if let Some(uring) = worker.uring.as_mut() {
            uring.drain(
                &self.disk,
                &self.settings.serial,
                self.write_through(),
                &mut worker.completions,
            );
        }
        if let Some(offload) = worker.offload.as_mut() {
            offload.drain(&mut worker.completions);
        }
        if let Some(vring) = worker.vring.clone() {
            worker.complete(&vring)?;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("unexpected event {evset:?} on queue {thread_id}");
        }
        let (Some(mut worker), Some(vring)) = (self.worker(thread_id), vrings.first()) else {
            return Ok(());
        };
        if worker.vring.is_none() {
            worker.vring = Some(vring.clone());
        }
        // Errors here are about the guest's rings; they are logged, never fatal to the worker.
        let result = if device_event == 0 {
            worker.process_queue(self, vring)
        } else if usize::from(device_event) == self.num_queues() + 1 {
            worker.reap(self, vring)
        } else {
            log::warn!("unknown event {device_event} on queue {thread_id}");
            Ok(())
        };
        if let Err(e) = result {
            log::warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }
}

impl DaemonBackend for BlkBackend {
    fn register_listeners(
        self: &Arc<Self>,
        handlers: &[Arc<VringEpollHandler<Arc<Self>>>],
    ) -> io::Result<()> {
        let data = self.num_queues() as u64 + 1;
        for (index, handler) in handlers.iter().enumerate() {
            let Some(worker) = self.worker(index) else {
                continue;
            };
            if let Some(uring) = worker.uring.as_ref() {
                handler
                    .register_listener(uring.eventfd(), EventSet::IN, data)
                    .map_err(|e| {
                        io::Error::other(format!("registering the io_uring eventfd: {e}"))
                    })?;
            }
            if let Some(offload) = worker.offload.as_ref() {
                handler
                    .register_listener(offload.eventfd(), EventSet::IN, data)
                    .map_err(|e| {
                        io::Error::other(format!("registering the copy threads' eventfd: {e}"))
                    })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(readonly: bool) -> (tempfile::NamedTempFile, BlkBackend) {
        let (file, disk) = crate::disk::temp_disk(1 << 20, readonly);
        let settings = DeviceSettings {
            num_queues: 2,
            queue_size: 64,
            serial: b"s".to_vec(),
            engine: EngineKind::Sync,
            logical_block_size: 4096,
            poll: Duration::ZERO,
        };
        (file, BlkBackend::new(Arc::new(disk), settings))
    }

    #[test]
    fn config_reads_are_exact_or_empty() {
        let (_f, b) = backend(false);
        assert_eq!(
            b.get_config(0, 8),
            ((1u64 << 20) / 512).to_le_bytes().to_vec()
        );
        assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(34, 2), vec![2, 0]);
        assert_eq!(b.get_config(12, 4), 62u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(44, 4), 8u32.to_le_bytes().to_vec());
        assert!(b.get_config(250, 16).is_empty());
        assert!(b.get_config(u32::MAX, 2).is_empty());
    }

    #[test]
    fn config_writes_only_touch_the_cache_mode_and_only_with_wce() {
        let (_f, b) = backend(false);
        assert!(b.set_config(32, &[0]).is_err(), "WCE not negotiated yet");
        b.acked_features(device_features(false));
        assert!(b.set_config(32, &[0]).is_ok());
        assert!(b.write_through());
        assert!(b.set_config(0, &[0; 8]).is_err(), "capacity is read-only");
        assert!(b.set_config(32, &[1, 1]).is_err());
    }

    #[test]
    fn read_only_disks_advertise_ro_and_no_discard() {
        let f = device_features(true);
        assert!(f & (1 << VIRTIO_BLK_F_RO) != 0);
        assert_eq!(
            f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        let (_f, b) = backend(true);
        assert!(b.limits().readonly);
    }
}
