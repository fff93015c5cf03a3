//! Inflight I/O tracking for split virtqueues (vhost-user protocol feature `INFLIGHT_SHMFD`).
//!
//! A frontend cannot read the ring position of a backend that died: on reconnection it rewinds
//! each queue to the guest's used index, and the new backend would execute again everything
//! after it. That is only right when requests complete in the order they were taken. This
//! module keeps, in a buffer shared with the frontend, which descriptor chains are in flight and
//! in which order they were taken, so that a restarted backend resubmits exactly those, oldest
//! first, and never a completed one (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking").
//!
//! The pieces, in the order a connection uses them:
//! - [`allocate`]: `GET_INFLIGHT_FD`, a zeroed, sealed memfd with one region per queue.
//! - [`map`]: `SET_INFLIGHT_FD`, maps what the frontend hands back (after checking it) and gives
//!   one [`QueueTracker`] per queue.
//! - [`start_ring`]: on the first event after a ring started, [`QueueTracker::recover`] and the
//!   chains to resubmit before anything new.
//! - [`QueueTracker::taken`] when a chain is taken; [`QueueTracker::returning`] before its used
//!   element is published and [`QueueTracker::returned`] after the used index moved.
//!
//! The region stays consistent at every instant, so that a SIGKILL between any two stores is
//! recovered: see [`QueueTracker::returning`] for the one point where we are stricter than the
//! spec's wording.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{ChainBuffers, ChainError};
use crate::GuestMemory;

/// The region layout version this module writes (the spec's current one).
pub const INFLIGHT_VERSION: u16 = 1;
/// Largest split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue regions start on this alignment (as QEMU's libvhost-user lays them out).
const REGION_ALIGNMENT: u64 = 64;

/// `QueueRegionSplit` without its flexible array: 16 bytes, followed by `desc_num`
/// [`DescStateSplit`]s. (The `vhost` crate's `QueueRegionSplit` has a Rust size of 24, but in C
/// the array starts at byte 16.)
///
/// Every field is an atomic: the memory is shared with the frontend, which may write it at any
/// time, and the stores must reach memory in program order for crash consistency. Values are in
/// host byte order, as QEMU and libvhost-user keep them.
#[repr(C)]
#[derive(Debug)]
pub struct QueueRegionHeader {
    /// Feature flags of the region; 0 for now.
    pub features: AtomicU64,
    /// 0: not initialised yet; [`INFLIGHT_VERSION`] once a backend started the ring.
    pub version: AtomicU16,
    /// Number of descriptors tracked (the queue size).
    pub desc_num: AtomicU16,
    /// Head of the list of the last batch of used descriptors.
    pub last_batch_head: AtomicU16,
    /// The used ring's index once the last batch was fully recorded here.
    pub used_idx: AtomicU16,
}

/// The state of one head descriptor (16 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct DescStateSplit {
    /// 1 while the chain headed by this descriptor is in flight.
    pub inflight: AtomicU8,
    padding: [AtomicU8; 5],
    /// Next entry of the last batch list.
    pub next: AtomicU16,
    /// Order in which chains were taken.
    pub counter: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<QueueRegionHeader>() == 16);
const _: () = assert!(std::mem::size_of::<DescStateSplit>() == 16);
const _: () = assert!(std::mem::align_of::<DescStateSplit>() <= REGION_ALIGNMENT as usize);

/// Bytes of one queue's region, as QEMU's libvhost-user computes it (a restarted backend of
/// either kind must find the regions where the previous one put them). Always holds the 16-byte
/// header and `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 2).div_ceil(REGION_ALIGNMENT) * REGION_ALIGNMENT
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Checks the queue count and size of a GET/SET_INFLIGHT_FD message against the device's
/// `max_queues`; returns the size of the whole buffer.
fn checked_size(msg: &VhostUserInflight, max_queues: usize) -> io::Result<u64> {
    if msg.num_queues == 0 || usize::from(msg.num_queues) > max_queues {
        return Err(invalid(format!(
            "inflight buffer for {} queues: the device has {max_queues}",
            msg.num_queues
        )));
    }
    if msg.queue_size == 0 || msg.queue_size > MAX_QUEUE_SIZE {
        return Err(invalid(format!(
            "inflight buffer for queues of {} entries",
            msg.queue_size
        )));
    }
    // Cannot overflow: at most 65535 queues of 32768 * 16 bytes.
    Ok(queue_region_size(msg.queue_size) * u64::from(msg.num_queues))
}

