//! The vhost-user glue: features, config space, one worker thread per queue pair, and the
//! events that move frames (TX kick, RX kick, tap readable, tap writable).
//!
//! Queue pair `i` is RX queue `2i` and TX queue `2i + 1`, served by worker thread `i` with tap
//! queue `i`. Each pair has its own lock, so pairs run in parallel.
//!
//! Back-pressure: when the guest has no receive buffers the tap fd is taken out of the worker's
//! epoll (frames wait in the kernel's tap queue) until the next RX kick; when the tap would
//! block on write, the unsent TX chains are put back and TX resumes on EPOLLOUT. At most one
//! received frame and the receive chains popped for it are held per pair.
//!
//! Batching: TX chains are popped, written and given back [`TX_BATCH`] at a time, RX used
//! entries published [`RX_PUBLISH`] at a time (whole frames), each with one used-index update;
//! at most one interrupt per call, as EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT allow.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use vhost_user_common::chain::pop_parsed;
use vhost_user_common::{lock, DaemonBackend, GuestMemory, GuestMemoryAtomic};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;

use crate::args::Config;
use crate::rx::{self, Fit, RxChain};
use crate::stats::Stats;
use crate::tap::{Offloads, Tap};
use crate::tx;
use crate::{LEGACY_VNET_HDR_LEN, VNET_HDR_LEN};

/// Ring size limit we accept from the frontend.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Frames received per tap wake-up before yielding to the other events of the thread.
const RX_BUDGET: usize = 64;
/// Receive used entries published together (whole frames only).
const RX_PUBLISH: usize = 32;
/// Transmit chains popped, sent and given back together.
const TX_BATCH: usize = 32;
/// Transmit chains sent per event before yielding to the thread's other events.
const TX_BUDGET: usize = 256;
/// Room for the largest frame the tap can hand us, header included.
const RX_FRAME_BUF: usize = VNET_HDR_LEN + 65_535 + 14;

/// Index of the RX and TX rings within a worker thread's vrings.
const RX_RING: u16 = 0;
const TX_RING: u16 = 1;

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

/// The header length the guest uses with `features` (virtio 1.2, 5.1.6).
pub fn hdr_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN
    } else {
        LEGACY_VNET_HDR_LEN
    }
}

/// The tap offloads matching the guest's receive features.
pub fn offloads(features: u64) -> Offloads {
    let has = |b| features & bit(b) != 0;
    Offloads {
        csum: has(VIRTIO_NET_F_GUEST_CSUM),
        tso4: has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: has(VIRTIO_NET_F_GUEST_TSO6),
        ecn: has(VIRTIO_NET_F_GUEST_ECN),
        ufo: has(VIRTIO_NET_F_GUEST_UFO),
    }
}

/// `struct virtio_net_config` up to `mtu`: mac, status, max_virtqueue_pairs, mtu.
pub fn config_space(config: &Config) -> Vec<u8> {
    let mut space = Vec::with_capacity(12);
    space.extend_from_slice(&config.mac);
    space.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    space.extend_from_slice(&config.queue_pairs.to_le_bytes());
    space.extend_from_slice(&config.mtu.to_le_bytes());
    space
}

/// `size` bytes of `space` from `offset`, zero past its end; empty for absurd requests.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    // virtio-net's config space is well under a page; anything beyond is a broken frontend.
    const LIMIT: u64 = 4096;
    if u64::from(offset) + u64::from(size) > LIMIT {
        return Vec::new();
    }
    (offset..offset + size)
        .map(|i| space.get(i as usize).copied().unwrap_or(0))
        .collect()
}

/// One transmit chain of a batch: its head, and its iovecs in [`TxBatch::iovecs`] (none when
/// the chain is dropped).
struct TxFrame {
    head: u16,
    iovecs: Option<(usize, usize)>,
}

/// Transmit chains popped together, kept in the pair so that their storage is reused.
#[derive(Default)]
struct TxBatch {
    frames: Vec<TxFrame>,
    iovecs: Vec<libc::iovec>,
}

impl TxBatch {
    fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
    }
}

// SAFETY: the iovecs are plain addresses into guest memory, only dereferenced (by the kernel,
// in `writev`) by the worker that made them, while it holds the pair's lock and the memory
// guard they came from; they are cleared before that guard is released.
unsafe impl Send for TxBatch {}

