//! Transmit path, device side: a guest transmit chain is the virtio-net header followed by the
//! frame, all device-readable. The tap takes exactly that layout (IFF_VNET_HDR with the same
//! header length), so the chain's buffers go to `writev` as they are: the chain is walked and
//! checked into the queue pair's scratch [`ChainBuffers`] and its readable part turned into
//! host iovecs, without copying the frame or allocating. No vhost types here.

use vhost_user_common::chain::{host_iovecs, ChainBuffers, ChainError};
use vhost_user_common::GuestMemory;
use virtio_queue::desc::split::Descriptor;

/// The longest frame the tap accepts after the header (64 KiB GSO frames).
pub const MAX_FRAME: u64 = 65_535 + 14;

/// Why a transmit chain is dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxDrop {
    #[error("transmit chain {head}: {0}", head = .1)]
    Invalid(ChainError, u16),
    #[error("transmit chain {head}: {len} readable bytes, less than the {hdr_len}-byte header")]
    NoHeader { head: u16, len: u64, hdr_len: usize },
    #[error("transmit chain {head}: {len}-byte frame is larger than the tap takes")]
    TooLarge { head: u16, len: u64 },
}

/// Checks a transmit chain and appends the host iovecs of its readable part (header, then
/// frame) to `out`; returns the readable length. On error `out` is left as it was.
///
/// The chain is parsed into `scratch` (whose storage is reused: nothing is allocated once it
/// has grown to the longest chain seen) with the rules of [`ChainBuffers::parse_into`]: every
/// descriptor inside guest memory, device-readable descriptors before device-writable ones
/// (which a transmit chain has no use for and are ignored), zero-length descriptors skipped, at
/// most `max_descriptors` descriptors.
///
/// The iovecs point into guest memory: they stay valid while `mem` does.
pub fn frame_iovecs<I>(
    scratch: &mut ChainBuffers,
    head: u16,
    descriptors: I,
    mem: &GuestMemory,
    max_descriptors: usize,
    hdr_len: usize,
    out: &mut Vec<libc::iovec>,
) -> Result<u64, TxDrop>
where
    I: IntoIterator<Item = Descriptor>,
{
    scratch
        .parse_into(descriptors, mem, max_descriptors)
        .map_err(|e| TxDrop::Invalid(e, head))?;
    let len = scratch.readable_len();
    if len < hdr_len as u64 {
        return Err(TxDrop::NoHeader { head, len, hdr_len });
    }
    if len > hdr_len as u64 + MAX_FRAME {
        return Err(TxDrop::TooLarge { head, len });
    }
    let start = out.len();
    if let Err(e) = host_iovecs(mem, scratch.readable().iter().copied(), out) {
        out.truncate(start);
        return Err(TxDrop::Invalid(e, head));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{descriptors, memory, MEM_SIZE};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    fn iovecs(descs: &[(u64, u32, u32)], max: usize) -> (Result<u64, TxDrop>, Vec<libc::iovec>) {
        let mem = memory();
        let mut out = Vec::new();
        let mut scratch = ChainBuffers::default();
        let chain = descriptors(&mem, descs);
        let result = frame_iovecs(&mut scratch, 7, chain, &mem, max, 12, &mut out);
        (result, out)
    }

    #[test]
    fn header_and_frame_pass_through() {
        let (result, out) = iovecs(&[(0x1000, 12, 0), (0x2000, 60, 0)], 16);
        assert_eq!(result, Ok(72));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].iov_len, 60);
    }

    #[test]
    fn chains_without_header_or_outside_memory_are_dropped() {
        let (result, out) = iovecs(&[(0x1000, 11, 0)], 16);
        assert_eq!(
            result,
            Err(TxDrop::NoHeader {
                head: 7,
                len: 11,
                hdr_len: 12
            })
        );
        assert!(out.is_empty());
        let (result, out) = iovecs(&[(0x1000, 12, 0), (MEM_SIZE - 8, 64, 0)], 16);
        assert!(matches!(
            result,
            Err(TxDrop::Invalid(
                ChainError::OutsideMemory { index: 1, .. },
                7
            ))
        ));
        assert!(out.is_empty(), "a rejected chain leaves no iovecs behind");
        // Write-only buffers carry nothing to send.
        let (result, _) = iovecs(&[(0x1000, 64, VRING_DESC_F_WRITE)], 16);
        assert!(result.is_err());
        // Readable after writable is malformed.
        let (result, _) = iovecs(
            &[
                (0x1000, 12, 0),
                (0x2000, 8, VRING_DESC_F_WRITE),
                (0x3000, 8, 0),
            ],
            16,
        );
        assert_eq!(
            result,
            Err(TxDrop::Invalid(
                ChainError::ReadableAfterWritable { index: 2 },
                7
            ))
        );
    }

    #[test]
    fn oversized_and_overlong_chains_are_dropped() {
        let (result, _) = iovecs(&[(0x1000, 12, 0), (0x10000, 70_000, 0)], 16);
        assert!(matches!(result, Err(TxDrop::TooLarge { .. })));
        let (result, _) = iovecs(&[(0x1000, 12, 0), (0x2000, 8, 0), (0x3000, 8, 0)], 2);
        assert_eq!(result, Err(TxDrop::Invalid(ChainError::TooLong(2), 7)));
    }

    #[test]
    fn zero_length_descriptors_are_skipped_and_writable_tail_ignored() {
        let (result, out) = iovecs(
            &[
                (0x1000, 12, 0),
                (0x2000, 0, 0),
                (0x3000, 20, 0),
                (0x4000, 8, VRING_DESC_F_WRITE),
            ],
            16,
        );
        assert_eq!(result, Ok(32));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn the_scratch_is_reused_and_iovecs_append() {
        let mem = memory();
        let mut scratch = ChainBuffers::default();
        let mut out = Vec::new();
        let first = descriptors(&mem, &[(0x1000, 12, 0), (0x2000, 60, 0)]);
        let second = descriptors(&mem, &[(0x3000, 40, 0)]);
        assert_eq!(
            frame_iovecs(&mut scratch, 1, first, &mem, 16, 12, &mut out),
            Ok(72)
        );
        assert_eq!(
            frame_iovecs(&mut scratch, 2, second, &mem, 16, 12, &mut out),
            Ok(40)
        );
        assert_eq!(out.len(), 3, "the second chain's iovec follows the first's");
        assert_eq!(
            scratch.readable().len(),
            1,
            "the scratch holds the last chain only"
        );
    }
}
