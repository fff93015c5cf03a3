//! One queue pair of the device: the loops that move frames between a pair's rings and its
//! tap queue. Everything here takes the pair's two [`Ring`]s, the guest memory and the tap
//! queue as arguments; the vhost-user glue ([`crate::backend`]) only says what woke the pair.
//!
//! - TX ([`QueuePair::process_tx`]): chains are taken [`TX_BATCH`] at a time, checked and
//!   turned into iovecs ([`crate::tx`]), written to the tap in one batch (one io_uring
//!   submission, [`crate::tx_uring`]; a tap takes one frame per write), then given back with
//!   one used-index update per batch. The guest's kicks are off while the ring is drained and
//!   back on when it runs dry.
//! - RX ([`QueuePair::process_rx`]): the tap drives receiving. A frame is read into the pair's
//!   buffer, receive chains are taken until they hold it (several with MRG_RXBUF), it is copied
//!   in ([`crate::rx`]), and used entries are published [`RX_PUBLISH`] at a time, whole frames
//!   only. The guest's kicks are on only when it ran out of buffers: the frame then waits in
//!   the pair, and the tap is not read again until the guest kicks the RX ring.
//! - At most one interrupt per call on each ring ([`Ring::notify`]).
//!
//! Back-pressure: when the guest has no receive buffers the pair stops asking for the tap's
//! readable events (frames wait in the kernel's tap queue) until the next RX kick; when the tap
//! would block on write, the unsent TX chains are put back and TX resumes when the tap is
//! writable. At most one received frame and the receive chains taken for it are held.
//!
//! Nothing is allocated per frame: the receive buffer, the held chains, the transmit batch and
//! the chain walker's segment lists are the pair's own and reused.

use std::io;
use std::sync::atomic::Ordering;

use vhost_user_common::chain::ChainBuffers;
use vhost_user_common::ring::{Ring, RingHooks};
use vhost_user_common::GuestMemory;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

use crate::rx::{self, Fit, HeldChains};
use crate::stats::Stats;
use crate::tx;
use crate::{LEGACY_VNET_HDR_LEN, VNET_HDR_LEN};

/// Frames received per tap wake-up before yielding to the other events of the thread.
pub const RX_BUDGET: usize = 64;
/// Receive used entries published together (whole frames only).
pub const RX_PUBLISH: usize = 32;
/// Transmit chains taken, sent and given back together.
pub const TX_BATCH: usize = 32;
/// Transmit chains sent per event before yielding to the thread's other events.
pub const TX_BUDGET: usize = 256;
/// Room for the largest frame the tap can hand us, header included.
const RX_FRAME_BUF: usize = VNET_HDR_LEN + 65_535 + 14;

/// The host side of a queue pair: one tap queue, frames prefixed by a virtio-net header.
/// [`crate::tap::TapQueue`] in the daemon; a fake in the tests.
pub trait TapIo {
    /// Reads one frame (virtio-net header first) into `buf`; `WouldBlock` when none waits.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame (virtio-net header first) gathered from `iovecs`; `WouldBlock` when
    /// the tap is full.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable for the whole call.
    unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize>;

    /// Writes `frames` (ranges of `iovecs`) in order, pushing each one's result onto
    /// `results`, and stops once the tap is full (a `WouldBlock` pushed last). Frames after a
    /// `WouldBlock` may have been tried as well (a tap that drained in between takes them).
    /// One [`TapIo::write_frame`] per frame, stopping at the first `WouldBlock`, unless the
    /// tap does better.
    ///
    /// # Safety
    ///
    /// As [`TapIo::write_frame`], for every frame.
    unsafe fn write_frames(
        &self,
        iovecs: &[libc::iovec],
        frames: &[(usize, usize)],
        results: &mut Vec<io::Result<usize>>,
    ) {
        // SAFETY: the same contract, passed on.
        unsafe { write_frames_one_by_one(self, iovecs, frames, results) }
    }
}

fn would_block(result: &io::Result<usize>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// [`TapIo::write_frames`] with one [`TapIo::write_frame`] per frame.
///
/// # Safety
///
/// As [`TapIo::write_frame`], for every frame.
pub unsafe fn write_frames_one_by_one<T: TapIo + ?Sized>(
    tap: &T,
    iovecs: &[libc::iovec],
    frames: &[(usize, usize)],
    results: &mut Vec<io::Result<usize>>,
) {
    for &(from, to) in frames {
        let frame = iovecs.get(from..to).unwrap_or_default();
        // SAFETY: the caller's contract.
        let result = unsafe { tap.write_frame(frame) };
        let full = would_block(&result);
        results.push(result);
        if full {
            return;
        }
    }
}

const fn bit(b: u32) -> u64 {
    1 << b
}

/// How frames are laid out in the guest's buffers, from the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The virtio-net header's length (virtio 1.2, 5.1.6).
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several receive chains.
    pub mergeable: bool,
}

