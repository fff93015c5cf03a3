//! virtio-blk requests (virtio 1.2, 5.2.6): parsing a descriptor chain into a validated
//! [`Request`], and answering it (the status byte and the [`Completion`], written in one
//! place). Nothing here knows vhost-user or how requests are executed.
//!
//! Everything in a chain is guest-controlled. A request that is wrong but has a status byte gets
//! a status (IOERR or UNSUPP); one without a status byte is returned to the guest unanswered.

use vhost_user_common::chain::{ChainBuffers, Segment};
use vhost_user_common::GuestMemory;
use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// GET_ID answers with at most this many bytes.
pub const ID_BYTES: usize = 20;

/// `struct virtio_blk_outhdr`, the request header.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Header(virtio_blk_outhdr);
// SAFETY: a C struct of integers without padding; every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

/// `struct virtio_blk_discard_write_zeroes`, one range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct RangeEntry(virtio_blk_discard_write_zeroes);
// SAFETY: a C struct of integers without padding; every bit pattern is a valid value.
unsafe impl ByteValued for RangeEntry {}

const HEADER_SIZE: u64 = std::mem::size_of::<Header>() as u64;
const RANGE_SIZE: u64 = std::mem::size_of::<RangeEntry>() as u64;

/// The device's geometry and limits, as advertised in config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub logical_block_size: u32,
    pub readonly: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Read {
        offset: u64,
        data: Vec<Segment>,
        len: u64,
    },
    Write {
        offset: u64,
        data: Vec<Segment>,
        len: u64,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
        len: u64,
    },
    Discard(Vec<ByteRange>),
    WriteZeroes(Vec<ByteRange>),
}

/// A validated request: every segment is inside guest memory and every range inside the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Operation,
    /// Where the one-byte status goes.
    pub status: GuestAddress,
}

impl Request {
    /// Bytes the device writes into the chain: data read plus the status byte.
    pub fn used_len(&self) -> u32 {
        let data = match &self.op {
            Operation::Read { len, .. } | Operation::GetId { len, .. } => *len,
            _ => 0,
        };
        // A chain is at most 4 GiB (checked while parsing), so this fits.
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

/// Why a chain could not become a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status byte to answer with, when the chain has one.
    pub status: Option<(GuestAddress, u8)>,
    pub reason: String,
}

impl Rejection {
    fn with_status(status: GuestAddress, code: u8, reason: impl Into<String>) -> Self {
        Rejection {
            status: Some((status, code)),
            reason: reason.into(),
        }
    }
}

/// A chain the device is done with, ready for the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
    /// The guest memory the device wrote for it, to mark in the migration log before the
    /// chain is published (`QueueWorker::complete`).
    pub written: Written,
}

/// What a request wrote into guest memory: the data of a read or GET_ID (by the kernel, an
/// io_uring, a copy thread or a bounce-buffer copy) and the status byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub data: Vec<Segment>,
    pub status: Option<GuestAddress>,
}

impl Written {
    /// Every written range, as (address, length).
    pub fn ranges(&self) -> impl Iterator<Item = (GuestAddress, u64)> + '_ {
        let data = self.data.iter().map(|seg| (seg.addr, u64::from(seg.len)));
        data.chain(self.status.map(|at| (at, 1)))
    }
}

impl Completion {
    /// A chain returned unanswered: it had no status byte to write.
    pub fn unanswered(head: u16) -> Completion {
        Completion {
            head,
            used_len: 0,
            written: Written::default(),
        }
    }
}

/// Writes a status byte into guest memory. A failure (memory changed under us) is logged; the
/// chain is still returned.
fn write_status(mem: &GuestMemory, at: GuestAddress, status: u8) {
    if let Err(e) = mem.write_obj(status, at) {
        log::warn!("cannot write a request status: {e}");
    }
}

impl Request {
    /// Writes `status` for the request in chain `head`: the one place a request is answered.
    /// Call it once the request's data is in guest memory: the completion says what was
    /// written.
    pub fn finish(self, head: u16, mem: &GuestMemory, status: u8) -> Completion {
        write_status(mem, self.status, status);
        let used_len = self.used_len();
        let data = match self.op {
            Operation::Read { data, .. } | Operation::GetId { data, .. } => data,
            _ => Vec::new(),
        };
        Completion {
            head,
            used_len,
            written: Written {
                data,
                status: Some(self.status),
            },
        }
    }
}

