//! Receive path, device side: a frame read from the tap (virtio-net header first) is copied
//! into one guest receive chain, or into several with VIRTIO_NET_F_MRG_RXBUF, whose count goes
//! into the header's `num_buffers`. No vhost types here: the caller pops chains and publishes
//! the used entries.

use vhost_user_common::chain::{ChainBuffers, ChainError};
use vhost_user_common::GuestMemory;

/// A guest receive chain taken from the available ring.
#[derive(Debug, Clone)]
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

/// Checks that a parsed chain can hold at least a virtio-net header.
pub fn check_chain(
    head: u16,
    parsed: Result<ChainBuffers, ChainError>,
    hdr_len: usize,
) -> Result<RxChain, BadChain> {
    let buffers = parsed.map_err(|e| BadChain::Invalid(e, head))?;
    if buffers.writable_len() < hdr_len as u64 {
        return Err(BadChain::NoRoomForHeader {
            head,
            len: buffers.writable_len(),
            hdr_len,
        });
    }
    Ok(RxChain { head, buffers })
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
        if let Some(field) = frame.get_mut(10..12) {
            field.copy_from_slice(&count.to_le_bytes());
        }
    }
}

/// Copies `frame` (header included) into `chains`, filling each before the next, after setting
/// the header's `num_buffers` to the number of chains used, and appends the used-ring entries
/// `(head, bytes written)` to `used`. On error `used` is left as it was.
///
/// `chains` must be exactly the chains [`fit`] said the frame needs.
pub fn write_frame(
    mem: &GuestMemory,
    frame: &mut [u8],
    hdr_len: usize,
    chains: &[RxChain],
    used: &mut Vec<(u16, u32)>,
) -> Result<(), ChainError> {
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    set_num_buffers(frame, hdr_len, count);
    let start = used.len();
    let mut rest: &[u8] = frame;
    for chain in chains {
        let take = rest.len().min(chain.buffers.writable_len() as usize);
        if let Err(e) = chain.buffers.write_all_at(mem, 0, &rest[..take]) {
            used.truncate(start);
            return Err(e);
        }
        used.push((chain.head, take as u32));
        rest = &rest[take..];
    }
    if !rest.is_empty() {
        used.truncate(start);
        return Err(ChainError::OutOfRange {
            offset: (frame.len() - rest.len()) as u64,
            len: rest.len() as u64,
            available: 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{chain_buffers, memory};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    fn rx_chain(mem: &GuestMemory, head: u16, addr: u64, len: u32) -> RxChain {
        let buffers = chain_buffers(mem, &[(addr, len, VRING_DESC_F_WRITE)]);
        check_chain(head, buffers, 12).unwrap_or_else(|e| panic!("{e}"))
    }

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[0] = 1; // NEEDS_CSUM, kept as the tap gave it
        f.extend((0..payload_len).map(|i| i as u8));
        f
    }

    #[test]
    fn single_buffer_gets_num_buffers_one() {
        let mem = memory();
        let chains = [rx_chain(&mem, 3, 0x1000, 2048)];
        let mut f = frame(100);
        assert_eq!(fit(f.len(), false, &chains), Fit::Fits(1));
        let mut used = Vec::new();
        write_frame(&mem, &mut f, 12, &chains, &mut used).unwrap_or_else(|e| panic!("{e}"));
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
        let chains = [
            rx_chain(&mem, 0, 0x1000, 64),
            rx_chain(&mem, 1, 0x2000, 64),
            rx_chain(&mem, 2, 0x3000, 64),
            rx_chain(&mem, 3, 0x4000, 64),
        ];
        let mut f = frame(150); // 162 bytes: three buffers
        assert_eq!(fit(f.len(), true, &chains), Fit::Fits(3));
        assert_eq!(fit(f.len(), true, &chains[..2]), Fit::NeedMore);
        let mut used = vec![(9, 0)];
        write_frame(&mem, &mut f, 12, &chains[..3], &mut used).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used, vec![(9, 0), (0, 64), (1, 64), (2, 34)]);
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
        // A frame longer than the chains leaves `used` as it was.
        let mut long = frame(300);
        assert!(write_frame(&mem, &mut long, 12, &chains[..1], &mut used).is_err());
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn frame_larger_than_chain_without_merging_is_too_large() {
        let mem = memory();
        let chains = [
            rx_chain(&mem, 0, 0x1000, 64),
            rx_chain(&mem, 1, 0x2000, 4096),
        ];
        assert_eq!(fit(100, false, &chains), Fit::TooLarge);
        assert_eq!(fit(100, false, &[]), Fit::NeedMore);
        assert_eq!(fit(100, true, &chains), Fit::Fits(2));
    }

    #[test]
    fn hostile_chains_are_rejected() {
        let mem = memory();
        let small = chain_buffers(&mem, &[(0x1000, 8, VRING_DESC_F_WRITE)]);
        assert!(matches!(
            check_chain(0, small, 12),
            Err(BadChain::NoRoomForHeader { len: 8, .. })
        ));
        let outside = chain_buffers(
            &mem,
            &[(crate::test_util::MEM_SIZE - 4, 64, VRING_DESC_F_WRITE)],
        );
        assert!(matches!(
            check_chain(1, outside, 12),
            Err(BadChain::Invalid(ChainError::OutsideMemory { .. }, 1))
        ));
        let readonly = chain_buffers(&mem, &[(0x1000, 64, 0)]);
        assert!(check_chain(2, readonly, 12).is_err());
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mut f = vec![0u8; 10];
        set_num_buffers(&mut f, 10, 1);
        assert_eq!(f, vec![0u8; 10]);
    }
}