/// `GET_INFLIGHT_FD`: a zeroed memfd for `msg.num_queues` regions of `msg.queue_size`
/// descriptors, sealed against resizing (the backend maps it; a shrunk file would fault).
/// Returns the reply (size, offset 0, the same queue count and size) and the file.
pub fn allocate(
    msg: &VhostUserInflight,
    max_queues: usize,
) -> io::Result<(VhostUserInflight, File)> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let size = checked_size(msg, max_queues)?;
    let fd = memfd_create(
        c"vhost-inflight",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    // A new memfd reads as zeroes: every region starts with version 0 (uninitialised).
    file.set_len(size)?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    let reply = VhostUserInflight {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: msg.num_queues,
        queue_size: msg.queue_size,
    };
    Ok((reply, file))
}

/// One shared mapping of the inflight buffer, unmapped when the last tracker goes.
#[derive(Debug)]
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; it is only ever accessed through atomics (see
// `QueueTracker::header` and `QueueTracker::desc`), so sharing the pointer between threads is
// sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` describe a mapping made by `map` and owned by this value
        // alone; no reference into it outlives the trackers holding this `Arc`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// `SET_INFLIGHT_FD`: maps the buffer the frontend hands over and returns one tracker per
/// queue. The frontend may be hostile: sizes and offsets are checked against the file.
pub fn map(
    msg: &VhostUserInflight,
    file: &File,
    max_queues: usize,
) -> io::Result<Vec<QueueTracker>> {
    let needed = checked_size(msg, max_queues)?;
    if msg.mmap_size < needed {
        return Err(invalid(format!(
            "inflight buffer of {} bytes: {} queues of {} entries need {needed}",
            msg.mmap_size, msg.num_queues, msg.queue_size
        )));
    }
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if !msg.mmap_offset.is_multiple_of(page) {
        return Err(invalid(format!(
            "inflight buffer offset {:#x} is not page-aligned",
            msg.mmap_offset
        )));
    }
    let file_len = file.metadata()?.len();
    // The whole buffer the frontend describes must be in the file; we map only what we use.
    match msg.mmap_offset.checked_add(msg.mmap_size) {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(invalid(format!(
                "inflight buffer of {} bytes at {:#x} is beyond the file's {file_len}",
                msg.mmap_size, msg.mmap_offset
            )))
        }
    }
    // A file the frontend could still shrink would fault on our accesses (SIGBUS); the memfds
    // we allocate are sealed. Accept others (they may be ordinary shared memory) but say so.
    // SAFETY: F_GET_SEALS only reads the descriptor's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        log::warn!("inflight buffer is not sealed against shrinking");
    }
    let len = usize::try_from(needed).map_err(|_| invalid("inflight buffer too large".into()))?;
    let offset = libc::off_t::try_from(msg.mmap_offset)
        .map_err(|_| invalid("inflight buffer offset too large".into()))?;
    // SAFETY: a fresh shared mapping of `len` bytes of `file` at a page-aligned `offset`, both
    // checked against the file's size above; the result is checked before use.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(base.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
    let mapping = Arc::new(Mapping { base, len });
    let stride = queue_region_size(msg.queue_size) as usize;
    let trackers = (0..usize::from(msg.num_queues))
        .map(|q| {
            let tracker = QueueTracker {
                mapping: mapping.clone(),
                offset: q * stride,
                desc_num: msg.queue_size,
                counter: 0,
                batch: Vec::with_capacity(usize::from(msg.queue_size)),
                needs_recovery: true,
                #[cfg(test)]
                stores_left: std::cell::Cell::new(usize::MAX),
            };
            // As libvhost-user: the region describes the queue size it was set up for.
            tracker
                .header()
                .desc_num
                .store(msg.queue_size, Ordering::Relaxed);
            tracker
        })
        .collect();
    Ok(trackers)
}

