//! Bounds-checked access to virtio descriptor chains.
//!
//! Everything in a chain comes from the guest: addresses, lengths, flags and the chain's shape.
//! [`ChainBuffers::parse`] walks a chain once, checks that every descriptor lies inside guest
//! memory and that device-readable descriptors come before device-writable ones (virtio 1.2,
//! 2.7.4.2), and keeps the two parts as lists of segments. Callers then copy whole ranges in and
//! out, or turn a range into host iovecs for vectored I/O, without ever touching memory outside
//! the guest's regions. A queue keeps one `ChainBuffers` as scratch ([`ChainBuffers::parse_into`])
//! so that walking a chain allocates nothing.

use std::io;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::GuestMemory;

/// One guest-physical buffer: `len` bytes at `addr`, known to be inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index}: {len} bytes at {addr:#x} are outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: usize },
    #[error("chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("chain is empty or its first descriptor cannot be read")]
    Empty,
    #[error("range {offset}+{len} is beyond the chain's {available} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        available: u64,
    },
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

impl From<ChainError> for io::Error {
    fn from(e: ChainError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A chain split into its device-readable part followed by its device-writable part.
#[derive(Debug, Default, Clone)]
pub struct ChainBuffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

impl ChainBuffers {
    /// Walks `descriptors` (a `DescriptorChain`, which already follows indirect tables and stops
    /// on loops) and validates every descriptor against `mem`. Chains longer than
    /// `max_descriptors` are rejected. Zero-length descriptors are skipped.
    pub fn parse<I>(
        descriptors: I,
        mem: &GuestMemory,
        max_descriptors: usize,
    ) -> Result<Self, ChainError>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let mut buffers = ChainBuffers::default();
        buffers.parse_into(descriptors, mem, max_descriptors)?;
        Ok(buffers)
    }

    /// [`ChainBuffers::parse`] into this value, reusing its storage: a queue keeps one as
    /// scratch and walks every chain without allocating.
    pub fn parse_into<I>(
        &mut self,
        descriptors: I,
        mem: &GuestMemory,
        max_descriptors: usize,
    ) -> Result<(), ChainError>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        let mut seen = 0;
        for (index, desc) in descriptors.into_iter().enumerate() {
            seen += 1;
            if index >= max_descriptors {
                return Err(ChainError::TooLong(max_descriptors));
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if host_address(mem, segment).is_none()
                && !GuestMemoryBackend::check_range(mem, segment.addr, segment.len as usize)
            {
                return Err(ChainError::OutsideMemory {
                    index,
                    addr: segment.addr.0,
                    len: segment.len,
                });
            }
            if desc.is_write_only() {
                if segment.len > 0 {
                    self.writable_len += u64::from(segment.len);
                    self.writable.push(segment);
                }
            } else {
                if !self.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable { index });
                }
                if segment.len > 0 {
                    self.readable_len += u64::from(segment.len);
                    self.readable.push(segment);
                }
            }
        }
        if seen == 0 {
            return Err(ChainError::Empty);
        }
        Ok(())
    }

    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Copies `buf.len()` bytes of the readable part, starting `offset` bytes in, into `buf`.
    pub fn read_exact_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for seg in self.readable_range(offset, buf.len() as u64)? {
            let end = done + seg.len as usize;
            mem.read_slice(&mut buf[done..end], seg.addr)
                .map_err(|e| ChainError::Memory(e.to_string()))?;
            done = end;
        }
        Ok(())
    }

    /// Copies `data` into the writable part, starting `offset` bytes in.
    pub fn write_all_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for seg in self.writable_range(offset, data.len() as u64)? {
            let end = done + seg.len as usize;
            mem.write_slice(&data[done..end], seg.addr)
                .map_err(|e| ChainError::Memory(e.to_string()))?;
            done = end;
        }
        Ok(())
    }

    /// The readable bytes `[offset, offset + len)` as segments.
    pub fn readable_range(&self, offset: u64, len: u64) -> Result<SubSegments<'_>, ChainError> {
        sub_segments(&self.readable, self.readable_len, offset, len)
    }

    /// The writable bytes `[offset, offset + len)` as segments.
    pub fn writable_range(&self, offset: u64, len: u64) -> Result<SubSegments<'_>, ChainError> {
        sub_segments(&self.writable, self.writable_len, offset, len)
    }
}

