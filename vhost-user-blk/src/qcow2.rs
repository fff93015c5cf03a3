//! qcow2 images (and their backing chains) through the `imago` crate, built synchronously: no
//! async runtime and no threads of its own; every call runs in the queue thread that makes it.
//!
//! **The data path.** A read or write first asks imago where the guest range lives
//! ([`Qcow2Image::direct_extent`]: an L2 lookup in imago's metadata cache). When the whole
//! request falls in one allocated, writable cluster run of a file we opened (the image itself, or
//! for reads a backing file), the queue's own engine (io_uring or preadv/pwritev) does the data
//! I/O on that file at the host offset, exactly as for a raw file. Everything else (a cluster to
//! allocate, copy-on-write from the backing file, compressed clusters, zero clusters, requests
//! spanning several runs) goes through imago's own `readv`/`writev` in the queue thread.
//!
//! **Concurrency with one thread per queue.** The image is one `FormatAccess` shared by all queue
//! threads. A lookup that hits imago's L2 cache (128 tables) takes shared (read) locks only; a
//! miss loads the table under the cache's write lock, holding up other queues' lookups for that
//! one read. The data I/O of already-allocated clusters then runs with no lock of ours or
//! imago's held, so queues do not serialise on it. Allocation (new clusters, refcount updates, L2 changes) happens under
//! imago's allocator mutex and its per-range write blockers, in the thread of the request that
//! needs it; a concurrent write to the same unallocated cluster waits for it inside imago.
//! A cluster once mapped is never freed while the daemon runs: DISCARD and WRITE_ZEROES turn
//! whole clusters into zero clusters that keep their allocation (and punch the host file's blocks
//! under them, which gives the space back), so a direct write still in flight on another queue
//! can only land in its own guest range, never in a cluster reused for other data or metadata.
//!
//! **Durability.** Metadata changes live in imago's caches until a FLUSH, which writes them back
//! (refcount blocks before the L2 tables that point to new clusters, in imago's dependency
//! order) and syncs the file. Killed without a flush, the image may leak clusters but is never
//! corrupt; what was flushed reads back.
//!
//! **Safety of names.** The format is never probed: `--format` says it, and a backing file's
//! format must be recorded in the image (`qemu-img create -F`) or given with `--backing-format`.
//! Every file of the chain is opened here, at start-up, before the sandbox is entered.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, Storage};

/// Image formats `--format` / `--backing-format` name (as QEMU names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ImageFormat {
    /// The file's bytes are the disk's bytes.
    #[default]
    Raw,
    /// QEMU's copy-on-write format: thin, with backing files, compressed clusters.
    Qcow2,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// Longest backing chain accepted: a loop of backing names must end in an error, not a stack
/// overflow.
const MAX_CHAIN: usize = 16;

/// A file of the chain, as imago's storage: imago's own file driver for its metadata I/O, plus
/// a descriptor of the same open file for our engines' data I/O.
#[derive(Debug)]
pub struct ImageFile {
    inner: imago::file::File,
    /// A duplicate of the descriptor imago holds: same open file, same offsets, our own handle.
    ours: File,
    path: PathBuf,
}