impl Framing {
    pub fn from_features(features: u64) -> Framing {
        let mergeable = features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let hdr_len = if mergeable || features & bit(VIRTIO_F_VERSION_1) != 0 {
            VNET_HDR_LEN
        } else {
            LEGACY_VNET_HDR_LEN
        };
        Framing { hdr_len, mergeable }
    }
}

/// What woke a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The guest kicked the RX ring (it added receive buffers).
    RxKick,
    /// The guest kicked the TX ring.
    TxKick,
    /// The tap queue became readable and/or writable.
    Tap { readable: bool, writable: bool },
    /// Anything else (a ring became ready): nothing to move, only the interest to renew.
    Other,
}

/// The tap events a queue pair wants next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapInterest {
    /// Frames are welcome (the RX ring is usable and the guest has buffers).
    pub read: bool,
    /// TX has chains left (the tap was full, or the budget ran out).
    pub write: bool,
}

/// One transmit chain of a batch: its head, and its iovecs in [`TxBatch::iovecs`] (none when
/// the chain is dropped).
#[derive(Debug)]
struct TxFrame {
    head: u16,
    iovecs: Option<(usize, usize)>,
}

/// Transmit chains taken together, kept in the pair so that their storage is reused.
#[derive(Debug, Default)]
struct TxBatch {
    frames: Vec<TxFrame>,
    iovecs: Vec<libc::iovec>,
    /// The iovec ranges of the frames to send (the chains not dropped), in order.
    sendable: Vec<(usize, usize)>,
    /// The tap's answer for each sendable frame, in order ([`TapIo::write_frames`]).
    results: Vec<io::Result<usize>>,
}

impl TxBatch {
    fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
        self.sendable.clear();
        self.results.clear();
    }
}

// SAFETY: the iovecs are plain addresses into guest memory, only dereferenced (by the kernel,
// in `writev`) by the worker that made them, in the same `process_tx` call, while it holds the
// pair and the memory guard they came from; they are cleared before that call returns.
unsafe impl Send for TxBatch {}

/// The state of one queue pair between events.
#[derive(Debug)]
pub struct QueuePair {
    index: usize,
    /// The guest had no receive buffers: wait for an RX kick before reading the tap again.
    rx_starved: bool,
    /// A frame read from the tap and not yet in the guest (`rx_len` bytes of `rx_frame`).
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// Receive chains taken but not yet used (waiting for the rest of a merged frame).
    rx_held: HeldChains,
    /// The tap would block: resume TX when it is writable.
    tx_blocked: bool,
    /// The TX budget ran out with chains left: resume TX when the tap is writable (at once).
    tx_more: bool,
    /// Scratch space for one batch of transmit chains.
    tx_batch: TxBatch,
    /// Scratch space to walk one transmit chain.
    tx_chain: ChainBuffers,
}

impl QueuePair {
    /// Pair `index` (for log lines), with its buffers allocated once.
    pub fn new(index: usize) -> QueuePair {
        QueuePair {
            index,
            rx_starved: false,
            rx_frame: vec![0u8; RX_FRAME_BUF],
            rx_len: 0,
            rx_held: HeldChains::default(),
            tx_blocked: false,
            tx_more: false,
            tx_batch: TxBatch::default(),
            tx_chain: ChainBuffers::default(),
        }
    }

    /// Everything the pair does for one wake-up: TX on a TX kick or a writable tap, RX on an
    /// RX kick or a readable tap (never on a TX kick: it has nothing to receive). Returns the
    /// tap events to wait for next.
    #[allow(clippy::too_many_arguments)]
    pub fn handle<T: TapIo + ?Sized, H: RingHooks>(
        &mut self,
        wake: Wake,
        rx: &mut Ring<H>,
        tx: &mut Ring<H>,
        mem: &GuestMemory,
        tap: &T,
        framing: Framing,
        stats: &Stats,
    ) -> TapInterest {
        let (tap_readable, tap_writable) = match wake {
            Wake::Tap { readable, writable } => (readable, writable),
            _ => (false, false),
        };
        if wake == Wake::RxKick {
            self.rx_starved = false;
        }
        if tap_writable {
            self.tx_blocked = false;
        }
        if tx.is_usable() && !self.tx_blocked && (wake == Wake::TxKick || tap_writable) {
            self.process_tx(tx, mem, tap, framing, stats);
        }
        if rx.is_usable() && !self.rx_starved && (wake == Wake::RxKick || tap_readable) {
            self.process_rx(rx, mem, tap, framing, stats);
        }
        self.interest(rx, tx)
    }

    /// The tap events wanted in the pair's current state.
    pub fn interest<H: RingHooks>(&self, rx: &Ring<H>, tx: &Ring<H>) -> TapInterest {
        TapInterest {
            read: rx.is_usable() && !self.rx_starved,
            write: tx.is_usable() && (self.tx_blocked || self.tx_more),
        }
    }