impl Rejection {
    /// Answers the rejected chain `head` with its status, if it has a status byte.
    pub fn finish(&self, head: u16, mem: &GuestMemory) -> Completion {
        match self.status {
            Some((at, status)) => {
                write_status(mem, at, status);
                Completion {
                    head,
                    used_len: 1,
                    written: Written {
                        data: Vec::new(),
                        status: Some(at),
                    },
                }
            }
            None => Completion::unanswered(head),
        }
    }
}

/// Checks `[sector, sector + sectors)` against the capacity and the logical block size, and
/// returns it as a byte range.
fn sector_range(limits: &Limits, sector: u64, sectors: u64) -> Result<(u64, u64), String> {
    let end = sector
        .checked_add(sectors)
        .ok_or_else(|| format!("sector {sector} + {sectors} overflows"))?;
    if end > limits.capacity_sectors {
        return Err(format!(
            "sectors {sector}..{end} are beyond the capacity of {} sectors",
            limits.capacity_sectors
        ));
    }
    let per_block = u64::from(limits.logical_block_size) / SECTOR_SIZE;
    if per_block > 1 && (!sector.is_multiple_of(per_block) || !sectors.is_multiple_of(per_block)) {
        return Err(format!(
            "sectors {sector}..{end} are not aligned to the {}-byte logical block size",
            limits.logical_block_size
        ));
    }
    Ok((sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT))
}