impl ImageFile {
    fn open(path: &Path, writable: bool, direct: bool) -> io::Result<ImageFile> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(writable);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let ours = file.try_clone()?;
        let opts = imago::StorageOpenOptions::new()
            .filename(path)
            .write(writable)
            .direct(direct);
        let inner = imago::file::File::from_open_file(file, opts)?;
        Ok(ImageFile {
            inner,
            ours,
            path: path.to_owned(),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.ours.as_raw_fd()
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

// Everything is imago's file driver's; the wrapper only adds `raw_fd`.
impl Storage for ImageFile {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: imago's contract for `pure_*` is passed on unchanged to its own driver.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: as above.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as above.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as above.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as above.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: as for `pure_*`.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}

/// Why an image (or a file of its chain) cannot be served; each is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: not a qcow2 image (no QFI magic); for a plain disk image use --format raw")]
    NotQcow2 { path: PathBuf },
    #[error("{path}: qcow2 version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: {what}: not supported{hint}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
    #[error("{path}: the image is marked {what}; repair it first: qemu-img check -r all {path}")]
    NeedsRepair { path: PathBuf, what: &'static str },
    #[error("{path}: corrupt or unreadable qcow2 image: {source}")]
    Corrupt { path: PathBuf, source: io::Error },
    #[error("{path}: backing file {backing} (named in {named_by}): {source}")]
    Backing {
        path: PathBuf,
        backing: PathBuf,
        named_by: PathBuf,
        source: io::Error,
    },
    #[error("{path}: its backing file {backing:?} has no recorded format and formats are never guessed; give it with --backing-format raw|qcow2, or record it: qemu-img rebase -u -b {backing} -F raw|qcow2 {path}")]
    BackingFormatUnknown { path: PathBuf, backing: String },
    #[error("{path}: backing chain deeper than {MAX_CHAIN} images (a loop of backing names?)")]
    ChainTooDeep { path: PathBuf },
    #[error("{path}: --backing {backing} given, but the image has no backing file")]
    NoBackingToOverride { path: PathBuf, backing: PathBuf },
}

/// How the top image is opened.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub writable: bool,
    pub direct: bool,
    /// Instead of the backing file the image names.
    pub backing: Option<PathBuf>,
    /// The backing file's format, when the image does not record it (or to override it).
    pub backing_format: Option<ImageFormat>,
}

/// What the header says, read by us before imago: the refusals an operator must understand.
struct HeaderFacts {
    cluster_bits: u32,
}

const QCOW2_MAGIC: u32 = 0x5146_49fb;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Checks the header for what we refuse, with a message for each (imago's own checks follow).
fn check_header(file: &File, path: &Path) -> Result<HeaderFacts, ImageError> {
    let mut header = [0u8; 80];
    let got = read_prefix(file, &mut header).map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })?;
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if got < 72 || be32(0) != QCOW2_MAGIC {
        return Err(ImageError::NotQcow2 {
            path: path.to_owned(),
        });
    }
    let version = be32(4);
    if version != 2 && version != 3 {
        return Err(ImageError::Version {
            path: path.to_owned(),
            version,
        });
    }
    let unsupported = |what, hint| ImageError::Unsupported {
        path: path.to_owned(),
        what,
        hint,
    };
    if be32(32) != 0 {
        return Err(unsupported(
            "qcow2 encryption",
            "; decrypt it first (qemu-img convert with --object secret)",
        ));
    }
    if version == 3 && got >= 80 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[72..80]);
        let incompatible = u64::from_be_bytes(b);
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(ImageError::NeedsRepair {
                path: path.to_owned(),
                what: "corrupt",
            });
        }
        if incompatible & INCOMPAT_DIRTY != 0 {
            return Err(ImageError::NeedsRepair {
                path: path.to_owned(),
                what: "dirty (lazy refcounts, not closed cleanly)",
            });
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "external data file",
                "; convert it: qemu-img convert -O qcow2",
            ));
        }
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(unsupported(
                "zstd compression (only zlib is)",
                "; convert it: qemu-img convert -O qcow2 -o compression_type=zlib",
            ));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(
                "extended L2 entries (subclusters)",
                "; convert it: qemu-img convert -O qcow2 -o extended_l2=off",
            ));
        }
    }
    Ok(HeaderFacts {
        cluster_bits: be32(20),
    })
}

/// Reads as much of `buf` as the file has from offset 0.
fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Where a relative backing name points: relative to the directory of the image that names it,
/// as QEMU resolves it.
fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_owned(),
    }
}

fn parse_format(name: &str) -> Option<ImageFormat> {
    match name {
        "raw" | "file" => Some(ImageFormat::Raw),
        "qcow2" => Some(ImageFormat::Qcow2),
        _ => None,
    }
}

/// Where a guest range of a qcow2 image is ([`Qcow2Image::lookup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// In one file at this offset: our engines move the data.
    Host(RawFd, u64),
    /// Reads as zeroes (unallocated without backing data, or zero clusters).
    Zero,
    /// Only imago's own read or write can serve it.
    Image,
}

/// An open qcow2 image with its chain.
pub struct Qcow2Image {
    access: FormatAccess<ImageFile>,
    /// The chain, top first, for the start-up log.
    chain: Vec<(PathBuf, ImageFormat)>,
    cluster_size: u64,
}

impl fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("chain", &self.chain)
            .field("size", &self.access.size())
            .finish()
    }
}

