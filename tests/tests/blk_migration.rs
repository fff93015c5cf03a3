//! Live migration of vhost-user-blk as a frontend sees it, over the daemon's real socket: after
//! SET_LOG_BASE and VHOST_F_LOG_ALL, every request marks in the shared log exactly the pages the
//! device wrote (its device-writable buffers and the used ring), on every path the daemon can
//! take; nothing is marked while the frontend does not ask; regions added later are logged;
//! GET_VRING_BASE returns with every request taken finished and marked.
//!
//! How each path is chosen: `--io-engine io_uring` (the default) or `sync` on a disk on ext4;
//! a disk on tmpfs makes the queue thread copy inline, and a batch of reads of at least 64 KiB
//! goes to the copy threads (one per CPU the queues leave idle); `--direct` with a guest buffer
//! that is not 512-byte aligned goes through a bounce buffer.

use std::collections::BTreeSet;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_tests::inflight::Inflight;
use vhost_user_tests::migration::{pages_of, DirtyLog, VHOST_F_LOG_ALL};
use vhost_user_tests::*;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const DISK_SIZE: u64 = 16 << 20;
const RAM: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 256;
const WAIT: Duration = Duration::from_secs(10);
const PAGE: u64 = 4096;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;

/// Where the disk image lives: it decides how reads and writes run.
#[derive(Clone, Copy)]
enum Place {
    /// A regular file system: io_uring, or preadv/pwritev with `--io-engine sync`.
    Ext4,
    /// tmpfs: inline copies in the queue thread, and the copy threads.
    Tmpfs,
}

struct Blk {
    vmm: TestVmm,
    log: DirtyLog,
    daemon: Daemon,
    _disk: tempfile::NamedTempFile,
}

/// A daemon with `args` on a fresh disk at `place`, and a frontend that negotiated logging
/// (LOG_SHMFD) but not VHOST_F_LOG_ALL yet, with one queue and a log covering twice its RAM.
fn blk(place: Place, args: &[&str]) -> Result<Blk> {
    blk_with(place, args, VhostUserProtocolFeatures::empty())
}

fn blk_with(place: Place, args: &[&str], protocol: VhostUserProtocolFeatures) -> Result<Blk> {
    let disk = match place {
        Place::Ext4 => tempfile::NamedTempFile::new()?,
        Place::Tmpfs => tempfile::NamedTempFile::new_in("/dev/shm")?,
    };
    // Data to read back that is not zeros.
    std::fs::write(disk.path(), vec![0x5a; DISK_SIZE as usize])?;
    let path = disk.path().to_string_lossy().into_owned();
    let mut all = vec!["--file", path.as_str(), "--serial", "MIGRATION-SERIAL"];
    all.extend_from_slice(args);
    let daemon = Daemon::start("vhost-user-blk", &all)?;
    let negotiate = Negotiate {
        features: !VHOST_F_LOG_ALL,
        protocol: Negotiate::default().protocol | VhostUserProtocolFeatures::LOG_SHMFD | protocol,
    };
    let mut vmm = if protocol.is_empty() {
        TestVmm::connect(&daemon.socket, RAM, 1, QUEUE_SIZE, negotiate)?
    } else {
        TestVmm::connect_unstarted(&daemon.socket, RAM, 1, negotiate)?
    };
    assert_ne!(
        vmm.offered_features & VHOST_F_LOG_ALL,
        0,
        "VHOST_F_LOG_ALL is not offered"
    );
    assert!(
        vmm.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD is not offered"
    );
    vmm.acknowledge_every_request();
    let log = DirtyLog::new(2 * RAM)?;
    Ok(Blk {
        vmm,
        log,
        daemon,
        _disk: disk,
    })
}

/// One request, every buffer on pages of its own so that what was marked tells what was
/// written.
struct Request {
    bufs: Vec<Buf>,
    status: u64,
    /// The pages the device may write: its device-writable buffers'.
    writable_pages: BTreeSet<u64>,
}

/// The data part of a request.
enum Data {
    None,
    /// `len` device-writable bytes at `offset` into a fresh page.
    Writable {
        len: u32,
        offset: u64,
    },
    /// These bytes, device-readable.
    Readable(Vec<u8>),
}

