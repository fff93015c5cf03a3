//! The vhost-user glue: features, config space, guest memory, one worker thread per queue
//! pair, and the dispatch of events (RX kick, TX kick, tap readable/writable) to the pair's
//! device core ([`crate::queue_pair`]), which moves the frames.
//!
//! Queue pair `i` is RX queue `2i` and TX queue `2i + 1`, served by worker thread `i` with tap
//! queue `i`. Each pair has its own lock, and its own handle on guest memory (set when the
//! frontend sends a memory table), so pairs run in parallel and share no lock on the data path.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use vhost_user_common::Vring;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vhost_user_common::device::{
    read_config, DeviceEvents, MIGRATION_FEATURES, MIGRATION_PROTOCOL_FEATURES,
};
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_common::ring::Ring;
use vhost_user_common::{lock, DaemonBackend, GuestMemoryAtomic};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;

use crate::announce::rarp_frame;
use crate::args::Config;
use crate::queue_pair::{Framing, QueuePair, TapInterest, Wake};
use crate::stats::Stats;
use crate::tap::{Offloads, Tap};

/// Ring size limit we accept from the frontend.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Index of the RX and TX rings within a worker thread's vrings.
const RX_RING: u16 = 0;
const TX_RING: u16 = 1;

/// The device's own event: the pair's tap queue.
const TAP_EVENT: u16 = 0;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The virtio features we offer.
pub const FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MQ);

/// The protocol features we offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        // QEMU >= 8.2 then sends RESET_DEVICE on a virtio reset (driver unbind, reboot); the
        // library disables the rings, clears the features and calls reset_device().
        | VhostUserProtocolFeatures::RESET_DEVICE
        // Live migration: SET_LOG_BASE maps QEMU's dirty log, and every write into guest
        // memory goes through vm-memory, which marks it (see `NetBackend`). QEMU refuses to
        // migrate without this and VHOST_F_LOG_ALL.
        | MIGRATION_PROTOCOL_FEATURES
        // After a migration QEMU asks us to announce the guest (SEND_RARP), since we do not
        // offer VIRTIO_NET_F_GUEST_ANNOUNCE: see `crate::announce`.
        | VhostUserProtocolFeatures::RARP
    // No CONFIGURE_MEM_SLOTS: QEMU (7.2 to 8.x) drives a multiqueue net device as one
    // vhost_dev per queue pair and sends every ADD_MEM_REG (and REM_MEM_REG) once per pair,
    // which the library refuses as overlapping regions. SET_MEM_TABLE is idempotent.
}

/// `struct virtio_net_config`, viewable as the bytes of the config space.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct NetConfigSpace(virtio_net_config);

// SAFETY: `virtio_net_config` is `repr(C, packed)` and made of integers and byte arrays only:
// it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for NetConfigSpace {}

/// The config space (virtio 1.2, 5.1.4): mac, status (link up), max_virtqueue_pairs and mtu,
/// little-endian; the rest is zero (the features that give it meaning are not offered).
pub fn config_space(config: &Config) -> Vec<u8> {
    let space = NetConfigSpace(virtio_net_config {
        mac: config.mac,
        status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
        max_virtqueue_pairs: config.queue_pairs.to_le(),
        mtu: config.mtu.to_le(),
        ..Default::default()
    });
    space.as_slice().to_vec()
}

/// The two rings of a pair, made on the pair's first event (the library hands the vrings to
/// `handle_event` only).
struct Rings {
    rx: Ring,
    tx: Ring,
}

/// Per queue pair state, behind its own lock.
struct Pair {
    core: QueuePair,
    rings: Option<Rings>,
    /// This pair's handle on guest memory, set in `update_memory`.
    memory: Option<GuestMemoryAtomic>,
    /// Events the tap fd is registered for in this pair's worker epoll.
    interest: EventSet,
    /// Whether the tap queue is attached (gets frames from the kernel).
    attached: bool,
}

