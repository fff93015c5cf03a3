//! Receive path, device side: a frame read from the tap (virtio-net header first) is copied
//! into one guest receive chain, or into several with VIRTIO_NET_F_MRG_RXBUF, whose count goes
//! into the header's `num_buffers`. No vhost types here: the caller takes chains from the ring
//! and gives them back.
//!
//! The chains held for a frame live in [`HeldChains`], whose slots (and the segment lists in
//! them) are reused from frame to frame: receiving allocates nothing once the slots have grown
//! to the most chains a frame has needed.

use std::mem::offset_of;

use vhost_user_common::chain::{ChainBuffers, ChainError};
use vhost_user_common::GuestMemory;
use virtio_bindings::virtio_net::virtio_net_hdr_mrg_rxbuf;
use virtio_queue::desc::split::Descriptor;

/// Where `num_buffers` sits in the 12-byte header.
const NUM_BUFFERS: usize = offset_of!(virtio_net_hdr_mrg_rxbuf, num_buffers);

/// A guest receive chain taken from the available ring.
#[derive(Debug, Clone, Default)]
pub struct RxChain {
    pub head: u16,
    pub buffers: ChainBuffers,
}

/// Why a receive chain cannot take any frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadChain {
    #[error("receive chain {head}: {0}", head = .1)]
    Invalid(ChainError, u16),
    #[error("receive chain {head} has {len} writable bytes, less than the {hdr_len}-byte header")]
    NoRoomForHeader { head: u16, len: u64, hdr_len: usize },
}

/// Receive chains taken from the ring and not yet used, in ring order.
#[derive(Debug, Default)]
pub struct HeldChains {
    /// `slots[..len]` are held; the rest are storage kept for the next chains.
    slots: Vec<RxChain>,
    len: usize,
}

impl HeldChains {
    /// The held chains, in ring order.
    pub fn chains(&self) -> &[RxChain] {
        self.slots.get(..self.len).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Walks and checks the chain `head` into the next slot, and holds it if it can take at
    /// least a virtio-net header of `hdr_len` bytes. A bad chain is not held (the caller gives
    /// it back empty).
    pub fn take<I>(
        &mut self,
        head: u16,
        descriptors: I,
        mem: &GuestMemory,
        max_descriptors: usize,
        hdr_len: usize,
    ) -> Result<(), BadChain>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        if self.len == self.slots.len() {
            self.slots.push(RxChain::default());
        }
        let Some(slot) = self.slots.get_mut(self.len) else {
            return Err(BadChain::Invalid(ChainError::Empty, head));
        };
        slot.head = head;
        slot.buffers
            .parse_into(descriptors, mem, max_descriptors)
            .map_err(|e| BadChain::Invalid(e, head))?;
        let len = slot.buffers.writable_len();
        if len < hdr_len as u64 {
            return Err(BadChain::NoRoomForHeader { head, len, hdr_len });
        }
        self.len += 1;
        Ok(())
    }

    /// Lets go of the first `n` held chains (they were used), keeping their storage.
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.len);
        if let Some(held) = self.slots.get_mut(..self.len) {
            held.rotate_left(n);
        }
        self.len -= n;
    }

    /// Lets go of every held chain; returns their heads.
    pub fn release_all(&mut self) -> impl Iterator<Item = u16> + '_ {
        let held = self.len;
        self.len = 0;
        self.slots.iter().take(held).map(|c| c.head)
    }
}

/// How the chains held so far relate to a frame of some length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The first `n` chains take the whole frame.
    Fits(usize),
    /// More chains are needed (merging receive buffers only).
    NeedMore,
    /// The frame can never fit: without MRG_RXBUF it is longer than the first chain.
    TooLarge,
}

/// Decides how many of `chains` (in ring order) a frame of `frame_len` bytes, header included,
/// occupies.
pub fn fit(frame_len: usize, mergeable: bool, chains: &[RxChain]) -> Fit {
    let frame_len = frame_len as u64;
    if !mergeable {
        return match chains.first() {
            None => Fit::NeedMore,
            Some(c) if c.buffers.writable_len() >= frame_len => Fit::Fits(1),
            Some(_) => Fit::TooLarge,
        };
    }
    let mut room = 0u64;
    for (i, chain) in chains.iter().enumerate() {
        room = room.saturating_add(chain.buffers.writable_len());
        if room >= frame_len {
            return Fit::Fits(i + 1);
        }
    }
    Fit::NeedMore
}

/// Sets `num_buffers` (bytes 10..12 of the 12-byte header) to `count`.
pub fn set_num_buffers(frame: &mut [u8], hdr_len: usize, count: u16) {
    if hdr_len >= crate::VNET_HDR_LEN {
        if let Some(field) = frame.get_mut(NUM_BUFFERS..NUM_BUFFERS + 2) {
            field.copy_from_slice(&count.to_le_bytes());
        }
    }
}

