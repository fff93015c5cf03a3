//! One virtqueue as a device core uses it: the two moments of every chain, when it is taken
//! from the available ring and when it is returned through the used ring, written once for the
//! three daemons.
//!
//! - [`Ring::try_pop`] / [`Ring::pop`] take the next chain. `pop` re-arms the driver's kicks
//!   when the ring is empty and looks once more, so that a chain made available in between is
//!   not left waiting for a kick that will not come. A ring whose available index is
//!   impossible (more than the queue size ahead of ours) or whose entries cannot be read is
//!   marked broken: one log line, and the ring is left alone until the frontend sets it up
//!   again ([`Ring::reset`]). A hostile driver costs its own queue, never a spinning thread.
//! - [`Ring::push_used`] collects used entries; [`Ring::publish`] writes them with a single
//!   used-index update (a merged frame or a batch becomes visible at once);
//!   [`Ring::notify`] interrupts the driver at most once for everything published since the
//!   last call, as EVENT_IDX's `used_event` or VRING_AVAIL_F_NO_INTERRUPT ask.
//! - [`Ring::wrote`] / [`Ring::wrote_writable`] mark what the device wrote into a chain's
//!   buffers by other means than vm-memory's accessors (io_uring, `readv` from a tap, raw
//!   copies) in the live-migration log, before the chain is published.
//! - [`RingHooks`] are called at those moments: inflight tracking records taken heads and
//!   clears returned ones.

use crate::Vring;
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::ChainBuffers;
use crate::ratelimit::RateLimit;
use crate::GuestMemory;

/// One used-ring entry: the head of a chain and how many bytes the device wrote into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub head: u16,
    pub len: u32,
}

/// What happens to chains at a ring's two moments. Every method has an empty default.
pub trait RingHooks {
    /// The chain with this head was taken from the available ring.
    fn taken(&mut self, _head: u16) {}
    /// These entries are about to be written to the used ring; the used index will then be
    /// `new_used_idx`.
    fn returning(&mut self, _used: &[UsedElem], _new_used_idx: u16) {}
    /// The used index `used_idx` is published: the entries passed to `returning` are the
    /// driver's.
    fn returned(&mut self, _used_idx: u16) {}
    /// The device wrote `len` bytes of guest memory at `addr` (reported through
    /// [`Ring::wrote`], which has already marked them in the migration log).
    fn wrote(&mut self, _addr: GuestAddress, _len: u64) {}
}

/// Why a ring stopped being served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingBroken {
    #[error("available index {avail} is {ahead} entries ahead of ours ({next}), more than the queue's {size}")]
    AvailTooFarAhead {
        avail: u16,
        next: u16,
        ahead: u16,
        size: u16,
    },
    #[error("the available ring cannot be read: {0}")]
    Unreadable(String),
    #[error("the used ring cannot be written: {0}")]
    UsedUnwritable(String),
}

/// No hooks: a ring whose chains nothing else needs to know about.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl RingHooks for NoHooks {}

impl<H: RingHooks> RingHooks for Option<H> {
    fn taken(&mut self, head: u16) {
        if let Some(hooks) = self {
            hooks.taken(head);
        }
    }
    fn returning(&mut self, used: &[UsedElem], new_used_idx: u16) {
        if let Some(hooks) = self {
            hooks.returning(used, new_used_idx);
        }
    }
    fn returned(&mut self, used_idx: u16) {
        if let Some(hooks) = self {
            hooks.returned(used_idx);
        }
    }
    fn wrote(&mut self, addr: GuestAddress, len: u64) {
        if let Some(hooks) = self {
            hooks.wrote(addr, len);
        }
    }
}

