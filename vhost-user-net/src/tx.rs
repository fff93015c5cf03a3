//! Transmit path, device side: a guest transmit chain is the virtio-net header followed by the
//! frame, all device-readable. The tap takes exactly that layout (IFF_VNET_HDR with the same
//! header length), so the chain's buffers go to `writev` as they are: each descriptor is checked
//! against guest memory and turned into host iovecs in one pass, without copying the frame or
//! allocating. No vhost types here.

use vhost_user_common::chain::ChainError;
use vhost_user_common::GuestMemory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

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
/// The rules are those of [`vhost_user_common::chain::ChainBuffers::parse`]: every descriptor
/// must lie inside guest memory, device-readable descriptors come before device-writable ones
/// (which a transmit chain has no use for and are ignored), zero-length descriptors are
/// skipped, and a chain may have at most `max_descriptors` descriptors.
///
/// The iovecs point into guest memory: they stay valid while `mem` does.
pub fn frame_iovecs<I>(
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
    let start = out.len();
    let result = gather(head, descriptors, mem, max_descriptors, hdr_len, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn gather<I>(
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
    let invalid = |e| TxDrop::Invalid(e, head);
    let mut len = 0u64;
    let mut seen = 0usize;
    let mut writable = false;
    for (index, desc) in descriptors.into_iter().enumerate() {
        seen += 1;
        if index >= max_descriptors {
            return Err(invalid(ChainError::TooLong(max_descriptors)));
        }
        let (addr, size) = (desc.addr(), desc.len());
        if !GuestMemoryBackend::check_range(mem, addr, size as usize) {
            return Err(invalid(ChainError::OutsideMemory {
                index,
                addr: addr.0,
                len: size,
            }));
        }
        if desc.is_write_only() {
            writable = true;
            continue;
        }
        if writable {
            return Err(invalid(ChainError::ReadableAfterWritable { index }));
        }
        if size == 0 {
            continue;
        }
        len += u64::from(size);
        if len > hdr_len as u64 + MAX_FRAME {
            return Err(TxDrop::TooLarge { head, len });
        }
        for slice in GuestMemoryBackend::get_slices(mem, addr, size as usize) {
            let slice = slice.map_err(|e| invalid(ChainError::Memory(e.to_string())))?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    if seen == 0 {
        return Err(invalid(ChainError::Empty));
    }
    if len < hdr_len as u64 {
        return Err(TxDrop::NoHeader { head, len, hdr_len });
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
        let result = frame_iovecs(7, descriptors(&mem, descs), &mem, max, 12, &mut out);
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
}