/// The vhost-user-net backend for one frontend connection. The serve loop shares it with the
/// worker threads as an `Arc`.
///
/// Live migration: everything the device writes into guest memory (frames and their
/// virtio-net headers with `num_buffers` in receive buffers, used entries, `avail_event`) goes
/// through vm-memory's accessors on memory whose regions carry the dirty-page log
/// ([`vhost_user_common::DirtyBitmap`]), so it is marked before the used index that hands it to
/// the guest moves; the tap's frames are copied in from the pair's own buffer, never read into
/// guest memory directly. `tests/tests/migration_net.rs` checks the pages.
pub struct NetBackend {
    config: Config,
    tap: Arc<Tap>,
    stats: Arc<Stats>,
    pairs: Vec<Mutex<Pair>>,
    handlers: Mutex<Vec<Weak<VringEpollHandler<Arc<NetBackend>>>>>,
    events: DeviceEvents,
    acked: AtomicU64,
    space: Vec<u8>,
    /// SEND_RARP comes from the frontend, as often as it likes.
    announce_log: RateLimit,
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        log::info!("session totals: {}", self.stats.summary());
    }
}

impl NetBackend {
    /// A backend for one frontend session over the (already open) tap.
    pub fn new(config: Config, tap: Arc<Tap>, stats: Arc<Stats>) -> NetBackend {
        let pairs = (0..usize::from(config.queue_pairs))
            .map(|i| {
                // Until the guest enables this pair's RX ring, the kernel must not steer flows
                // to a queue nobody reads.
                let attached = !(tap.multi_queue
                    && tap
                        .queues
                        .get(i)
                        .is_some_and(|q| q.set_attached(false).is_ok()));
                Mutex::new(Pair {
                    core: QueuePair::new(i),
                    rings: None,
                    memory: None,
                    interest: EventSet::empty(),
                    attached,
                })
            })
            .collect();
        let space = config_space(&config);
        let events = DeviceEvents::new(2 * usize::from(config.queue_pairs));
        NetBackend {
            config,
            tap,
            stats,
            pairs,
            handlers: Mutex::new(Vec::new()),
            events,
            acked: AtomicU64::new(0),
            space,
            announce_log: RateLimit::default(),
        }
    }

    /// Puts a RARP broadcast from `mac` on the tap ([`crate::announce`]) through pair 0's tap
    /// queue. A queue the guest has not enabled yet is detached, and the kernel refuses writes
    /// to a detached queue (EBADFD): it is attached for the write and detached again after
    /// (QEMU sends SEND_RARP before it starts the rings on the destination).
    fn announce(&self, mac: [u8; 6]) {
        let (Some(pair), Some(queue)) = (self.pairs.first(), self.tap.queues.first()) else {
            return;
        };
        let frame = rarp_frame(mac);
        let hdr = [0u8; crate::VNET_HDR_LEN];
        let hdr_len = self.tap.vnet_hdr_len().min(hdr.len());
        let iovecs = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        let mut pair = lock(pair);
        let was_attached = pair.attached;
        self.set_attached(0, &mut pair.attached, true);
        // SAFETY: both iovecs describe local buffers that live until the call returns.
        let written = unsafe { queue.write_frame(&iovecs) };
        self.set_attached(0, &mut pair.attached, was_attached);
        let mac = format_mac(mac);
        match written {
            Ok(_) if self.announce_log.allow() => {
                log::info!("{}: announced {mac} (RARP broadcast)", self.tap.name)
            }
            Ok(_) => {}
            Err(e) => self.stats.warn(format_args!(
                "{}: cannot announce {mac}: {e}",
                self.tap.name
            )),
        }
    }