/// A virtqueue of the device, with its pending used entries and its hooks.
pub struct Ring<H = NoHooks> {
    vring: Vring,
    label: String,
    broken: Option<RingBroken>,
    used: Vec<UsedElem>,
    /// The used index when something was first published after the last notification.
    unsignalled_from: Option<u16>,
    /// Whether `notify` has decided since the ring (re)started. Its first decision signals
    /// whatever `used_event` says: the driver may be waiting for an interrupt at a used
    /// index before our first one, owed by the previous backend (a migration's source) or by
    /// our previous run (a restart, a stop), and only an interrupt makes it look again.
    /// Linux's vhost and libvhost-user do the same (`signalled_used_valid`).
    notified_since_start: bool,
    hooks: H,
    errors: RateLimit,
}

impl<H> fmt::Debug for Ring<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("label", &self.label)
            .field("broken", &self.broken)
            .field("pending_used", &self.used.len())
            .finish()
    }
}

impl Ring<NoHooks> {
    /// `label` names the ring in log lines ("queue 0", "pair 1 RX").
    pub fn new(vring: Vring, label: impl Into<String>) -> Ring {
        Ring::with_hooks(vring, label, NoHooks)
    }
}

impl<H: RingHooks> Ring<H> {
    /// A ring whose two moments are also reported to `hooks`.
    pub fn with_hooks(vring: Vring, label: impl Into<String>, hooks: H) -> Ring<H> {
        Ring {
            vring,
            label: label.into(),
            broken: None,
            used: Vec::new(),
            unsignalled_from: None,
            notified_since_start: false,
            hooks,
            errors: RateLimit::default(),
        }
    }

    pub fn vring(&self) -> &Vring {
        &self.vring
    }

    pub fn hooks_mut(&mut self) -> &mut H {
        &mut self.hooks
    }