impl Qcow2Image {
    /// Opens `path` as qcow2 and every backing file under it (read-only).
    pub fn open(path: &Path, options: &ImageOptions) -> Result<Qcow2Image, ImageError> {
        let mut chain = Vec::new();
        let (access, cluster_bits) = open_qcow2(
            path,
            options.writable,
            options.direct,
            options.backing.as_deref(),
            options.backing_format,
            &mut chain,
        )?;
        Ok(Qcow2Image {
            access,
            chain,
            cluster_size: 1u64 << cluster_bits.min(31),
        })
    }

    /// The virtual disk size.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The chain for the start-up log: "top.qcow2 (qcow2) <- base.raw (raw)".
    pub fn describe(&self) -> String {
        self.chain
            .iter()
            .map(|(p, f)| format!("{} ({f})", p.display()))
            .collect::<Vec<_>>()
            .join(" <- ")
    }

    /// Where `[offset, offset + len)` is: one run of allocated clusters of a file we opened
    /// (writable ones for a write), zeroes all the way (a read needs no I/O), or something only
    /// imago can serve (allocation, compressed clusters, a write onto the backing file's data,
    /// several runs).
    pub fn lookup(&self, offset: u64, len: u64, write: bool) -> Lookup {
        match guard(|| self.access.get_mapping(offset, len)) {
            Ok((
                Mapping::Raw {
                    storage,
                    offset: host,
                    writable,
                    ..
                },
                run,
            )) if run >= len && (writable || !write) => Lookup::Host(storage.raw_fd(), host),
            Ok((Mapping::Zero { .. }, run)) if run >= len && !write => Lookup::Zero,
            _ => Lookup::Image,
        }
    }

    /// The host file and offset of [`Lookup::Host`], for the engines' data I/O.
    pub fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<(RawFd, u64)> {
        match self.lookup(offset, len, write) {
            Lookup::Host(fd, host) => Some((fd, host)),
            _ => None,
        }
    }

    /// Reads into `iov` through imago.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes of its length until this returns.
    pub unsafe fn readv(&self, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
        let slices: Vec<io::IoSliceMut<'_>> = iov
            .iter()
            .map(|v| {
                // SAFETY: the caller vouches for the memory; it lives until we return.
                io::IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                })
            })
            .collect();
        guard(|| self.access.readv(IoVectorMut::from(slices), offset))
    }

    /// Writes `iov` through imago (allocating clusters as needed).
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length until this returns.
    pub unsafe fn writev(&self, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
        let slices: Vec<io::IoSlice<'_>> = iov
            .iter()
            .map(|v| {
                // SAFETY: the caller vouches for the memory; it lives until we return.
                io::IoSlice::new(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                })
            })
            .collect();
        guard(|| self.access.writev(IoVector::from(slices), offset))
    }

    /// Makes the range read back as zeroes. Whole clusters become zero clusters that keep their
    /// allocation (see the module comment for why they are not freed); with `unmap`, the host
    /// file's blocks under them are punched, so the space goes back to the host.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let holes = if unmap {
            self.whole_cluster_extents(offset, len)
        } else {
            Vec::new()
        };
        match guard(|| self.access.write_zeroes(offset, len)) {
            // Version 2 images have no zero clusters: zeroes are written as data.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                return self.write_zero_data(offset, len)
            }
            other => other?,
        }
        for (fd, host, run) in holes {
            // A hint: a file system that cannot punch keeps the (unreadable) old data.
            let _ = punch_hole(fd, host, run);
        }
        Ok(())
    }

    fn write_zero_data(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            guard(|| self.access.write(&zeroes[..n], offset))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// The host ranges of the image's own allocated clusters lying wholly inside the range.
    fn whole_cluster_extents(&self, offset: u64, len: u64) -> Vec<(RawFd, u64, u64)> {
        let cs = self.cluster_size;
        let start = offset.next_multiple_of(cs);
        let end = (offset + len) / cs * cs;
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let Ok((mapping, run)) = guard(|| self.access.get_mapping(at, end - at)) else {
                break;
            };
            if run == 0 {
                break;
            }
            if let Mapping::Raw {
                storage,
                offset: host,
                writable: true,
                ..
            } = mapping
            {
                out.push((storage.raw_fd(), host, run));
            }
            at += run;
        }
        out
    }

    /// Writes cached metadata back, then makes data and metadata durable.
    pub fn flush(&self) -> io::Result<()> {
        guard(|| self.access.flush())?;
        guard(|| self.access.sync())
    }
}

fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on an open descriptor with integer arguments.
    if unsafe { libc::fallocate(fd, mode, off, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs an imago call; a panic inside it (a corrupt image hitting one of its assertions) becomes
/// an I/O error for this request instead of taking the queue thread down.
fn guard<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(io::Error::other(
            "internal error in the qcow2 driver (corrupt metadata?)",
        ))
    })
}

/// Opens one qcow2 layer and, recursively, its backing chain. `backing` / `backing_format`
/// override what the header says for this layer's backing file.
fn open_qcow2(
    path: &Path,
    writable: bool,
    direct: bool,
    backing: Option<&Path>,
    backing_format: Option<ImageFormat>,
    chain: &mut Vec<(PathBuf, ImageFormat)>,
) -> Result<(FormatAccess<ImageFile>, u32), ImageError> {
    if chain.len() >= MAX_CHAIN {
        return Err(ImageError::ChainTooDeep {
            path: chain.first().map(|c| c.0.clone()).unwrap_or_default(),
        });
    }
    chain.push((path.to_owned(), ImageFormat::Qcow2));
    let file = ImageFile::open(path, writable, direct).map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })?;
    // Through a descriptor of its own: ours may be O_DIRECT, which wants aligned buffers.
    let plain = File::open(path).map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })?;
    let facts = check_header(&plain, path)?;
    let corrupt = |source| ImageError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let mut qcow2 = guard(|| Qcow2::<ImageFile>::open_image(file, writable)).map_err(corrupt)?;
    let named = qcow2.implicit_backing_file().cloned();
    let recorded = qcow2.implicit_backing_format().cloned();
    let target = match (backing, named.as_deref()) {
        (Some(over), _) => Some(over.to_owned()),
        (None, Some(name)) => Some(resolve_backing(path, name)),
        (None, None) => None,
    };
    let layer = match target {
        None => None,
        Some(target) => {
            let format = match (backing_format, recorded.as_deref()) {
                (Some(f), _) => f,
                (None, Some(name)) => parse_format(name).ok_or_else(|| ImageError::Backing {
                    path: chain[0].0.clone(),
                    backing: target.clone(),
                    named_by: path.to_owned(),
                    source: io::Error::other(format!(
                        "backing format {name:?} is not supported (raw and qcow2 are)"
                    )),
                })?,
                (None, None) => {
                    return Err(ImageError::BackingFormatUnknown {
                        path: path.to_owned(),
                        backing: named
                            .clone()
                            .unwrap_or_else(|| target.display().to_string()),
                    })
                }
            };
            Some(open_backing(path, &target, format, direct, chain)?)
        }
    };
    qcow2.set_data_file(None);
    qcow2.set_backing(layer);
    Ok((FormatAccess::new(qcow2), facts.cluster_bits))
}

