//! The backing store: a regular file or a block device, holding a raw disk or a qcow2 image
//! ([`crate::qcow2`]), and the operations virtio-blk needs on it. Offsets and lengths here are
//! already validated against the capacity by the request layer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::qcow2::{ImageError, ImageFormat, ImageOptions, Lookup, Qcow2Image};

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_get_logical_block_size, libc::BLKSSZGET, libc::c_int);
nix::ioctl_read_bad!(blk_get_physical_block_size, libc::BLKPBSZGET, libc::c_uint);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);

/// What to open and how.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// What the file holds; never guessed.
    pub format: ImageFormat,
    /// qcow2: a backing file instead of the one the image names.
    pub backing: Option<PathBuf>,
    /// qcow2: the backing file's format, when the image does not record it.
    pub backing_format: Option<ImageFormat>,
}

impl DiskOptions {
    /// A raw disk at `path`, with the default options.
    pub fn raw(path: impl Into<PathBuf>) -> DiskOptions {
        DiskOptions {
            path: path.into(),
            readonly: false,
            direct: false,
            format: ImageFormat::Raw,
            backing: None,
            backing_format: None,
        }
    }
}

/// Errors opening the backing store, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: cannot open the backing file: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: the filesystem does not support O_DIRECT; drop --direct or move the image")]
    DirectUnsupported { path: PathBuf },
    #[error("{path}: not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("{path}: cannot read its size: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("{path}: is empty; a disk needs at least one 512-byte sector (resize it, e.g. truncate -s 1G)")]
    Empty { path: PathBuf },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// An open backing file or block device.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
    readonly: bool,
    direct: bool,
    /// Memory and offset alignment that O_DIRECT requires (the device's logical block size).
    direct_alignment: usize,
    /// The host device's physical block size (a hint for the guest's topology).
    physical_block_size: u32,
    /// Device and inode number: the disk's identity, for the default serial.
    identity: (u64, u64),
    /// The file lives in memory (tmpfs, ramfs, hugetlbfs): I/O is a memory copy that never
    /// waits for a device.
    memory_backed: bool,
    /// A qcow2 image: guest offsets go through its mapping.
    image: Option<Qcow2Image>,
}

/// File systems whose files are memory: tmpfs, ramfs, hugetlbfs (statfs `f_type`).
const MEMORY_FS_MAGIC: [i64; 3] = [0x0102_1994, 0x8584_58f6, 0x9584_58f6];