/// Parses a chain (already split and bounds-checked by [`ChainBuffers::parse`]).
pub fn parse(
    buffers: &ChainBuffers,
    mem: &GuestMemory,
    limits: &Limits,
) -> Result<Request, Rejection> {
    let writable_len = buffers.writable_len();
    if writable_len == 0 {
        return Err(Rejection {
            status: None,
            reason: "no device-writable status byte".into(),
        });
    }
    let status_seg = buffers
        .writable_range(writable_len - 1, 1)
        .ok()
        .and_then(|mut range| range.next())
        .ok_or_else(|| Rejection {
            status: None,
            reason: "cannot locate the status byte".into(),
        })?;
    let status = status_seg.addr;
    let ioerr = |reason: String| Rejection::with_status(status, VIRTIO_BLK_S_IOERR, reason);

    if buffers.readable_len() < HEADER_SIZE {
        return Err(ioerr(format!(
            "header is {} bytes, expected {HEADER_SIZE}",
            buffers.readable_len()
        )));
    }
    let mut header = Header::default();
    buffers
        .read_exact_at(mem, 0, header.as_mut_slice())
        .map_err(|e| ioerr(e.to_string()))?;
    let request_type = u32::from_le(header.0.type_);
    let sector = u64::from_le(header.0.sector);
    let readable_data = buffers.readable_len() - HEADER_SIZE;
    let writable_data = writable_len - 1;

    let op = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = request_type == VIRTIO_BLK_T_IN;
            let (len, wrong_side) = if is_read {
                (writable_data, readable_data)
            } else {
                (readable_data, writable_data)
            };
            if wrong_side != 0 {
                return Err(ioerr(format!(
                    "{} data must be device-{} ({wrong_side} bytes are not)",
                    if is_read { "read" } else { "write" },
                    if is_read { "writable" } else { "readable" }
                )));
            }
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(ioerr(format!("data length {len} is not a multiple of 512")));
            }
            if !is_read && limits.readonly {
                return Err(ioerr("write to a read-only disk".into()));
            }
            let (offset, len) = sector_range(limits, sector, len >> SECTOR_SHIFT).map_err(ioerr)?;
            if is_read {
                let data = buffers
                    .writable_range(0, len)
                    .map_err(|e| ioerr(e.to_string()))?
                    .collect();
                Operation::Read { offset, data, len }
            } else {
                let data = buffers
                    .readable_range(HEADER_SIZE, len)
                    .map_err(|e| ioerr(e.to_string()))?
                    .collect();
                Operation::Write { offset, data, len }
            }
        }
        VIRTIO_BLK_T_FLUSH => Operation::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let len = writable_data.min(ID_BYTES as u64);
            let data = buffers
                .writable_range(0, len)
                .map_err(|e| ioerr(e.to_string()))?
                .collect();
            Operation::GetId { data, len }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = request_type == VIRTIO_BLK_T_DISCARD;
            if limits.readonly {
                return Err(ioerr("discard or write-zeroes on a read-only disk".into()));
            }
            let (max_seg, max_sectors) = if is_discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            if readable_data == 0 || !readable_data.is_multiple_of(RANGE_SIZE) {
                return Err(ioerr(format!("range list of {readable_data} bytes")));
            }
            let count = readable_data / RANGE_SIZE;
            if count > u64::from(max_seg) {
                return Err(ioerr(format!("{count} ranges, at most {max_seg} allowed")));
            }
            let mut ranges = Vec::with_capacity(count as usize);
            for i in 0..count {
                let mut entry = RangeEntry::default();
                buffers
                    .read_exact_at(mem, HEADER_SIZE + i * RANGE_SIZE, entry.as_mut_slice())
                    .map_err(|e| ioerr(e.to_string()))?;
                let range_sector = u64::from_le(entry.0.sector);
                let sectors = u32::from_le(entry.0.num_sectors);
                let flags = u32::from_le(entry.0.flags);
                let allowed = if is_discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(Rejection::with_status(
                        status,
                        VIRTIO_BLK_S_UNSUPP,
                        format!("unsupported range flags {flags:#x}"),
                    ));
                }
                if sectors > max_sectors {
                    return Err(ioerr(format!(
                        "range of {sectors} sectors, at most {max_sectors}"
                    )));
                }
                let (offset, len) =
                    sector_range(limits, range_sector, u64::from(sectors)).map_err(ioerr)?;
                ranges.push(ByteRange {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            if is_discard {
                Operation::Discard(ranges)
            } else {
                Operation::WriteZeroes(ranges)
            }
        }
        other => {
            return Err(Rejection::with_status(
                status,
                VIRTIO_BLK_S_UNSUPP,
                format!("unsupported request type {other}"),
            ))
        }
    };
    Ok(Request { op, status })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use crate::executor::{execute_sync, ExecContext};
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::DescriptorChain;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048,
            logical_block_size: 512,
            readonly: false,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
        }
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE } else { 0 } | VRING_DESC_F_NEXT;
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0))
    }

    /// Writes a header, builds the chain with the mock driver, and parses it.
    fn parse_chain(
        mem: &GuestMemory,
        kind: u32,
        sector: u64,
        descs: &[RawDescriptor],
        limits: &Limits,
    ) -> Result<Request, Rejection> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR))
            .unwrap_or_else(|e| panic!("{e}"));
        let queue = MockSplitQueue::new(mem, 16);
        let chain: DescriptorChain<&GuestMemory> = queue
            .build_desc_chain(descs)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let buffers = ChainBuffers::parse(chain, mem, 16).unwrap_or_else(|e| panic!("{e}"));
        parse(&buffers, mem, limits)
    }

    fn disk() -> (tempfile::NamedTempFile, Disk) {
        crate::disk::temp_disk(2048 * 512, false)
    }

    fn context(disk: Disk, serial: &[u8]) -> ExecContext {
        ExecContext::new(std::sync::Arc::new(disk), serial.to_vec())
    }

    #[test]
    fn write_then_read_through_the_request_layer() {
        let mem = memory();
        let (file, disk) = disk();
        let ctx = context(disk, b"");
        mem.write_slice(&[0x42; 1024], GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        let w = parse_chain(
            &mem,
            VIRTIO_BLK_T_OUT,
            4,
            &[
                desc(HDR, 16, false),
                desc(DATA, 1024, false),
                desc(STATUS, 1, true),
            ],
            &limits(),
        )
        .unwrap_or_else(|r| panic!("{}", r.reason));
        assert_eq!(w.used_len(), 1);
        assert_eq!(execute_sync(&w, &ctx, &mem), VIRTIO_BLK_S_OK);
        let mut on_disk = [0u8; 1024];
        file.as_file()
            .read_exact_at(&mut on_disk, 4 * 512)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk.iter().all(|&b| b == 0x42));

        let r = parse_chain(
            &mem,
            VIRTIO_BLK_T_IN,
            4,
            &[
                desc(HDR, 16, false),
                desc(DATA + 4096, 512, true),
                desc(DATA + 8192, 512, true),
                desc(STATUS, 1, true),
            ],
            &limits(),
        )
        .unwrap_or_else(|r| panic!("{}", r.reason));
        assert_eq!(r.used_len(), 1025);
        assert_eq!(execute_sync(&r, &ctx, &mem), VIRTIO_BLK_S_OK);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 8192))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(back.iter().all(|&b| b == 0x42));
    }

    #[test]
    fn status_is_the_last_writable_byte() {
        let mem = memory();
        let r = parse_chain(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HDR, 16, false), desc(DATA, 513, true)],
            &limits(),
        )
        .unwrap_or_else(|r| panic!("{}", r.reason));
        assert_eq!(r.status, GuestAddress(DATA + 512));
        assert!(matches!(r.op, Operation::Read { len: 512, .. }));
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let mem = memory();
        let status_of =
            |r: Result<Request, Rejection>| r.err().and_then(|r| r.status).map(|(_, s)| s);
        let io = [
            desc(HDR, 16, false),
            desc(DATA, 1024, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(
            status_of(parse_chain(&mem, VIRTIO_BLK_T_IN, 2047, &io, &limits())),
            Some(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            status_of(parse_chain(
                &mem,
                VIRTIO_BLK_T_IN,
                u64::MAX - 1,
                &io,
                &limits()
            )),
            Some(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            status_of(parse_chain(&mem, 77, 0, &io, &limits())),
            Some(VIRTIO_BLK_S_UNSUPP)
        );
        let out_in_writable = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(
            status_of(parse_chain(
                &mem,
                VIRTIO_BLK_T_OUT,
                0,
                &out_in_writable,
                &limits()
            )),
            Some(VIRTIO_BLK_S_IOERR)
        );
        let short = [desc(HDR, 12, false), desc(STATUS, 1, true)];
        assert_eq!(
            status_of(parse_chain(&mem, VIRTIO_BLK_T_FLUSH, 0, &short, &limits())),
            Some(VIRTIO_BLK_S_IOERR)
        );
        let no_status = [desc(HDR, 16, false)];
        let r = parse_chain(&mem, VIRTIO_BLK_T_FLUSH, 0, &no_status, &limits());
        assert!(matches!(r, Err(Rejection { status: None, .. })));
        let readonly = Limits {
            readonly: true,
            ..limits()
        };
        let write = [
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(
            status_of(parse_chain(&mem, VIRTIO_BLK_T_OUT, 0, &write, &readonly)),
            Some(VIRTIO_BLK_S_IOERR)
        );
        let big_blocks = Limits {
            logical_block_size: 4096,
            ..limits()
        };
        assert_eq!(
            status_of(parse_chain(&mem, VIRTIO_BLK_T_OUT, 1, &write, &big_blocks)),
            Some(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let mem = memory();
        let mut ranges = Vec::new();
        for (sector, count, flags) in [(8u64, 8u32, 1u32), (100, 4, 0)] {
            ranges.extend_from_slice(&sector.to_le_bytes());
            ranges.extend_from_slice(&count.to_le_bytes());
            ranges.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&ranges, GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        let chain = [
            desc(HDR, 16, false),
            desc(DATA, 32, false),
            desc(STATUS, 1, true),
        ];
        let r = parse_chain(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &chain, &limits())
            .unwrap_or_else(|r| panic!("{}", r.reason));
        assert_eq!(
            r.op,
            Operation::WriteZeroes(vec![
                ByteRange {
                    offset: 8 * 512,
                    len: 8 * 512,
                    unmap: true
                },
                ByteRange {
                    offset: 100 * 512,
                    len: 4 * 512,
                    unmap: false
                },
            ])
        );
        // The same list as a discard has a flag discard doesn't allow.
        let r = parse_chain(&mem, VIRTIO_BLK_T_DISCARD, 0, &chain, &limits());
        assert_eq!(
            r.err().and_then(|r| r.status).map(|(_, s)| s),
            Some(VIRTIO_BLK_S_UNSUPP)
        );
        // Too many ranges.
        let tight = Limits {
            max_write_zeroes_seg: 1,
            ..limits()
        };
        assert!(parse_chain(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, &chain, &tight).is_err());
    }

    #[test]
    fn get_id_fills_at_most_twenty_bytes() {
        let mem = memory();
        let (_f, disk) = disk();
        let ctx = context(disk, b"serial-1");
        let chain = [
            desc(HDR, 16, false),
            desc(DATA, 32, true),
            desc(STATUS, 1, true),
        ];
        mem.write_slice(&[0xff; 32], GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        let r = parse_chain(&mem, VIRTIO_BLK_T_GET_ID, 0, &chain, &limits())
            .unwrap_or_else(|r| panic!("{}", r.reason));
        assert_eq!(r.used_len(), 21);
        assert_eq!(execute_sync(&r, &ctx, &mem), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 32];
        mem.read_slice(&mut id, GuestAddress(DATA))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&id[..8], b"serial-1");
        assert!(id[8..20].iter().all(|&b| b == 0));
        assert!(id[20..].iter().all(|&b| b == 0xff), "wrote past 20 bytes");
    }
}
