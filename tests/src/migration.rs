//! Live migration as the VMM sees it: the dirty-page log a frontend shares with a backend
//! (SET_LOG_BASE, VHOST_F_LOG_ALL), and a QMP client to drive QEMU's own migration.
//!
//! For net (and console): SEND_RARP as QEMU sends it ([`send_rarp`]), two QEMUs migrating a
//! guest between them ([`MigratingVm`]), and what the network sees meanwhile ([`PingStream`],
//! [`Capture`], [`PacedSender`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use crate::guest::Guest;
use crate::netns::internet_checksum;
use crate::qemu::{Logs, Vm, VmConfig};
use crate::{Result, TestVmm};

/// `VHOST_F_LOG_ALL`: the frontend asks the backend to log its writes to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// The log's page (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// The dirty-page log as a frontend shares it: one bit per 4 KiB page of guest-physical
/// address space, in a memfd the backend maps.
pub struct DirtyLog {
    pub file: File,
    pub size: u64,
}

impl DirtyLog {
    /// A zeroed log covering guest-physical addresses `[0, covers)`.
    pub fn new(covers: u64) -> Result<DirtyLog> {
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-user-test-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let file = File::from(fd);
        let size = covers.div_ceil(LOG_PAGE).div_ceil(8);
        file.set_len(size)?;
        Ok(DirtyLog { file, size })
    }

    /// SET_LOG_BASE's description of this log.
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The guest page numbers marked dirty, in order.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        let mut bits = vec![0u8; self.size as usize];
        self.file.read_exact_at(&mut bits, 0)?;
        let mut pages = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.push(i as u64 * 8 + bit);
                }
            }
        }
        Ok(pages)
    }

    /// Clears every bit (what QEMU does after each pass over the log).
    pub fn clear(&self) -> Result<()> {
        self.file.write_all_at(&vec![0u8; self.size as usize], 0)?;
        Ok(())
    }
}

/// The pages `[gpa, gpa + len)` touches.
pub fn pages_of(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    gpa / LOG_PAGE..=(gpa + len.max(1) - 1) / LOG_PAGE
}