/// Per queue pair state, behind its own lock.
struct Pair {
    /// Events the tap fd is registered for in this pair's worker epoll.
    interest: EventSet,
    /// Whether the tap queue is attached (gets frames from the kernel).
    attached: bool,
    /// The guest had no receive buffers: wait for an RX kick before reading the tap again.
    rx_starved: bool,
    /// A frame read from the tap and not yet in the guest (`rx_len` bytes of `rx_frame`).
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// Receive chains popped but not yet used (waiting for the rest of a merged frame).
    rx_held: Vec<RxChain>,
    /// Used entries of whole frames (and bad chains) not yet published.
    rx_used: Vec<(u16, u32)>,
    /// The tap would block: resume TX on EPOLLOUT.
    tx_blocked: bool,
    /// The TX budget ran out with chains left: resume TX on EPOLLOUT (right away).
    tx_more: bool,
    /// Scratch space for one batch of transmit chains.
    tx_batch: TxBatch,
    /// This pair's RX ring, kept for `stop_vring`.
    rx_vring: Option<VringRwLock>,
}

/// The vhost-user-net backend for one frontend connection. The serve loop shares it with the
/// worker threads as an `Arc`.
pub struct NetBackend {
    config: Config,
    tap: Arc<Tap>,
    stats: Arc<Stats>,
    pairs: Vec<Mutex<Pair>>,
    handlers: Mutex<Vec<Weak<VringEpollHandler<Arc<NetBackend>>>>>,
    memory: Mutex<Option<GuestMemoryAtomic>>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    space: Vec<u8>,
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
                    interest: EventSet::empty(),
                    attached,
                    rx_starved: false,
                    rx_frame: vec![0u8; RX_FRAME_BUF],
                    rx_len: 0,
                    rx_held: Vec::new(),
                    rx_used: Vec::with_capacity(RX_PUBLISH + MAX_QUEUE_SIZE),
                    tx_blocked: false,
                    tx_more: false,
                    tx_batch: TxBatch::default(),
                    rx_vring: None,
                })
            })
            .collect();
        let space = config_space(&config);
        NetBackend {
            config,
            tap,
            stats,
            pairs,
            handlers: Mutex::new(Vec::new()),
            memory: Mutex::new(None),
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            space,
        }
    }

    fn tap_event(&self) -> u16 {
        // Data values up to num_queues are the library's (rings, exit event).
        (self.num_queues() + 1) as u16
    }

    fn hdr_len(&self) -> usize {
        hdr_len(self.acked.load(Ordering::Relaxed))
    }

    fn mergeable(&self) -> bool {
        self.acked.load(Ordering::Relaxed) & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
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
        let data = u64::from(self.tap_event());
        if !pair.interest.is_empty() {
            if let Err(e) = handler.unregister_listener(fd, pair.interest, data) {
                log::error!("pair {index}: cannot unregister the tap queue: {e}");
            }
        }
        pair.interest = EventSet::empty();
        if !want.is_empty() {
            match handler.register_listener(fd, want, data) {
                Ok(()) => pair.interest = want,
                Err(e) => log::error!("pair {index}: cannot register the tap queue: {e}"),
            }
        }
    }

    fn set_attached(&self, index: usize, pair: &mut Pair, attached: bool) {
        if pair.attached == attached || !self.tap.multi_queue {
            return;
        }
        if let Some(queue) = self.tap.queues.get(index) {
            match queue.set_attached(attached) {
                Ok(()) => {
                    pair.attached = attached;
                    log::debug!(
                        "pair {index}: tap queue {}",
                        if attached { "attached" } else { "detached" }
                    );
                }
                Err(e) => log::warn!("pair {index}: TUNSETQUEUE failed: {e}"),
            }
        }
    }

    /// Moves guest transmit chains to the tap until the ring is empty or the tap is full.
    ///
    /// Chains go in batches of up to [`TX_BATCH`]: popped and checked with the ring locked,
    /// written to the tap with it unlocked (one `writev` per frame, which a tap requires), then
    /// given back with one used-index update per batch. The guest's kicks are off while the
    /// ring is drained, and it gets at most one interrupt per call.
    fn process_tx(&self, index: usize, pair: &mut Pair, vring: &VringRwLock, mem: &GuestMemory) {
        let Some(tap) = self.tap.queues.get(index) else {
            return;
        };
        let stats = &self.stats;
        let hdr_len = self.hdr_len();
        let start_used = vring.get_ref().get_queue().next_used();
        if let Err(e) = vring.disable_notification() {
            log::error!("pair {index}: TX ring: {e}");
        }
        pair.tx_more = false;
        let batch = &mut pair.tx_batch;
        let (mut sent_frames, mut dropped) = (0u64, 0u64);
        loop {
            batch.clear();
            let more = self.pop_tx_batch(index, vring, mem, hdr_len, batch);
            let mut done = 0;
            for frame in &batch.frames {
                if let Some((from, to)) = frame.iovecs {
                    let iovecs = &batch.iovecs[from..to];
                    match tap.write_frame(iovecs) {
                        Ok(_) => sent_frames += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Keep this chain and the rest for when the tap drains.
                            pair.tx_blocked = true;
                            break;
                        }
                        Err(e) => {
                            dropped += 1;
                            stats.warn(format_args!(
                                "pair {index}: the tap refused a {}-byte frame: {e}",
                                iovecs.iter().map(|v| v.iov_len).sum::<usize>()
                            ));
                        }
                    }
                }
                done += 1;
            }
            let published = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                for _ in done..batch.frames.len() {
                    queue.go_to_previous_position();
                }
                let used = batch.frames[..done].iter().map(|f| (f.head, 0));
                publish_used(queue, mem, used)
            };
            if let Err(e) = published {
                log::error!("pair {index}: TX used ring: {e}");
                break;
            }
            if !more || pair.tx_blocked {
                break;
            }
            if sent_frames + dropped >= TX_BUDGET as u64 {
                // Yield to the thread's other events; EPOLLOUT on the tap (at once, as a tap
                // is writable) brings us back, since the guest will not kick for chains it
                // already published.
                pair.tx_more = true;
                break;
            }
        }
        batch.clear();
        stats.tx_frames.fetch_add(sent_frames, Ordering::Relaxed);
        stats.tx_dropped.fetch_add(dropped, Ordering::Relaxed);
        self.signal_if_needed(index, vring, mem, start_used);
    }

    /// Pops up to [`TX_BATCH`] chains into `batch`, with their iovecs; chains that cannot be
    /// sent are counted and kept (without iovecs) to be given back. False when the ring ran
    /// dry (the guest's kicks are then back on).
    fn pop_tx_batch(
        &self,
        index: usize,
        vring: &VringRwLock,
        mem: &GuestMemory,
        hdr_len: usize,
        batch: &mut TxBatch,
    ) -> bool {
        let stats = &self.stats;
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let max = usize::from(queue.size()).max(1);
        while batch.frames.len() < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Ask for a kick when chains come, then look once more (they may have come in
                // between).
                match queue.enable_notification(mem) {
                    Ok(true) => {
                        let _ = queue.disable_notification(mem);
                        continue;
                    }
                    Ok(false) => return false,
                    Err(e) => {
                        log::error!("pair {index}: TX ring: {e}");
                        return false;
                    }
                }
            };
            let head = chain.head_index();
            let from = batch.iovecs.len();
            let iovecs = match tx::frame_iovecs(head, chain, mem, max, hdr_len, &mut batch.iovecs) {
                Ok(_) => Some((from, batch.iovecs.len())),
                Err(drop) => {
                    Stats::count(&stats.tx_dropped);
                    Stats::count(&stats.bad_chains);
                    stats.warn(format_args!("pair {index}: dropped: {drop}"));
                    None
                }
            };
            batch.frames.push(TxFrame { head, iovecs });
        }
        true
    }

    /// Interrupts the guest if the used entries published since `start_used` call for it:
    /// with EVENT_IDX when they pass the driver's `used_event`, without it unless the driver
    /// set VRING_AVAIL_F_NO_INTERRUPT (a polling driver such as DPDK's does).
    fn signal_if_needed(
        &self,
        index: usize,
        vring: &VringRwLock,
        mem: &GuestMemory,
        start_used: u16,
    ) {
        let (now, avail, size) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.next_used(), queue.avail_ring(), queue.size())
        };
        if now == start_used {
            return;
        }
        // Our used-index stores before the driver's flags or used_event.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx.load(Ordering::Relaxed) {
            let event = avail
                .checked_add(4 + 2 * u64::from(size))
                .and_then(|at| mem.load::<u16>(GuestAddress(at), Ordering::Acquire).ok());
            match event.map(u16::from_le) {
                // vring_need_event(event, new, old)
                Some(event) => {
                    now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(start_used)
                }
                None => true,
            }
        } else {
            mem.load::<u16>(GuestAddress(avail), Ordering::Acquire)
                .map_or(true, |flags| {
                    u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
                })
        };
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                log::error!("pair {index}: cannot signal the guest: {e}");
            }
        }
    }

    /// Pops receive chains until the held ones can take `frame_len` bytes. Bad chains go back
    /// to the guest empty (with the next batch of used entries). False when the ring ran dry
    /// first (the guest's kicks are then back on).
    fn gather_rx(
        &self,
        index: usize,
        pair: &mut Pair,
        vring: &VringRwLock,
        mem: &GuestMemory,
        hdr_len: usize,
    ) -> io::Result<bool> {
        let stats = &self.stats;
        let popped = pop_parsed(vring, mem);
        match popped {
            Some((head, parsed)) => match rx::check_chain(head, parsed, hdr_len) {
                Ok(chain) => pair.rx_held.push(chain),
                Err(bad) => {
                    Stats::count(&stats.bad_chains);
                    stats.warn(format_args!("pair {index}: returned empty: {bad}"));
                    pair.rx_used.push((head, 0));
                }
            },
            None => {
                // Ask for a kick when buffers come, then look once more (they may have come
                // in between).
                if !vring.enable_notification().map_err(io::Error::other)? {
                    return Ok(false);
                }
                vring.disable_notification().map_err(io::Error::other)?;
            }
        }
        Ok(true)
    }

    /// Moves frames from the tap to the guest until the tap is empty, the guest is out of
    /// buffers, or the budget is spent. Used entries are published a batch at a time (whole
    /// frames only) and the guest gets at most one interrupt per call. The guest's kicks are
    /// off unless its buffers ran out: the tap, not the kicks, drives receiving.
    fn process_rx(&self, index: usize, pair: &mut Pair, vring: &VringRwLock, mem: &GuestMemory) {
        let Some(tap) = self.tap.queues.get(index) else {
            return;
        };
        let stats = &self.stats;
        let hdr_len = self.hdr_len();
        let mergeable = self.mergeable();
        let (ring_size, start_used) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (usize::from(queue.size()), queue.next_used())
        };
        if let Err(e) = vring.disable_notification() {
            log::error!("pair {index}: RX ring: {e}");
        }
        pair.rx_used.clear();
        let mut delivered = 0u64;
        let mut frames = 0;
        while frames < RX_BUDGET {
            frames += 1;
            if pair.rx_len == 0 {
                match tap.read_frame(&mut pair.rx_frame) {
                    Ok(n) if n < hdr_len => {
                        Stats::count(&stats.rx_dropped);
                        stats.warn(format_args!("pair {index}: {n}-byte read from the tap"));
                        continue;
                    }
                    Ok(n) => pair.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        stats.warn(format_args!("pair {index}: tap read failed: {e}"));
                        break;
                    }
                }
            }
            let placed = loop {
                match rx::fit(pair.rx_len, mergeable, &pair.rx_held) {
                    Fit::Fits(n) => break Some(n),
                    Fit::TooLarge => break None,
                    Fit::NeedMore if pair.rx_held.len() >= ring_size => break None,
                    Fit::NeedMore => match self.gather_rx(index, pair, vring, mem, hdr_len) {
                        Ok(true) => {}
                        Ok(false) => {
                            pair.rx_starved = true;
                            break None;
                        }
                        Err(e) => {
                            log::error!("pair {index}: RX ring: {e}");
                            pair.rx_starved = true;
                            break None;
                        }
                    },
                }
            };
            if pair.rx_starved {
                // The frame waits in `rx_frame` for the guest's next buffers.
                break;
            }
            let frame_len = pair.rx_len;
            pair.rx_len = 0;
            let Some(n) = placed else {
                Stats::count(&stats.rx_dropped);
                stats.warn(format_args!(
                    "pair {index}: dropped a {frame_len}-byte frame larger than the guest's receive buffers"
                ));
                continue;
            };
            let frame = &mut pair.rx_frame[..frame_len];
            let chains = &pair.rx_held[..n];
            match rx::write_frame(mem, frame, hdr_len, chains, &mut pair.rx_used) {
                Ok(()) => delivered += 1,
                Err(e) => {
                    // Guest memory changed under the held chains: give them back empty.
                    Stats::count(&stats.rx_dropped);
                    stats.warn(format_args!("pair {index}: dropped a received frame: {e}"));
                    pair.rx_used.extend(chains.iter().map(|c| (c.head, 0)));
                }
            }
            pair.rx_held.drain(..n);
            if pair.rx_used.len() >= RX_PUBLISH && !self.publish_rx(index, pair, vring, mem) {
                return;
            }
        }
        if self.publish_rx(index, pair, vring, mem) {
            stats.rx_frames.fetch_add(delivered, Ordering::Relaxed);
            self.signal_if_needed(index, vring, mem, start_used);
        }
    }

    /// Publishes the pending receive used entries; false (logged) if the ring is unusable.
    fn publish_rx(
        &self,
        index: usize,
        pair: &mut Pair,
        vring: &VringRwLock,
        mem: &GuestMemory,
    ) -> bool {
        if pair.rx_used.is_empty() {
            return true;
        }
        let result = {
            let mut state = vring.get_mut();
            publish_used(state.get_queue_mut(), mem, pair.rx_used.iter().copied())
        };
        pair.rx_used.clear();
        if let Err(e) = result {
            log::error!("pair {index}: RX used ring: {e}");
            return false;
        }
        true
    }

    /// Everything one worker does for one event, with its pair locked.
    fn handle(&self, index: usize, event: u16, evset: EventSet, vrings: &[VringRwLock]) {
        let (Some(rx_vring), Some(tx_vring)) = (
            vrings.get(usize::from(RX_RING)),
            vrings.get(usize::from(TX_RING)),
        ) else {
            return;
        };
        let Some(pair) = self.pairs.get(index) else {
            return;
        };
        let Some(atomic) = lock(&self.memory).clone() else {
            return;
        };
        let guard = atomic.memory();
        let mem: &GuestMemory = &guard;
        let mut pair = lock(pair);
        let pair = &mut *pair;
        if pair.rx_vring.is_none() {
            pair.rx_vring = Some(rx_vring.clone());
        }
        let usable = |v: &VringRwLock| {
            let state = v.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        let rx_usable = usable(rx_vring);
        let tx_usable = usable(tx_vring);
        if event == RX_RING {
            pair.rx_starved = false;
        } else if event == self.tap_event() && evset.contains(EventSet::OUT) {
            pair.tx_blocked = false;
        }
        if rx_usable {
            self.set_attached(index, pair, true);
        } else if event == self.tap_event() {
            // Frames for a pair the guest disabled: stop taking them.
            self.set_attached(index, pair, false);
        }
        let tap_writable = event == self.tap_event() && evset.contains(EventSet::OUT);
        if tx_usable && !pair.tx_blocked && (event == TX_RING || tap_writable) {
            self.process_tx(index, pair, tx_vring, mem);
        }
        // Receiving is driven by the tap (level-triggered: frames left behind by the budget
        // wake us again) and by RX kicks; a TX kick has nothing to receive.
        let tap_readable = event == self.tap_event() && evset.contains(EventSet::IN);
        if rx_usable && !pair.rx_starved && (tap_readable || event == RX_RING) {
            self.process_rx(index, pair, rx_vring, mem);
        }
        let mut want = EventSet::empty();
        if rx_usable && !pair.rx_starved {
            want |= EventSet::IN;
        }
        if tx_usable && (pair.tx_blocked || pair.tx_more) {
            want |= EventSet::OUT;
        }
        self.set_interest(index, pair, want);
    }
}