/// The part `[offset, offset + len)` of the byte stream formed by `segments` (whose lengths
/// add up to `total`), as an iterator of segments: nothing is allocated.
pub fn sub_segments(
    segments: &[Segment],
    total: u64,
    offset: u64,
    len: u64,
) -> Result<SubSegments<'_>, ChainError> {
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(SubSegments {
            segments: segments.iter(),
            skip: offset,
            want: len,
        }),
        _ => Err(ChainError::OutOfRange {
            offset,
            len,
            available: total,
        }),
    }
}

/// See [`sub_segments`].
#[derive(Debug, Clone)]
pub struct SubSegments<'a> {
    segments: std::slice::Iter<'a, Segment>,
    skip: u64,
    want: u64,
}

impl Iterator for SubSegments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        while self.want > 0 {
            let seg = self.segments.next()?;
            let seg_len = u64::from(seg.len);
            if self.skip >= seg_len {
                self.skip -= seg_len;
                continue;
            }
            let take = (seg_len - self.skip).min(self.want);
            // `skip < seg_len <= u32::MAX` and the segment is inside guest memory, so neither
            // the address nor the length can overflow.
            let out = Segment {
                addr: GuestAddress(seg.addr.0 + self.skip),
                len: take as u32,
            };
            self.want -= take;
            self.skip = 0;
            return Some(out);
        }
        None
    }
}