fn request(ram: &mut GuestRam, kind: u32, sector: u64, data: Data) -> Result<Request> {
    let header = ram.alloc(16, PAGE);
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    ram.write(header, &bytes)?;
    let mut bufs = vec![Buf::readable(header, 16)];
    let mut writable_pages = BTreeSet::new();
    match data {
        Data::None => {}
        Data::Writable { len, offset } => {
            let at = ram.alloc(u64::from(len) + offset, PAGE) + offset;
            ram.write(at, &vec![0xee; len as usize])?;
            bufs.push(Buf::writable(at, len));
            writable_pages.extend(pages_of(at, u64::from(len)));
        }
        Data::Readable(bytes) => {
            let at = ram.alloc(bytes.len() as u64, PAGE);
            ram.write(at, &bytes)?;
            bufs.push(Buf::readable(at, bytes.len() as u32));
        }
    }
    let status = ram.alloc(1, PAGE) + 0x7ff;
    ram.write(status, &[0xee])?;
    bufs.push(Buf::writable(status, 1));
    writable_pages.extend(pages_of(status, 1));
    Ok(Request {
        bufs,
        status,
        writable_pages,
    })
}

/// A DISCARD or WRITE_ZEROES range: `sectors` from `sector`.
fn range(sector: u64, sectors: u32) -> Vec<u8> {
    let mut entry = vec![0u8; 16];
    entry[..8].copy_from_slice(&sector.to_le_bytes());
    entry[8..12].copy_from_slice(&sectors.to_le_bytes());
    entry
}

/// The requests of every kind, and what each should mark.
fn every_kind(ram: &mut GuestRam) -> Result<Vec<(&'static str, Request)>> {
    Ok(vec![
        // 8 KiB read into a buffer that starts 256 bytes into a page: three pages, and not
        // aligned for O_DIRECT (a bounce buffer with --direct).
        (
            "read",
            request(
                ram,
                T_IN,
                8,
                Data::Writable {
                    len: 8192,
                    offset: 0x100,
                },
            )?,
        ),
        (
            "write",
            request(ram, T_OUT, 64, Data::Readable(vec![0xa5; 4096]))?,
        ),
        ("flush", request(ram, T_FLUSH, 0, Data::None)?),
        // The 20-byte ID across a page boundary: both pages.
        (
            "get-id",
            request(
                ram,
                T_GET_ID,
                0,
                Data::Writable {
                    len: 20,
                    offset: PAGE - 8,
                },
            )?,
        ),
        (
            "discard",
            request(ram, T_DISCARD, 0, Data::Readable(range(1024, 8)))?,
        ),
        (
            "write-zeroes",
            request(ram, T_WRITE_ZEROES, 0, Data::Readable(range(2048, 8)))?,
        ),
    ])
}

impl Blk {
    /// The pages of queue 0's used ring.
    fn used_ring_pages(&self) -> BTreeSet<u64> {
        let q = &self.vmm.queues[0];
        pages_of(q.used, 6 + 8 * u64::from(q.size)).collect()
    }

    /// Makes `requests` available with one kick and waits for all of them; checks their
    /// status bytes.
    fn run(&mut self, requests: &[&Request]) -> Result<()> {
        let (ram, q) = self.vmm.queue(0);
        for r in requests {
            let head = q.add_chain(ram, &r.bufs)?;
            q.publish(ram, head)?;
        }
        q.notify()?;
        let used = q.wait_used(ram, requests.len(), WAIT)?;
        assert_eq!(used.len(), requests.len());
        for r in requests {
            assert_eq!(ram.read(r.status, 1)?[0], S_OK, "request status");
        }
        Ok(())
    }

    /// Runs `requests` from a clean log and checks that exactly their writable pages and the
    /// used ring's were marked.
    fn expect_marked(&mut self, what: &str, requests: &[&Request]) -> Result<()> {
        self.log.clear()?;
        self.run(requests)?;
        let mut expected: BTreeSet<u64> = self.used_ring_pages();
        for r in requests {
            expected.extend(&r.writable_pages);
        }
        let marked: BTreeSet<u64> = self.log.dirty_pages()?.into_iter().collect();
        assert_eq!(
            marked,
            expected,
            "{what}: marked pages (left) differ from the device-writable and used-ring pages \
             (right); {}",
            self.daemon.log_tail(5)
        );
        Ok(())
    }