/// Whether `file` is on a memory file system.
fn is_memory_backed(file: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a `struct statfs` into the pointer, which points to one.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised (it was zeroed anyway).
    let f_type = unsafe { st.assume_init() }.f_type;
    // `f_type` is an i64 here, but its C type (`__fsword_t`) differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let f_type = f_type as i64;
    MEMORY_FS_MAGIC.contains(&f_type)
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl Disk {
    pub fn open(options: &DiskOptions) -> Result<Disk, DiskError> {
        let path = options.path.clone();
        let open = |direct: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(!options.readonly);
            if direct {
                oo.custom_flags(libc::O_DIRECT);
            }
            oo.open(&options.path)
        };
        let file = match open(options.direct) {
            Ok(file) => file,
            Err(e) if options.direct && is_einval(&e) => {
                return Err(DiskError::DirectUnsupported { path })
            }
            Err(source) => return Err(DiskError::Open { path, source }),
        };
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.file_type().is_file() {
            return Err(DiskError::NotADisk { path });
        }
        let (mut size, direct_alignment, physical_block_size, identity) = if is_block_device {
            let mut size = 0u64;
            let mut logical: libc::c_int = 512;
            let mut physical: libc::c_uint = 512;
            // SAFETY: the fd is an open block device and each pointer is to a local of the
            // type the ioctl writes.
            unsafe {
                blk_get_size64(file.as_raw_fd(), &mut size).map_err(|e| DiskError::Size {
                    path: path.clone(),
                    source: e.into(),
                })?;
                let _ = blk_get_logical_block_size(file.as_raw_fd(), &mut logical);
                let _ = blk_get_physical_block_size(file.as_raw_fd(), &mut physical);
            }
            (
                size,
                logical.max(512) as usize,
                physical.max(512),
                (meta.rdev(), 0),
            )
        } else {
            (meta.len(), 512, 4096, (meta.dev(), meta.ino()))
        };
        let image = match options.format {
            ImageFormat::Raw => None,
            ImageFormat::Qcow2 => {
                let image = Qcow2Image::open(
                    &path,
                    &ImageOptions {
                        writable: !options.readonly,
                        direct: options.direct,
                        backing: options.backing.clone(),
                        backing_format: options.backing_format,
                    },
                )?;
                size = image.size();
                Some(image)
            }
        };
        if size < 512 {
            return Err(DiskError::Empty { path });
        }
        let memory_backed = !is_block_device && is_memory_backed(&file);
        Ok(Disk {
            file,
            path,
            size,
            is_block_device,
            readonly: options.readonly,
            direct: options.direct,
            direct_alignment,
            physical_block_size,
            identity,
            memory_backed,
            image,
        })
    }

    /// The qcow2 image, when the disk is one.
    pub fn image(&self) -> Option<&Qcow2Image> {
        self.image.as_ref()
    }

    /// What the start-up log says about the format: empty for raw.
    pub fn describe_format(&self) -> String {
        match &self.image {
            Some(image) => format!(", qcow2: {}", image.describe()),
            None => String::new(),
        }
    }

    /// Where guest bytes `[offset, offset + len)` are on the host, when one read or write there
    /// does the whole request: raw disks always; qcow2 images for one run of allocated clusters.
    pub fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<(RawFd, u64)> {
        match &self.image {
            None => Some((self.file.as_raw_fd(), offset)),
            Some(image) => image.direct_extent(offset, len, write),
        }
    }

    /// Whether a flush is more than fdatasync on the file (qcow2: cached metadata first).
    pub fn flush_needs_sync_path(&self) -> bool {
        self.image.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn direct_alignment(&self) -> usize {
        self.direct_alignment
    }

    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Whether the file is on a memory file system (tmpfs, ramfs, hugetlbfs).
    pub fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// A serial that stays the same for the same file across restarts (at most 20 bytes).
    pub fn default_serial(&self) -> String {
        let (dev, ino) = self.identity;
        let mut serial = format!("vub{dev:x}-{ino:x}");
        serial.truncate(20);
        serial
    }

    /// `preadv` until all of `iov` is filled (short reads continue; EOF is an error).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes of its length and stays so
    /// until this returns.
    pub unsafe fn read_vectored_at(&self, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
        let Some(image) = &self.image else {
            // SAFETY: the caller vouches for the iovecs.
            return unsafe { vectored_at(self.file.as_raw_fd(), iov, offset, false, 0) };
        };
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        match image.lookup(offset, len, false) {
            // SAFETY: the caller vouches for the iovecs.
            Lookup::Host(fd, at) => unsafe { vectored_at(fd, iov, at, false, 0) },
            Lookup::Zero => {
                for v in iov {
                    // SAFETY: the caller vouches that each iovec is writable memory of its length.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                }
                Ok(())
            }
            // SAFETY: the caller vouches for the iovecs.
            Lookup::Image => unsafe { image.readv(iov, offset) },
        }
    }

    /// `pwritev2` until all of `iov` is written; `dsync` makes this write durable (write-through).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads of its length and stays so
    /// until this returns.
    pub unsafe fn write_vectored_at(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        dsync: bool,
    ) -> io::Result<()> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        match (self.direct_extent(offset, len, true), &self.image) {
            // SAFETY: the caller vouches for the iovecs.
            (Some((fd, at)), _) => unsafe { vectored_at(fd, iov, at, true, flags) },
            (None, Some(image)) => {
                // SAFETY: as above.
                unsafe { image.writev(iov, offset)? };
                if dsync {
                    // Write-through: the clusters this allocated must be durable too.
                    image.flush()?;
                }
                Ok(())
            }
            (None, None) => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// fdatasync: everything written before is durable when this returns.
    pub fn flush(&self) -> io::Result<()> {
        match &self.image {
            Some(image) => image.flush(),
            None => self.file.sync_data(),
        }
    }

    /// Tells the storage the range is unused. Files get a hole; devices get BLKDISCARD.
    /// Discard is a hint: where the storage cannot do it, it is a successful no-op.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(image) = &self.image {
            return image.write_zeroes(offset, len, true);
        }
        let result = if self.is_block_device {
            // SAFETY: the fd is an open block device; the argument is a [start, len] pair.
            unsafe { blk_discard(self.file.as_raw_fd(), &[offset, len]) }
                .map(drop)
                .map_err(io::Error::from)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    /// Makes the range read back as zeroes; with `unmap`, deallocating it where possible.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if let Some(image) = &self.image {
            return image.write_zeroes(offset, len, unmap);
        }
        if self.is_block_device {
            // SAFETY: the fd is an open block device; the argument is a [start, len] pair.
            return unsafe { blk_zero_out(self.file.as_raw_fd(), &[offset, len]) }
                .map(drop)
                .map_err(io::Error::from);
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: plain syscall on our own fd with integer arguments.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeroes = AlignedBuf::new(CHUNK.min(len as usize).max(self.direct_alignment), 4096)?;
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            let iov = [libc::iovec {
                iov_base: zeroes.as_ptr().cast(),
                iov_len: n,
            }];
            // SAFETY: the iovec covers `n <= zeroes.len()` bytes of the live buffer `zeroes`.
            unsafe { self.write_vectored_at(&iov, offset, false)? };
            offset += n as u64;
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `preadv`/`pwritev2` on `fd` until all of `iov` is transferred (short transfers continue; EOF
/// is an error).
///
/// # Safety
/// Every iovec must describe memory valid for the transfer's direction and length until this
/// returns.
unsafe fn vectored_at(
    fd: RawFd,
    iov: &[libc::iovec],
    offset: u64,
    write: bool,
    flags: libc::c_int,
) -> io::Result<()> {
    // The common case is one call that transfers everything; the iovecs are only copied (to
    // be advanced) after a short transfer.
    let original = iov;
    let total: usize = original.iter().map(|v| v.iov_len).sum();
    let mut owned: Option<Vec<libc::iovec>> = None;
    let mut first = 0;
    let mut offset = offset;
    while first < original.len() {
        let iov: &[libc::iovec] = owned.as_deref().unwrap_or(original);
        let count = (iov.len() - first).min(libc::UIO_MAXIOV as usize);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs describe valid memory for this call.
        let done = unsafe {
            if write {
                libc::pwritev2(fd, iov[first..].as_ptr(), count as i32, off, flags)
            } else {
                libc::preadv(fd, iov[first..].as_ptr(), count as i32, off)
            }
        };
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer at end of disk",
            ));
        }
        if owned.is_none() && done as usize == total {
            return Ok(());
        }
        offset += done as u64;
        let iov = owned.get_or_insert_with(|| original.to_vec());
        first = advance_iovecs(iov, first, done as usize);
    }
    Ok(())
}

/// Drops the first `done` bytes from `iov[first..]`; returns the new first index.
pub fn advance_iovecs(iov: &mut [libc::iovec], mut first: usize, mut done: usize) -> usize {
    while first < iov.len() && done > 0 {
        let v = &mut iov[first];
        if done >= v.iov_len {
            done -= v.iov_len;
            first += 1;
        } else {
            // SAFETY: `done < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
            v.iov_len -= done;
            done = 0;
        }
    }
    while first < iov.len() && iov[first].iov_len == 0 {
        first += 1;
    }
    first
}

/// A zeroed heap buffer with a given alignment: O_DIRECT bounce buffers.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of `len()` bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len())
    }
}