/// Appends the host-virtual iovecs covering `segments` (split where a segment crosses a region
/// boundary) to `out`.
///
/// The pointers stay valid while the `GuestMemory` they come from is alive: keep an `Arc` of it
/// until the I/O using them has completed.
pub fn host_iovecs(
    mem: &GuestMemory,
    segments: impl IntoIterator<Item = Segment>,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ChainError> {
    for seg in segments {
        if seg.len == 0 {
            continue;
        }
        if let Some(base) = host_address(mem, seg) {
            out.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: seg.len as usize,
            });
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(|e| ChainError::Memory(e.to_string()))?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// The host address of `segment` when it lies inside one region, as nearly every buffer does:
/// one region lookup instead of vm-memory's slice iterator, which is most of the cost of a
/// small frame outside the kernel. `None` when it spans regions or is not in guest memory.
fn host_address(mem: &GuestMemory, segment: Segment) -> Option<*mut u8> {
    let region = mem.find_region(segment.addr)?;
    let offset = segment.addr.0.checked_sub(region.start_addr().0)?;
    if u64::from(segment.len) > region.len().checked_sub(offset)? {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::DescriptorChain;

    const MEM_SIZE: u64 = 0x10_0000;

    fn memory() -> GuestMemory {
        // Two regions so that host_iovecs has a boundary to split at.
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x8_0000), 0x8_0000),
        ])
        .unwrap_or_else(|e| panic!("test memory: {e}"))
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0))
    }

    fn chain(mem: &GuestMemory, descs: &[RawDescriptor]) -> Vec<Descriptor> {
        let queue = MockSplitQueue::new(mem, 16);
        let chain: DescriptorChain<&GuestMemory> = queue
            .build_desc_chain(descs)
            .unwrap_or_else(|e| panic!("mock chain: {e:?}"));
        chain.collect()
    }

    #[test]
    fn splits_readable_and_writable() {
        let mem = memory();
        let c = chain(
            &mem,
            &[
                desc(0x1000, 16, VRING_DESC_F_NEXT),
                desc(0x2000, 512, VRING_DESC_F_WRITE),
                desc(0x3000, 1, VRING_DESC_F_WRITE),
            ],
        );
        let buffers = ChainBuffers::parse(c, &mem, 16).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buffers.readable_len(), 16);
        assert_eq!(buffers.writable_len(), 513);
        assert_eq!(buffers.writable().len(), 2);
    }

    #[test]
    fn rejects_descriptor_outside_memory() {
        let mem = memory();
        let c = chain(
            &mem,
            &[
                desc(0x1000, 16, 0),
                desc(MEM_SIZE - 8, 16, VRING_DESC_F_WRITE),
            ],
        );
        assert!(matches!(
            ChainBuffers::parse(c, &mem, 16),
            Err(ChainError::OutsideMemory { index: 1, .. })
        ));
        let c = chain(&mem, &[desc(u64::MAX - 4, 16, 0)]);
        assert!(ChainBuffers::parse(c, &mem, 16).is_err());
    }

    #[test]
    fn rejects_readable_after_writable_and_long_chains() {
        let mem = memory();
        let c = chain(
            &mem,
            &[desc(0x1000, 16, VRING_DESC_F_WRITE), desc(0x2000, 16, 0)],
        );
        assert_eq!(
            ChainBuffers::parse(c, &mem, 16).err(),
            Some(ChainError::ReadableAfterWritable { index: 1 })
        );
        let c = chain(
            &mem,
            &[desc(0x1000, 16, 0), desc(0x2000, 16, 0), desc(0x3000, 1, 0)],
        );
        assert_eq!(
            ChainBuffers::parse(c, &mem, 2).err(),
            Some(ChainError::TooLong(2))
        );
    }

    #[test]
    fn copies_across_segments_and_ranges_are_checked() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x1000))
            .unwrap_or_default();
        mem.write_slice(&[5, 6, 7, 8], GuestAddress(0x2000))
            .unwrap_or_default();
        let c = chain(
            &mem,
            &[
                desc(0x1000, 4, 0),
                desc(0x2000, 4, 0),
                desc(0x3000, 3, VRING_DESC_F_WRITE),
                desc(0x4000, 3, VRING_DESC_F_WRITE),
            ],
        );
        let buffers = ChainBuffers::parse(c, &mem, 16).unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 6];
        buffers
            .read_exact_at(&mem, 1, &mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, [2, 3, 4, 5, 6, 7]);
        buffers
            .write_all_at(&mem, 2, &[9, 9, 9])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = [0u8; 3];
        mem.read_slice(&mut out, GuestAddress(0x4000))
            .unwrap_or_default();
        assert_eq!(out, [9, 9, 0]);
        assert!(buffers.write_all_at(&mem, 4, &[0, 0, 0]).is_err());
        assert!(buffers.readable_range(u64::MAX, 2).is_err());
        let middle: Vec<Segment> = buffers
            .readable_range(3, 3)
            .unwrap_or_else(|e| panic!("{e}"))
            .collect();
        assert_eq!(
            middle,
            vec![
                Segment {
                    addr: GuestAddress(0x1003),
                    len: 1
                },
                Segment {
                    addr: GuestAddress(0x2000),
                    len: 2
                }
            ]
        );
    }

    #[test]
    fn iovecs_split_at_region_boundaries() {
        let mem = memory();
        let segs = [Segment {
            addr: GuestAddress(0x8_0000 - 100),
            len: 200,
        }];
        let mut iov = Vec::new();
        host_iovecs(&mem, segs, &mut iov).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 100);
        assert_eq!(iov[1].iov_len, 100);
    }

    #[test]
    fn segments_ending_at_a_region_end_take_one_iovec_and_the_right_address() {
        let mem = memory();
        let at = |addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let segs = [
            Segment {
                addr: GuestAddress(0x8_0000 - 100),
                len: 100,
            },
            Segment {
                addr: GuestAddress(MEM_SIZE - 8),
                len: 8,
            },
            Segment {
                addr: GuestAddress(0x10),
                len: 0,
            },
        ];
        let mut iov = Vec::new();
        host_iovecs(&mem, segs, &mut iov).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(iov.len(), 2, "an empty segment adds no iovec");
        assert_eq!(iov[0].iov_base, at(0x8_0000 - 100).cast());
        assert_eq!(iov[0].iov_len, 100);
        assert_eq!(iov[1].iov_base, at(MEM_SIZE - 8).cast());
        assert_eq!(iov[1].iov_len, 8);
        // One byte more runs past the last region.
        let past = [Segment {
            addr: GuestAddress(MEM_SIZE - 8),
            len: 9,
        }];
        assert!(host_iovecs(&mem, past, &mut Vec::new()).is_err());
    }
}