impl TestVmm {
    /// Every later request waits for the backend's acknowledgement (REPLY_ACK must have been
    /// negotiated): a feature change is in force before the test kicks a queue.
    pub fn acknowledge_every_request(&mut self) {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    /// SET_LOG_BASE with `log`.
    pub fn set_log(&mut self, log: &DirtyLog) -> Result<()> {
        self.frontend.set_log_base(0, Some(log.region()))?;
        Ok(())
    }

    /// SET_FEATURES with or without VHOST_F_LOG_ALL (what QEMU sends when a migration starts
    /// and when it ends).
    pub fn log_all(&mut self, on: bool) -> Result<()> {
        if on {
            self.acked_features |= VHOST_F_LOG_ALL;
        } else {
            self.acked_features &= !VHOST_F_LOG_ALL;
        }
        self.frontend.set_features(self.acked_features)?;
        Ok(())
    }
}

/// A QMP connection to QEMU (`-qmp unix:PATH,server=on,wait=off`), capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path`, waiting up to `timeout` for QEMU to create it.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()).into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}").into());
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err("QEMU closed the QMP connection".into());
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` and returns its `return` value; events that arrive meanwhile are skipped.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command}: {error}").into());
            }
        }
    }
}

/// What QEMU's `query-migrate` reported for a completed migration.
#[derive(Debug, Clone)]
pub struct MigrationStats {
    /// How long the guest was stopped (ms): the last pass over dirty memory, device state,
    /// and stopping and starting the devices (the backends' GET_VRING_BASE drain included).
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// RAM sent, in bytes.
    pub transferred: u64,
    /// Passes over the dirty log.
    pub dirty_sync_count: u64,
}

/// How fast a migration may send (bytes/s) and how long it may stop the guest at the end.
#[derive(Debug, Clone, Copy)]
pub struct MigrationLimits {
    pub bandwidth: u64,
    pub downtime_ms: u64,
}

impl MigrationLimits {
    /// As fast as this machine goes (both QEMUs are here), with QEMU's default downtime limit.
    pub const FULL_SPEED: MigrationLimits = MigrationLimits {
        bandwidth: 4 << 30,
        downtime_ms: 300,
    };

    /// Sets the limits of `source`'s migrations (also while one runs).
    pub fn apply(self, source: &mut Qmp) -> Result<()> {
        source.execute(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": self.bandwidth, "downtime-limit": self.downtime_ms }),
        )?;
        Ok(())
    }
}

/// Starts migrating the VM behind `source` to `uri` within `limits`.
pub fn start_migration(source: &mut Qmp, uri: &str, limits: MigrationLimits) -> Result<()> {
    limits.apply(source)?;
    source.execute("migrate", serde_json::json!({ "uri": uri }))?;
    Ok(())
}

/// `query-migrate`, failing if the migration failed or was cancelled: (status, everything).
pub fn query_migrate(source: &mut Qmp) -> Result<(String, serde_json::Value)> {
    let info = source.execute("query-migrate", serde_json::json!({}))?;
    let status = info
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string();
    if status == "failed" || status == "cancelled" {
        return Err(format!("migration {status}: {info}").into());
    }
    Ok((status, info))
}

/// Waits until QEMU has made `passes` passes over the dirty log (the first pass over all of
/// memory is done when `passes` is 2).
pub fn wait_dirty_syncs(source: &mut Qmp, passes: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, info) = query_migrate(source)?;
        let syncs = info
            .get("ram")
            .and_then(|ram| ram.get("dirty-sync-count"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if syncs >= passes {
            return Ok(());
        }
        if status == "completed" {
            return Err(format!("the migration completed after {syncs} passes").into());
        }
        if Instant::now() > deadline {
            return Err(format!("{syncs} dirty-log passes after {timeout:?}: {info}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to `timeout`) until QEMU reports the migration completed.
pub fn wait_migrated(source: &mut Qmp, timeout: Duration) -> Result<MigrationStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, info) = query_migrate(source)?;
        if status == "completed" {
            let number = |key: &str| info.get(key).and_then(serde_json::Value::as_u64);
            let ram = |key: &str| {
                info.get("ram")
                    .and_then(|ram| ram.get(key))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            return Ok(MigrationStats {
                downtime_ms: number("downtime")
                    .ok_or_else(|| format!("query-migrate has no downtime: {info}"))?,
                total_ms: number("total-time").unwrap_or(0),
                transferred: ram("transferred"),
                dirty_sync_count: ram("dirty-sync-count"),
            });
        }
        if Instant::now() > deadline {
            return Err(format!("migration not completed after {timeout:?}: {info}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `-incoming`).
pub fn free_tcp_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends `VHOST_USER_SEND_RARP` for `mac` on the frontend's connection, with NEED_REPLY, and
/// returns the backend's answer (0: done). `vhost`'s frontend has no method for it: the message
/// is written by hand (header: request 19, flags version 1 | NEED_REPLY, size 8; payload: the
/// MAC in the first 6 bytes of a u64), with nothing else in flight on the connection.
pub fn send_rarp(frontend: &Frontend, mac: [u8; 6]) -> Result<u64> {
    const SEND_RARP: u32 = 19;
    const VERSION: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&SEND_RARP.to_le_bytes());
    msg.extend_from_slice(&(VERSION | NEED_REPLY).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&mac);
    msg.extend_from_slice(&[0, 0]);
    let fd = frontend.as_raw_fd();
    // SAFETY: `msg` is valid for reads of its length during the call.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if sent != msg.len() as isize {
        return Err(format!("SEND_RARP: send: {}", std::io::Error::last_os_error()).into());
    }
    let mut reply = [0u8; 20];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < reply.len() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        // SAFETY: the rest of `reply` is valid for writes of its length during the call.
        let n = unsafe {
            libc::recv(
                fd,
                reply[got..].as_mut_ptr().cast(),
                reply.len() - got,
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return Err("SEND_RARP: the backend closed the connection".into());
        }
        if n > 0 {
            got += n as usize;
        } else if Instant::now() > deadline {
            return Err("SEND_RARP: no reply within 5 s".into());
        }
    }
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) != SEND_RARP || word(4) & REPLY == 0 || word(8) != 8 {
        return Err(format!("SEND_RARP: unexpected reply header {:?}", &reply[..12]).into());
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..]);
    Ok(u64::from_le_bytes(value))
}

// ---------------------------------------------------------------------------------------------
// Two QEMUs migrating one guest (net: tests/tests/e2e_qemu.rs, `net_migration`)

/// What a completed migration took, as the source QEMU reports it and as the test saw it.
#[derive(Debug, Clone)]
pub struct Migration {
    /// When `migrate` was sent.
    pub started: Instant,
    /// When the source first reported `completed` (polled every 5 ms).
    pub completed: Instant,
    /// When the destination first reported `running` (polled every 5 ms).
    pub destination_running: Instant,
    /// The source's `total-time` and `downtime` (the guest paused), in ms.
    pub total_ms: u64,
    pub downtime_ms: u64,
    /// RAM bytes sent.
    pub ram_bytes: u64,
}

/// A guest on a source QEMU and a destination QEMU waiting for it (`-incoming`), each with a
/// QMP socket: the same machine, each with its own devices (their own daemons' sockets).
pub struct MigratingVm {
    pub source: Vm,
    pub destination: Vm,
    source_qmp: PathBuf,
    destination_qmp: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl MigratingVm {
    /// Boots `guest` on `source` and starts `destination` (which must describe the same
    /// machine) listening for the migration on 127.0.0.1. Each keeps its evidence in its own
    /// log directory.
    pub fn start(
        guest: &Guest,
        source: &VmConfig,
        destination: &VmConfig,
        source_logs: &Logs,
        destination_logs: &Logs,
    ) -> Result<MigratingVm> {
        // QEMU 11 runs in a chroot where /tmp is bound at the same path: the sockets go there.
        let dir = tempfile::Builder::new()
            .prefix("vhost-migration-")
            .tempdir_in("/tmp")?;
        let source_qmp = dir.path().join("source.qmp");
        let destination_qmp = dir.path().join("destination.qmp");
        let port = free_tcp_port()?;
        let mut src = source.clone();
        src.qmp = Some(source_qmp.clone());
        let mut dst = destination.clone();
        dst.qmp = Some(destination_qmp.clone());
        dst.incoming = Some(format!("tcp:127.0.0.1:{port}"));
        let destination = Vm::start(guest, &dst, destination_logs)?;
        let source = Vm::start(guest, &src, source_logs)?;
        Ok(MigratingVm {
            source,
            destination,
            source_qmp,
            destination_qmp,
            port,
            _dir: dir,
        })
    }

    /// Migrates the running guest to the destination (no bandwidth cap, QEMU's default 300 ms
    /// downtime limit) and waits up to `timeout` for it to complete and run there.
    pub fn migrate(&mut self, timeout: Duration) -> Result<Migration> {
        let mut src = Qmp::connect(&self.source_qmp, Duration::from_secs(10))?;
        let mut dst = Qmp::connect(&self.destination_qmp, Duration::from_secs(10))?;
        // QEMU 7.2 caps migration at 32 MiB/s by default; loopback needs no cap.
        let started = Instant::now();
        let uri = format!("tcp:127.0.0.1:{}", self.port);
        start_migration(&mut src, &uri, MigrationLimits::FULL_SPEED)?;
        let deadline = started + timeout;
        let mut completed: Option<(Instant, serde_json::Value)> = None;
        let mut running: Option<Instant> = None;
        loop {
            if completed.is_none() {
                let info = src.execute("query-migrate", serde_json::json!({}))?;
                match info.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => completed = Some((Instant::now(), info)),
                    Some("failed") | Some("cancelled") => {
                        return Err(format!("the migration failed: {info}").into())
                    }
                    _ => {}
                }
            }
            if running.is_none() {
                let status = dst.execute("query-status", serde_json::json!({}))?;
                if status.get("status").and_then(|s| s.as_str()) == Some("running") {
                    running = Some(Instant::now());
                }
            }
            if let (Some((at, info)), Some(destination_running)) = (&completed, running) {
                let number = |key: &str| info.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
                let ram_bytes = info
                    .get("ram")
                    .and_then(|r| r.get("transferred"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                return Ok(Migration {
                    started,
                    completed: *at,
                    destination_running,
                    total_ms: number("total-time"),
                    downtime_ms: number("downtime"),
                    ram_bytes,
                });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the migration did not complete within {timeout:?} (source completed: {}, destination running: {})",
                    completed.is_some(),
                    running.is_some()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the network across a migration

/// ICMP echo requests sent at a fixed interval from inside a network namespace, and the
/// replies: what `ping -D -i` shows, with every sequence number and time kept.
pub struct PingStream {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<PingLog>>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// What a [`PingStream`] saw.
#[derive(Debug, Default, Clone)]
pub struct PingLog {
    /// When each request was sent (index = sequence number).
    pub sent: Vec<Instant>,
    /// Each reply's sequence number and arrival time, in arrival order.
    pub replies: Vec<(u16, Instant)>,
}

impl PingLog {
    /// Requests without a reply.
    pub fn lost(&self) -> usize {
        let answered: BTreeSet<u16> = self.replies.iter().map(|(s, _)| *s).collect();
        (0..self.sent.len())
            .filter(|&s| !answered.contains(&(s as u16)))
            .count()
    }

    /// The longest time without a reply that ended after `after`, and when it ended.
    pub fn longest_gap_after(&self, after: Instant) -> Option<(Duration, Instant)> {
        self.replies
            .windows(2)
            .filter(|w| w[1].1 > after)
            .map(|w| (w[1].1 - w[0].1, w[1].1))
            .max_by_key(|(gap, _)| *gap)
    }

    /// Requests sent at or after `from` without a reply.
    pub fn lost_after(&self, from: Instant) -> usize {
        let answered: BTreeSet<u16> = self.replies.iter().map(|(s, _)| *s).collect();
        (0..self.sent.len())
            .filter(|&s| self.sent[s] >= from && !answered.contains(&(s as u16)))
            .count()
    }
}

impl PingStream {
    /// Pings `to` every `interval` from the network namespace `netns`.
    pub fn start(netns: &str, to: Ipv4Addr, interval: Duration) -> Result<PingStream> {
        let ns_path = format!("/var/run/netns/{netns}");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let log = Arc::new(Mutex::new(PingLog::default()));
        let logging = log.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let socket = match icmp_socket(&ns_path) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
            };
            ping_loop(&socket, to, interval, &stopping, &logging)
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PingStream { stop, log, thread }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the ping thread died".into()),
        }
    }

    /// Replies so far.
    pub fn replies(&self) -> usize {
        lock(&self.log).replies.len()
    }

    /// Stops sending, waits a second for late replies and returns the log.
    pub fn finish(self) -> Result<PingLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the ping thread panicked")??;
        Ok(lock(&self.log).clone())
    }
}

/// A raw ICMP socket in the namespace at `ns_path` (the calling thread enters it for good:
/// call from a thread of its own).
fn icmp_socket(ns_path: &str) -> Result<OwnedFd> {
    let ns = File::open(ns_path)?;
    // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn ping_loop(
    socket: &OwnedFd,
    to: Ipv4Addr,
    interval: Duration,
    stop: &AtomicBool,
    log: &Mutex<PingLog>,
) -> Result<()> {
    let id = (std::process::id() & 0xffff) as u16;
    let mut next = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut buf = [0u8; 1500];
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dest.sin_family = libc::AF_INET as u16;
    dest.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
    loop {
        let now = Instant::now();
        if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
            stopped_at = Some(now);
        }
        if stopped_at.is_some_and(|t| now - t > Duration::from_secs(1)) {
            return Ok(());
        }
        if stopped_at.is_none() && now >= next {
            let seq = lock(log).sent.len() as u16;
            let mut packet = vec![8u8, 0, 0, 0];
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(&seq.to_be_bytes());
            packet.extend((0..48u8).map(|i| i.wrapping_add(seq as u8)));
            let sum = internet_checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
            // SAFETY: `packet` and `dest` are valid for reads of the lengths passed.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&dest as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            lock(log).sent.push(now);
            next += interval;
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 1) };
        loop {
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = buf.get(ihl..n).unwrap_or_default();
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                lock(log)
                    .replies
                    .push((u16::from_be_bytes([icmp[6], icmp[7]]), Instant::now()));
            }
        }
    }
}

/// Locks `mutex`, also when a panicking thread poisoned it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Frames seen on one interface (an AF_PACKET socket in its namespace), with their arrival
/// times, until stopped: the test's packet capture.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<CapturedFrame>>,
}

/// One captured frame: when, its direction (`PACKET_OUTGOING` for frames the interface sent
/// out) and its first bytes.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    pub at: Instant,
    pub pkttype: u8,
    pub head: Vec<u8>,
}

impl CapturedFrame {
    /// The frame's EtherType.
    pub fn ethertype(&self) -> Option<u16> {
        Some(u16::from_be_bytes([
            *self.head.get(12)?,
            *self.head.get(13)?,
        ]))
    }

    /// The source MAC address.
    pub fn source(&self) -> Option<&[u8]> {
        self.head.get(6..12)
    }
}

impl Capture {
    /// Starts capturing on `ifname` in `netns`.
    pub fn start(netns: &str, ifname: &str) -> Result<Capture> {
        let fd = crate::netns::packet_socket(
            netns,
            ifname,
            libc::ETH_P_ALL as u16,
            libc::SOCK_NONBLOCK,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 70_000];
            while !stopping.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                loop {
                    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: `buf` and `from` are valid for writes of the lengths passed.
                    let n = unsafe {
                        libc::recvfrom(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            libc::MSG_DONTWAIT,
                            (&mut from as *mut libc::sockaddr_ll).cast(),
                            &mut len,
                        )
                    };
                    if n < 0 {
                        break;
                    }
                    frames.push(CapturedFrame {
                        at: Instant::now(),
                        pkttype: from.sll_pkttype,
                        head: buf[..(n as usize).min(64)].to_vec(),
                    });
                }
            }
            frames
        });
        Ok(Capture { stop, thread })
    }

    /// Stops and returns every frame seen.
    pub fn finish(self) -> Result<Vec<CapturedFrame>> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self
            .thread
            .join()
            .map_err(|_| "the capture thread panicked")?)
    }
}

/// A TCP stream of known bytes sent from inside a network namespace at a bounded rate, so that
/// it lasts long enough to cross a migration; the receiver checks what arrived.
pub struct PacedSender {
    thread: std::thread::JoinHandle<Result<()>>,
}

impl PacedSender {
    /// Connects from `netns` to `to` (retrying for 30 s while nothing listens) and sends
    /// `data` at no more than `bytes_per_second`, then closes.
    pub fn start(
        netns: &str,
        to: std::net::SocketAddr,
        data: Vec<u8>,
        bytes_per_second: usize,
    ) -> Result<PacedSender> {
        let ns_path = format!("/var/run/netns/{netns}");
        let thread = std::thread::spawn(move || -> Result<()> {
            let ns = File::open(&ns_path)?;
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut stream = loop {
                match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("connect to {to}: {e}").into())
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            let chunk = (bytes_per_second / 50).max(1);
            let started = Instant::now();
            for (i, part) in data.chunks(chunk).enumerate() {
                stream.write_all(part)?;
                // Chunk i is due at i / 50 s.
                let due = started + Duration::from_millis(20 * (i as u64 + 1));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        });
        Ok(PacedSender { thread })
    }

    /// Waits until everything was sent.
    pub fn finish(self) -> Result<()> {
        self.thread
            .join()
            .map_err(|_| "the sender thread panicked")?
    }
}