/// Adds `used` to the used ring and makes them all visible with one index update: the driver
/// never sees the first buffer of a merged frame without the others, and the cache line of the
/// used index moves once per batch rather than once per frame.
fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    used: impl IntoIterator<Item = (u16, u32)>,
) -> io::Result<()> {
    let size = queue.size();
    if size == 0 {
        return Err(io::Error::other("queue has no size"));
    }
    let ring = queue.used_ring();
    let start = queue.next_used();
    let mut next = start;
    for (head, len) in used {
        let slot = u64::from(next % size);
        let addr = ring
            .checked_add(4 + 8 * slot)
            .ok_or_else(|| io::Error::other("used ring address overflows"))?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(addr))
            .map_err(io::Error::other)?;
        next = next.wrapping_add(1);
    }
    if next == start {
        return Ok(());
    }
    let idx_addr = ring
        .checked_add(2)
        .ok_or_else(|| io::Error::other("used ring address overflows"))?;
    mem.store(next.to_le(), GuestAddress(idx_addr), Ordering::Release)
        .map_err(io::Error::other)?;
    queue.set_next_used(next);
    Ok(())
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.config.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let tap = &self.tap;
        let len = hdr_len(features);
        if let Err(e) = tap.set_vnet_hdr_len(len) {
            log::error!("{}: TUNSETVNETHDRSZ {len}: {e}", tap.name);
        }
        let wanted = offloads(features);
        match tap.set_offloads(wanted) {
            Ok(flags) => log::info!(
                "{}: features {features:#x} acked, header {len} bytes, tap offloads {flags:#x} ({wanted:?})",
                tap.name
            ),
            Err(e) => log::error!("{}: TUNSETOFFLOAD: {e}", tap.name),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            // QEMU >= 8.2 then sends RESET_DEVICE on a virtio reset (driver unbind, reboot);
            // the library disables the rings, clears the features and calls reset_device().
            | VhostUserProtocolFeatures::RESET_DEVICE
        // No CONFIGURE_MEM_SLOTS: QEMU (7.2 to 8.x) drives a multiqueue net device as one
        // vhost_dev per queue pair and sends every ADD_MEM_REG (and REM_MEM_REG) once per pair,
        // which the library refuses as overlapping regions. SET_MEM_TABLE is idempotent.
    }

    fn reset_device(&self) {
        // Rings and features are reset by the library; the next SET_FEATURES sets ours again.
        log::info!("device reset by the frontend");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.space, offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        vhost_user_common::memory::check_backing(&mem.memory())?;
        *lock(&self.memory) = Some(mem);
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
        // An RX ring stops: give back the chains held for a partial frame, so the guest
        // gets every buffer back.
        if queue_index & 1 == 1 {
            return Ok(());
        }
        let index = (queue_index / 2) as usize;
        let Some(pair) = self.pairs.get(index) else {
            return Ok(());
        };
        let mut pair = lock(pair);
        if pair.rx_held.is_empty() {
            return Ok(());
        }
        let Some(rx_vring) = pair.rx_vring.clone() else {
            return Ok(());
        };
        let held: Vec<(u16, u32)> = pair.rx_held.drain(..).map(|c| (c.head, 0)).collect();
        for (head, len) in held {
            rx_vring.add_used(head, len).map_err(io::Error::other)?;
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
    fn header_length_follows_features() {
        assert_eq!(hdr_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(hdr_len(0), 10);
    }

    #[test]
    fn no_control_queue_is_offered() {
        assert_eq!(FEATURES & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        assert_ne!(FEATURES & bit(VIRTIO_NET_F_MQ), 0);
    }

    #[test]
    fn config_reads_are_exact_and_bounded() {
        let space = [1u8, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0xdc, 0x05];
        assert_eq!(read_config(&space, 0, 6), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(read_config(&space, 10, 4), vec![0xdc, 0x05, 0, 0]);
        assert_eq!(read_config(&space, 100, 8), vec![0; 8]);
        assert!(read_config(&space, u32::MAX, 8).is_empty());
    }

    #[test]
    fn offloads_follow_guest_receive_features() {
        let o = offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        assert!(o.csum && o.tso4 && !o.tso6 && !o.ufo);
        assert_eq!(offloads(bit(VIRTIO_NET_F_HOST_TSO4)), Offloads::default());
    }
}