    /// Runs `requests` from a clean log and checks that nothing was marked.
    fn expect_unmarked(&mut self, what: &str, requests: &[&Request]) -> Result<()> {
        self.log.clear()?;
        self.run(requests)?;
        assert_eq!(self.log.dirty_pages()?, Vec::<u64>::new(), "{what}");
        Ok(())
    }

    /// SET_LOG_BASE and VHOST_F_LOG_ALL, as QEMU starts a migration.
    fn start_logging(&mut self) -> Result<()> {
        self.vmm.set_log(&self.log)?;
        self.vmm.log_all(true)
    }
}

/// Every request kind, one at a time, on the engine `args` and `place` choose.
fn every_kind_marks_exactly_its_writable_pages(place: Place, args: &[&str]) -> Result<()> {
    let mut blk = blk(place, args)?;
    blk.start_logging()?;
    for (what, request) in every_kind(&mut blk.vmm.ram)? {
        blk.expect_marked(what, &[&request])?;
    }
    Ok(())
}

#[test]
fn io_uring_marks_every_request_kind() -> Result<()> {
    every_kind_marks_exactly_its_writable_pages(Place::Ext4, &["--io-engine", "io_uring"])
}

#[test]
fn sync_engine_marks_every_request_kind() -> Result<()> {
    every_kind_marks_exactly_its_writable_pages(Place::Ext4, &["--io-engine", "sync"])
}

#[test]
fn inline_copies_on_tmpfs_mark_every_request_kind() -> Result<()> {
    every_kind_marks_exactly_its_writable_pages(Place::Tmpfs, &[])
}

#[test]
fn o_direct_bounce_buffers_mark_every_request_kind_with_io_uring() -> Result<()> {
    every_kind_marks_exactly_its_writable_pages(Place::Ext4, &["--direct"])
}

#[test]
fn o_direct_bounce_buffers_mark_every_request_kind_with_sync_io() -> Result<()> {
    every_kind_marks_exactly_its_writable_pages(Place::Ext4, &["--direct", "--io-engine", "sync"])
}

#[test]
fn copy_threads_mark_the_reads_they_share() -> Result<()> {
    let mut blk = blk(Place::Tmpfs, &[])?;
    let threads = std::fs::read_dir(format!("/proc/{}/task", blk.daemon.pid()))?
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("blk-copy"))
        .count();
    assert!(
        threads > 0,
        "no copy thread: this machine has no CPU to spare for them"
    );
    blk.start_logging()?;
    // One kick, 128 KiB of reads: a share goes to the copy threads.
    let mut reads = Vec::new();
    for i in 0..4 {
        let data = Data::Writable {
            len: 32 << 10,
            offset: 0x200,
        };
        reads.push(request(&mut blk.vmm.ram, T_IN, i * 64, data)?);
    }
    let reads: Vec<&Request> = reads.iter().collect();
    blk.expect_marked("reads shared with the copy threads", &reads)
}

#[test]
fn nothing_is_marked_before_log_all_nor_after_it_is_cleared() -> Result<()> {
    let mut blk = blk(Place::Ext4, &[])?;
    let reads: Vec<Request> = (0..4)
        .map(|_| {
            let data = Data::Writable {
                len: 4096,
                offset: 0,
            };
            request(&mut blk.vmm.ram, T_IN, 0, data)
        })
        .collect::<Result<_>>()?;
    // QEMU maps the log first and acks LOG_ALL next: the log alone starts nothing.
    blk.vmm.set_log(&blk.log)?;
    blk.expect_unmarked("after SET_LOG_BASE without VHOST_F_LOG_ALL", &[&reads[0]])?;
    blk.vmm.log_all(true)?;
    blk.expect_marked("with VHOST_F_LOG_ALL", &[&reads[1]])?;
    // The migration ended (or failed): QEMU clears LOG_ALL and stops reading the log.
    blk.vmm.log_all(false)?;
    blk.expect_unmarked("after VHOST_F_LOG_ALL was cleared", &[&reads[2]])?;
    // A second migration logs again, in the log it was given.
    blk.vmm.log_all(true)?;
    blk.expect_marked("with VHOST_F_LOG_ALL acked again", &[&reads[3]])
}

