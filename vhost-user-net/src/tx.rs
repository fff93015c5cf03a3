//! Transmit path, device side: a guest transmit chain is the virtio-net header followed by the
//! frame, all device-readable. The tap takes exactly that layout (IFF_VNET_HDR with the same
//! header length), so the chain's segments go to `writev` as they are. No vhost types here.

use vhost_user_common::chain::{ChainBuffers, ChainError, Segment};

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

/// Validates a parsed transmit chain and returns the segments to write to the tap.
pub fn frame_segments(
    head: u16,
    parsed: Result<ChainBuffers, ChainError>,
    hdr_len: usize,
) -> Result<Vec<Segment>, TxDrop> {
    let buffers = parsed.map_err(|e| TxDrop::Invalid(e, head))?;
    let len = buffers.readable_len();
    if len < hdr_len as u64 {
        return Err(TxDrop::NoHeader { head, len, hdr_len });
    }
    if len - hdr_len as u64 > MAX_FRAME {
        return Err(TxDrop::TooLarge { head, len });
    }
    Ok(buffers.readable().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{chain_buffers, memory, MEM_SIZE};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    #[test]
    fn header_and_frame_pass_through() {
        let mem = memory();
        let parsed = chain_buffers(&mem, &[(0x1000, 12, 0), (0x2000, 60, 0)]);
        let segs = frame_segments(0, parsed, 12).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1].len, 60);
    }

    #[test]
    fn chains_without_header_or_outside_memory_are_dropped() {
        let mem = memory();
        let short = chain_buffers(&mem, &[(0x1000, 11, 0)]);
        assert_eq!(
            frame_segments(4, short, 12),
            Err(TxDrop::NoHeader {
                head: 4,
                len: 11,
                hdr_len: 12
            })
        );
        let outside = chain_buffers(&mem, &[(MEM_SIZE - 8, 64, 0)]);
        assert!(matches!(
            frame_segments(5, outside, 12),
            Err(TxDrop::Invalid(ChainError::OutsideMemory { .. }, 5))
        ));
        // Write-only buffers carry nothing to send.
        let writable = chain_buffers(&mem, &[(0x1000, 64, VRING_DESC_F_WRITE)]);
        assert!(frame_segments(6, writable, 12).is_err());
    }

    #[test]
    fn oversized_frames_are_dropped() {
        let mem = memory();
        let big = chain_buffers(&mem, &[(0x1000, 12, 0), (0x10000, 70_000, 0)]);
        assert!(matches!(
            frame_segments(0, big, 12),
            Err(TxDrop::TooLarge { .. })
        ));
    }
}
