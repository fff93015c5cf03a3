//! The vhost-user glue: features, config space, guest memory, and dispatching each worker
//! thread's events to its queue's [`QueueWorker`] (one thread per queue).
//!
//! A guest request goes from the kick eventfd (`handle_event`) to [`QueueWorker::process`]
//! (`queue.rs`), which parses it (`request.rs`) and runs it on the queue's executor
//! (`executor.rs`), then back to the used ring.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vhost_user_common::Vring;

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vhost_user_common::device::{
    read_config, DeviceEvents, MIGRATION_FEATURES, MIGRATION_PROTOCOL_FEATURES,
};
use vhost_user_common::inflight;
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_common::{exit_event_pair, lock, DaemonBackend, GuestMemoryAtomic};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::disk::Disk;
use crate::executor::{EngineKind, ExecContext, Executor};
use crate::pool::CopyPool;
use crate::queue::QueueWorker;
use crate::request::{Limits, SECTOR_SHIFT, SECTOR_SIZE};
use crate::store::Store;

/// Largest single discard / write-zeroes range we accept (1 GiB): bounds the time one request
/// can hold a worker.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
const MAX_DISCARD_SEG: u32 = 32;
/// Largest segment the guest may send (SIZE_MAX); larger I/O is simply split into more segments.
const SIZE_MAX: u32 = 1 << 20;
/// Where `wce` sits in the config space: the one field the driver may write.
const CONFIG_WCE_OFFSET: u32 = std::mem::offset_of!(virtio_blk_config, wce) as u32;

/// The device's own event: requests completed (the executor's eventfd).
const COMPLETION_EVENT: u16 = 0;