/// A second memfd region of guest memory at `gpa`, mapped here too.
struct ExtraRegion {
    mem: GuestMemoryMmap<()>,
    file: std::fs::File,
    gpa: u64,
    size: u64,
}

impl ExtraRegion {
    fn new(gpa: u64, size: u64) -> Result<ExtraRegion> {
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-user-test-extra",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let file = std::fs::File::from(fd);
        file.set_len(size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(gpa),
            size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])?;
        Ok(ExtraRegion {
            mem,
            file,
            gpa,
            size,
        })
    }

    fn info(&self) -> Result<VhostUserMemoryRegionInfo> {
        use std::os::fd::AsRawFd;
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.mem.get_host_address(GuestAddress(self.gpa))? as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        })
    }

    /// A read request whose data buffer (`len` bytes at `offset`) is in this region.
    fn read_into(&self, ram: &mut GuestRam, offset: u64, len: u32) -> Result<Request> {
        let mut r = request(ram, T_IN, 0, Data::None)?;
        let at = self.gpa + offset;
        r.bufs.insert(1, Buf::writable(at, len));
        r.writable_pages.extend(pages_of(at, u64::from(len)));
        Ok(r)
    }
}

#[test]
fn regions_added_after_the_log_are_logged() -> Result<()> {
    let mut blk = blk(Place::Ext4, &[])?;
    blk.start_logging()?;
    // QEMU adds memory (a DIMM) with ADD_MEM_REG while the migration logs.
    let extra = ExtraRegion::new(RAM, 1 << 20)?;
    blk.vmm.frontend.add_mem_region(&extra.info()?)?;
    let read = extra.read_into(&mut blk.vmm.ram, 0x3000, 8192)?;
    blk.expect_marked("a read into a region added by ADD_MEM_REG", &[&read])?;
    // A new SET_MEM_TABLE maps every region anew.
    let table = [blk.vmm.ram.region_info()?, extra.info()?];
    blk.vmm.frontend.set_mem_table(&table)?;
    let into_extra = extra.read_into(&mut blk.vmm.ram, 0x8000, 4096)?;
    let into_ram = request(
        &mut blk.vmm.ram,
        T_IN,
        0,
        Data::Writable {
            len: 4096,
            offset: 0,
        },
    )?;
    blk.expect_marked("reads after a new SET_MEM_TABLE", &[&into_extra, &into_ram])
}

#[test]
fn a_log_larger_than_its_file_is_refused_and_the_daemon_survives() -> Result<()> {
    let Blk {
        vmm,
        log,
        mut daemon,
        _disk,
    } = blk(Place::Ext4, &[])?;
    // Marking past the end of the memfd would raise SIGBUS in the daemon.
    let mut region = log.region();
    region.mmap_size = 64 * log.size;
    assert!(
        vmm.frontend.set_log_base(0, Some(region)).is_err(),
        "SET_LOG_BASE with a log larger than its file was accepted"
    );
    drop(vmm);
    assert!(daemon.is_running(), "{}", daemon.log_tail(10));
    // The next frontend is served.
    let negotiate = Negotiate {
        protocol: Negotiate::default().protocol | VhostUserProtocolFeatures::LOG_SHMFD,
        ..Negotiate::default()
    };
    let mut blk = Blk {
        vmm: TestVmm::connect(&daemon.socket, RAM, 1, QUEUE_SIZE, negotiate)?,
        log: DirtyLog::new(2 * RAM)?,
        daemon,
        _disk,
    };
    blk.vmm.acknowledge_every_request();
    blk.start_logging()?;
    let read = request(
        &mut blk.vmm.ram,
        T_IN,
        0,
        Data::Writable {
            len: 512,
            offset: 0,
        },
    )?;
    blk.expect_marked("a read on the next connection", &[&read])
}