    /// Whether the frontend has the ring running (set up and enabled) and it is not broken.
    pub fn is_usable(&self) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let state = self.vring.get_ref();
        state.is_enabled() && state.get_queue().ready()
    }

    /// Whether the ring is set up (false once the frontend stops it with GET_VRING_BASE).
    pub fn is_ready(&self) -> bool {
        self.vring.get_ref().get_queue().ready()
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// The queue's size: also the most descriptors a chain may have.
    pub fn size(&self) -> u16 {
        self.vring.get_ref().get_queue().size()
    }

    /// Whether the driver has made chains available that were not taken yet (one read of the
    /// available index, for polling). True when the index cannot be read, so that taking
    /// finds out and reports it; false for a broken or stopped ring.
    pub fn has_available(&self, mem: &GuestMemory) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let state = self.vring.get_ref();
        let queue = state.get_queue();
        queue.ready()
            && queue
                .avail_idx(mem, Ordering::Acquire)
                .map_or(true, |idx| idx.0 != queue.next_avail())
    }

    /// Signals the ring's kick eventfd, so that its worker is called again for it: a device
    /// that stops draining a ring before it is empty, to let the thread's other events run,
    /// comes back to it this way (the driver does not kick again for chains it already made
    /// available).
    pub fn kick_self(&self) {
        let state = self.vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to the ring's eventfd, which `state`
        // keeps open for the duration of the call.
        let written = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if written < 0 {
            self.guest_error(format_args!(
                "cannot re-signal the ring: {}",
                std::io::Error::last_os_error()
            ));
        }
    }

    /// The frontend stopped the ring (GET_VRING_BASE) and will set it up again: forgets that it
    /// was broken, and the first notification after the restart is sent unconditionally.
    pub fn reset(&mut self) {
        self.broken = None;
        self.notified_since_start = false;
    }

    /// Logs a guest error about this ring, rate-limited.
    pub fn guest_error(&self, what: fmt::Arguments<'_>) {
        self.errors.warn(format_args!("{}: {what}", self.label));
    }

    fn mark_broken(&mut self, why: RingBroken) {
        log::error!(
            "{}: {why}; the ring is no longer served until the frontend sets it up again",
            self.label
        );
        self.broken = Some(why);
    }

    /// The driver's kicks are not needed while the device drains the ring (with EVENT_IDX
    /// this only means not moving `avail_event` forward).
    pub fn disable_notifications(&self, mem: &GuestMemory) {
        if let Err(e) = self
            .vring
            .get_mut()
            .get_queue_mut()
            .disable_notification(mem)
        {
            self.guest_error(format_args!("cannot disable notifications: {e}"));
        }
    }

    /// Takes the next available chain without touching notifications.
    pub fn try_pop<'m>(
        &mut self,
        mem: &'m GuestMemory,
    ) -> Option<DescriptorChain<&'m GuestMemory>> {
        if self.broken.is_some() {
            return None;
        }
        let taken = {
            let mut state = self.vring.get_mut();
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return None;
            }
            let next = queue.next_avail();
            // One read of the available index on the common path (virtio-queue's iterator
            // makes it); the index is read again only to tell why nothing was taken.
            let taken = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(virtio_queue::Error::InvalidAvailRingIndex) => None,
                Err(e) => {
                    drop(state);
                    self.mark_broken(RingBroken::Unreadable(e.to_string()));
                    return None;
                }
            };
            match taken {
                Some(chain) => Ok(chain),
                None => match queue.avail_idx(mem, Ordering::Acquire) {
                    Ok(avail) if avail.0 == next => return None,
                    Ok(avail) => {
                        let (avail, size) = (avail.0, queue.size());
                        let ahead = avail.wrapping_sub(next);
                        if ahead > size {
                            Err(RingBroken::AvailTooFarAhead {
                                avail,
                                next,
                                ahead,
                                size,
                            })
                        } else {
                            // Entries arrived after the iterator's read, or the entry cannot
                            // be read: a second try tells them apart.
                            queue
                                .iter(mem)
                                .ok()
                                .and_then(|mut iter| iter.next())
                                .ok_or_else(|| {
                                    RingBroken::Unreadable(format!(
                                        "entry {next} of the available ring"
                                    ))
                                })
                        }
                    }
                    Err(e) => Err(RingBroken::Unreadable(e.to_string())),
                },
            }
        };
        match taken {
            Ok(chain) => {
                self.hooks.taken(chain.head_index());
                Some(chain)
            }
            Err(why) => {
                self.mark_broken(why);
                None
            }
        }
    }

    /// Takes up to `max` available chains under one lock of the ring and one read of the
    /// available index, handing each to `each`; when the ring looks empty, does what
    /// [`Ring::pop`] does (re-arms kicks and looks once more, telling a broken ring apart).
    /// Returns how many were taken; fewer than `max` means the ring is empty (kicks on), not
    /// ready, or broken. For devices that take chains in batches: one lock per chain costs net
    /// transmit about a tenth of its small-frame rate.
    pub fn pop_batch<'m>(
        &mut self,
        mem: &'m GuestMemory,
        max: usize,
        mut each: impl FnMut(DescriptorChain<&'m GuestMemory>),
    ) -> usize {
        if self.broken.is_some() || max == 0 {
            return 0;
        }
        let mut taken = 0;
        {
            let mut state = self.vring.get_mut();
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return 0;
            }
            if let Ok(mut iter) = queue.iter(mem) {
                while taken < max {
                    let Some(chain) = iter.next() else {
                        break;
                    };
                    self.hooks.taken(chain.head_index());
                    each(chain);
                    taken += 1;
                }
            }
        }
        // Whatever the iterator could not give (an empty ring, entries that arrived after its
        // read, a broken ring) goes through the one-chain path, which tells them apart.
        while taken < max {
            let Some(chain) = self.pop(mem) else {
                break;
            };
            each(chain);
            taken += 1;
        }
        taken
    }

    /// Asks the driver to kick when it makes a chain available. Returns true if one arrived
    /// in between; kicks are then off again, as the caller goes on draining. False for a
    /// broken ring.
    pub fn rearm(&mut self, mem: &GuestMemory) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let more = {
            let mut state = self.vring.get_mut();
            let queue = state.get_queue_mut();
            match queue.enable_notification(mem) {
                Ok(true) => {
                    let _ = queue.disable_notification(mem);
                    Ok(true)
                }
                Ok(false) => Ok(false),
                Err(e) => Err(e),
            }
        };
        match more {
            Ok(more) => more,
            Err(e) => {
                self.mark_broken(RingBroken::Unreadable(e.to_string()));
                false
            }
        }
    }

    /// Takes the next available chain; when there is none, re-arms the driver's kicks and
    /// looks once more. `None`: the ring is empty (kicks on), not ready, or broken.
    pub fn pop<'m>(&mut self, mem: &'m GuestMemory) -> Option<DescriptorChain<&'m GuestMemory>> {
        if let Some(chain) = self.try_pop(mem) {
            return Some(chain);
        }
        if self.rearm(mem) {
            self.try_pop(mem)
        } else {
            None
        }
    }

    /// Puts the last taken chain back, to be taken again (the device could not handle it now).
    pub fn put_back(&mut self) {
        self.vring
            .get_mut()
            .get_queue_mut()
            .go_to_previous_position();
    }

    /// Queues a used entry; it reaches the driver with the next [`Ring::publish`].
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.used.push(UsedElem { head, len });
    }

    /// Used entries queued and not yet published.
    pub fn pending_used(&self) -> usize {
        self.used.len()
    }

    /// The device wrote `len` bytes of guest memory at `addr`: marks their pages dirty in the
    /// live-migration log and tells the hooks.
    ///
    /// Call it once the bytes are in guest memory and before the chain they belong to is
    /// published ([`Ring::push_used`] then [`Ring::publish`]): the frontend may read the log
    /// any time after the driver sees the used entry, and a page marked late could be missed
    /// by the last pass of the migration. `mem` is the memory the ring is published with (the
    /// latest table the frontend sent): the log is attached to its regions.
    ///
    /// Writes through vm-memory (`write_obj`, `write_slice`, `VolatileSlice` copies) and the
    /// used-ring entries mark themselves; this is for writes vm-memory does not see. Marking
    /// twice is harmless. Does nothing while the frontend does not log (no SET_LOG_BASE, or
    /// `VHOST_F_LOG_ALL` not acked), and ignores bytes outside guest memory.
    pub fn wrote(&mut self, mem: &GuestMemory, addr: GuestAddress, len: u64) {
        crate::memory::mark_dirty(mem, addr, usize::try_from(len).unwrap_or(usize::MAX));
        self.hooks.wrote(addr, len);
    }

    /// [`Ring::wrote`] for the first `len` bytes of `chain`'s device-writable part: what a
    /// device that fills a chain from the start (a received frame with its header, console
    /// input) wrote into it. `len` past the end of the writable part is clamped.
    pub fn wrote_writable(&mut self, mem: &GuestMemory, chain: &ChainBuffers, len: u64) {
        let len = len.min(chain.writable_len());
        if let Ok(segments) = chain.writable_range(0, len) {
            for seg in segments {
                self.wrote(mem, seg.addr, u64::from(seg.len));
            }
        }
    }

    /// Writes the queued used entries and makes them visible with one used-index update. Also
    /// while the ring is being stopped: what the device finishes then is still the driver's.
    pub fn publish(&mut self, mem: &GuestMemory) {
        if self.used.is_empty() {
            return;
        }
        let result = {
            let mut state = self.vring.get_mut();
            publish_used(state.get_queue_mut(), mem, &self.used, &mut self.hooks)
        };
        self.used.clear();
        match result {
            Ok(Some(start)) => {
                self.unsignalled_from.get_or_insert(start);
            }
            Ok(None) => {}
            Err(why) => self.mark_broken(why),
        }
    }

    /// Interrupts the driver if what was published since the last call asks for it: with
    /// EVENT_IDX when the used index passed the driver's `used_event`, without it unless the
    /// driver set VRING_AVAIL_F_NO_INTERRUPT (a polling driver such as DPDK's does).
    pub fn notify(&mut self, mem: &GuestMemory) {
        let Some(start) = self.unsignalled_from.take() else {
            return;
        };
        let (now, avail, size, event_idx) = {
            let state = self.vring.get_ref();
            let queue = state.get_queue();
            (
                queue.next_used(),
                queue.avail_ring(),
                queue.size(),
                queue.event_idx_enabled(),
            )
        };
        if now == start {
            return;
        }
        // Our used-index store before the driver's flags or used_event.
        fence(Ordering::SeqCst);
        let first_since_start = !std::mem::replace(&mut self.notified_since_start, true);
        let needed = if event_idx {
            first_since_start || {
                let used_event = avail
                    .checked_add(4 + 2 * u64::from(size))
                    .and_then(|at| mem.load::<u16>(GuestAddress(at), Ordering::Acquire).ok());
                match used_event.map(u16::from_le) {
                    // vring_need_event(used_event, new, old)
                    Some(event) => {
                        now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(start)
                    }
                    None => true,
                }
            }
        } else {
            mem.load::<u16>(GuestAddress(avail), Ordering::Acquire)
                .map_or(true, |flags| {
                    u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
                })
        };
        if needed {
            if let Err(e) = self.vring.signal_used_queue() {
                self.errors.error(format_args!(
                    "{}: cannot signal the driver: {e}",
                    self.label
                ));
            }
        }
    }

    /// [`Ring::publish`] then [`Ring::notify`].
    pub fn complete(&mut self, mem: &GuestMemory) {
        self.publish(mem);
        self.notify(mem);
    }
}