    /// Moves guest transmit chains to the tap until the ring is empty, the tap is full or the
    /// budget is spent.
    pub fn process_tx<T: TapIo + ?Sized, H: RingHooks>(
        &mut self,
        ring: &mut Ring<H>,
        mem: &GuestMemory,
        tap: &T,
        framing: Framing,
        stats: &Stats,
    ) {
        let index = self.index;
        let max = usize::from(ring.size()).max(1);
        ring.disable_notifications(mem);
        self.tx_more = false;
        let (mut sent, mut dropped) = (0u64, 0u64);
        loop {
            let batch = &mut self.tx_batch;
            batch.clear();
            let tx_chain = &mut self.tx_chain;
            // Kicks come back on when the ring runs dry.
            let more = ring.pop_batch(mem, TX_BATCH, |chain| {
                let head = chain.head_index();
                let from = batch.iovecs.len();
                let iovecs = match tx::frame_iovecs(
                    tx_chain,
                    head,
                    chain,
                    mem,
                    max,
                    framing.hdr_len,
                    &mut batch.iovecs,
                ) {
                    Ok(_) => Some((from, batch.iovecs.len())),
                    Err(drop) => {
                        dropped += 1;
                        Stats::count(&stats.bad_chains);
                        stats.warn(format_args!("pair {index}: dropped: {drop}"));
                        None
                    }
                };
                batch.frames.push(TxFrame { head, iovecs });
            }) == TX_BATCH;
            batch
                .sendable
                .extend(batch.frames.iter().filter_map(|frame| frame.iovecs));
            // SAFETY: the iovecs were made from bounds-checked descriptors of `mem`, which the
            // caller's guard keeps mapped for this whole call.
            unsafe { tap.write_frames(&batch.iovecs, &batch.sendable, &mut batch.results) };
            // Frames up to the last one the tap took or refused are done; the rest wait for
            // room. A frame the tap had no room for while a later one went out is dropped
            // rather than sent out of order.
            let settled = batch.results.len()
                - batch
                    .results
                    .iter()
                    .rev()
                    .take_while(|r| would_block(r))
                    .count();
            let mut results = batch.results.iter().take(settled);
            let mut done = 0;
            for frame in &batch.frames {
                if let Some((from, to)) = frame.iovecs {
                    match results.next() {
                        Some(Ok(_)) => sent += 1,
                        Some(Err(e)) => {
                            dropped += 1;
                            let len: usize = batch
                                .iovecs
                                .get(from..to)
                                .unwrap_or_default()
                                .iter()
                                .map(|v| v.iov_len)
                                .sum();
                            stats.warn(format_args!(
                                "pair {index}: the tap refused a {len}-byte frame: {e}"
                            ));
                        }
                        None => {
                            // Keep this chain and the rest for when the tap drains.
                            self.tx_blocked = true;
                            break;
                        }
                    }
                }
                done += 1;
            }
            for _ in done..batch.frames.len() {
                ring.put_back();
            }
            for frame in batch.frames.iter().take(done) {
                ring.push_used(frame.head, 0);
            }
            ring.publish(mem);
            if !more || self.tx_blocked {
                break;
            }
            if sent + dropped >= TX_BUDGET as u64 {
                // Yield to the thread's other events; the tap's writable event (at once, as a
                // tap is writable) brings us back, since the guest will not kick for chains it
                // already made available.
                self.tx_more = true;
                break;
            }
        }
        self.tx_batch.clear();
        stats.tx_frames.fetch_add(sent, Ordering::Relaxed);
        stats.tx_dropped.fetch_add(dropped, Ordering::Relaxed);
        ring.notify(mem);
    }