/// The descriptors open in `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn set_log_fd_is_accepted_and_its_descriptor_closed() -> Result<()> {
    let mut blk = blk(Place::Ext4, &[])?;
    let before = open_fds(blk.daemon.pid())?;
    for _ in 0..32 {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        blk.vmm
            .frontend
            .set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&eventfd))?;
    }
    let after = open_fds(blk.daemon.pid())?;
    assert!(
        after < before + 32,
        "{before} descriptors open before 32 SET_LOG_FD, {after} after"
    );
    // The connection is still served.
    blk.start_logging()?;
    let read = request(
        &mut blk.vmm.ram,
        T_IN,
        0,
        Data::Writable {
            len: 512,
            offset: 0,
        },
    )?;
    blk.expect_marked("a read after SET_LOG_FD", &[&read])
}

/// Makes `count` reads of `len` bytes available with one kick and stops the ring at once with
/// GET_VRING_BASE, as QEMU does when the migration's last pass begins. Every request taken
/// must be in the used ring when GET_VRING_BASE answers, and its pages marked.
fn stop_under_load(blk: &mut Blk, count: u64, len: u32) -> Result<u16> {
    blk.start_logging()?;
    blk.log.clear()?;
    let mut by_head = std::collections::BTreeMap::new();
    let mut built = Vec::new();
    for i in 0..count {
        let data = Data::Writable { len, offset: 0 };
        built.push(request(&mut blk.vmm.ram, T_IN, i * 8, data)?);
    }
    let (ram, q) = blk.vmm.queue(0);
    for r in &built {
        let head = q.add_chain(ram, &r.bufs)?;
        q.publish(ram, head)?;
        by_head.insert(head, r);
    }
    q.notify()?;
    // The device is at work (a first request is back) when the frontend stops the ring.
    let mut used = q.wait_used(ram, 1, WAIT)?;
    let early = used.len();
    let base = blk.vmm.frontend.get_vring_base(0)? as u16;
    // No waiting: the device answered GET_VRING_BASE, so everything it took is returned.
    let (ram, q) = blk.vmm.queue(0);
    used.extend(q.take_used(ram)?);
    eprintln!(
        "GET_VRING_BASE: {base} of {count} requests taken, {early} of them completed before it"
    );
    assert_eq!(
        used.len(),
        usize::from(base),
        "GET_VRING_BASE said {base} requests were taken, {} are in the used ring",
        used.len()
    );
    let marked: BTreeSet<u64> = blk.log.dirty_pages()?.into_iter().collect();
    for u in &used {
        let Some(r) = by_head.get(&u.id) else {
            panic!("used entry for head {} that was not made available", u.id);
        };
        assert_eq!(ram.read(r.status, 1)?[0], S_OK);
        let missing: Vec<u64> = r.writable_pages.difference(&marked).copied().collect();
        assert!(
            missing.is_empty(),
            "request {} was returned but pages {missing:?} are not marked",
            u.id
        );
    }
    Ok(base)
}

#[test]
fn get_vring_base_returns_after_every_request_taken_is_done_and_marked() -> Result<()> {
    // 64 reads of 256 KiB through io_uring with O_DIRECT (from the disk, not the page cache):
    // GET_VRING_BASE arrives while most are in flight.
    let mut blk = blk(Place::Ext4, &["--direct"])?;
    stop_under_load(&mut blk, 64, 256 << 10)?;
    Ok(())
}

#[test]
fn inflight_region_is_consistent_after_a_stop_under_logging() -> Result<()> {
    let mut blk = blk_with(
        Place::Ext4,
        &["--direct"],
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    )?;
    // QEMU's order: GET_INFLIGHT_FD once, SET_INFLIGHT_FD, then the rings.
    let (info, file) = blk.vmm.frontend.get_inflight_fd(&VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    })?;
    let inflight = Inflight { info, file };
    blk.vmm.frontend.set_inflight_fd(
        &inflight.info,
        std::os::fd::AsRawFd::as_raw_fd(&inflight.file),
    )?;
    blk.vmm.start_queue(0, QUEUE_SIZE)?;
    let base = stop_under_load(&mut blk, 64, 256 << 10)?;
    // What the destination's QEMU would hand a new backend: nothing in flight, and the
    // region's used index where the ring's is.
    assert_eq!(
        inflight.in_flight(0)?,
        Vec::new(),
        "requests still marked in flight after GET_VRING_BASE"
    );
    assert_eq!(inflight.used_idx(0)?, base, "the region's used index");
    Ok(())
}
