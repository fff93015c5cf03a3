//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) through vhost-user-blk's real
//! socket. The test is QEMU: GET_INFLIGHT_FD after SET_FEATURES and before the memory table on
//! the first connection, SET_INFLIGHT_FD with the same memfd on every connection before the
//! rings, SET_VRING_BASE rewound to the guest's used index after a restart. Between two daemons
//! it leaves the region and the rings exactly as a SIGKILLed backend would after completing
//! requests out of order, then checks that the new daemon executes what was in flight, once,
//! oldest first, never what completed, and carries on.
//!
//! The region is read and written here with byte offsets from the spec, independently of the
//! daemon's typed layout: a layout mismatch fails these tests.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vhost_user_tests::inflight::{region_size, Inflight};
use vhost_user_tests::*;
use vmm_sys_util::eventfd::EventFd;

const DISK_SIZE: u64 = 16 << 20;
const RAM: u64 = 64 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const WAIT: Duration = Duration::from_secs(10);
/// Where each queue's rings live in guest RAM (room for 1024 entries).
const RING_BASE: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x10_0000;

/// The guest's side of one split ring, with the raw access a test of crash states needs.
struct Ring {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Ring {
    fn new(ram: &GuestRam, index: usize, size: u16) -> Result<Ring> {
        let desc = RING_BASE + index as u64 * RING_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).div_ceil(4) * 4;
        ram.write(
            desc,
            &vec![0u8; (used + 6 + 8 * u64::from(size) - desc) as usize],
        )?;
        Ok(Ring {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE, as QEMU starts a ring.
    fn start(&self, frontend: &mut Frontend, ram: &GuestRam, base: u16) -> Result<()> {
        frontend.set_vring_num(self.index, self.size)?;
        let config = VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host_addr(self.desc)?,
            used_ring_addr: ram.host_addr(self.used)?,
            avail_ring_addr: ram.host_addr(self.avail)?,
            log_addr: None,
        };
        frontend.set_vring_addr(self.index, &config)?;
        frontend.set_vring_base(self.index, base)?;
        frontend.set_vring_call(self.index, &self.call)?;
        frontend.set_vring_kick(self.index, &self.kick)?;
        frontend.set_vring_enable(self.index, true)?;
        Ok(())
    }

    /// A virtio-blk request (header, data, status) in the descriptor table; returns its head.
    fn add_request(
        &mut self,
        ram: &mut GuestRam,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
    ) -> Result<Request> {
        let header = ram.alloc(16, 16);
        let status = ram.alloc(1, 1);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        ram.write(header, &bytes)?;
        ram.write(status, &[0xee])?;
        let head = self.next_desc;
        let data_flags = if kind == T_IN { DESC_F_WRITE } else { 0 };
        let descs = [
            (header, 16, DESC_F_NEXT),
            (data, len, data_flags | DESC_F_NEXT),
            (status, 1, DESC_F_WRITE),
        ];
        for (n, (addr, len, flags)) in descs.into_iter().enumerate() {
            let i = (head + n as u16) % self.size;
            let next = (i + 1) % self.size;
            GuestQueue::write_desc(ram, self.desc, i, addr, len, flags, next)?;
        }
        self.next_desc = (head + 3) % self.size;
        Ok(Request { head, status })
    }

    fn publish(&mut self, ram: &GuestRam, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        ram.write(self.avail + 2, &self.avail_idx.to_le_bytes())?;
        Ok(())
    }

    fn used_idx(&self, ram: &GuestRam) -> Result<u16> {
        let b = ram.read(self.used + 2, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Writes a used element and moves the used index, as a backend does.
    fn push_used(&mut self, ram: &GuestRam, head: u16, len: u32) -> Result<()> {
        let idx = self.used_idx(ram)?;
        let slot = u64::from(idx % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        ram.write(self.used + 4 + 8 * slot, &elem)?;
        fence(Ordering::SeqCst);
        ram.write(self.used + 2, &idx.wrapping_add(1).to_le_bytes())?;
        Ok(())
    }

    /// Used heads not seen yet, waiting up to `WAIT` for at least `count`.
    fn wait_used(&mut self, ram: &GuestRam, count: usize) -> Result<Vec<u16>> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        loop {
            let idx = self.used_idx(ram)?;
            fence(Ordering::SeqCst);
            while self.last_used != idx {
                let slot = u64::from(self.last_used % self.size);
                let b = ram.read(self.used + 4 + 8 * slot, 4)?;
                out.push(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u16);
                self.last_used = self.last_used.wrapping_add(1);
            }
            if out.len() >= count || Instant::now() > deadline {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Marks everything in the used ring as seen.
    fn skip_used(&mut self, ram: &GuestRam) -> Result<()> {
        self.last_used = self.used_idx(ram)?;
        Ok(())
    }
}

struct Request {
    head: u16,
    status: u64,
}

fn blk(disk: &tempfile::NamedTempFile, num_queues: usize, queue_size: u16) -> Result<Daemon> {
    let path = disk.path().to_string_lossy().into_owned();
    let queues = num_queues.to_string();
    let size = queue_size.to_string();
    Daemon::start(
        "vhost-user-blk",
        &[
            "--file",
            &path,
            "--num-queues",
            &queues,
            "--queue-size",
            &size,
            // One request at a time, in the order taken: the order of execution is observable.
            "--io-engine",
            "sync",
        ],
    )
}

/// Connects as QEMU's vhost-user-blk does: features, GET_INFLIGHT_FD on the first connection
/// only, SET_INFLIGHT_FD on every one, then the memory table. The rings are started by the
/// caller.
fn connect(
    daemon: &Daemon,
    ram: &GuestRam,
    num_queues: usize,
    queue_size: u16,
    inflight: &mut Option<Inflight>,
) -> Result<Frontend> {
    let mut frontend = Frontend::connect(&daemon.socket, num_queues as u64)?;
    frontend.set_owner()?;
    let features = frontend.get_features()?;
    assert_ne!(features & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    let offered = frontend.get_protocol_features()?;
    assert!(
        offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "vhost-user-blk must offer INFLIGHT_SHMFD"
    );
    frontend.set_protocol_features(
        offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD),
    )?;
    // Every request acknowledged: a refusal is seen where it happens.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let acked = features
        & (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VHOST_USER_F_PROTOCOL_FEATURES);
    frontend.set_features(acked)?;
    if inflight.is_none() {
        let (info, file) = frontend.get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: num_queues as u16,
            queue_size,
        })?;
        assert_eq!(info.mmap_size, region_size(queue_size) * num_queues as u64);
        assert_eq!(file.metadata()?.len(), info.mmap_size);
        *inflight = Some(Inflight { info, file });
    }
    if let Some(inflight) = inflight.as_ref() {
        frontend.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())?;
    }
    frontend.set_mem_table(&[ram.region_info()?])?;
    Ok(frontend)
}

fn write_request(
    ring: &mut Ring,
    ram: &mut GuestRam,
    sector: u64,
    fill: u8,
) -> Result<(Request, u64)> {
    let data = ram.alloc(512, 512);
    ram.write(data, &[fill; 512])?;
    let req = ring.add_request(ram, T_OUT, sector, data, 512)?;
    Ok((req, data))
}

fn sector_of(disk: &tempfile::NamedTempFile, sector: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    disk.as_file().read_exact_at(&mut buf, sector * 512)?;
    Ok(buf)
}

/// What a dead backend left on one queue, and what the new one must do with it.
struct Left {
    /// In flight, oldest first: must be executed, once, in this order.
    in_flight: Vec<u16>,
    /// Sector both in-flight writes target: ends up with the newest one's data.
    sector: u64,
    newest_fill: u8,
    statuses: Vec<u64>,
    /// Completed writes whose guest buffers now say REPLAY: a replay would write that.
    completed_sectors: Vec<u64>,
}

const REPLAY: u8 = 0xee;

/// Session 1 traffic: a few requests completed normally, so that the rings and the region are
/// not at their initial state. Checks the region afterwards.
fn warm_up(
    ring: &mut Ring,
    ram: &mut GuestRam,
    inflight: &Inflight,
    q: usize,
    count: u16,
) -> Result<()> {
    for n in 0..count {
        let (req, _) = write_request(ring, ram, 1000 + n as u64, 0x10 + n as u8)?;
        ring.publish(ram, req.head)?;
        ring.kick.write(1)?;
        let used = ring.wait_used(ram, 1)?;
        assert_eq!(used, vec![req.head]);
        assert_eq!(ram.read(req.status, 1)?[0], S_OK);
    }
    // Between batches the region is consistent: nothing in flight, the ring's used index.
    // (The daemon updates it just after publishing the used index: give it a moment.)
    let deadline = Instant::now() + WAIT;
    while (inflight.used_idx(q)? != ring.used_idx(ram)? || !inflight.in_flight(q)?.is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(inflight.version(q)?, 1, "queue {q} region initialised");
    assert_eq!(inflight.desc_num(q)?, ring.size);
    assert_eq!(inflight.used_idx(q)?, ring.used_idx(ram)?);
    assert_eq!(inflight.in_flight(q)?, vec![]);
    Ok(())
}

/// Leaves queue `q` as a backend killed after an out-of-order completion: P and Q taken and in
/// flight (P first), R taken after them and completed (in the used ring, not in flight).
/// P's head index is larger than Q's, so that "oldest first" is not "lowest head first".
fn leave_out_of_order(
    ring: &mut Ring,
    ram: &mut GuestRam,
    inflight: &Inflight,
    disk: &tempfile::NamedTempFile,
    q: usize,
) -> Result<Left> {
    let sector = 2000 + 10 * q as u64;
    let (req_q, _) = write_request(ring, ram, sector, 0xb0)?;
    let (req_p, _) = write_request(ring, ram, sector, 0xa0)?;
    let (req_r, data_r) = write_request(ring, ram, sector + 1, 0xc0)?;
    assert!(req_p.head > req_q.head);
    let counter = inflight
        .in_flight(q)?
        .iter()
        .map(|&(_, c)| c + 1)
        .max()
        .unwrap_or(100);
    for req in [&req_p, &req_q, &req_r] {
        ring.publish(ram, req.head)?;
    }
    // The dead backend took P, Q, R (counters in that order), executed R and returned it.
    inflight.set_desc(q, req_p.head, 1, 0, counter)?;
    inflight.set_desc(q, req_q.head, 1, 0, counter + 1)?;
    disk.as_file()
        .write_all_at(&[0xc0; 512], (sector + 1) * 512)?;
    ram.write(req_r.status, &[S_OK])?;
    inflight.set_desc(q, req_r.head, 1, 0, counter + 2)?;
    inflight.set_last_batch_head(q, req_r.head)?;
    ring.push_used(ram, req_r.head, 1)?;
    inflight.set_desc(q, req_r.head, 0, 0, counter + 2)?;
    inflight.set_used_idx(q, ring.used_idx(ram)?)?;
    // The guest saw R complete and reused its buffer.
    ram.write(data_r, &[REPLAY; 512])?;
    ring.skip_used(ram)?;
    Ok(Left {
        in_flight: vec![req_p.head, req_q.head],
        sector,
        newest_fill: 0xb0,
        statuses: vec![req_p.status, req_q.status],
        completed_sectors: vec![sector + 1],
    })
}

/// Leaves queue `q` as a backend killed inside a batch return, between the used index store
/// and the region update: P in flight; R and T taken after it, completed in one batch, in the
/// used ring, and still marked in flight in the region, whose used index is the old one.
fn leave_torn_batch(
    ring: &mut Ring,
    ram: &mut GuestRam,
    inflight: &Inflight,
    disk: &tempfile::NamedTempFile,
    q: usize,
) -> Result<Left> {
    let sector = 3000 + 10 * q as u64;
    let (req_p, _) = write_request(ring, ram, sector, 0xa1)?;
    let (req_r, data_r) = write_request(ring, ram, sector + 1, 0xc1)?;
    let (req_t, data_t) = write_request(ring, ram, sector + 2, 0xd1)?;
    for req in [&req_p, &req_r, &req_t] {
        ring.publish(ram, req.head)?;
    }
    let old_used = ring.used_idx(ram)?;
    inflight.set_desc(q, req_p.head, 1, 0, 500)?;
    // The batch list as the spec builds it (each entry points to the previous head).
    let old_head = 0;
    inflight.set_desc(q, req_r.head, 1, old_head, 501)?;
    inflight.set_desc(q, req_t.head, 1, req_r.head, 502)?;
    inflight.set_last_batch_head(q, req_t.head)?;
    for (req, sector, fill) in [(&req_r, sector + 1, 0xc1), (&req_t, sector + 2, 0xd1)] {
        disk.as_file().write_all_at(&[fill; 512], sector * 512)?;
        ram.write(req.status, &[S_OK])?;
        ring.push_used(ram, req.head, 1)?;
    }
    // Killed here: flags of R and T still set, region used index still the old one.
    assert_eq!(inflight.used_idx(q)?, old_used);
    ram.write(data_r, &[REPLAY; 512])?;
    ram.write(data_t, &[REPLAY; 512])?;
    ring.skip_used(ram)?;
    Ok(Left {
        in_flight: vec![req_p.head],
        sector,
        newest_fill: 0xa1,
        statuses: vec![req_p.status],
        completed_sectors: vec![sector + 1, sector + 2],
    })
}

type Scenario =
    fn(&mut Ring, &mut GuestRam, &Inflight, &tempfile::NamedTempFile, usize) -> Result<Left>;

/// Session 1 with a daemon, SIGKILL, `scenario` on every queue, session 2 with a new daemon:
/// exactly the in-flight requests run, once, oldest first, before a new one; completed ones
/// never run again; GET_VRING_BASE then reports the true ring position.
fn restart_recovers(num_queues: usize, queue_size: u16, scenario: Scenario) -> Result<()> {
    let disk = tempfile::NamedTempFile::new()?;
    disk.as_file().set_len(DISK_SIZE)?;
    let mut ram = GuestRam::new(RAM)?;
    let mut inflight = None;
    let mut rings = Vec::new();

    let mut first = blk(&disk, num_queues, queue_size)?;
    {
        let mut frontend = connect(&first, &ram, num_queues, queue_size, &mut inflight)?;
        let region = inflight.as_ref().ok_or("no inflight buffer")?;
        for q in 0..num_queues {
            let mut ring = Ring::new(&ram, q, queue_size)?;
            ring.start(&mut frontend, &ram, 0)?;
            warm_up(&mut ring, &mut ram, region, q, 3 + q as u16)?;
            rings.push(ring);
        }
        first.child.kill()?;
        first.child.wait()?;
    }

    let region = inflight.as_ref().ok_or("no inflight buffer")?;
    let mut left = Vec::new();
    for (q, ring) in rings.iter_mut().enumerate() {
        left.push(scenario(ring, &mut ram, region, &disk, q)?);
    }

    let second = blk(&disk, num_queues, queue_size)?;
    let mut frontend = connect(&second, &ram, num_queues, queue_size, &mut inflight)?;
    let region = inflight.as_ref().ok_or("no inflight buffer")?;
    for (q, ring) in rings.iter_mut().enumerate() {
        // QEMU cannot ask a dead backend where the ring was: it rewinds to the used index.
        let rewound = ring.used_idx(&ram)?;
        ring.start(&mut frontend, &ram, rewound)?;
        // No kick: the backend resubmits on its own when the ring starts.
        let done = ring.wait_used(&ram, left[q].in_flight.len())?;
        assert_eq!(
            done, left[q].in_flight,
            "queue {q}: exactly the requests in flight, oldest first"
        );
        for &status in &left[q].statuses {
            assert_eq!(ram.read(status, 1)?[0], S_OK);
        }
        assert_eq!(
            sector_of(&disk, left[q].sector)?,
            vec![left[q].newest_fill; 512],
            "queue {q}: the oldest in-flight write ran first, and only once"
        );
        for &sector in &left[q].completed_sectors {
            assert!(
                sector_of(&disk, sector)?.iter().all(|&b| b != REPLAY),
                "queue {q}: a completed request was executed again"
            );
        }
        // New requests continue after them.
        let (req, data) = write_request(ring, &mut ram, 4000 + q as u64, 0x5a)?;
        ring.publish(&ram, req.head)?;
        ring.kick.write(1)?;
        let used = ring.wait_used(&ram, 1)?;
        assert_eq!(used, vec![req.head], "queue {q}: only the new request");
        let read = ring.add_request(&mut ram, T_IN, 4000 + q as u64, data, 512)?;
        ram.write(data, &[0; 512])?;
        ring.publish(&ram, read.head)?;
        ring.kick.write(1)?;
        assert_eq!(ring.wait_used(&ram, 1)?, vec![read.head]);
        assert_eq!(ram.read(data, 512)?, vec![0x5a; 512]);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            ring.wait_used(&ram, 0)?,
            Vec::<u16>::new(),
            "queue {q}: nothing else"
        );
        assert_eq!(region.in_flight(q)?, vec![], "queue {q}: region drained");
        assert_eq!(region.used_idx(q)?, ring.used_idx(&ram)?);
    }
    // Stopping a ring reports the true position: everything published was taken.
    for (q, ring) in rings.iter().enumerate() {
        let base = frontend.get_vring_base(q)?;
        assert_eq!(base as u16, ring.avail_idx, "queue {q}: GET_VRING_BASE");
    }
    Ok(())
}

#[test]
fn out_of_order_completion_survives_a_restart_128_entries_2_queues() -> Result<()> {
    restart_recovers(2, 128, leave_out_of_order)
}

#[test]
fn out_of_order_completion_survives_a_restart_1024_entries_4_queues() -> Result<()> {
    restart_recovers(4, 1024, leave_out_of_order)
}

#[test]
fn torn_batch_survives_a_restart_256_entries_3_queues() -> Result<()> {
    restart_recovers(3, 256, leave_torn_batch)
}

#[test]
fn torn_batch_survives_a_restart_1024_entries_1_queue() -> Result<()> {
    restart_recovers(1, 1024, leave_torn_batch)
}

/// A hostile frontend: SET_INFLIGHT_FD descriptions that do not fit the file are refused, and
/// the daemon keeps serving the next connection.
#[test]
fn bad_inflight_descriptions_are_refused() -> Result<()> {
    let disk = tempfile::NamedTempFile::new()?;
    disk.as_file().set_len(DISK_SIZE)?;
    let ram = GuestRam::new(RAM)?;
    let daemon = blk(&disk, 2, 128)?;
    let mut inflight = None;
    drop(connect(&daemon, &ram, 2, 128, &mut inflight)?);
    let good = inflight.ok_or("no inflight buffer")?;
    let size = good.info.mmap_size;
    for (mmap_size, mmap_offset, num_queues, queue_size) in [
        (size * 2, 0, 2, 128),
        (size, 4096, 2, 128),
        (size, 0, 3, 128),
        (size, 0, 2, 256),
    ] {
        let info = VhostUserInflight {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        };
        let mut bad = Some(Inflight {
            info,
            file: good.file.try_clone()?,
        });
        let refused = connect(&daemon, &ram, 2, 128, &mut bad).is_err();
        assert!(
            refused,
            "{mmap_size} {mmap_offset} {num_queues} {queue_size} accepted"
        );
    }
    // Still serving.
    let mut again = Some(good);
    let _frontend = connect(&daemon, &ram, 2, 128, &mut again)?;
    Ok(())
}

/// Runs a system command; an error names it.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// A small ext4 file system on a loop device, mounted for the test (needs root).
struct Ext4 {
    dir: tempfile::TempDir,
}

impl Ext4 {
    fn new() -> Result<Ext4> {
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        File::create(&image)?.set_len(192 << 20)?;
        let image = image.to_string_lossy().into_owned();
        sh("mkfs.ext4", &["-q", "-F", &image])?;
        sh("mount", &["-o", "loop", &image, &mnt.to_string_lossy()])?;
        Ok(Ext4 { dir })
    }
    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = sh("umount", &[&self.mnt().to_string_lossy()]);
    }
}

/// A frozen file system (`fsfreeze`): writes and flushes block until it thaws; reads of cached
/// data still complete. Thaws when dropped.
struct Frozen(std::path::PathBuf);

impl Frozen {
    fn new(mnt: std::path::PathBuf) -> Result<Frozen> {
        sh("fsfreeze", &["--freeze", &mnt.to_string_lossy()])?;
        Ok(Frozen(mnt))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = sh("fsfreeze", &["--unfreeze", &self.0.to_string_lossy()]);
    }
}

/// The daemon (io_uring engine) SIGKILLed while requests are really in flight and completing
/// out of order: on a frozen file system the writes taken first block in io_uring's workers
/// while the reads taken after them complete. A new daemon executes the writes (nothing lost)
/// and not the reads again (a replayed read would overwrite guest memory the guest reused).
/// Without inflight tracking the frontend's rewound base would replay the reads and never run
/// the writes.
#[test]
fn sigkill_with_requests_really_in_flight_out_of_order() -> Result<()> {
    let fs = Ext4::new()?;
    let disk_path = fs.mnt().join("disk.img");
    std::fs::write(&disk_path, vec![0x77u8; DISK_SIZE as usize])?;
    let path = disk_path.to_string_lossy().into_owned();
    let args = ["--file", path.as_str(), "--queue-size", "256"];
    let mut ram = GuestRam::new(RAM)?;
    let mut inflight = None;

    let mut first = Daemon::start("vhost-user-blk", &args)?;
    let mut frontend = connect(&first, &ram, 1, 256, &mut inflight)?;
    let region = inflight.as_ref().ok_or("no inflight buffer")?;
    let mut ring = Ring::new(&ram, 0, 256)?;
    ring.start(&mut frontend, &ram, 0)?;
    warm_up(&mut ring, &mut ram, region, 0, 2)?;

    let frozen = Frozen::new(fs.mnt())?;
    let (w1, _) = write_request(&mut ring, &mut ram, 100, 0xa1)?;
    let (w2, _) = write_request(&mut ring, &mut ram, 101, 0xa2)?;
    let mut reads = Vec::new();
    for sector in [200, 201] {
        let data = ram.alloc(512, 512);
        let req = ring.add_request(&mut ram, T_IN, sector, data, 512)?;
        reads.push((req, data));
    }
    for head in [w1.head, w2.head, reads[0].0.head, reads[1].0.head] {
        ring.publish(&ram, head)?;
    }
    ring.kick.write(1)?;
    let done = ring.wait_used(&ram, 2)?;
    assert_eq!(
        done,
        vec![reads[0].0.head, reads[1].0.head],
        "the reads complete while the writes taken before them block"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        ring.wait_used(&ram, 0)?,
        Vec::<u16>::new(),
        "writes blocked"
    );
    // The region says so: both writes in flight, in the order taken; the reads not.
    let in_flight = region.in_flight(0)?;
    assert_eq!(
        in_flight.iter().map(|&(h, _)| h).collect::<Vec<_>>(),
        vec![w1.head, w2.head]
    );
    assert!(
        in_flight[0].1 < in_flight[1].1,
        "counters in the order taken"
    );
    // The guest got its reads and reuses the buffers.
    for (req, data) in &reads {
        assert_eq!(ram.read(*data, 512)?, vec![0x77; 512]);
        ram.write(*data, &[REPLAY; 512])?;
        ram.write(req.status, &[0xee])?;
    }

    first.child.kill()?;
    // The dying process finishes only when its blocked writes return.
    drop(frozen);
    first.child.wait()?;
    drop(frontend);

    let second = Daemon::start("vhost-user-blk", &args)?;
    let mut frontend = connect(&second, &ram, 1, 256, &mut inflight)?;
    let region = inflight.as_ref().ok_or("no inflight buffer")?;
    let rewound = ring.used_idx(&ram)?;
    ring.start(&mut frontend, &ram, rewound)?;
    let done = ring.wait_used(&ram, 2)?;
    assert_eq!(done, vec![w1.head, w2.head], "exactly the writes in flight");
    assert_eq!(ram.read(w1.status, 1)?[0], S_OK);
    assert_eq!(ram.read(w2.status, 1)?[0], S_OK);
    for (req, data) in &reads {
        assert_eq!(ram.read(*data, 512)?, vec![REPLAY; 512], "a read ran again");
        assert_eq!(ram.read(req.status, 1)?[0], 0xee);
    }
    let disk = File::open(&disk_path)?;
    let mut sector = vec![0u8; 512];
    disk.read_exact_at(&mut sector, 100 * 512)?;
    assert_eq!(sector, vec![0xa1; 512]);
    disk.read_exact_at(&mut sector, 101 * 512)?;
    assert_eq!(sector, vec![0xa2; 512]);
    // And the ring carries on.
    let (w3, _) = write_request(&mut ring, &mut ram, 102, 0xa3)?;
    ring.publish(&ram, w3.head)?;
    ring.kick.write(1)?;
    assert_eq!(ring.wait_used(&ram, 1)?, vec![w3.head]);
    let deadline = Instant::now() + WAIT;
    while !region.in_flight(0)?.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(region.in_flight(0)?, vec![]);
    assert_eq!(frontend.get_vring_base(0)? as u16, ring.avail_idx);
    drop(frontend);
    drop(second);
    Ok(())
}

/// Under QEMU 7.2 (Debian 12's kernel) and QEMU 11 (the newest Debian kernel): a guest runs
/// fio random writes at iodepth 32 with crc32c verification while the daemon is SIGKILLed and
/// restarted three times (QEMU reconnects: `reconnect=1` / `reconnect-ms`). The disk is an
/// O_DIRECT file on a loop-mounted ext4, so io_uring completes requests out of order. Zero
/// verification errors, no I/O error in the guest, and the job finishes (no request lost: the
/// guest's driver has no timeout).
#[test]
fn qemu72_guest_fio_verify_survives_repeated_sigkill() -> Result<()> {
    use vhost_user_tests::guest::GuestKernel;
    use vhost_user_tests::qemu::QemuVersion;
    guest_fio_verify_survives_repeated_sigkill(
        QemuVersion::Qemu72,
        GuestKernel::Host,
        "",
        &ext4_disk,
    )
}

#[test]
fn qemu11_guest_fio_verify_survives_repeated_sigkill() -> Result<()> {
    use vhost_user_tests::guest::GuestKernel;
    use vhost_user_tests::qemu::QemuVersion;
    guest_fio_verify_survives_repeated_sigkill(
        QemuVersion::Qemu11,
        GuestKernel::Newest,
        "",
        &ext4_disk,
    )
}

/// The same on a Ceph RBD image (a throwaway cluster): librbd completes requests out of order
/// too, and the restarted daemon takes the image's exclusive lock over from the killed one.
#[cfg(feature = "rbd")]
#[test]
fn qemu72_guest_fio_verify_on_rbd_survives_repeated_sigkill() -> Result<()> {
    use vhost_user_tests::guest::GuestKernel;
    use vhost_user_tests::qemu::QemuVersion;
    guest_fio_verify_survives_repeated_sigkill(
        QemuVersion::Qemu72,
        GuestKernel::Host,
        "_rbd",
        &|| {
            let cluster = vhost_user_tests::ceph::Cluster::start()?;
            let spec = cluster.create_image("inflight", GUEST_DISK_SIZE)?;
            let args = vec![
                "--rbd".to_string(),
                spec,
                "--rbd-conf".into(),
                cluster.conf().display().to_string(),
                "--rbd-keyring".into(),
                cluster.keyring().display().to_string(),
            ];
            Ok(DiskUnderTest {
                args,
                frozen_during_kill: None,
                _keep: Box::new(cluster),
            })
        },
    )
}

/// The image [`guest_fio_verify_survives_repeated_sigkill`] serves (ext4 file or RBD image).
const GUEST_DISK_SIZE: u64 = 128 << 20;

/// A 128 MiB O_DIRECT file on a loop-mounted ext4 (io_uring completes out of order there),
/// frozen around each kill so that the guest's writes are certainly in flight.
fn ext4_disk() -> Result<DiskUnderTest> {
    let fs = Ext4::new()?;
    let disk = fs.mnt().join("disk.img");
    File::create(&disk)?.set_len(GUEST_DISK_SIZE)?;
    let args = vec![
        "--file".into(),
        disk.to_string_lossy().into_owned(),
        "--direct".into(),
    ];
    Ok(DiskUnderTest {
        args,
        frozen_during_kill: Some(fs.mnt()),
        _keep: Box::new(fs),
    })
}

/// What a daemon serves in [`guest_fio_verify_survives_repeated_sigkill`].
struct DiskUnderTest {
    args: Vec<String>,
    /// A file system to freeze before each kill: the writes the daemon takes then block, so
    /// the kill always leaves requests in flight. Without it (RBD), whether a kill catches
    /// any depends on the backend's latency: a fast disk and a slow TCG guest once gave a run
    /// in which none of three kills did.
    frozen_during_kill: Option<std::path::PathBuf>,
    /// What must live as long as the test (a mount, a cluster).
    _keep: Box<dyn std::any::Any>,
}

fn guest_fio_verify_survives_repeated_sigkill(
    version: vhost_user_tests::qemu::QemuVersion,
    kernel: vhost_user_tests::guest::GuestKernel,
    variant: &str,
    disk: &dyn Fn() -> Result<DiskUnderTest>,
) -> Result<()> {
    use vhost_user_tests::guest::Guest;
    use vhost_user_tests::qemu::{ensure, fio_verify_script, FioTerse, Logs, Qemu, Vm, VmConfig};
    // The guest's job must outlast three kill rounds however fast the machine: each round lets
    // about a second of I/O through, and 32 MiB (about two seconds of writes on an idle machine
    // here) once ended before the last kill.
    const FIO_SIZE: u64 = 96 << 20;
    const TIMEOUT: Duration = Duration::from_secs(300);
    let name = format!("inflight_{version:?}{variant}_guest_fio_verify_survives_repeated_sigkill");
    let logs = Logs::new(&name)?;
    let result = (|| -> Result<()> {
        let qemu = Qemu::get(version)?;
        let guest = Guest::with_kernel(kernel)?;
        let disk = disk()?;
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("blk.sock");
        let mut args: Vec<&str> = disk.args.iter().map(String::as_str).collect();
        args.extend(["--num-queues", "2"]);
        let script = format!(
            "{}echo \"E2E io_errors=$(dmesg | grep -c -i 'I/O error')\"\n",
            fio_verify_script(
                "inflight",
                "--ioengine=libaio --iodepth=32",
                FIO_SIZE,
                Some(500)
            )
        );
        let mut daemons = vec![Daemon::start_at(
            "vhost-user-blk",
            &args,
            socket.clone(),
            tempfile::tempdir()?,
        )?];
        let mut kept = vec![logs.keep(&daemons[0], "vhost-user-blk.0.log")];
        let config = VmConfig::new(&qemu, script).blk(&socket, 2, true);
        let mut vm = Vm::start(&guest, &config, &logs)?;
        vm.wait_for("io_running", TIMEOUT)?;
        for round in 1..=3 {
            std::thread::sleep(Duration::from_millis(700));
            let Some(old) = daemons.last_mut() else {
                break;
            };
            let frozen = match &disk.frozen_during_kill {
                Some(mnt) => {
                    let frozen = Frozen::new(mnt.clone())?;
                    // Long enough for the guest to submit and the daemon to take new writes.
                    std::thread::sleep(Duration::from_millis(300));
                    Some(frozen)
                }
                None => None,
            };
            // SIGKILL, this PID only. The dying process exits only when its blocked writes
            // return, before the next daemon resubmits them.
            old.child.kill()?;
            drop(frozen);
            old.child.wait()?;
            std::thread::sleep(Duration::from_millis(300));
            let mut new = Daemon::start_at(
                "vhost-user-blk",
                &args,
                socket.clone(),
                tempfile::tempdir()?,
            )?;
            kept.push(logs.keep(&new, &format!("vhost-user-blk.{round}.log")));
            new.wait_for_log("frontend connected", Duration::from_secs(20))
                .map_err(|e| format!("QEMU did not reconnect after kill {round}: {e}"))?;
            daemons.push(new);
        }
        let out = vm.finish(TIMEOUT, &|| false)?;
        let resumed = daemons
            .iter()
            .filter(|d| d.log_text().contains("request(s) to resubmit"))
            .count();
        eprintln!("{name}: {resumed} of 3 restarts resubmitted requests left in flight");
        FioTerse::verified_job(&out, FIO_SIZE)?;
        ensure(out.get_u64("io_errors")? == 0, || {
            "I/O errors in the guest".into()
        })?;
        ensure(resumed > 0, || {
            "no restart found requests in flight: the test did not test recovery".into()
        })?;
        // Frozen, the first kill (well inside fio's write phase) cannot miss.
        let first_restart_resumed = daemons
            .get(1)
            .is_some_and(|d| d.log_text().contains("request(s) to resubmit"));
        ensure(
            disk.frozen_during_kill.is_none() || first_restart_resumed,
            || "the file system was frozen, yet the first restart found nothing in flight".into(),
        )?;
        drop(kept);
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{name} failed: {e}\n{}", logs.report());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// vhost-user-console has no inflight tracking: what a restart loses or repeats there.

/// Connects as QEMU does to a device without INFLIGHT_SHMFD (here vhost-user-console, one
/// port: rx0 and tx0), then the memory table.
fn connect_plain(daemon: &Daemon, ram: &GuestRam, num_queues: usize) -> Result<Frontend> {
    let mut frontend = Frontend::connect(&daemon.socket, num_queues as u64)?;
    frontend.set_owner()?;
    let features = frontend.get_features()?;
    let offered = frontend.get_protocol_features()?;
    assert!(!offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    frontend.set_protocol_features(
        offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
    )?;
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_features(features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))?;
    frontend.set_mem_table(&[ram.region_info()?])?;
    Ok(frontend)
}

/// Reads until EOF or `timeout` without data.
fn read_to_end_within(stream: &mut std::os::unix::net::UnixStream, timeout: Duration) -> Vec<u8> {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(timeout));
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// vhost-user-console SIGKILLed while a client is not reading (back-pressure: the daemon holds
/// accepted output and stops taking transmit chains), then restarted; QEMU rewinds the ring to
/// the used index. The rings are exact: the new daemon sends every chain the old one had not
/// returned, in order, and none it had returned. What the old daemon had accepted but not
/// written is lost (at most its 64 KiB buffer), and a chain it was part-way through is sent
/// again from its start (at most one chain).
#[test]
fn console_restart_loses_only_its_buffer_and_repeats_at_most_one_chain() -> Result<()> {
    const CHAIN: usize = 16 * 1024;
    let dir = tempfile::tempdir()?;
    let first_ep = dir.path().join("first.sock");
    let second_ep = dir.path().join("second.sock");
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut ram = GuestRam::new(RAM)?;

    let mut first = Daemon::start(
        "vhost-user-console",
        &["--unix", &first_ep.to_string_lossy()],
    )?;
    let mut client = {
        let deadline = Instant::now() + WAIT;
        loop {
            match std::os::unix::net::UnixStream::connect(&first_ep) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    let mut frontend = connect_plain(&first, &ram, 2)?;
    let rx = Ring::new(&ram, 0, 256)?;
    let mut tx = Ring::new(&ram, 1, 256)?;
    rx.start(&mut frontend, &ram, 0)?;
    tx.start(&mut frontend, &ram, 0)?;
    let mut heads = Vec::new();
    for chunk in data.chunks(CHAIN) {
        let gpa = ram.alloc(chunk.len() as u64, 8);
        ram.write(gpa, chunk)?;
        let head = tx.next_desc;
        GuestQueue::write_desc(&ram, tx.desc, head, gpa, chunk.len() as u32, 0, 0)?;
        tx.next_desc = (head + 1) % tx.size;
        tx.publish(&ram, head)?;
        heads.push(head);
    }
    tx.kick.write(1)?;
    // Nobody reads: the daemon takes chains until its buffer and the socket's are full.
    std::thread::sleep(Duration::from_millis(500));
    let returned = usize::from(tx.used_idx(&ram)?);
    assert!(returned < heads.len(), "no back-pressure");
    tx.skip_used(&ram)?;
    first.child.kill()?;
    first.child.wait()?;
    drop(frontend);
    // What reached the client before the daemon died: a prefix of the stream.
    let before = read_to_end_within(&mut client, Duration::from_secs(2));
    assert_eq!(&before[..], &data[..before.len()]);

    let second = Daemon::start(
        "vhost-user-console",
        &["--unix", &second_ep.to_string_lossy()],
    )?;
    let mut client = std::os::unix::net::UnixStream::connect(&second_ep)?;
    let mut frontend = connect_plain(&second, &ram, 2)?;
    let rewound = tx.used_idx(&ram)?;
    rx.start(&mut frontend, &ram, rx.used_idx(&ram)?)?;
    tx.start(&mut frontend, &ram, rewound)?;
    let expected = &data[returned * CHAIN..];
    let mut after = Vec::new();
    let deadline = Instant::now() + WAIT;
    while after.len() < expected.len() && Instant::now() < deadline {
        after.extend(read_to_end_within(&mut client, Duration::from_millis(200)));
    }
    assert!(
        after == expected,
        "the new daemon sent {} bytes, expected the {} of the chains not returned",
        after.len(),
        expected.len()
    );
    let done = tx.wait_used(&ram, heads.len() - returned)?;
    assert_eq!(
        done,
        heads[returned..].to_vec(),
        "each chain used once, in order"
    );
    let accepted = returned * CHAIN;
    let lost = accepted.saturating_sub(before.len());
    let repeated = before.len().saturating_sub(accepted);
    eprintln!(
        "console restart: {returned} chains returned before the kill, {} bytes reached the \
         client; lost {lost} bytes (accepted, not written), repeated {repeated} bytes",
        before.len()
    );
    assert!(lost <= 64 * 1024, "lost more than the daemon's buffer");
    assert!(repeated <= CHAIN, "repeated more than one chain");
    drop(frontend);
    Ok(())
}
