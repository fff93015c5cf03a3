//! Checks on the guest memory a frontend hands us with SET_MEM_TABLE / ADD_MEM_REG.
//!
//! mmap happily maps a file range that extends past the end of the file; touching those pages
//! later kills the daemon with SIGBUS. A hostile or buggy frontend must get an error instead.
//! A file that shrinks after the check is survived by [`crate::sigbus`].
//!
//! Also: marking guest memory dirty for live migration when the device wrote it by other means
//! than vm-memory's accessors (io_uring, `readv` from a tap, raw copies).

use std::io;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

/// Verifies that every file-backed region lies within its file, then guards the regions
/// against a later truncation of their files (see [`crate::sigbus`]).
pub fn check_backing(mem: &GuestMemory) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let file_len = file_offset.file().metadata()?.len();
        let end = file_offset.start().checked_add(region.len());
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "memory region at guest address {:#x} ({} bytes at file offset {}) extends past the end of its {}-byte file",
                        region.start_addr().0,
                        region.len(),
                        file_offset.start(),
                        file_len
                    ),
                ));
            }
        }
    }
    crate::sigbus::guard(mem);
    Ok(())
}

/// Marks `len` bytes at `addr` dirty in the migration log, across regions. Writes through
/// vm-memory (`write_obj`, `VolatileSlice` copies, used-ring updates) mark themselves; this is
/// for the rest. Bytes outside guest memory are ignored (the write could not have happened).
/// Does nothing until the frontend has sent SET_LOG_BASE.
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    let mut addr = addr;
    let mut left = len;
    while left > 0 {
        let Some(region) = mem.find_region(addr) else {
            return;
        };
        let offset = addr.0 - region.start_addr().0;
        let in_region = usize::try_from(region.len() - offset).unwrap_or(usize::MAX);
        let n = left.min(in_region);
        region.bitmap().mark_dirty(offset as usize, n);
        left -= n;
        let Some(next) = addr.0.checked_add(n as u64) else {
            return;
        };
        addr = GuestAddress(next);
    }
}

/// The page numbers whose bits are set in a dirty-page log (bit `n % 8` of byte `n / 8` is
/// page `n`, as vhost-user's SET_LOG_BASE defines it), in order.
pub fn dirty_pages_in_log(log: &[u8]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (i, &byte) in log.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    #[test]
    fn regions_past_the_end_of_their_file_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let file = tempfile::tempfile()?;
        file.set_len(0x2000)?;
        let inside = GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            0x2000,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])?;
        assert!(check_backing(&inside).is_ok());
        let past = GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            0x2000,
            Some(FileOffset::new(file, 0x1000)),
        )])?;
        assert!(check_backing(&past).is_err());
        Ok(())
    }

    #[test]
    fn mark_dirty_marks_every_page_of_a_range_across_regions_and_nothing_outside_memory(
    ) -> Result<(), Box<dyn std::error::Error>> {
        // Two adjacent regions, a hole, a third region.
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x8000),
            (GuestAddress(0x8000), 0x8000),
            (GuestAddress(0x2_0000), 0x8000),
        ])?;
        let log = crate::testing::TestLog::attach(&mem);
        assert!(log.dirty_pages().is_empty());
        // Across the boundary of the first two regions: pages 7 and 8.
        mark_dirty(&mem, GuestAddress(0x7fff), 2);
        // Into the hole: page 0xf is marked, the rest is not memory.
        mark_dirty(&mem, GuestAddress(0xfff0), 0x100);
        // Outside guest memory altogether, and nothing at all.
        mark_dirty(&mem, GuestAddress(0x1_0000), 0x1000);
        mark_dirty(&mem, GuestAddress(0x2_1000), 0);
        // One byte per page, then a whole page.
        mark_dirty(&mem, GuestAddress(0x2_3fff), 1);
        mark_dirty(&mem, GuestAddress(0x2_5000), 0x1000);
        // Past the end of the last region: only its last page.
        mark_dirty(&mem, GuestAddress(0x2_7fff), usize::MAX);
        assert_eq!(log.dirty_pages(), vec![7, 8, 0xf, 0x23, 0x25, 0x27]);
        Ok(())
    }
}