    /// Moves frames from the tap to the guest until the tap is empty, the guest is out of
    /// buffers, or the budget is spent.
    pub fn process_rx<T: TapIo + ?Sized, H: RingHooks>(
        &mut self,
        ring: &mut Ring<H>,
        mem: &GuestMemory,
        tap: &T,
        framing: Framing,
        stats: &Stats,
    ) {
        let index = self.index;
        let hdr_len = framing.hdr_len;
        let max = usize::from(ring.size()).max(1);
        ring.disable_notifications(mem);
        let mut delivered = 0u64;
        for _ in 0..RX_BUDGET {
            if self.rx_len == 0 {
                match tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < hdr_len => {
                        Stats::count(&stats.rx_dropped);
                        stats.warn(format_args!("pair {index}: {n}-byte read from the tap"));
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        stats.warn(format_args!("pair {index}: tap read failed: {e}"));
                        break;
                    }
                }
            }
            let placed = loop {
                match rx::fit(self.rx_len, framing.mergeable, self.rx_held.chains()) {
                    Fit::Fits(n) => break Some(n),
                    Fit::TooLarge => break None,
                    Fit::NeedMore if self.rx_held.len() >= max => break None,
                    Fit::NeedMore => {
                        // Kicks come back on only when the guest is out of buffers.
                        let Some(chain) = ring.pop(mem) else {
                            self.rx_starved = true;
                            break None;
                        };
                        let head = chain.head_index();
                        if let Err(bad) = self.rx_held.take(head, chain, mem, max, hdr_len) {
                            Stats::count(&stats.bad_chains);
                            stats.warn(format_args!("pair {index}: returned empty: {bad}"));
                            ring.push_used(head, 0);
                        }
                    }
                }
            };
            if self.rx_starved {
                // The frame waits in `rx_frame` for the guest's next buffers.
                break;
            }
            let frame_len = self.rx_len;
            self.rx_len = 0;
            let Some(n) = placed else {
                Stats::count(&stats.rx_dropped);
                stats.warn(format_args!(
                    "pair {index}: dropped a {frame_len}-byte frame larger than the guest's receive buffers"
                ));
                continue;
            };
            let frame = self.rx_frame.get_mut(..frame_len).unwrap_or_default();
            let chains = self.rx_held.chains().get(..n).unwrap_or_default();
            let written = rx::write_frame(mem, frame, hdr_len, chains, |head, len| {
                ring.push_used(head, len)
            });
            match written {
                Ok(()) => delivered += 1,
                Err(e) => {
                    // Guest memory changed under the held chains: give them back empty.
                    Stats::count(&stats.rx_dropped);
                    stats.warn(format_args!("pair {index}: dropped a received frame: {e}"));
                    for chain in chains {
                        ring.push_used(chain.head, 0);
                    }
                }
            }
            self.rx_held.release(n);
            if ring.pending_used() >= RX_PUBLISH {
                ring.publish(mem);
            }
        }
        ring.complete(mem);
        stats.rx_frames.fetch_add(delivered, Ordering::Relaxed);
    }

    /// The RX ring is stopping: queues the chains held for a partial frame as used (empty),
    /// so that the guest gets every buffer back. The frame itself stays for the next start.
    pub fn return_held<H: RingHooks>(&mut self, rx: &mut Ring<H>) {
        for head in self.rx_held.release_all() {
            rx.push_used(head, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    use vhost_user_backend::VringT;
    use vhost_user_common::lock;
    use vhost_user_common::{GuestMemoryAtomic, Vring};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
    };
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

    const SIZE: u16 = 128;
    const MEM_SIZE: u64 = 0x40_0000;

    /// A tap in memory: frames to hand to the pair, frames it wrote, and how many more it
    /// takes before it is full.
    #[derive(Default)]
    struct FakeTap {
        incoming: Mutex<VecDeque<Vec<u8>>>,
        sent: Mutex<Vec<Vec<u8>>>,
        room: Mutex<Option<usize>>,
        /// Like the io_uring tap: a batch tries every frame, and these attempts (counted from
        /// 0 over the tap's life) find it full although it has room.
        busy_attempts: Mutex<Option<Vec<usize>>>,
        attempts: Mutex<usize>,
    }

    impl TapIo for FakeTap {
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(frame) = lock(&self.incoming).pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            Ok(n)
        }

        unsafe fn write_frames(
            &self,
            iovecs: &[libc::iovec],
            frames: &[(usize, usize)],
            results: &mut Vec<io::Result<usize>>,
        ) {
            if lock(&self.busy_attempts).is_none() {
                // SAFETY: the caller's contract, passed on.
                return unsafe { write_frames_one_by_one(self, iovecs, frames, results) };
            }
            for &(from, to) in frames {
                // SAFETY: the caller's contract, passed on.
                results.push(unsafe { self.write_frame(&iovecs[from..to]) });
            }
        }

        unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
            let attempt = {
                let mut attempts = lock(&self.attempts);
                *attempts += 1;
                *attempts - 1
            };
            let busy = lock(&self.busy_attempts)
                .as_ref()
                .is_some_and(|busy| busy.contains(&attempt));
            let mut room = lock(&self.room);
            if *room == Some(0) || busy {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut frame = Vec::new();
            for iov in iovecs {
                // SAFETY: the caller guarantees every iovec is readable memory for this call.
                let part =
                    unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
                frame.extend_from_slice(part);
            }
            if let Some(room) = room.as_mut() {
                *room -= 1;
            }
            let len = frame.len();
            lock(&self.sent).push(frame);
            Ok(len)
        }
    }

    /// Records every used-index update of a ring.
    struct Published(Arc<Mutex<Vec<u16>>>);

    impl RingHooks for Published {
        fn returned(&mut self, used_idx: u16) {
            lock(&self.0).push(used_idx);
        }
    }

    /// The guest driver's side of one ring.
    struct Driver {
        queue: MockSplitQueue<'static, GuestMemory>,
        used: GuestAddress,
        next_desc: u16,
        seen: u16,
        calls: File,
        published: Arc<Mutex<Vec<u16>>>,
    }

    impl Driver {
        /// Makes a chain of `(addr, len, flags)` descriptors available; returns its head.
        fn add(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
            let head = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i + 1 == descs.len();
                    let (flags, next) = if last {
                        (flags, 0)
                    } else {
                        (flags | VRING_DESC_F_NEXT, head + i as u16 + 1)
                    };
                    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
                })
                .collect();
            self.queue
                .add_desc_chains(&raw, head)
                .unwrap_or_else(|e| panic!("{e:?}"));
            self.next_desc += descs.len() as u16;
            head
        }

        /// The used entries the device added since the last call.
        fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
            let idx: u16 = read(mem, self.used.unchecked_add(2));
            let mut out = Vec::new();
            while self.seen != idx {
                let at = self.used.unchecked_add(4 + 8 * u64::from(self.seen % SIZE));
                let id: u32 = read(mem, at);
                let len: u32 = read(mem, at.unchecked_add(4));
                out.push((id as u16, len));
                self.seen = self.seen.wrapping_add(1);
            }
            out
        }

        /// Interrupts since the last call.
        fn interrupts(&mut self) -> u64 {
            let mut count = [0u8; 8];
            match self.calls.read_exact(&mut count) {
                Ok(()) => u64::from_ne_bytes(count),
                Err(_) => 0,
            }
        }

        /// Whether the device asks for kicks: no VRING_USED_F_NO_NOTIFY without EVENT_IDX,
        /// `avail_event` at the driver's index with it.
        fn kicks_wanted(&self, mem: &GuestMemory, event_idx: bool) -> bool {
            if event_idx {
                let avail_idx: u16 = read(mem, self.queue.avail_addr().unchecked_add(2));
                let avail_event: u16 = read(mem, self.used.unchecked_add(4 + 8 * u64::from(SIZE)));
                avail_event == avail_idx
            } else {
                let flags: u16 = read(mem, self.used);
                flags & VRING_USED_F_NO_NOTIFY as u16 == 0
            }
        }
    }

    fn read<T: vm_memory::ByteValued>(mem: &GuestMemory, at: GuestAddress) -> T {
        mem.read_obj(at).unwrap_or_else(|e| panic!("{e}"))
    }

    fn call_eventfd(vring: &Vring) -> File {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let reader = file.try_clone().unwrap_or_else(|e| panic!("{e}"));
        vring.set_call(Some(file));
        reader
    }

    fn ring(
        mem: &'static GuestMemory,
        atomic: &GuestMemoryAtomic,
        at: u64,
        used: GuestAddress,
        event_idx: bool,
        label: &str,
    ) -> (Ring<Option<Published>>, Driver) {
        let queue = MockSplitQueue::create(mem, GuestAddress(at), SIZE);
        let vring = Vring::new(atomic.clone(), SIZE).unwrap_or_else(|e| panic!("{e}"));
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, used.0)
            .unwrap_or_else(|e| panic!("{e}"));
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let calls = call_eventfd(&vring);
        let published = Arc::new(Mutex::new(Vec::new()));
        let ring = Ring::with_hooks(vring, label, Some(Published(published.clone())));
        let driver = Driver {
            queue,
            used,
            next_desc: 0,
            seen: 0,
            calls,
            published,
        };
        (ring, driver)
    }

    struct Fixture {
        mem: GuestMemoryAtomic,
        rx: Ring<Option<Published>>,
        tx: Ring<Option<Published>>,
        rx_guest: Driver,
        tx_guest: Driver,
        tap: FakeTap,
        pair: QueuePair,
        stats: Stats,
        framing: Framing,
        event_idx: bool,
        next_buf: u64,
    }

    /// A pair whose rings are driven by mock drivers in 4 MiB of guest memory (the mock's own
    /// used ring overlaps the avail ring's `used_event`, so the used rings go elsewhere).
    fn fixture(mergeable: bool, event_idx: bool) -> Fixture {
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .unwrap_or_else(|e| panic!("memory: {e}")),
        ));
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let (rx, rx_guest) = ring(
            mem,
            &atomic,
            0,
            GuestAddress(0x8000),
            event_idx,
            "pair 0 RX",
        );
        let (tx, tx_guest) = ring(
            mem,
            &atomic,
            0x2000,
            GuestAddress(0x9000),
            event_idx,
            "pair 0 TX",
        );
        let features = bit(VIRTIO_F_VERSION_1)
            | if mergeable {
                bit(VIRTIO_NET_F_MRG_RXBUF)
            } else {
                0
            };
        Fixture {
            mem: atomic,
            rx,
            tx,
            rx_guest,
            tx_guest,
            tap: FakeTap::default(),
            pair: QueuePair::new(0),
            stats: Stats::default(),
            framing: Framing::from_features(features),
            event_idx,
            next_buf: 0x10_0000,
        }
    }

    impl Fixture {
        fn wake(&mut self, wake: Wake) -> TapInterest {
            let mem = self.mem.memory();
            self.pair.handle(
                wake,
                &mut self.rx,
                &mut self.tx,
                &mem,
                &self.tap,
                self.framing,
                &self.stats,
            )
        }

        fn alloc(&mut self, len: u32) -> u64 {
            let addr = self.next_buf;
            self.next_buf += u64::from(len).next_multiple_of(0x100);
            addr
        }

        /// Puts `bytes` in guest memory, split into descriptors of `split` bytes at most.
        fn tx_chain(&mut self, bytes: &[u8], split: usize) -> u16 {
            let mem = self.mem.memory();
            let mut descs = Vec::new();
            for part in bytes.chunks(split) {
                let addr = self.alloc(part.len() as u32);
                mem.write_slice(part, GuestAddress(addr))
                    .unwrap_or_else(|e| panic!("{e}"));
                descs.push((addr, part.len() as u32, 0));
            }
            self.tx_guest.add(&descs)
        }

        /// Posts a receive chain of one `len`-byte buffer; returns (head, address).
        fn rx_buffer(&mut self, len: u32) -> (u16, u64) {
            let addr = self.alloc(len);
            (self.rx_guest.add(&[(addr, len, VRING_DESC_F_WRITE)]), addr)
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem
                .memory()
                .read_slice(&mut out, GuestAddress(addr))
                .unwrap_or_else(|e| panic!("{e}"));
            out
        }

        fn tx_used(&mut self) -> Vec<(u16, u32)> {
            let mem = self.mem.memory();
            self.tx_guest.take_used(&mem)
        }

        fn rx_used(&mut self) -> Vec<(u16, u32)> {
            let mem = self.mem.memory();
            self.rx_guest.take_used(&mem)
        }

        fn sent(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut *lock(&self.tap.sent))
        }

        fn tap_receives(&self, frame: Vec<u8>) {
            lock(&self.tap.incoming).push_back(frame);
        }
    }

    /// A frame as the guest or the tap writes it: a header (NEEDS_CSUM, csum offsets) and a
    /// payload that tells frames apart.
    fn frame(seed: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        f.extend((0..payload).map(|i| seed.wrapping_add(i as u8)));
        f
    }

    fn tap_readable() -> Wake {
        Wake::Tap {
            readable: true,
            writable: false,
        }
    }

    fn tap_writable() -> Wake {
        Wake::Tap {
            readable: false,
            writable: true,
        }
    }

    #[test]
    fn framing_follows_features() {
        assert_eq!(Framing::from_features(bit(VIRTIO_F_VERSION_1)).hdr_len, 12);
        let mrg = Framing::from_features(bit(VIRTIO_NET_F_MRG_RXBUF));
        assert_eq!((mrg.hdr_len, mrg.mergeable), (12, true));
        assert_eq!(Framing::from_features(0).hdr_len, 10);
    }

    #[test]
    fn tx_frames_reach_the_tap_byte_exact_with_their_header() {
        let mut f = fixture(false, true);
        let a = frame(1, 100);
        let b = frame(2, 64);
        // The header alone, then the payload in two parts; then everything in one buffer.
        let mem = f.mem.memory();
        let hdr = f.alloc(12);
        let p1 = f.alloc(60);
        let p2 = f.alloc(40);
        for (addr, bytes) in [(hdr, &a[..12]), (p1, &a[12..72]), (p2, &a[72..])] {
            mem.write_slice(bytes, GuestAddress(addr))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let head_a = f.tx_guest.add(&[(hdr, 12, 0), (p1, 60, 0), (p2, 40, 0)]);
        let head_b = f.tx_chain(&b, b.len());
        let want = f.wake(Wake::TxKick);
        assert_eq!(f.sent(), vec![a, b]);
        assert_eq!(f.tx_used(), vec![(head_a, 0), (head_b, 0)]);
        assert_eq!(f.stats.tx_frames.load(Ordering::Relaxed), 2);
        assert!(!want.write, "nothing left to send");
        assert!(want.read, "receiving goes on");
        assert_eq!(f.tx_guest.interrupts(), 1);
        assert!(
            f.tx_guest.kicks_wanted(&mem, f.event_idx),
            "kicks are back on once the ring ran dry"
        );
    }

    #[test]
    fn bad_tx_chains_are_dropped_and_returned() {
        let mut f = fixture(false, false);
        let short = f.tx_chain(&[0u8; 8], 8);
        let outside = f.tx_guest.add(&[(MEM_SIZE - 16, 64, 0)]);
        let buf = f.alloc(64);
        let write_only = f.tx_guest.add(&[(buf, 64, VRING_DESC_F_WRITE)]);
        let good = frame(3, 50);
        let head = f.tx_chain(&good, 20);
        f.wake(Wake::TxKick);
        assert_eq!(f.sent(), vec![good]);
        assert_eq!(
            f.tx_used(),
            vec![(short, 0), (outside, 0), (write_only, 0), (head, 0)]
        );
        assert_eq!(f.stats.tx_dropped.load(Ordering::Relaxed), 3);
        assert_eq!(f.stats.bad_chains.load(Ordering::Relaxed), 3);
        let mem = f.mem.memory();
        assert!(f.tx_guest.kicks_wanted(&mem, f.event_idx));
    }

    #[test]
    fn a_full_tap_keeps_tx_chains_until_it_is_writable() {
        let mut f = fixture(false, true);
        *lock(&f.tap.room) = Some(1);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(i, 60)).collect();
        let heads: Vec<u16> = frames.iter().map(|fr| f.tx_chain(fr, 64)).collect();
        let want = f.wake(Wake::TxKick);
        assert_eq!(f.sent(), frames[..1].to_vec());
        assert_eq!(f.tx_used(), vec![(heads[0], 0)]);
        assert!(want.write, "wait for the tap to drain");
        // A TX kick while the tap is full changes nothing.
        f.wake(Wake::TxKick);
        assert!(f.sent().is_empty());
        *lock(&f.tap.room) = None;
        let want = f.wake(tap_writable());
        assert_eq!(f.sent(), frames[1..].to_vec());
        assert_eq!(f.tx_used(), vec![(heads[1], 0), (heads[2], 0)]);
        assert!(!want.write);
    }

    #[test]
    fn a_frame_the_tap_was_full_for_is_dropped_when_a_later_one_went_out() {
        let mut f = fixture(false, true);
        // Attempts 1 and 3 find the tap full, attempt 2 gets in (the tap drained in between),
        // and so does nothing after 3 until the tap is writable again.
        *lock(&f.tap.busy_attempts) = Some(vec![1, 3, 4]);
        let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 60)).collect();
        let heads: Vec<u16> = frames.iter().map(|fr| f.tx_chain(fr, 64)).collect();
        let want = f.wake(Wake::TxKick);
        // Frame 1 would now go out after frame 2: it is dropped, not reordered.
        assert_eq!(f.sent(), vec![frames[0].clone(), frames[2].clone()]);
        assert_eq!(
            f.tx_used(),
            vec![(heads[0], 0), (heads[1], 0), (heads[2], 0)]
        );
        assert_eq!(f.stats.tx_dropped.load(Ordering::Relaxed), 1);
        assert!(want.write, "frames 3 and 4 wait for room");
        let want = f.wake(tap_writable());
        assert_eq!(f.sent(), frames[3..].to_vec());
        assert_eq!(f.tx_used(), vec![(heads[3], 0), (heads[4], 0)]);
        assert!(!want.write);
    }

    #[test]
    fn tx_gives_chains_back_with_one_used_index_update_per_batch() {
        let mut f = fixture(false, true);
        let count = TX_BATCH + 8;
        for i in 0..count {
            f.tx_chain(&frame(i as u8, 30), 64);
        }
        f.wake(Wake::TxKick);
        assert_eq!(f.sent().len(), count);
        assert_eq!(
            *lock(&f.tx_guest.published),
            vec![TX_BATCH as u16, count as u16]
        );
        assert_eq!(f.tx_guest.interrupts(), 1, "one interrupt per call");
    }

    #[test]
    fn rx_frame_is_written_with_its_header_into_one_chain() {
        let mut f = fixture(false, true);
        let (head, addr) = f.rx_buffer(2048);
        let sent = frame(4, 100);
        f.tap_receives(sent.clone());
        let want = f.wake(tap_readable());
        assert_eq!(f.rx_used(), vec![(head, 112)]);
        let got = f.guest_bytes(addr, 112);
        assert_eq!(&got[..10], &sent[..10], "the tap's header is passed on");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &sent[12..]);
        assert_eq!(f.stats.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(f.rx_guest.interrupts(), 1);
        assert!(want.read);
    }

    #[test]
    fn rx_frame_is_merged_across_chains_with_mrg_rxbuf() {
        let mut f = fixture(true, true);
        let bufs: Vec<(u16, u64)> = (0..4).map(|_| f.rx_buffer(64)).collect();
        let sent = frame(5, 150); // 162 bytes: three buffers
        f.tap_receives(sent.clone());
        f.wake(tap_readable());
        assert_eq!(
            f.rx_used(),
            vec![(bufs[0].0, 64), (bufs[1].0, 64), (bufs[2].0, 34)]
        );
        assert_eq!(
            *lock(&f.rx_guest.published),
            vec![3],
            "the merged frame appears at once"
        );
        let mut got = Vec::new();
        for (i, &(_, addr)) in bufs[..3].iter().enumerate() {
            got.extend(f.guest_bytes(addr, if i < 2 { 64 } else { 34 }));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[12..], &sent[12..]);
        // The fourth buffer is still the guest's, for the next frame.
        f.tap_receives(frame(6, 20));
        f.wake(tap_readable());
        assert_eq!(f.rx_used(), vec![(bufs[3].0, 32)]);
    }

    #[test]
    fn rx_waits_when_the_guest_has_no_buffers_and_resumes_on_its_kick() {
        let mut f = fixture(false, false);
        let frames: Vec<Vec<u8>> = (0..2).map(|i| frame(i, 80)).collect();
        for fr in &frames {
            f.tap_receives(fr.clone());
        }
        let want = f.wake(tap_readable());
        assert!(f.rx_used().is_empty());
        assert!(
            !want.read,
            "the tap is left alone until the guest adds buffers"
        );
        let mem = f.mem.memory();
        assert!(
            f.rx_guest.kicks_wanted(&mem, false),
            "kicks are on: the guest ran out of buffers"
        );
        // The tap staying readable does not make the pair read it.
        f.wake(tap_readable());
        assert_eq!(
            lock(&f.tap.incoming).len(),
            1,
            "one frame waits in the pair"
        );
        let (h1, a1) = f.rx_buffer(2048);
        let (h2, a2) = f.rx_buffer(2048);
        let want = f.wake(Wake::RxKick);
        assert_eq!(f.rx_used(), vec![(h1, 92), (h2, 92)]);
        assert_eq!(&f.guest_bytes(a1, 92)[12..], &frames[0][12..]);
        assert_eq!(&f.guest_bytes(a2, 92)[12..], &frames[1][12..]);
        assert!(want.read);
        assert!(
            !f.rx_guest.kicks_wanted(&mem, false),
            "with buffers left to use, the tap drives receiving, not kicks"
        );
    }

    #[test]
    fn rx_publishes_once_per_batch_and_interrupts_once() {
        let mut f = fixture(false, true);
        let count = RX_PUBLISH + 8;
        for i in 0..count {
            f.rx_buffer(256);
            f.tap_receives(frame(i as u8, 40));
        }
        f.wake(tap_readable());
        assert_eq!(f.rx_used().len(), count);
        assert_eq!(
            *lock(&f.rx_guest.published),
            vec![RX_PUBLISH as u16, count as u16]
        );
        assert_eq!(f.rx_guest.interrupts(), 1);
    }

    #[test]
    fn bad_rx_chains_come_back_empty_and_large_frames_are_dropped() {
        let mut f = fixture(false, true);
        let tiny = f.rx_buffer(8);
        let outside = f.rx_guest.add(&[(MEM_SIZE - 16, 2048, VRING_DESC_F_WRITE)]);
        let (small, _) = f.rx_buffer(64);
        let (good, addr) = f.rx_buffer(2048);
        // Without MRG_RXBUF a 112-byte frame cannot fit the 64-byte chain: it is dropped (the
        // chain stays held for the next frame).
        f.tap_receives(frame(7, 100));
        f.tap_receives(frame(8, 40));
        f.tap_receives(frame(9, 100));
        f.wake(tap_readable());
        assert_eq!(
            f.rx_used(),
            vec![(tiny.0, 0), (outside, 0), (small, 52), (good, 112)]
        );
        assert_eq!(&f.guest_bytes(addr, 112)[12..], &frame(9, 100)[12..]);
        assert_eq!(f.stats.bad_chains.load(Ordering::Relaxed), 2);
        assert_eq!(f.stats.rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn held_chains_go_back_when_the_ring_stops() {
        let mut f = fixture(true, true);
        let (head, _) = f.rx_buffer(64);
        f.tap_receives(frame(1, 150));
        let want = f.wake(tap_readable());
        assert!(!want.read, "one buffer is not enough: starved");
        assert!(f.rx_used().is_empty());
        f.pair.return_held(&mut f.rx);
        f.rx.publish(&f.mem.memory());
        assert_eq!(f.rx_used(), vec![(head, 0)]);
    }

    /// Counts the allocations of the calling thread (tests run in parallel threads).
    struct Counting;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn allocations() -> u64 {
        ALLOCATIONS.with(|c| c.get())
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the thread-local
    // counter has a const initializer and no destructor, so counting never allocates.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// A tap that hands out the same frame `to_read` times and swallows what is written,
    /// without allocating.
    struct QuietTap {
        frame: Vec<u8>,
        to_read: std::cell::Cell<usize>,
        written: std::cell::Cell<usize>,
    }

    impl TapIo for QuietTap {
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            if self.to_read.get() == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.to_read.set(self.to_read.get() - 1);
            buf[..self.frame.len()].copy_from_slice(&self.frame);
            Ok(self.frame.len())
        }

        unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
            self.written.set(self.written.get() + 1);
            Ok(iovecs.iter().map(|v| v.iov_len).sum())
        }
    }

    #[test]
    fn moving_frames_allocates_nothing_once_the_pair_is_warm() {
        const FRAMES: usize = 8;
        let mut f = fixture(true, true);
        *f.rx.hooks_mut() = None;
        *f.tx.hooks_mut() = None;
        let tap = QuietTap {
            frame: frame(1, 150), // three 64-byte receive buffers each
            to_read: std::cell::Cell::new(0),
            written: std::cell::Cell::new(0),
        };
        let round = |f: &mut Fixture| -> u64 {
            // The guest's side (which allocates) first.
            for i in 0..FRAMES {
                for _ in 0..3 {
                    f.rx_buffer(64);
                }
                f.tx_chain(&frame(i as u8, 100), 40);
            }
            tap.to_read.set(FRAMES);
            let mem = f.mem.memory();
            let before = allocations();
            for wake in [tap_readable(), Wake::TxKick] {
                f.pair
                    .handle(wake, &mut f.rx, &mut f.tx, &mem, &tap, f.framing, &f.stats);
            }
            let spent = allocations() - before;
            drop(mem);
            assert_eq!(f.rx_used().len(), 3 * FRAMES);
            assert_eq!(f.tx_used().len(), FRAMES);
            spent
        };
        // The pair's buffers grow to their working size (which shows the counter counts).
        assert!(round(&mut f) > 0);
        assert_eq!(round(&mut f), 0, "allocations while moving frames");
        assert_eq!(tap.written.get(), 2 * FRAMES);
    }
}