/// `struct virtio_blk_config`, as the guest sees it (little-endian fields).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BlkConfig(virtio_blk_config);
// SAFETY: a packed C struct of integers: no padding, every bit pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

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
    ctx: Arc<ExecContext>,
    settings: DeviceSettings,
    limits: Limits,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    events: DeviceEvents,
    workers: Vec<Mutex<QueueWorker>>,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, settings: DeviceSettings) -> BlkBackend {
        BlkBackend::with_store(Store::File(disk), settings)
    }

    pub fn with_store(store: Store, settings: DeviceSettings) -> BlkBackend {
        let limits = Limits {
            capacity_sectors: store.size() >> SECTOR_SHIFT,
            logical_block_size: settings.logical_block_size,
            readonly: store.readonly(),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        // On a memory file system the kernel cannot read or write without blocking (no
        // IOCB_NOWAIT), so io_uring would hand every request to one of its worker threads: two
        // more thread switches per request for what is a memory copy. Copying in the queue's
        // own thread is cheaper and faster.
        let memory_backed = store.memory_backed();
        let inline = settings.engine == EngineKind::IoUring && memory_backed;
        if inline {
            log::info!(
                "{}: on a memory file system; reads and writes run in the queue threads",
                store.name()
            );
        }
        let pool = if inline { copy_pool(&settings) } else { None };
        let ctx = Arc::new(ExecContext::with_store(
            store.clone(),
            settings.serial.clone(),
        ));
        let mut warned = false;
        let workers = (0..settings.num_queues)
            .map(|index| {
                #[cfg(feature = "rbd")]
                if let Store::Rbd(image) = &store {
                    return Mutex::new(QueueWorker::new(
                        index,
                        ctx.clone(),
                        limits,
                        settings.poll,
                        crate::rbd::engine::executor(image, settings.queue_size),
                        settings.queue_size,
                    ));
                }
                let executor = Executor::new(
                    settings.engine,
                    memory_backed,
                    settings.queue_size,
                    pool.as_ref(),
                )
                .unwrap_or_else(|e| {
                    if !warned {
                        log::warn!("io_uring unavailable ({e}); using synchronous I/O");
                        warned = true;
                    }
                    Executor::Sync
                });
                Mutex::new(QueueWorker::new(
                    index,
                    ctx.clone(),
                    limits,
                    settings.poll,
                    executor,
                    settings.queue_size,
                ))
            })
            .collect();
        BlkBackend {
            ctx,
            events: DeviceEvents::new(usize::from(settings.num_queues)),
            settings,
            limits,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
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

    /// virtio_blk_config as the guest sees it.
    pub fn config_space(&self) -> Vec<u8> {
        let lbs = self.settings.logical_block_size;
        let physical = self.ctx.store().physical_block_size().max(lbs);
        let config = virtio_blk_config {
            capacity: self.limits.capacity_sectors.to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: u32::from(self.settings.queue_size.saturating_sub(2).max(1)).to_le(),
            blk_size: lbs.to_le(),
            // Topology: physical block exponent (in logical blocks), alignment, min and
            // optimal I/O size.
            physical_block_exp: (physical / lbs).trailing_zeros() as u8,
            alignment_offset: 0,
            min_io_size: 1u16.to_le(),
            opt_io_size: 0,
            wce: u8::from(self.ctx.writeback()),
            num_queues: self.settings.num_queues.to_le(),
            max_discard_sectors: self.limits.max_discard_sectors.to_le(),
            max_discard_seg: self.limits.max_discard_seg.to_le(),
            discard_sector_alignment: ((u64::from(lbs.max(4096)) / SECTOR_SIZE) as u32).to_le(),
            max_write_zeroes_sectors: self.limits.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: self.limits.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        BlkConfig(config).as_slice().to_vec()
    }
}

/// Copy threads for reads on memory file systems, one per CPU the queue threads leave idle.
fn copy_pool(settings: &DeviceSettings) -> Option<Arc<CopyPool>> {
    let spare_cpus = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(usize::from(settings.num_queues))
        .min(8);
    if spare_cpus == 0 {
        return None;
    }
    match CopyPool::new(spare_cpus) {
        Ok(pool) => Some(Arc::new(pool)),
        Err(e) => {
            log::warn!("cannot start copy threads ({e}); all reads run in the queue threads");
            None
        }
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
        // Live migration: every write to guest memory is logged while the frontend asks.
        | MIGRATION_FEATURES
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if readonly {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = vhost_user_common::DirtyBitmap;
    type Vring = vhost_user_common::Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.limits.readonly)
    }

    fn acked_features(&self, features: u64) {
        let before = self.acked_features.swap(features, Ordering::Relaxed);
        // A frontend could toggle the bit in a loop: the lines are rate-limited.
        static LOGGING_CHANGES: RateLimit = RateLimit::new(Duration::from_secs(1), 4);
        if (before ^ features) & MIGRATION_FEATURES != 0 && LOGGING_CHANGES.allow() {
            if features & MIGRATION_FEATURES != 0 {
                log::info!("live migration: writes to guest memory are logged");
            } else {
                log::info!("live migration: logging stopped");
            }
        }
        // Without FLUSH the driver cannot ask for durability, so the device must write through.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.ctx.set_writeback(flush);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            // QEMU >= 8.2 then sends RESET_DEVICE on a virtio reset (driver unbind, reboot);
            // the library disables the rings, clears the features and calls reset_device().
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | MIGRATION_PROTOCOL_FEATURES
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        inflight::allocate(msg, self.workers.len())
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        // On every connection, before the rings start: each queue recovers from its region on
        // its first event.
        let trackers = inflight::map(msg, &file, self.workers.len())?;
        for (index, tracker) in trackers.into_iter().enumerate() {
            if let Some(mut worker) = self.worker(index) {
                worker.set_inflight(tracker);
            }
        }
        Ok(())
    }

    fn reset_device(&self) {
        // Rings and features are reset by the library; the next SET_FEATURES sets ours again.
        // Requests still in flight finish first (QEMU normally stopped the rings already).
        log::info!("device reset by the frontend");
        for index in 0..self.workers.len() {
            if let Some(mut worker) = self.worker(index) {
                worker.drain();
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if let ([byte], true, true) = (buf, offset == CONFIG_WCE_OFFSET, wce_acked) {
            let writeback = *byte != 0;
            if !writeback {
                // Switching to write-through: what was cached so far becomes durable now.
                self.ctx.store().flush()?;
            }
            self.ctx.set_writeback(writeback);
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
                worker.set_memory(mem.clone());
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
        if let Some(mut worker) = self.worker(queue_index as usize) {
            worker.drain();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("unexpected event {evset:?} on queue {thread_id}");
        }
        let (Some(mut worker), Some(vring)) = (self.worker(thread_id), vrings.first()) else {
            return Ok(());
        };
        // Errors here are about the guest's rings; the ring layer logs them, never fatal.
        if device_event == 0 {
            worker.process(vring, self.event_idx.load(Ordering::Relaxed));
        } else if self.events.which(device_event) == Some(COMPLETION_EVENT) {
            worker.reap(vring);
        } else {
            log::warn!("unknown event {device_event} on queue {thread_id}");
        }
        Ok(())
    }
}

impl DaemonBackend for BlkBackend {
    fn register_listeners(
        self: &Arc<Self>,
        handlers: &[Arc<VringEpollHandler<Arc<Self>>>],
    ) -> io::Result<()> {
        let data = self.events.id(COMPLETION_EVENT);
        for (index, handler) in handlers.iter().enumerate() {
            let Some(fd) = self
                .worker(index)
                .and_then(|worker| worker.completion_eventfd())
            else {
                continue;
            };
            handler
                .register_listener(fd, EventSet::IN, data)
                .map_err(|e| {
                    io::Error::other(format!("registering the completion eventfd: {e}"))
                })?;
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
    fn config_reads_are_exact_and_zero_padded() {
        let (_f, b) = backend(false);
        assert_eq!(
            b.get_config(0, 8),
            ((1u64 << 20) / 512).to_le_bytes().to_vec()
        );
        assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(34, 2), vec![2, 0]);
        assert_eq!(b.get_config(12, 4), 62u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(44, 4), 8u32.to_le_bytes().to_vec());
        assert_eq!(b.get_config(32, 1), vec![1]);
        assert_eq!(b.get_config(56, 1), vec![1]);
        assert_eq!(b.get_config(250, 16), vec![0; 16]);
        assert!(b.get_config(u32::MAX, 2).is_empty());
    }

    #[test]
    fn config_writes_only_touch_the_cache_mode_and_only_with_wce() {
        let (_f, b) = backend(false);
        assert!(b.set_config(32, &[0]).is_err(), "WCE not negotiated yet");
        b.acked_features(device_features(false));
        assert!(b.set_config(32, &[0]).is_ok());
        assert!(!b.ctx.writeback());
        assert_eq!(b.get_config(32, 1), vec![0]);
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