/// What [`QueueTracker::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The ring's true next available index, `None` for a fresh region (then the frontend's
    /// SET_VRING_BASE is right).
    pub next_avail: Option<u16>,
    /// Heads still in flight, oldest first: to be executed again before anything new.
    pub resubmit: Vec<u16>,
}

/// The inflight state of one queue, in its region of the shared buffer. Owned by the thread
/// that serves the queue.
#[derive(Debug)]
pub struct QueueTracker {
    mapping: Arc<Mapping>,
    /// Where this queue's region starts in the mapping.
    offset: usize,
    desc_num: u16,
    /// The counter value the next taken chain gets.
    counter: u64,
    /// The batch between `returning` and `returned`, in publication order.
    batch: Vec<u16>,
    needs_recovery: bool,
    /// Tests: stores still allowed before a simulated kill.
    #[cfg(test)]
    stores_left: std::cell::Cell<usize>,
}

impl QueueTracker {
    /// False once a test's simulated kill happened: the store is not made.
    fn alive(&self) -> bool {
        #[cfg(test)]
        {
            let left = self.stores_left.get();
            if left == 0 {
                return false;
            }
            self.stores_left.set(left - 1);
        }
        true
    }

    fn header(&self) -> &QueueRegionHeader {
        // SAFETY: `map` checked that every queue's region (header and `desc_num` descriptors)
        // lies inside the mapping, which lives as long as `self.mapping`. Regions start on a
        // 64-byte boundary of a page-aligned mapping, so the header is aligned. All fields are
        // atomics, so concurrent writes by the frontend are not data races.
        unsafe {
            &*self
                .mapping
                .base
                .as_ptr()
                .add(self.offset)
                .cast::<QueueRegionHeader>()
        }
    }

    fn desc(&self, index: u16) -> Option<&DescStateSplit> {
        if index >= self.desc_num {
            return None;
        }
        let at = self.offset + 16 + 16 * usize::from(index);
        // SAFETY: `index < desc_num`, so the descriptor is inside this queue's region, which
        // `map` checked to be inside the mapping; 16-byte aligned; all fields atomic (see
        // `header`).
        Some(unsafe { &*self.mapping.base.as_ptr().add(at).cast::<DescStateSplit>() })
    }

