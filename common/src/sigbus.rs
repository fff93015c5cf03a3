//! Surviving a frontend that shrinks the file behind guest memory after SET_MEM_TABLE.
//!
//! `check_backing` can only see the file's size when the table arrives; a later `ftruncate` by
//! the frontend turns every access to the lost pages into SIGBUS, which by default kills the
//! daemon and every guest it serves. Refusing memfds that are not sealed against shrinking
//! (F_SEAL_SHRINK) would prevent that, but only QEMU seals: DPDK (`--no-huge`:
//! `memfd_create("nohuge", 0)`) and the blkio crate (`memfd_create("libblkio-buf", 0)`) create
//! memfds that cannot be sealed at all, and both are frontends we serve. So the daemon survives
//! the fault instead:
//!
//! - every file-backed guest region that passed `check_backing` is recorded in a fixed table of
//!   atomics (the current memory table and the one before it);
//! - the SIGBUS handler, for a truncation fault (`BUS_ADRERR`) inside a recorded region, maps
//!   anonymous memory over the faulting page (`MAP_FIXED`), so the access completes (it reads
//!   zeros), and wakes a watcher thread through a pipe. It uses only atomics, `mmap`, `write`,
//!   `sigaction` and `raise`. Any other SIGBUS gets the default action, as without the handler;
//! - the watcher logs one line and drops the frontend's connection: its memory is broken. The
//!   next connection is served as usual.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use vhost_user_backend::ShutdownHandle;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

/// Room for two tables of 509 regions (CONFIGURE_MEM_SLOTS), the old one still in use while
/// the new one is installed.
const SLOTS: usize = 1024;

/// One guarded region. `len == 0` marks a free slot; `len` is written last on insertion.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// The mapping's page size: the base page, or the huge page size on hugetlbfs.
    page: AtomicUsize,
    generation: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    generation: AtomicU64::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// The write end of the watcher's pipe (non-blocking), or -1 before installation.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Host address of the last fault we absorbed.
static FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);
/// Set by the handler; cleared when a new connection is registered.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Serialises updates of `TABLE`; holds the current generation.
static GENERATION: Mutex<u64> = Mutex::new(0);
/// The connection to drop when its memory breaks.
static CONNECTION: Mutex<Option<ShutdownHandle>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// Installs the SIGBUS handler and its watcher thread now (else on the first `guard`): before
/// a seccomp filter or a sandbox could forbid `sigaction`, `pipe2` or a new thread.
pub fn arm() {
    INSTALL.call_once(install);
}

/// Records the file-backed regions of `mem` (a table that passed `check_backing`) so that a
/// later truncation of their files is survived; forgets regions of older tables.
pub fn guard(mem: &GuestMemory) {
    INSTALL.call_once(install);
    let mut generation = crate::lock(&GENERATION);
    *generation += 1;
    let now = *generation;
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let start = region.as_ptr() as usize;
        let len = region.len() as usize;
        let page = mapping_page_size(file_offset.file());
        if !record(start, len, page, now) {
            log::warn!(
                "more than {SLOTS} guest memory regions: a frontend that truncates the file \
                 behind the region at {start:#x} will crash the daemon"
            );
        }
    }
    for slot in &TABLE {
        if slot.len.load(Ordering::Acquire) != 0
            && slot.generation.load(Ordering::Relaxed) + 1 < now
        {
            slot.len.store(0, Ordering::Release);
        }
    }
}

/// Sets (or clears) the frontend connection whose memory is guarded; a fault drops it.
pub fn set_connection(connection: Option<ShutdownHandle>) {
    BROKEN.store(false, Ordering::Release);
    *crate::lock(&CONNECTION) = connection;
}

fn record(start: usize, len: usize, page: usize, generation: u64) -> bool {
    for slot in &TABLE {
        if slot.len.load(Ordering::Acquire) == len && slot.start.load(Ordering::Relaxed) == start {
            slot.generation.store(generation, Ordering::Relaxed);
            return true;
        }
    }
    for slot in &TABLE {
        if slot.len.load(Ordering::Acquire) == 0 {
            slot.start.store(start, Ordering::Relaxed);
            slot.page.store(page, Ordering::Relaxed);
            slot.generation.store(generation, Ordering::Relaxed);
            slot.len.store(len, Ordering::Release);
            return true;
        }
    }
    false
}

