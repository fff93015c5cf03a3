//! What a device's requests run against: a file or block device ([`Disk`]) or, built with the
//! `rbd` feature, an RBD image ([`crate::rbd::RbdImage`]). The few questions the vhost-user
//! glue asks of its backing store, answered for each.

use std::io;
use std::sync::Arc;

use crate::disk::Disk;

/// The backing store of one device.
#[derive(Debug, Clone)]
pub enum Store {
    File(Arc<Disk>),
    #[cfg(feature = "rbd")]
    Rbd(Arc<crate::rbd::RbdImage>),
}

impl Store {
    /// The file, for the engines that work on file descriptors.
    pub fn file(&self) -> Option<&Arc<Disk>> {
        match self {
            Store::File(disk) => Some(disk),
            #[cfg(feature = "rbd")]
            Store::Rbd(_) => None,
        }
    }

    /// What logs call it: the path, or `pool/image[@snap]`.
    pub fn name(&self) -> String {
        match self {
            Store::File(disk) => disk.path().display().to_string(),
            #[cfg(feature = "rbd")]
            Store::Rbd(image) => format!("rbd:{}", image.name()),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Store::File(disk) => disk.size(),
            #[cfg(feature = "rbd")]
            Store::Rbd(image) => image.size(),
        }
    }

    pub fn readonly(&self) -> bool {
        match self {
            Store::File(disk) => disk.readonly(),
            #[cfg(feature = "rbd")]
            Store::Rbd(image) => image.readonly(),
        }
    }

    /// A hint for the guest's topology.
    pub fn physical_block_size(&self) -> u32 {
        match self {
            Store::File(disk) => disk.physical_block_size(),
            // RADOS objects are written in place at any byte offset; 4 KiB keeps the guest's
            // writes page-sized.
            #[cfg(feature = "rbd")]
            Store::Rbd(_) => 4096,
        }
    }

    /// Whether I/O is a memory copy (tmpfs): the engines then run requests inline.
    pub fn memory_backed(&self) -> bool {
        self.file().is_some_and(|disk| disk.memory_backed())
    }

    /// Makes everything written so far durable (blocking; not for the data path).
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Store::File(disk) => disk.flush(),
            #[cfg(feature = "rbd")]
            Store::Rbd(image) => image.flush(),
        }
    }

    /// A serial that stays the same for the same store across restarts (at most 20 bytes).
    pub fn default_serial(&self) -> String {
        match self {
            Store::File(disk) => disk.default_serial(),
            #[cfg(feature = "rbd")]
            Store::Rbd(image) => image.default_serial(),
        }
    }
}