    /// Number of descriptors the region tracks.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// True until [`QueueTracker::recover`] ran for the current start of the ring.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery
    }

    /// The ring was stopped (GET_VRING_BASE): recover again when it starts.
    pub fn stopped(&mut self) {
        self.needs_recovery = true;
    }

    /// A chain headed by `head` was taken from the available ring: record it in flight with
    /// the next counter value. A head already in flight keeps its place (it is a resubmission).
    pub fn taken(&mut self, head: u16) {
        let Some(desc) = self.desc(head) else {
            // Not a descriptor of this queue: the ring layer rejects it when returning it.
            return;
        };
        if desc.inflight.load(Ordering::Relaxed) != 0 {
            return;
        }
        if self.alive() {
            desc.counter.store(self.counter, Ordering::Relaxed);
        }
        // Release: the counter is in memory before the entry counts as in flight.
        if self.alive() {
            desc.inflight.store(1, Ordering::Release);
        }
        self.counter += 1;
    }

    /// `heads` are about to be added to the used ring, in this order: link them into the last
    /// batch list. Call before the first used element of the batch is published.
    ///
    /// The spec's recovery walks `ring used index - region used_idx` entries from
    /// `last_batch_head`. We link the batch so that this walk visits it in publication order
    /// (`last_batch_head` is the first head published): virtio-queue publishes the used index
    /// once per element, and a kill after `k` of them then clears exactly those `k`.
    pub fn returning(&mut self, heads: impl IntoIterator<Item = u16>) {
        self.batch.clear();
        self.batch
            .extend(heads.into_iter().filter(|&h| h < self.desc_num));
        let header = self.header();
        for &head in self.batch.iter().rev() {
            if let Some(desc) = self.desc(head) {
                if self.alive() {
                    let last = header.last_batch_head.load(Ordering::Relaxed);
                    desc.next.store(last, Ordering::Release);
                }
                if self.alive() {
                    header.last_batch_head.store(head, Ordering::Release);
                }
            }
        }
    }

    /// The batch given to [`QueueTracker::returning`] is in the used ring, whose index is now
    /// `used_idx`: the batch is no longer in flight.
    pub fn returned(&mut self, used_idx: u16) {
        // Release stores: the used ring's index (stored before this call) reaches memory first,
        // then each flag, then our copy of the index.
        for &head in &self.batch {
            if let (Some(desc), true) = (self.desc(head), self.alive()) {
                desc.inflight.store(0, Ordering::Release);
            }
        }
        if self.alive() {
            self.header().used_idx.store(used_idx, Ordering::Release);
        }
        self.batch.clear();
    }

    /// Ring start with this region: reconciles it with the used ring's index `ring_used_idx`
    /// and says where the ring really is and what to execute again. `ring_size` is the size of
    /// the ring as set up now; entries beyond it are ignored.
    pub fn recover(&mut self, ring_used_idx: u16, ring_size: u16) -> Recovery {
        self.needs_recovery = false;
        self.batch.clear();
        let header = self.header();
        if header.version.load(Ordering::Acquire) == 0 {
            // A fresh region: nothing was ever in flight. Record the ring's position first, so
            // that a kill before the first batch is not taken for a torn one.
            header.used_idx.store(ring_used_idx, Ordering::Release);
            header.last_batch_head.store(0, Ordering::Release);
            header.version.store(INFLIGHT_VERSION, Ordering::Release);
            self.counter = 0;
            return Recovery {
                next_avail: None,
                resubmit: Vec::new(),
            };
        }
        let tracked = self.desc_num.min(ring_size);
        let region_used = header.used_idx.load(Ordering::Acquire);
        if region_used != ring_used_idx {
            // Killed while returning a batch: its first `published` entries reached the used
            // ring but are still marked in flight here.
            let published = ring_used_idx.wrapping_sub(region_used);
            if published > tracked {
                log::warn!(
                    "inflight region: used index {region_used}, ring {ring_used_idx}: more than \
                     a batch apart; clearing what the last batch list holds"
                );
            }
            let mut head = header.last_batch_head.load(Ordering::Acquire);
            for _ in 0..published.min(tracked) {
                let Some(desc) = self.desc(head) else {
                    break;
                };
                desc.inflight.store(0, Ordering::Release);
                head = desc.next.load(Ordering::Acquire);
            }
            header.used_idx.store(ring_used_idx, Ordering::Release);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.desc_num)
            .filter_map(|i| self.desc(i).map(|d| (i, d)))
            .filter(|(_, d)| d.inflight.load(Ordering::Acquire) != 0)
            .filter_map(|(i, d)| {
                if i < tracked {
                    Some((d.counter.load(Ordering::Relaxed), i))
                } else {
                    // Beyond the ring: cannot be a chain of it.
                    d.inflight.store(0, Ordering::Release);
                    None
                }
            })
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let resubmit: Vec<u16> = inflight.into_iter().map(|(_, i)| i).collect();
        Recovery {
            // Every chain before the next available one was either used or is in flight.
            next_avail: Some(ring_used_idx.wrapping_add(resubmit.len() as u16)),
            resubmit,
        }
    }
}

/// The tracker at the ring layer's two moments: taken chains become in flight, returned
/// batches leave it around the used-index update.
impl crate::ring::RingHooks for QueueTracker {
    fn taken(&mut self, head: u16) {
        QueueTracker::taken(self, head);
    }

    fn returning(&mut self, used: &[crate::ring::UsedElem], _new_used_idx: u16) {
        QueueTracker::returning(self, used.iter().map(|elem| elem.head));
    }