/// Writes `used` after the queue's used index and moves the index once. Returns the index
/// before, or `None` when nothing was written.
fn publish_used(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemory,
    used: &[UsedElem],
    hooks: &mut impl RingHooks,
) -> Result<Option<u16>, RingBroken> {
    // A ring being stopped (GET_VRING_BASE clears `ready` first) still gets the chains the
    // device finishes while it drains: only a ring without a size has nowhere to put them.
    let size = queue.size();
    if size == 0 {
        return Ok(None);
    }
    let ring = queue.used_ring();
    let start = queue.next_used();
    let unwritable = |what: &dyn fmt::Display| RingBroken::UsedUnwritable(what.to_string());
    let end = start.wrapping_add(used.len() as u16);
    hooks.returning(used, end);
    for (i, elem) in used.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let addr = ring
            .checked_add(4 + 8 * slot)
            .ok_or_else(|| unwritable(&"address overflows"))?;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(elem.head).to_le_bytes());
        bytes[4..].copy_from_slice(&elem.len.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| unwritable(&e))?;
    }
    let idx_addr = ring
        .checked_add(2)
        .ok_or_else(|| unwritable(&"address overflows"))?;
    // Release: the entries above are visible before the index that hands them over.
    mem.store(end.to_le(), GuestAddress(idx_addr), Ordering::Release)
        .map_err(|e| unwritable(&e))?;
    queue.set_next_used(end);
    hooks.returned(end);
    Ok(Some(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestQueue;
    use std::sync::{Arc, Mutex};
    use vhost_user_backend::VringT;

    const SIZE: u16 = 16;

    fn ring(queue: &TestQueue) -> Ring {
        Ring::new(queue.vring.clone(), "queue 0")
    }

    fn add_chains(queue: &mut TestQueue, count: u16) {
        for i in 0..count {
            queue.add_chain(&[(0x1_0000 + u64::from(i) * 0x100, 0x100, true)]);
        }
    }

    #[derive(Default)]
    struct Recorded {
        taken: Vec<u16>,
        returning: Vec<(Vec<UsedElem>, u16)>,
        returned: Vec<u16>,
    }

    struct Recorder(Arc<Mutex<Recorded>>);

    impl RingHooks for Recorder {
        fn taken(&mut self, head: u16) {
            crate::lock(&self.0).taken.push(head);
        }
        fn returning(&mut self, used: &[UsedElem], new_used_idx: u16) {
            crate::lock(&self.0)
                .returning
                .push((used.to_vec(), new_used_idx));
        }
        fn returned(&mut self, used_idx: u16) {
            crate::lock(&self.0).returned.push(used_idx);
        }
    }

    #[test]
    fn chains_are_taken_and_returned_in_one_batch_with_hooks() {
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let mut ring = Ring::with_hooks(queue.vring.clone(), "queue 0", Recorder(recorded.clone()));
        add_chains(&mut queue, 3);
        let mem = queue.memory();
        let mut heads = Vec::new();
        while let Some(chain) = ring.pop(&mem) {
            heads.push(chain.head_index());
        }
        assert_eq!(heads, vec![0, 1, 2]);
        for &head in heads.iter().rev() {
            ring.push_used(head, 7);
        }
        ring.complete(&mem);
        assert_eq!(queue.used_idx(), 3);
        assert_eq!(queue.used(0), (2, 7));
        assert!(queue.signalled());
        let recorded = crate::lock(&recorded);
        assert_eq!(recorded.taken, vec![0, 1, 2]);
        assert_eq!(recorded.returning.len(), 1, "one batch");
        assert_eq!(recorded.returning[0].1, 3);
        assert_eq!(recorded.returned, vec![3]);
    }

    #[test]
    fn chains_are_taken_in_batches_up_to_the_limit() {
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let mut ring = Ring::with_hooks(queue.vring.clone(), "queue 0", Recorder(recorded.clone()));
        add_chains(&mut queue, 5);
        let mem = queue.memory();
        let mut heads = Vec::new();
        assert_eq!(ring.pop_batch(&mem, 3, |c| heads.push(c.head_index())), 3);
        assert_eq!(ring.pop_batch(&mem, 3, |c| heads.push(c.head_index())), 2);
        assert_eq!(heads, vec![0, 1, 2, 3, 4]);
        assert_eq!(
            crate::lock(&recorded).taken,
            heads,
            "every chain goes through the hook"
        );
        assert_eq!(ring.pop_batch(&mem, 3, |_| {}), 0);
        // The batch found the ring dry and re-armed kicks at the next entry, like `pop`.
        assert_eq!(queue.avail_event(), 5);
        // A far-ahead available index breaks the ring through a batch too.
        queue.set_avail_idx(5 + SIZE + 1);
        assert_eq!(ring.pop_batch(&mem, 3, |_| {}), 0);
        assert!(ring.is_broken());
    }

    #[test]
    fn chains_finished_while_the_ring_stops_are_still_returned() {
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        let mut ring = ring(&queue);
        add_chains(&mut queue, 2);
        let mem = queue.memory();
        let heads: Vec<u16> =
            std::iter::from_fn(|| ring.pop(&mem).map(|c| c.head_index())).collect();
        // GET_VRING_BASE marks the ring not ready before the device drains it.
        queue.vring.set_queue_ready(false);
        for head in heads {
            ring.push_used(head, 1);
        }
        ring.complete(&mem);
        assert_eq!(queue.used_idx(), 2);
        assert!(
            ring.try_pop(&mem).is_none(),
            "nothing is taken from a stopped ring"
        );
    }

    #[test]
    fn an_available_index_too_far_ahead_breaks_the_ring_without_spinning() {
        let queue = TestQueue::new(SIZE, 0x10_0000, true);
        let mut ring = ring(&queue);
        let mem = queue.memory();
        // The driver claims SIZE + 5 new entries.
        queue.set_avail_idx(SIZE + 5);
        assert!(ring.pop(&mem).is_none());
        assert!(ring.is_broken());
        assert!(!ring.rearm(&mem), "a broken ring never asks to be drained");
        assert!(!ring.has_available(&mem));
        assert!(ring.pop(&mem).is_none());
        ring.reset();
        assert!(!ring.is_broken());
    }

    /// Takes one chain and returns it used, with a notification decision.
    fn complete_one(ring: &mut Ring, mem: &GuestMemory) {
        let head = ring.pop(mem).map(|c| c.head_index());
        ring.push_used(head.unwrap_or(0), 0);
        ring.complete(mem);
    }

    #[test]
    fn notification_follows_used_event_and_no_interrupt() {
        // EVENT_IDX: used_event = 5; after the first decision (always an interrupt, see the
        // next test), publishing entries 1..3 does not cross it.
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        let mut ring = ring(&queue);
        let mem = queue.memory();
        add_chains(&mut queue, 8);
        queue.set_used_event(5);
        complete_one(&mut ring, &mem);
        assert!(queue.signalled(), "the first decision since the start");
        for _ in 1..3 {
            let head = ring.pop(&mem).map(|c| c.head_index());
            ring.push_used(head.unwrap_or(0), 0);
        }
        ring.complete(&mem);
        assert!(!queue.signalled(), "no interrupt before used_event");
        for _ in 0..3 {
            let head = ring.pop(&mem).map(|c| c.head_index());
            ring.push_used(head.unwrap_or(0), 0);
        }
        ring.complete(&mem);
        assert!(queue.signalled(), "crossing used_event interrupts");

        // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT silences the device.
        let mut queue = TestQueue::new(SIZE, 0x10_0000, false);
        let mut ring = Ring::new(queue.vring.clone(), "queue 1");
        let mem = queue.memory();
        add_chains(&mut queue, 1);
        let avail = GuestAddress(ring.vring().get_ref().get_queue().avail_ring());
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, avail)
            .unwrap_or_else(|e| panic!("{e}"));
        let head = ring.pop(&mem).map(|c| c.head_index());
        ring.push_used(head.unwrap_or(0), 0);
        ring.complete(&mem);
        assert!(!queue.signalled());
    }

    /// A ring started on a used index past the driver's `used_event` (a migration's
    /// destination, a restarted daemon: the interrupt for `used_event` was owed by the backend
    /// before) interrupts on its first completion, or the driver would wait forever; later
    /// completions follow `used_event` again, and a stop and restart starts over.
    #[test]
    fn the_first_completion_after_a_start_interrupts_whatever_used_event_says() {
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        add_chains(&mut queue, 8);
        queue.vring.set_queue_next_avail(4);
        queue.vring.set_queue_next_used(4);
        let mut ring = ring(&queue);
        let mem = queue.memory();
        // The driver asked for an interrupt once entry 2 is used: the previous backend used it
        // and never told it.
        queue.set_used_event(2);
        complete_one(&mut ring, &mem);
        assert!(queue.signalled(), "the first completion after the start");
        complete_one(&mut ring, &mem);
        assert!(!queue.signalled(), "then used_event decides");
        // GET_VRING_BASE and a new start.
        ring.reset();
        complete_one(&mut ring, &mem);
        assert!(queue.signalled(), "the first completion after a restart");
        complete_one(&mut ring, &mem);
        assert!(!queue.signalled());
    }

    #[test]
    fn what_the_device_wrote_is_marked_in_the_log_before_publish() {
        let mut queue = TestQueue::new(SIZE, 0x10_0000, true);
        let mut ring = ring(&queue);
        let head = queue.add_chain(&[
            (0x3_0000, 0x100, false),
            (0x4_0000, 0x800, true),
            (0x5_0000, 0x2000, true),
        ]);
        let mem = queue.memory();
        let chain = ring
            .pop(&mem)
            .map(|chain| ChainBuffers::parse(chain, &mem, 16));
        let Some(Ok(buffers)) = chain else {
            panic!("the chain was not taken");
        };
        let log = crate::testing::TestLog::attach(&mem);
        // A write across a page boundary: both pages.
        ring.wrote(&mem, GuestAddress(0x2_0ff0), 0x20);
        // The first 0x900 writable bytes: all of the first buffer, the first page of the
        // second; the readable buffer is not the device's to write.
        ring.wrote_writable(&mem, &buffers, 0x900);
        // More than the chain holds: clamped to its writable part.
        ring.wrote_writable(&mem, &buffers, u64::MAX);
        assert_eq!(log.dirty_pages(), vec![0x20, 0x21, 0x40, 0x50, 0x51]);
        // Publishing marks the used ring's page (vm-memory's own marking).
        ring.push_used(head, 0x900);
        ring.publish(&mem);
        assert_eq!(
            log.dirty_pages(),
            vec![0x8, 0x20, 0x21, 0x40, 0x50, 0x51],
            "the used ring is at 0x8000"
        );
    }
}