fn base_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

/// The granularity a piece of this file's mapping can be replaced with: hugetlbfs mappings can
/// only be split at huge page boundaries.
fn mapping_page_size(file: &std::fs::File) -> usize {
    match nix::sys::statfs::fstatfs(file) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC => {
            usize::try_from(fs.block_size())
                .unwrap_or(0)
                .max(base_page_size())
        }
        _ => base_page_size(),
    }
}

fn install() {
    let (read_end, write_end) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(pair) => pair,
        Err(e) => {
            log::warn!("cannot guard guest memory against truncation (pipe: {e})");
            return;
        }
    };
    // The handler must never block on a full pipe.
    let nonblocking = nix::fcntl::fcntl(
        write_end.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    if let Err(e) = nonblocking {
        log::warn!("cannot guard guest memory against truncation (fcntl: {e})");
        return;
    }
    if let Err(e) = std::thread::Builder::new()
        .name("sigbus-watch".into())
        .spawn(move || watch(read_end))
    {
        log::warn!("cannot guard guest memory against truncation (thread: {e})");
        return;
    }
    WAKE_FD.store(
        std::os::fd::IntoRawFd::into_raw_fd(write_end),
        Ordering::Release,
    );
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
    // `extern "C"` fn with the SA_SIGINFO signature and only does async-signal-safe work.
    let result = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
    };
    if result != 0 {
        log::warn!(
            "cannot guard guest memory against truncation (sigaction: {})",
            std::io::Error::last_os_error()
        );
    }
}

/// The watcher: one log line and a dropped connection per broken memory table.
fn watch(read_end: OwnedFd) {
    let mut pipe = std::fs::File::from(read_end);
    let mut byte = [0u8; 64];
    loop {
        match pipe.read(&mut byte) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        // The handler wakes us once per connection, however many pages fault.
        let connection = crate::lock(&CONNECTION).take();
        log::error!(
            "the frontend truncated the file behind guest memory (fault at host address {:#x}): \
             the lost pages now read as zeros; {}",
            FAULT_ADDR.load(Ordering::Acquire),
            if connection.is_some() {
                "dropping the connection"
            } else {
                "its connection has ended already"
            }
        );
        if let Some(connection) = connection {
            connection.shutdown();
        }
    }
}

/// The recorded region containing `addr`, as (start, page size).
fn lookup(addr: usize) -> Option<usize> {
    TABLE.iter().find_map(|slot| {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Relaxed);
        (len != 0 && addr >= start && addr - start < len).then(|| slot.page.load(Ordering::Relaxed))
    })
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some(page) = lookup(addr) {
            let at = addr & !(page - 1);
            // SAFETY: `at..at + page` lies inside a guest region this process mapped (recorded
            // by `guard`, page-aligned as the mapping is); replacing it with private anonymous
            // memory only changes what those guest pages contain, which the frontend already
            // destroyed by truncating their file.
            let mapped = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                FAULT_ADDR.store(addr, Ordering::Release);
                if !BROKEN.swap(true, Ordering::AcqRel) {
                    let fd = WAKE_FD.load(Ordering::Acquire);
                    // SAFETY: writing one byte from a valid buffer; a failure (full pipe) is
                    // harmless, the watcher has been woken already.
                    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
                }
                return;
            }
        }
    }
    // Not a fault we can absorb: die of it, as without this handler.
    // SAFETY: resetting a disposition and raising a signal are async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, FileOffset, GuestAddress};

    #[test]
    fn a_truncated_region_reads_zeros_instead_of_killing_the_process(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let file = tempfile::tempfile()?;
        file.set_len(0x4000)?;
        file.write_all_at(&[0xab; 0x4000], 0)?;
        let mem = GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            0x4000,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])?;
        crate::memory::check_backing(&mem)?;
        file.set_len(0x1000)?;
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0))?;
        assert_eq!(
            buf, [0xab; 4],
            "the page still backed by the file is intact"
        );
        mem.read_slice(&mut buf, GuestAddress(0x2000))?;
        assert_eq!(buf, [0; 4], "a lost page reads as zeros");
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x3000))?;
        mem.read_slice(&mut buf, GuestAddress(0x3000))?;
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(BROKEN.load(Ordering::Acquire));
        Ok(())
    }
}