    fn returned(&mut self, used_idx: u16) {
        QueueTracker::returned(self, used_idx);
    }
}

/// The first event after `vring` started with an inflight region: recovers (see
/// [`QueueTracker::recover`]), moves the ring to its true next available index (SET_VRING_BASE
/// carried the frontend's rewound guess), and returns the chains to execute again, oldest
/// first, parsed as the ring layer's chains are. Does nothing (and returns nothing) when
/// recovery is not due or the ring is not ready.
pub fn start_ring(
    tracker: &mut QueueTracker,
    vring: &crate::Vring,
    mem: &GuestMemory,
) -> Vec<(u16, Result<ChainBuffers, ChainError>)> {
    if !tracker.needs_recovery() {
        return Vec::new();
    }
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return Vec::new();
    }
    let used = match queue.used_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0,
        Err(e) => {
            log::warn!("cannot read the used ring's index for inflight recovery: {e}");
            return Vec::new();
        }
    };
    let size = queue.size();
    let recovery = tracker.recover(used, size);
    if let Some(next) = recovery.next_avail {
        if next != queue.next_avail() {
            log::info!(
                "inflight: ring resumes at {next} (frontend said {}), {} request(s) to resubmit",
                queue.next_avail(),
                recovery.resubmit.len()
            );
        }
        queue.set_next_avail(next);
    }
    let table = GuestAddress(queue.desc_table());
    recovery
        .resubmit
        .into_iter()
        .map(|head| (head, parse_chain_at(mem, table, size, head)))
        .collect()
}

