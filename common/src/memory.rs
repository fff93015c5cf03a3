//! Checks on the guest memory a frontend hands us with SET_MEM_TABLE / ADD_MEM_REG.
//!
//! mmap happily maps a file range that extends past the end of the file; touching those pages
//! later kills the daemon with SIGBUS. A hostile or buggy frontend must get an error instead.
//! A file that shrinks after the check is survived by [`crate::sigbus`].

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
}