/// Opens a backing layer, read-only.
fn open_backing(
    named_by: &Path,
    path: &Path,
    format: ImageFormat,
    direct: bool,
    chain: &mut Vec<(PathBuf, ImageFormat)>,
) -> Result<FormatAccess<ImageFile>, ImageError> {
    let top = chain.first().map(|c| c.0.clone()).unwrap_or_default();
    let wrap = |source: io::Error| ImageError::Backing {
        path: top.clone(),
        backing: path.to_owned(),
        named_by: named_by.to_owned(),
        source,
    };
    match format {
        ImageFormat::Qcow2 => {
            let (access, _) =
                open_qcow2(path, false, direct, None, None, chain).map_err(|e| match e {
                    ImageError::Open { source, .. } => wrap(source),
                    other => other,
                })?;
            Ok(access)
        }
        ImageFormat::Raw => {
            chain.push((path.to_owned(), ImageFormat::Raw));
            let file = ImageFile::open(path, false, direct).map_err(wrap)?;
            let raw = guard(|| {
                Raw::builder(file)
                    .write(false)
                    .open(DenyImplicitOpenGate::default())
            })
            .map_err(wrap)?;
            Ok(FormatAccess::new(raw))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_image_directory() {
        assert_eq!(
            resolve_backing(Path::new("/img/vm/top.qcow2"), "base.qcow2"),
            Path::new("/img/vm/base.qcow2")
        );
        assert_eq!(
            resolve_backing(Path::new("/img/vm/top.qcow2"), "../b.raw"),
            Path::new("/img/vm/../b.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/img/top.qcow2"), "/abs/b"),
            Path::new("/abs/b")
        );
    }

    /// A new qcow2 image of `size` bytes in `dir`, made by imago, optionally over `backing`.
    fn make_image(dir: &Path, name: &str, size: u64, backing: Option<(&str, &str)>) -> PathBuf {
        use imago::FormatCreateBuilder;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        let opts = imago::StorageOpenOptions::new().write(true).filename(&path);
        let storage =
            imago::file::File::from_open_file(file, opts).unwrap_or_else(|e| panic!("{e}"));
        let mut builder = Qcow2::<imago::file::File>::create_builder(storage)
            .size(size)
            .cluster_size(4096);
        if let Some((name, format)) = backing {
            builder = builder.backing(name.into(), format.into());
        }
        builder.create().unwrap_or_else(|e| panic!("{e}"));
        path
    }

    fn options(writable: bool) -> ImageOptions {
        ImageOptions {
            writable,
            direct: false,
            backing: None,
            backing_format: None,
        }
    }

    fn iov(buf: &mut [u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
    }

    #[test]
    fn allocated_clusters_are_direct_and_the_rest_goes_through_imago() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = make_image(dir.path(), "a.qcow2", 1 << 20, None);
        let image = Qcow2Image::open(&path, &options(true)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(image.size(), 1 << 20);
        assert_eq!(image.lookup(8192, 4096, false), Lookup::Zero);
        assert_eq!(image.lookup(8192, 4096, true), Lookup::Image);
        let mut data = vec![0x5au8; 4096];
        // SAFETY: the iovec covers the live vector `data`.
        unsafe { image.writev(&iov(&mut data), 8192) }.unwrap_or_else(|e| panic!("{e}"));
        let Lookup::Host(fd, host) = image.lookup(8192, 4096, true) else {
            panic!("an allocated cluster is not direct");
        };
        let mut back = vec![0u8; 4096];
        let file = File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        file.read_exact_at(&mut back, host)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, data, "the host offset holds other data");
        assert!(fd >= 0);
        // Across two clusters, one of them unallocated: imago's path.
        assert_eq!(image.lookup(8192, 8192, false), Lookup::Image);
        image
            .write_zeroes(8192, 4096, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(image.lookup(8192, 4096, false), Lookup::Zero);
        image.flush().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn reads_fall_through_to_the_backing_file_and_writes_stay_on_top() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xbbu8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
        let top = make_image(dir.path(), "top.qcow2", 1 << 20, Some(("base.raw", "raw")));
        let image = Qcow2Image::open(&top, &options(true)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            image.describe().contains("base.raw (raw)"),
            "{}",
            image.describe()
        );
        // A read of the base's data is direct, on the base's file; a write is not.
        assert!(matches!(image.lookup(0, 4096, false), Lookup::Host(..)));
        assert_eq!(image.lookup(0, 4096, true), Lookup::Image);
        let mut data = vec![0x11u8; 512];
        // SAFETY: the iovec covers the live vector `data`.
        unsafe { image.writev(&iov(&mut data), 4096 + 512) }.unwrap_or_else(|e| panic!("{e}"));
        let mut back = vec![0u8; 4096];
        // SAFETY: as above, for `back`.
        unsafe { image.readv(&iov(&mut back), 4096) }.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            back[..512].iter().all(|&b| b == 0xbb),
            "copy-on-write lost the base"
        );
        assert!(back[512..1024].iter().all(|&b| b == 0x11));
        assert!(back[1024..].iter().all(|&b| b == 0xbb));
        image.flush().unwrap_or_else(|e| panic!("{e}"));
        let base_now = std::fs::read(&base).unwrap_or_else(|e| panic!("{e}"));
        assert!(base_now.iter().all(|&b| b == 0xbb), "the base was written");
        // A missing backing file is named, resolved against the image's directory.
        std::fs::remove_file(&base).unwrap_or_else(|e| panic!("{e}"));
        let err = Qcow2Image::open(&top, &options(false)).map(|_| ());
        assert!(
            err.as_ref()
                .is_err_and(|e| e.to_string().contains(&base.display().to_string())),
            "{err:?}"
        );
    }

    #[test]
    fn a_raw_file_is_not_taken_for_qcow2() {
        let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
        file.as_file()
            .set_len(1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        let err = Qcow2Image::open(file.path(), &options(true));
        assert!(matches!(err, Err(ImageError::NotQcow2 { .. })));
    }
}