/// Parses the chain headed by `head` in the descriptor table at `table` of a ring of
/// `queue_size` entries, following one indirect table, with the checks of
/// [`ChainBuffers::parse`]. (virtio-queue only builds chains it pops from the available ring.)
pub fn parse_chain_at(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<ChainBuffers, ChainError> {
    let max = usize::from(queue_size).max(1);
    let descriptors = walk_chain(mem, table, queue_size, head)?;
    ChainBuffers::parse(descriptors, mem, max)
}

fn read_descriptor(
    mem: &GuestMemory,
    table: GuestAddress,
    table_len: u32,
    index: u16,
) -> Result<Descriptor, ChainError> {
    if u32::from(index) >= table_len {
        return Err(ChainError::Memory(format!(
            "descriptor {index} is beyond a table of {table_len}"
        )));
    }
    let addr = table
        .0
        .checked_add(16 * u64::from(index))
        .ok_or_else(|| ChainError::Memory("descriptor address overflows".into()))?;
    mem.read_obj::<Descriptor>(GuestAddress(addr))
        .map_err(|e| ChainError::Memory(e.to_string()))
}

/// The descriptors of a chain, as virtio-queue's `DescriptorChain` yields them: an indirect
/// descriptor switches to its table (once; nesting is an error); a chain longer than its table
/// (a loop) is an error.
fn walk_chain(
    mem: &GuestMemory,
    mut table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut table_len = u32::from(queue_size);
    let mut indirect = false;
    let mut index = head;
    let mut out = Vec::new();
    loop {
        let desc = read_descriptor(mem, table, table_len, index)?;
        if desc.refers_to_indirect_table() {
            if indirect || desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) {
                return Err(ChainError::Memory("invalid indirect descriptor".into()));
            }
            indirect = true;
            table = desc.addr();
            table_len = desc.len() / 16;
            index = 0;
            continue;
        }
        out.push(desc);
        if out.len() > table_len as usize {
            return Err(ChainError::TooLong(table_len as usize));
        }
        if !desc.has_next() {
            return Ok(out);
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(num_queues: u16, queue_size: u16) -> (File, Vec<QueueTracker>) {
        let msg = VhostUserInflight {
            num_queues,
            queue_size,
            ..Default::default()
        };
        let (reply, file) = allocate(&msg, 8).unwrap_or_else(|e| panic!("allocate: {e}"));
        let trackers = map(&reply, &file, 8).unwrap_or_else(|e| panic!("map: {e}"));
        (file, trackers)
    }

    /// A fresh tracker on the same shared memory: what a restarted backend gets.
    fn remap(file: &File, num_queues: u16, queue_size: u16) -> Vec<QueueTracker> {
        let msg = VhostUserInflight {
            mmap_size: queue_region_size(queue_size) * u64::from(num_queues),
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        map(&msg, file, 8).unwrap_or_else(|e| panic!("map: {e}"))
    }

    #[test]
    fn layout_matches_the_spec() {
        for q in 1..=1024u16 {
            assert!(
                queue_region_size(q) >= 16 + 16 * u64::from(q),
                "queue size {q}"
            );
            assert_eq!(queue_region_size(q) % 64, 0);
        }
        assert_eq!(queue_region_size(128), 2112);
        let (file, mut t) = region(2, 128);
        t[1].recover(0, 128);
        t[1].taken(3);
        // Byte offsets as a C frontend sees them: region 1 at 2112, desc[3] at 16 + 3 * 16.
        let mut bytes = vec![0u8; 2 * 2112];
        let n = nix::sys::uio::pread(&file, &mut bytes, 0).unwrap_or(0);
        assert_eq!(n, bytes.len());
        let r1 = &bytes[2112..];
        assert_eq!(u16::from_ne_bytes([r1[8], r1[9]]), INFLIGHT_VERSION);
        assert_eq!(u16::from_ne_bytes([r1[10], r1[11]]), 128, "desc_num");
        assert_eq!(r1[16 + 3 * 16], 1, "inflight flag of head 3");
        assert_eq!(&bytes[..8], &[0; 8], "queue 0 untouched but desc_num");
        assert_eq!(
            u16::from_ne_bytes([bytes[8], bytes[9]]),
            0,
            "queue 0 version"
        );
    }

    #[test]
    fn allocation_is_sealed_and_zeroed() {
        let (file, _t) = region(3, 256);
        assert_eq!(
            file.metadata().map(|m| m.len()).unwrap_or(0),
            3 * queue_region_size(256)
        );
        assert!(file.set_len(1).is_err(), "sealed against shrinking");
        // SAFETY: F_GET_SEALS only reads the descriptor's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_GROW, 0);
    }

    #[test]
    fn hostile_descriptions_are_refused() {
        let (file, _t) = region(2, 128);
        let size = 2 * queue_region_size(128);
        let bad = [
            (size, 0, 0, 128),               // no queue
            (size, 0, 9, 128),               // more queues than the device
            (size, 0, 2, 0),                 // empty queues
            (size, 0, 2, 65535),             // larger than virtio allows
            (size - 1, 0, 2, 128),           // smaller than the regions
            (size, 4096, 2, 128),            // beyond the file
            (size, 100, 2, 128),             // unaligned
            (u64::MAX, 0, 2, 128),           // claims more than the file has
            (size, u64::MAX - 4095, 2, 128), // offset overflows
            (size * 4, 0, 2, 512),           // larger queues than the file holds
        ];
        for (mmap_size, mmap_offset, num_queues, queue_size) in bad {
            let msg = VhostUserInflight {
                mmap_size,
                mmap_offset,
                num_queues,
                queue_size,
            };
            assert!(
                map(&msg, &file, 8).is_err(),
                "{mmap_size} {mmap_offset} {num_queues} {queue_size} accepted"
            );
        }
        let msg = VhostUserInflight {
            num_queues: 9,
            queue_size: 128,
            ..Default::default()
        };
        assert!(allocate(&msg, 8).is_err());
    }

    #[test]
    fn fresh_region_is_initialised_and_keeps_the_frontends_base() {
        let (file, mut t) = region(1, 128);
        let r = t[0].recover(7, 128);
        assert_eq!(
            r,
            Recovery {
                next_avail: None,
                resubmit: vec![]
            }
        );
        // A kill before the first batch: the recorded index is the ring's, nothing torn.
        t[0].taken(5);
        let mut again = remap(&file, 1, 128);
        let r = again[0].recover(7, 128);
        assert_eq!(r.next_avail, Some(8));
        assert_eq!(r.resubmit, vec![5]);
    }

    #[test]
    fn out_of_order_completion_resubmits_in_counter_order() {
        let (file, mut t) = region(1, 256);
        let mut used = 0u16;
        t[0].recover(used, 256);
        for head in [40, 7, 200, 3] {
            t[0].taken(head);
        }
        // 200 and 7 complete first (one batch), then 40 is published alone.
        t[0].returning([200, 7]);
        used += 2;
        t[0].returned(used);
        t[0].taken(9);
        let mut again = remap(&file, 1, 256);
        let r = again[0].recover(used, 256);
        assert_eq!(r.resubmit, vec![40, 3, 9], "oldest first");
        assert_eq!(r.next_avail, Some(used + 3));
        // New chains get counters after the resubmitted ones; a resubmitted head taken again
        // keeps its place.
        again[0].taken(40);
        again[0].taken(11);
        let mut third = remap(&file, 1, 256);
        assert_eq!(third[0].recover(used, 256).resubmit, vec![40, 3, 9, 11]);
    }

    /// Simulates a kill after each store of taking chains and returning a batch (the
    /// tracker's own stores, and the used ring's index published once per element as
    /// virtio-queue does): whatever the point, recovery resubmits exactly the chains taken and
    /// not in the used ring, oldest first, and the ring resumes after all of them.
    #[test]
    fn a_kill_between_any_two_stores_recovers() {
        let older = [8u16, 20];
        let batch = [12u16, 5, 30, 1];
        // 2 stores per taken chain, 2 per batch entry linked, 1 per used index publication,
        // 1 per flag cleared, 1 for used_idx.
        let total = 2 * batch.len() + 2 * batch.len() + batch.len() + batch.len() + 1;
        for stop in 0..=total {
            let (file, mut t) = region(1, 64);
            t[0].recover(100, 64);
            for h in older {
                t[0].taken(h);
            }
            t[0].stores_left.set(stop);
            let mut taken = Vec::new();
            for h in batch {
                t[0].taken(h);
                if t[0]
                    .desc(h)
                    .is_some_and(|d| d.inflight.load(Ordering::Relaxed) == 1)
                {
                    taken.push(h);
                }
            }
            // The device returns only what it took.
            let returned: Vec<u16> = taken.clone();
            t[0].returning(returned.iter().copied());
            let mut ring_used = 100u16;
            for _ in &returned {
                if t[0].alive() {
                    ring_used += 1;
                }
            }
            t[0].returned(ring_used);
            let published = &returned[..usize::from(ring_used - 100)];
            let mut again = remap(&file, 1, 64);
            let r = again[0].recover(ring_used, 64);
            let expected: Vec<u16> = older
                .iter()
                .chain(&taken)
                .copied()
                .filter(|h| !published.contains(h))
                .collect();
            assert_eq!(r.resubmit, expected, "killed after {stop} stores");
            // Every chain taken before the kill was removed from the available ring.
            let taken_total = (older.len() + taken.len()) as u16;
            assert_eq!(
                r.next_avail,
                Some(100 + taken_total),
                "killed after {stop} stores"
            );
        }
    }

    #[test]
    fn torn_batch_spanning_the_used_index_wrap() {
        let (file, mut t) = region(1, 128);
        t[0].recover(65534, 128);
        for h in [1, 2, 3] {
            t[0].taken(h);
        }
        t[0].returning([2, 3]);
        // Killed after the used index went 65534 -> 0, before the region was updated.
        let mut again = remap(&file, 1, 128);
        let r = again[0].recover(0, 128);
        assert_eq!(r.resubmit, vec![1]);
        assert_eq!(r.next_avail, Some(1));
    }

    fn guest() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)])
            .unwrap_or_else(|e| panic!("test memory: {e}"))
    }

    fn put(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(Descriptor::new(addr, len, flags, next), at)
            .unwrap_or_else(|e| panic!("write descriptor: {e}"));
    }

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    #[test]
    fn resubmitted_chains_are_walked_like_popped_ones() {
        let mem = guest();
        let table = 0x1000;
        // Direct: head 5 -> 9 -> 2.
        put(&mem, table, 5, 0x8000, 16, NEXT, 9);
        put(&mem, table, 9, 0x9000, 512, NEXT | WRITE, 2);
        put(&mem, table, 2, 0xa000, 1, WRITE, 0);
        let chain = parse_chain_at(&mem, GuestAddress(table), 16, 5)
            .unwrap_or_else(|e| panic!("direct chain: {e}"));
        assert_eq!((chain.readable_len(), chain.writable_len()), (16, 513));
        // Indirect: head 7 refers to a table of three.
        let indirect = 0x4000;
        put(&mem, table, 7, indirect, 48, INDIRECT, 0);
        put(&mem, indirect, 0, 0x8000, 16, NEXT, 1);
        put(&mem, indirect, 1, 0x9000, 4096, NEXT | WRITE, 2);
        put(&mem, indirect, 2, 0xa000, 1, WRITE, 0);
        let chain = parse_chain_at(&mem, GuestAddress(table), 16, 7)
            .unwrap_or_else(|e| panic!("indirect chain: {e}"));
        assert_eq!((chain.readable_len(), chain.writable_len()), (16, 4097));
    }

    #[test]
    fn hostile_resubmitted_chains_are_refused() {
        let mem = guest();
        let table = 0x1000;
        // A loop.
        put(&mem, table, 0, 0x8000, 16, NEXT, 1);
        put(&mem, table, 1, 0x8000, 16, NEXT, 0);
        assert!(matches!(
            parse_chain_at(&mem, GuestAddress(table), 16, 0),
            Err(ChainError::TooLong(16))
        ));
        // A head or a next beyond the table.
        assert!(parse_chain_at(&mem, GuestAddress(table), 16, 16).is_err());
        put(&mem, table, 3, 0x8000, 16, NEXT, 200);
        assert!(parse_chain_at(&mem, GuestAddress(table), 16, 3).is_err());
        // Indirect inside indirect, a table of a partial descriptor, a table outside memory.
        put(&mem, table, 4, 0x4000, 16, INDIRECT, 0);
        put(&mem, 0x4000, 0, 0x5000, 16, INDIRECT, 0);
        assert!(parse_chain_at(&mem, GuestAddress(table), 16, 4).is_err());
        put(&mem, table, 6, 0x4000, 20, INDIRECT, 0);
        assert!(parse_chain_at(&mem, GuestAddress(table), 16, 6).is_err());
        put(&mem, table, 8, 0xff_fff0, 32, INDIRECT, 0);
        assert!(parse_chain_at(&mem, GuestAddress(table), 16, 8).is_err());
        // A buffer outside guest memory: ChainBuffers' own check.
        put(&mem, table, 10, 0x20_0000, 16, 0, 0);
        assert!(matches!(
            parse_chain_at(&mem, GuestAddress(table), 16, 10),
            Err(ChainError::OutsideMemory { .. })
        ));
        // A table at the very top of the address space.
        assert!(parse_chain_at(&mem, GuestAddress(u64::MAX - 8), 16, 1).is_err());
    }

    #[test]
    fn garbage_regions_do_not_panic_or_loop() {
        let (file, _t) = region(1, 128);
        let garbage: Vec<u8> = (0..queue_region_size(128))
            .map(|i| (i * 131 % 251) as u8)
            .collect();
        let n = nix::sys::uio::pwrite(&file, &garbage, 0).unwrap_or(0);
        assert_eq!(n, garbage.len());
        let mut t = remap(&file, 1, 128);
        for used in [0u16, 1, 127, 128, 40000] {
            let r = t[0].recover(used, 64);
            assert!(r.resubmit.iter().all(|&h| h < 64));
            assert!(r.resubmit.len() <= 64);
            t[0].stopped();
        }
    }
}