    /// Registers the tap fd of pair `index` for exactly `want`.
    fn set_interest(&self, index: usize, pair: &mut Pair, want: EventSet) {
        if pair.interest == want {
            return;
        }
        let handler = lock(&self.handlers).get(index).and_then(Weak::upgrade);
        let (Some(handler), Some(queue)) = (handler, self.tap.queues.get(index)) else {
            return;
        };
        let fd = queue.as_raw_fd();
        let data = self.events.id(TAP_EVENT);
        if !pair.interest.is_empty() {
            if let Err(e) = handler.unregister_listener(fd, pair.interest, data) {
                self.stats.error(format_args!(
                    "pair {index}: cannot unregister the tap queue: {e}"
                ));
            }
        }
        pair.interest = EventSet::empty();
        if !want.is_empty() {
            match handler.register_listener(fd, want, data) {
                Ok(()) => pair.interest = want,
                Err(e) => self.stats.error(format_args!(
                    "pair {index}: cannot register the tap queue: {e}"
                )),
            }
        }
    }

    /// Attaches or detaches tap queue `index` (`current` is the pair's record of it).
    fn set_attached(&self, index: usize, current: &mut bool, attached: bool) {
        if *current == attached || !self.tap.multi_queue {
            return;
        }
        if let Some(queue) = self.tap.queues.get(index) {
            match queue.set_attached(attached) {
                Ok(()) => {
                    *current = attached;
                    log::debug!(
                        "pair {index}: tap queue {}",
                        if attached { "attached" } else { "detached" }
                    );
                }
                Err(e) => self
                    .stats
                    .warn(format_args!("pair {index}: TUNSETQUEUE failed: {e}")),
            }
        }
    }

    /// Everything one worker does for one event, with its pair locked.
    fn handle(&self, index: usize, event: u16, evset: EventSet, vrings: &[Vring]) {
        let (Some(pair), Some(tap)) = (self.pairs.get(index), self.tap.queues.get(index)) else {
            return;
        };
        let mut pair = lock(pair);
        let pair = &mut *pair;
        let Some(mem) = pair.memory.as_ref().map(GuestMemoryAtomic::memory) else {
            return;
        };
        let rings = match &mut pair.rings {
            Some(rings) => rings,
            None => {
                let (Some(rx), Some(tx)) = (
                    vrings.get(usize::from(RX_RING)),
                    vrings.get(usize::from(TX_RING)),
                ) else {
                    return;
                };
                pair.rings.insert(Rings {
                    rx: Ring::new(rx.clone(), format!("pair {index} RX")),
                    tx: Ring::new(tx.clone(), format!("pair {index} TX")),
                })
            }
        };
        let tap_event = self.events.which(event) == Some(TAP_EVENT);
        let wake = match event {
            RX_RING => Wake::RxKick,
            TX_RING => Wake::TxKick,
            _ if tap_event => Wake::Tap {
                readable: evset.contains(EventSet::IN),
                writable: evset.contains(EventSet::OUT),
            },
            _ => Wake::Other,
        };
        if rings.rx.is_usable() {
            self.set_attached(index, &mut pair.attached, true);
        } else if tap_event {
            // Frames for a pair the guest disabled: stop taking them.
            self.set_attached(index, &mut pair.attached, false);
        }
        let framing = Framing::from_features(self.acked.load(Ordering::Relaxed));
        let want = pair.core.handle(
            wake,
            &mut rings.rx,
            &mut rings.tx,
            &mem,
            tap,
            framing,
            &self.stats,
        );
        self.set_interest(index, pair, event_set(want));
    }
}