/// A temporary file of `len` bytes opened as a disk: the fixture of this crate's unit tests.
#[cfg(test)]
pub(crate) fn temp_disk(len: u64, readonly: bool) -> (tempfile::NamedTempFile, Disk) {
    let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    file.as_file()
        .set_len(len)
        .unwrap_or_else(|e| panic!("{e}"));
    let disk = Disk::open(&DiskOptions {
        readonly,
        ..DiskOptions::raw(file.path())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (file, disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn vectored_io_round_trips() {
        let (_f, disk) = temp_disk(1 << 20, false);
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs cover the live vectors `a` and `b`.
        unsafe { disk.write_vectored_at(&iov, 4096, false) }.unwrap_or_else(|e| panic!("{e}"));
        let mut back = vec![0u8; 1536];
        let iov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: the iovec covers the live vector `back`.
        unsafe { disk.read_vectored_at(&iov, 4096) }.unwrap_or_else(|e| panic!("{e}"));
        assert!(back[..512].iter().all(|&x| x == 1));
        assert!(back[512..].iter().all(|&x| x == 2));
    }

    #[test]
    fn read_past_end_is_an_error() {
        let (_f, disk) = temp_disk(4096, false);
        let mut buf = vec![0u8; 1024];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers the live vector `buf`.
        assert!(unsafe { disk.read_vectored_at(&iov, 3584) }.is_err());
    }

    #[test]
    fn zeroes_and_discard_read_back_zero() {
        let (f, disk) = temp_disk(1 << 20, false);
        f.as_file()
            .write_all_at(&vec![0xaa; 1 << 20], 0)
            .unwrap_or_else(|e| panic!("{e}"));
        disk.write_zeroes(8192, 8192, false)
            .unwrap_or_else(|e| panic!("{e}"));
        disk.write_zeroes(65536, 4096, true)
            .unwrap_or_else(|e| panic!("{e}"));
        disk.discard(131072, 65536)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; 1 << 20];
        f.as_file()
            .read_exact_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf[8192..16384].iter().all(|&x| x == 0));
        assert!(buf[65536..69632].iter().all(|&x| x == 0));
        assert!(buf[..8192].iter().all(|&x| x == 0xaa));
        assert!(buf[16384..65536].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn empty_file_is_refused_with_a_hint() {
        let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
        let err = Disk::open(&DiskOptions::raw(file.path()));
        assert!(matches!(err, Err(DiskError::Empty { .. })));
    }

    #[test]
    fn advance_skips_whole_and_partial_vectors() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let first = advance_iovecs(&mut iov, 0, 10);
        assert_eq!(first, 1);
        assert_eq!(iov[1].iov_len, 6);
        assert_eq!(advance_iovecs(&mut iov, 1, 6), 2);
    }
}