/// Copies `frame` (header included) into `chains`, filling each before the next, after setting
/// the header's `num_buffers` to the number of chains used; then hands each chain's used entry
/// `(head, bytes written)` to `used`, in order. On error `used` is not called.
///
/// `chains` must be exactly the chains [`fit`] said the frame needs. The copy goes through
/// vm-memory's accessors (which mark what they write for dirty-page logging).
pub fn write_frame(
    mem: &GuestMemory,
    frame: &mut [u8],
    hdr_len: usize,
    chains: &[RxChain],
    mut used: impl FnMut(u16, u32),
) -> Result<(), ChainError> {
    let room = chains.iter().fold(0u64, |room, c| {
        room.saturating_add(c.buffers.writable_len())
    });
    if room < frame.len() as u64 {
        return Err(ChainError::OutOfRange {
            offset: 0,
            len: frame.len() as u64,
            available: room,
        });
    }
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    set_num_buffers(frame, hdr_len, count);
    let mut rest: &[u8] = frame;
    for chain in chains {
        let take = rest.len().min(chain.buffers.writable_len() as usize);
        chain.buffers.write_all_at(mem, 0, &rest[..take])?;
        rest = &rest[take..];
    }
    let mut rest = frame.len();
    for chain in chains {
        let take = rest.min(chain.buffers.writable_len() as usize);
        used(chain.head, take as u32);
        rest -= take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{descriptors, memory, MEM_SIZE};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    fn hold(mem: &GuestMemory, held: &mut HeldChains, head: u16, addr: u64, len: u32) {
        let chain = descriptors(mem, &[(addr, len, VRING_DESC_F_WRITE)]);
        held.take(head, chain, mem, 16, 12)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[0] = 1; // NEEDS_CSUM, kept as the tap gave it
        f.extend((0..payload_len).map(|i| i as u8));
        f
    }

    fn collect(
        mem: &GuestMemory,
        frame: &mut [u8],
        chains: &[RxChain],
    ) -> Result<Vec<(u16, u32)>, ChainError> {
        let mut used = Vec::new();
        write_frame(mem, frame, 12, chains, |head, len| used.push((head, len)))?;
        Ok(used)
    }

    #[test]
    fn single_buffer_gets_num_buffers_one() {
        let mem = memory();
        let mut held = HeldChains::default();
        hold(&mem, &mut held, 3, 0x1000, 2048);
        let mut f = frame(100);
        assert_eq!(fit(f.len(), false, held.chains()), Fit::Fits(1));
        let used = collect(&mem, &mut f, held.chains()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used, vec![(3, 112)]);
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, GuestAddress(0x1000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got[0], 1);
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], &frame(100)[12..]);
    }

    #[test]
    fn mergeable_frame_spans_buffers_and_counts_them() {
        let mem = memory();
        let mut held = HeldChains::default();
        for i in 0..4u16 {
            hold(&mem, &mut held, i, 0x1000 * (u64::from(i) + 1), 64);
        }
        let chains = held.chains();
        let mut f = frame(150); // 162 bytes: three buffers
        assert_eq!(fit(f.len(), true, chains), Fit::Fits(3));
        assert_eq!(fit(f.len(), true, &chains[..2]), Fit::NeedMore);
        let used = collect(&mem, &mut f, &chains[..3]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used, vec![(0, 64), (1, 64), (2, 34)]);
        let mut hdr = [0u8; 12];
        mem.read_slice(&mut hdr, GuestAddress(0x1000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3);
        let mut joined = [0u8; 162];
        for (i, part) in joined.chunks_mut(64).enumerate() {
            mem.read_slice(part, GuestAddress(0x1000 * (i as u64 + 1)))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(&joined[12..], &frame(150)[12..]);
        // A frame longer than the chains gives no used entries.
        let mut long = frame(300);
        assert!(collect(&mem, &mut long, &chains[..1]).is_err());
        // The used chains are let go; the fourth is now first.
        held.release(3);
        assert_eq!(held.len(), 1);
        assert_eq!(held.chains()[0].head, 3);
        assert_eq!(held.release_all().collect::<Vec<_>>(), vec![3]);
        assert!(held.is_empty());
    }

    #[test]
    fn frame_larger_than_chain_without_merging_is_too_large() {
        let mem = memory();
        let mut held = HeldChains::default();
        hold(&mem, &mut held, 0, 0x1000, 64);
        hold(&mem, &mut held, 1, 0x2000, 4096);
        assert_eq!(fit(100, false, held.chains()), Fit::TooLarge);
        assert_eq!(fit(100, false, &[]), Fit::NeedMore);
        assert_eq!(fit(100, true, held.chains()), Fit::Fits(2));
    }

    #[test]
    fn hostile_chains_are_rejected_and_not_held() {
        let mem = memory();
        let mut held = HeldChains::default();
        let take = |held: &mut HeldChains, head, descs: &[(u64, u32, u32)]| {
            held.take(head, descriptors(&mem, descs), &mem, 16, 12)
        };
        assert!(matches!(
            take(&mut held, 0, &[(0x1000, 8, VRING_DESC_F_WRITE)]),
            Err(BadChain::NoRoomForHeader { len: 8, .. })
        ));
        assert!(matches!(
            take(&mut held, 1, &[(MEM_SIZE - 4, 64, VRING_DESC_F_WRITE)]),
            Err(BadChain::Invalid(ChainError::OutsideMemory { .. }, 1))
        ));
        assert!(take(&mut held, 2, &[(0x1000, 64, 0)]).is_err());
        assert!(held.is_empty());
        // The slot a bad chain used is reused by the next good one.
        assert!(take(&mut held, 3, &[(0x1000, 64, VRING_DESC_F_WRITE)]).is_ok());
        assert_eq!(held.chains().len(), 1);
        assert_eq!(held.chains()[0].head, 3);
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mut f = vec![0u8; 10];
        set_num_buffers(&mut f, 10, 1);
        assert_eq!(f, vec![0u8; 10]);
        assert_eq!(NUM_BUFFERS, 10);
    }
}