/// `52:54:00:12:34:56`.
fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The epoll events for `interest`.
fn event_set(interest: TapInterest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

impl VhostUserBackend for NetBackend {
    type Bitmap = vhost_user_common::DirtyBitmap;
    type Vring = vhost_user_common::Vring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.config.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | MIGRATION_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let tap = &self.tap;
        let len = Framing::from_features(features).hdr_len;
        if let Err(e) = tap.set_vnet_hdr_len(len) {
            log::error!("{}: TUNSETVNETHDRSZ {len}: {e}", tap.name);
        }
        let wanted = Offloads::for_guest(features);
        match tap.set_offloads(wanted) {
            Ok(flags) => log::info!(
                "{}: features {features:#x} acked, header {len} bytes, tap offloads {flags:#x} ({wanted:?})",
                tap.name
            ),
            Err(e) => log::error!("{}: TUNSETOFFLOAD: {e}", tap.name),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
        // Best effort, as QEMU's own announcement: a failure is logged, not fatal to the
        // connection (an error here would end it).
        self.announce(mac);
        Ok(())
    }

    fn reset_device(&self) {
        // Rings and features are reset by the library; the next SET_FEATURES sets ours again.
        log::info!("device reset by the frontend");
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets it on every vring, where `Ring::notify` reads it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.space, offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        vhost_user_common::memory::check_backing(&mem.memory())?;
        for pair in &self.pairs {
            lock(pair).memory = Some(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        vhost_user_common::exit_event_pair()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(pair) = self.pairs.get((queue_index / 2) as usize) else {
            return Ok(());
        };
        let mut pair = lock(pair);
        let pair = &mut *pair;
        let Some(rings) = pair.rings.as_mut() else {
            return Ok(());
        };
        // The frontend sets the ring up again before it restarts it: a ring broken by a bad
        // available index gets a fresh start.
        if queue_index & 1 == 1 {
            rings.tx.reset();
            return Ok(());
        }
        // An RX ring stops: give back the chains held for a partial frame, so the guest gets
        // every buffer back (GET_VRING_BASE has marked the ring not ready; publishing still
        // writes its used ring). The pair's lock keeps the worker away meanwhile.
        pair.core.return_held(&mut rings.rx);
        if rings.rx.pending_used() > 0 {
            if let Some(mem) = pair.memory.as_ref().map(GuestMemoryAtomic::memory) {
                rings.rx.publish(&mem);
            }
        }
        rings.rx.reset();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.handle(thread_id, device_event, evset, vrings);
        Ok(())
    }
}

impl DaemonBackend for NetBackend {
    fn register_listeners(
        self: &Arc<Self>,
        handlers: &[Arc<VringEpollHandler<Arc<Self>>>],
    ) -> io::Result<()> {
        *lock(&self.handlers) = handlers.iter().map(Arc::downgrade).collect();
        for (index, pair) in self.pairs.iter().enumerate() {
            let mut pair = lock(pair);
            self.set_interest(index, &mut pair, EventSet::IN);
            if pair.interest != EventSet::IN {
                return Err(io::Error::other(format!(
                    "pair {index}: cannot watch the tap queue"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_control_queue_is_offered() {
        assert_eq!(FEATURES & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        assert_ne!(FEATURES & bit(VIRTIO_NET_F_MQ), 0);
    }

    #[test]
    fn migration_is_offered_with_rarp_not_guest_announce() {
        let p = protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(p.contains(VhostUserProtocolFeatures::RARP));
        // With GUEST_ANNOUNCE acked, QEMU would never send SEND_RARP.
        assert_eq!(FEATURES & bit(VIRTIO_NET_F_GUEST_ANNOUNCE), 0);
    }

    #[test]
    fn config_space_is_virtio_net_config_little_endian() {
        use clap::Parser;
        let args = crate::Args::try_parse_from([
            "vhost-user-net",
            "--socket-path=/tmp/x.sock",
            "--tap=t",
            "--queue-pairs=2",
            "--mac=02:02:03:04:05:06",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let config = Config::try_from(args).unwrap_or_else(|e| panic!("{e}"));
        let space = config_space(&config);
        assert_eq!(space.len(), 24);
        assert_eq!(&space[..12], &[2, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0xdc, 0x05]);
        assert!(space[12..].iter().all(|&b| b == 0));
        assert_eq!(read_config(&space, 10, 4), vec![0xdc, 0x05, 0, 0]);
    }
}
