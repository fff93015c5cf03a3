//! console benchmark: vhost-user-console against rust-vmm's vhost-device-console, both with a
//! TCP endpoint, driven by the same frontend: this program, acting as the VMM and the guest's
//! virtio-console driver (one port, no MULTIPORT, EVENT_IDX) over the daemon's socket, and as
//! the TCP client on the host side.
//!
//! Cases:
//!
//! - **guest-to-host**: the guest keeps `depth` 64 KiB transmit chains in flight; the TCP client
//!   reads and checks every byte. Throughput is what reached the client.
//! - **host-to-guest**: the client writes as fast as the endpoint takes it; the guest keeps
//!   `depth` 32 KiB receive buffers posted and checks every byte it gets. (32 KiB, not 64 KiB:
//!   vhost-device-console adds one used entry per byte, and 65536 entries would wrap the 16-bit
//!   used index back to where it was.)
//! - **ping-pong**: the guest sends 1 byte, the client answers 1 byte, the guest posts a receive
//!   buffer and waits for the answer in it; p50 / p99 of the round trip.
//!
//! In the throughput rows one op is 1 KB (1000 bytes) moved, so "backend CPU µs/op" × 1000 is
//! the backend's CPU µs per MB. The data is printable ASCII (vhost-device-console turns guest
//! output into a `String` and panics on anything else) following a known pattern, so every
//! byte is checked: a mismatch from our daemon is an error, from the peer a note.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_tests::{GuestRam, Negotiate, TestVmm, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::report::{process_cpu_time, Latencies, Measurement, Result, Table};
use crate::Options;

const OURS: &str = "vhost-user-console";
const PEER: &str = "vhost-device-console";
const RAM: u64 = 64 << 20;
/// vhost-device-console's largest queue; used for both.
const QUEUE_SIZE: u16 = 128;
const RX: usize = 0;
const TX: usize = 1;
const TX_BASE: u64 = 16 << 20;
const RX_BASE: u64 = 40 << 20;
const TX_CHUNK: usize = 64 * 1024;
const RX_CHUNK: usize = 32 * 1024;
/// The data pattern: byte `i` of a stream is `33 + i % PERIOD` (printable ASCII).
const PERIOD: usize = 89;
const STALL: Duration = Duration::from_secs(5);
/// Ping-pong: how late an answer may be before the guest suspects lost receive buffers.
const LOST_AFTER: Duration = Duration::from_millis(5);

/// Options of `vhost-user-bench console`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsoleArgs {
    /// Chains (guest-to-host) and receive buffers (host-to-guest) the guest keeps in flight.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub depth: u16,

    /// The vhost-device-console binary [default: from PATH, then ~/.cargo/bin].
    #[arg(long, value_name = "PATH")]
    pub peer_bin: Option<PathBuf>,

    /// Measure our daemon only.
    #[arg(long)]
    pub no_peer: bool,
}

impl Default for ConsoleArgs {
    fn default() -> Self {
        ConsoleArgs {
            depth: 8,
            peer_bin: None,
            no_peer: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Ours,
    Peer,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Ours => OURS,
            Subject::Peer => PEER,
        }
    }
}

pub fn run(opts: &Options, args: &ConsoleArgs) -> Result<()> {
    if !(1..=QUEUE_SIZE / 2).contains(&args.depth) {
        return Err(format!("--depth {}: must be 1 to {}", args.depth, QUEUE_SIZE / 2).into());
    }
    let ours_bin = opts.daemon(OURS);
    if !ours_bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release) or pass --bin-dir",
            ours_bin.display()
        )
        .into());
    }
    let mut subjects = vec![(Subject::Ours, ours_bin)];
    if args.no_peer {
        eprintln!("console: --no-peer: measuring {OURS} only");
    } else {
        match find_peer(args.peer_bin.as_deref()) {
            Some(bin) => subjects.push((Subject::Peer, bin)),
            None => eprintln!(
                "console: {PEER} not found (cargo install --locked vhost-device-console, or \
                 --peer-bin): measuring {OURS} only"
            ),
        }
    }
    let duration = opts.case_duration();
    let warmup = if opts.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let dir = tempfile::Builder::new().prefix("vub-console-").tempdir()?;
    let mut table = Table::new(
        "console: vhost-user-console vs vhost-device-console, TCP endpoint, frontend in-process \
         (throughput rows: 1 op = 1 KB, so CPU µs/op x 1000 = backend CPU µs per MB)",
        OURS,
    );
    let mut notes = Vec::new();
    let cases = [
        format!("guest-to-host {}KiB x{}", TX_CHUNK / 1024, args.depth),
        format!("host-to-guest {}KiB x{}", RX_CHUNK / 1024, args.depth),
        "ping-pong 1B".to_string(),
    ];
    // Subjects take turns case by case, each on a fresh daemon, so that slow drifts of a
    // shared machine hit both alike.
    for (i, case) in cases.iter().enumerate() {
        if !opts.selected(case) {
            continue;
        }
        for (subject, bin) in &subjects {
            let mut session = Session::start(*subject, bin, dir.path())?;
            // Every case starts with a little guest output, which also makes
            // vhost-device-console start passing host input to the guest (it waits for the
            // first transmit kick).
            session.prime()?;
            let outcome = match i {
                0 => session.guest_to_host(args.depth, warmup, duration),
                1 => session.host_to_guest(args.depth, warmup, duration),
                _ => session.ping_pong(warmup, duration),
            };
            match outcome {
                Ok(m) => {
                    session.check_alive()?;
                    if session.lost_rx > 0 {
                        notes.push(format!(
                            "{case}, {}: the device took {} receive buffer(s) and never gave \
                             them back (the guest posted more to go on; a real driver would have \
                             lost them)",
                            subject.name(),
                            session.lost_rx
                        ));
                    }
                    if let (Some(cpu), true) = (m.backend_cpu, m.bytes >= 1_000_000 && i < 2) {
                        notes.push(format!(
                            "{case}, {}: backend CPU {:.0} µs per MB",
                            subject.name(),
                            cpu.as_secs_f64() * 1e6 / (m.bytes as f64 / 1e6)
                        ));
                    }
                    table.push(case, subject.name(), m);
                }
                Err(e) => {
                    session.check_alive()?;
                    if *subject == Subject::Ours {
                        return Err(format!("{case}, {OURS}: {e}").into());
                    }
                    eprintln!(
                        "  {case}, {PEER}: failed: {e}; its log ends with:\n{}",
                        session.log_tail(8)
                    );
                    notes.push(format!("{case}, {PEER}: failed: {e}"));
                }
            }
            session.finish()?;
        }
    }
    table.print();
    if !notes.is_empty() {
        println!("Notes:");
        for note in &notes {
            println!("- {note}");
        }
    }
    Ok(())
}

fn find_peer(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.exists().then(|| path.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home)
        .map(|dir| dir.join(PEER))
        .find(|p| p.exists())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Byte `i` of the test stream.
fn pattern_byte(i: u64) -> u8 {
    33 + (i % PERIOD as u64) as u8
}

/// `len` bytes of the stream from `offset`, taken from a precomputed `pattern`.
fn pattern_at(pattern: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = (offset % PERIOD as u64) as usize;
    &pattern[start..start + len]
}

fn make_pattern(len: usize) -> Vec<u8> {
    (0..(len + PERIOD) as u64).map(pattern_byte).collect()
}

/// Checks `data` against the stream at `offset`.
fn check(pattern: &[u8], offset: u64, data: &[u8]) -> Result<()> {
    if data == pattern_at(pattern, offset, data.len()) {
        return Ok(());
    }
    let at = data
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_byte(offset + i as u64))
        .unwrap_or(0);
    Err(format!(
        "data corrupted at stream byte {}: got {:#04x}, expected {:#04x}",
        offset + at as u64,
        data.get(at).copied().unwrap_or(0),
        pattern_byte(offset + at as u64)
    )
    .into())
}

/// The guest side of one split virtqueue with single-descriptor chains: descriptor `slot` always
/// points at buffer `slot`, so a used entry's id names the buffer.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    base: u64,
    chunk: usize,
    avail_idx: u16,
    published: u16,
    last_used: u16,
    /// Slots the device holds, with the length posted.
    outstanding: HashMap<u16, u32>,
    free: Vec<u16>,
    /// Used entries for a slot the device did not hold, or more entries than the ring has.
    violations: u64,
    /// Of those: entries beyond the ring's size at once (several for one buffer).
    overrun: u64,
}

impl Ring {
    fn new(vmm: &TestVmm, index: usize, base: u64, chunk: usize, depth: u16) -> Result<Ring> {
        let q = &vmm.queues[index];
        Ok(Ring {
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            kick: q.kick.try_clone()?,
            call: q.call.try_clone()?,
            base,
            chunk,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            outstanding: HashMap::new(),
            free: (0..depth).rev().collect(),
            violations: 0,
            overrun: 0,
        })
    }

    fn buffer(&self, slot: u16) -> u64 {
        self.base + u64::from(slot) * self.chunk as u64
    }

    /// Makes buffer `slot` (its first `len` bytes) available; visible after `publish`.
    fn post(&mut self, ram: &GuestRam, slot: u16, len: u32, writable: bool) -> Result<()> {
        let at = self.desc + 16 * u64::from(slot);
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&self.buffer(slot).to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&(if writable { 2u16 } else { 0 }).to_le_bytes());
        ram.mem.write_slice(&desc, GuestAddress(at))?;
        let entry = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        ram.mem.write_obj(slot.to_le(), GuestAddress(entry))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.outstanding.insert(slot, len);
        Ok(())
    }

    /// Publishes the posted chains and kicks if the device asked for it (EVENT_IDX).
    fn publish(&mut self, ram: &GuestRam) -> Result<()> {
        if self.avail_idx == self.published {
            return Ok(());
        }
        fence(Ordering::SeqCst);
        ram.mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )?;
        fence(Ordering::SeqCst);
        let event_at = self.used + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(ram.mem.load(GuestAddress(event_at), Ordering::Acquire)?);
        let (new, old) = (self.avail_idx, self.published);
        self.published = new;
        // vring_need_event(event, new, old)
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kick.write(1)?;
        }
        Ok(())
    }

    /// Takes the used entries (slot, len), asks for an interrupt at the next one, and checks
    /// once more for entries that came meanwhile. Several entries for one slot in one call
    /// count once, with the largest length (vhost-device-console adds one per byte).
    fn reap(&mut self, ram: &GuestRam, out: &mut Vec<(u16, u32)>) -> Result<()> {
        out.clear();
        loop {
            let idx = u16::from_le(
                ram.mem
                    .load(GuestAddress(self.used + 2), Ordering::Acquire)?,
            );
            fence(Ordering::SeqCst);
            let mut pending = idx.wrapping_sub(self.last_used);
            if pending == 0 {
                break;
            }
            if pending > self.size {
                // The device wrote more entries than the ring holds: the oldest are gone.
                self.violations += u64::from(pending - self.size);
                self.overrun += u64::from(pending - self.size);
                self.last_used = idx.wrapping_sub(self.size);
                pending = self.size;
            }
            for _ in 0..pending {
                let slot_at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
                let mut entry = [0u8; 8];
                ram.mem.read_slice(&mut entry, GuestAddress(slot_at))?;
                let id = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let len = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
                self.last_used = self.last_used.wrapping_add(1);
                match out.iter_mut().find(|(s, _)| u32::from(*s) == id) {
                    Some(seen) => seen.1 = seen.1.max(len),
                    None => match u16::try_from(id) {
                        Ok(slot) if self.outstanding.contains_key(&slot) => out.push((slot, len)),
                        _ => self.violations += 1,
                    },
                }
            }
            ram.mem.store(
                self.last_used.to_le(),
                GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
                Ordering::Release,
            )?;
            fence(Ordering::SeqCst);
        }
        for &(slot, _) in out.iter() {
            self.outstanding.remove(&slot);
            self.free.push(slot);
        }
        Ok(())
    }

    /// True when the device has taken (popped) every chain published: its `avail_event`
    /// (EVENT_IDX) is the driver's avail index.
    fn device_took_all(&self, ram: &GuestRam) -> Result<bool> {
        let event_at = self.used + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(ram.mem.load(GuestAddress(event_at), Ordering::Acquire)?);
        Ok(event == self.published)
    }

    /// Waits up to `timeout` for an interrupt.
    fn wait(&self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = timeout.as_millis().clamp(1, 1000) as i32;
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        let _ = self.call.read();
    }
}

/// A daemon, the frontend connected to it, and the TCP client of its console endpoint.
struct Session {
    subject: Subject,
    child: KillOnDrop,
    log: PathBuf,
    vmm: TestVmm,
    tx: Ring,
    rx: Ring,
    tcp: TcpStream,
    pattern: Vec<u8>,
    /// Receive buffers posted again because the device took them and never gave them back.
    lost_rx: u64,
}

impl Session {
    fn start(subject: Subject, bin: &Path, dir: &Path) -> Result<Session> {
        let port = free_port()?;
        let tag = format!(
            "{}-{port}",
            if subject == Subject::Ours { "o" } else { "p" }
        );
        let log = dir.join(format!("{tag}.log"));
        let (socket, mut command) = match subject {
            Subject::Ours => {
                let socket = dir.join(format!("{tag}.sock"));
                let mut c = Command::new(bin);
                c.arg("--socket-path")
                    .arg(&socket)
                    .args(["--tcp", &format!("127.0.0.1:{port}")])
                    .args(["--log-level", "warn"]);
                (socket, c)
            }
            Subject::Peer => {
                // It appends the socket's index to the path.
                let base = dir.join(format!("{tag}.sock"));
                let mut socket = base.clone().into_os_string();
                socket.push("0");
                let mut c = Command::new(bin);
                c.arg("--socket-path")
                    .arg(&base)
                    .args(["-b", "network", "-p", &port.to_string()]);
                (PathBuf::from(socket), c)
            }
        };
        let out = std::fs::File::create(&log)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                return Err(format!(
                    "{} exited ({status}): {}",
                    subject.name(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
                .into());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: socket never appeared", subject.name()).into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let negotiate = Negotiate {
            features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK,
        };
        let vmm = match TestVmm::connect(&socket, RAM, 4, QUEUE_SIZE, negotiate) {
            Ok(vmm) => vmm,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: frontend: {e}", subject.name()).into());
            }
        };
        let tx = Ring::new(&vmm, TX, TX_BASE, TX_CHUNK, QUEUE_SIZE / 2)?;
        let rx = Ring::new(&vmm, RX, RX_BASE, RX_CHUNK, QUEUE_SIZE / 2)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let tcp = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("{}: TCP endpoint: {e}", subject.name()).into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        tcp.set_nodelay(true)?;
        Ok(Session {
            subject,
            child: KillOnDrop(child),
            log,
            vmm,
            tx,
            rx,
            tcp,
            pattern: make_pattern(TX_CHUNK.max(RX_CHUNK)),
            lost_rx: 0,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.0.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            return Err(format!(
                "{} died ({status}):\n{}",
                self.subject.name(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
            .into());
        }
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn cpu(&self) -> Result<Duration> {
        process_cpu_time(self.child.0.id())
    }

    /// Sends "hello" from the guest and waits for it on the client: the endpoint has accepted
    /// us and the device moves data.
    fn prime(&mut self) -> Result<()> {
        let hello = b"hello\n";
        let slot = self.tx.free.pop().ok_or("no free transmit slot")?;
        self.vmm
            .ram
            .write(self.tx.buffer(slot), hello)
            .map_err(|e| format!("guest RAM: {e}"))?;
        self.tx
            .post(&self.vmm.ram, slot, hello.len() as u32, false)?;
        self.tx.publish(&self.vmm.ram)?;
        self.tcp
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let mut used = Vec::new();
        while got.len() < hello.len() || !self.tx.outstanding.is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: the guest's first output never reached the TCP client (got {:?})",
                    self.subject.name(),
                    String::from_utf8_lossy(&got)
                )
                .into());
            }
            self.check_alive()?;
            self.tx.reap(&self.vmm.ram, &mut used)?;
            if got.len() < hello.len() {
                match self.tcp.read(&mut buf) {
                    Ok(0) => return Err("the TCP endpoint closed".into()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if is_timeout(&e) => {
                        // Kick again: the endpoint may not have been accepted at the first one.
                        self.tx.kick.write(1)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                self.tx.wait(Duration::from_millis(10));
            }
        }
        if got != hello {
            return Err(format!(
                "{}: the client got {:?} instead of \"hello\"",
                self.subject.name(),
                String::from_utf8_lossy(&got)
            )
            .into());
        }
        Ok(())
    }

    /// Guest → host: `depth` transmit chains of TX_CHUNK bytes in flight; the client reads and
    /// checks everything.
    fn guest_to_host(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
    ) -> Result<Measurement> {
        let received = AtomicU64::new(0);
        let target = AtomicU64::new(u64::MAX);
        let failed = AtomicBool::new(false);
        let reader_stream = self.tcp.try_clone()?;
        reader_stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let pattern = self.pattern.clone();
        std::thread::scope(|scope| -> Result<Measurement> {
            let reader = scope.spawn(|| {
                let r = read_and_check(reader_stream, &pattern, &received, &target);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            });
            let driven = self.drive_tx(depth, warmup, duration, &received, &failed);
            // Whatever happened, let the reader finish: it stops at the total sent, or on its
            // own timeout.
            let sent = match &driven {
                Ok((_, sent)) => *sent,
                Err(_) => 0,
            };
            target.store(sent, Ordering::Relaxed);
            let read = reader.join().map_err(|_| "the TCP reader panicked")?;
            let (m, _) = driven?;
            read?;
            Ok(m)
        })
    }

    /// The guest side of `guest_to_host`: returns the measurement and the bytes sent in all.
    fn drive_tx(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
        received: &AtomicU64,
        failed: &AtomicBool,
    ) -> Result<(Measurement, u64)> {
        let ram = &self.vmm.ram;
        let tx = &mut self.tx;
        let mut offset = 0u64;
        let mut used = Vec::new();
        let start = Instant::now();
        let mut mark: Option<(Instant, u64, Duration)> = None;
        let mut result = None;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((
                    now,
                    received.load(Ordering::Relaxed),
                    process_cpu_time(self.child.0.id())?,
                ));
            }
            if let Some((t0, b0, cpu0)) = mark {
                if result.is_none() && now >= t0 + duration {
                    let bytes = received.load(Ordering::Relaxed) - b0;
                    let cpu = process_cpu_time(self.child.0.id())?.saturating_sub(cpu0);
                    result = Some(throughput(bytes, now - t0, cpu));
                }
            }
            let draining = result.is_some();
            if !draining {
                while tx.outstanding.len() < usize::from(depth) {
                    let Some(slot) = tx.free.pop() else { break };
                    let data = pattern_at(&self.pattern, offset, TX_CHUNK);
                    ram.mem.write_slice(data, GuestAddress(tx.buffer(slot)))?;
                    tx.post(ram, slot, TX_CHUNK as u32, false)?;
                    offset += TX_CHUNK as u64;
                }
                tx.publish(ram)?;
            } else if tx.outstanding.is_empty() {
                break;
            }
            tx.wait(Duration::from_millis(50));
            tx.reap(ram, &mut used)?;
            if !used.is_empty() {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL {
                return Err(format!(
                    "no transmit chain came back for {STALL:?} ({} outstanding)",
                    tx.outstanding.len()
                )
                .into());
            }
            if failed.load(Ordering::Relaxed) {
                break;
            }
            if let Some(status) = self.child.0.try_wait()? {
                return Err(format!("{} exited ({status})", self.subject.name()).into());
            }
        }
        if tx.violations > 0 {
            return Err(format!("{} bad used entries on the transmit queue", tx.violations).into());
        }
        let m = result.ok_or("the case ended early")?;
        Ok((m, offset))
    }

    /// Host → guest: the client writes the stream as fast as it is taken; the guest keeps
    /// `depth` receive buffers posted and checks everything.
    fn host_to_guest(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
    ) -> Result<Measurement> {
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let writer_stream = self.tcp.try_clone()?;
        writer_stream.set_write_timeout(Some(Duration::from_millis(50)))?;
        let pattern = self.pattern.clone();
        std::thread::scope(|scope| -> Result<Measurement> {
            let writer = scope.spawn(|| write_stream(writer_stream, &pattern, &stop, &written));
            let driven = self.drive_rx(depth, warmup, duration, &stop, &written);
            stop.store(true, Ordering::Relaxed);
            let wrote = writer.join().map_err(|_| "the TCP writer panicked")?;
            let m = driven?;
            wrote?;
            Ok(m)
        })
    }

    fn drive_rx(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
        stop: &AtomicBool,
        written: &AtomicU64,
    ) -> Result<Measurement> {
        let ram = &self.vmm.ram;
        let rx = &mut self.rx;
        let mut offset = 0u64;
        let mut used = Vec::new();
        let mut data = vec![0u8; RX_CHUNK];
        let start = Instant::now();
        let mut mark: Option<(Instant, u64, Duration)> = None;
        let mut result = None;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((now, offset, process_cpu_time(self.child.0.id())?));
            }
            if let Some((t0, b0, cpu0)) = mark {
                if result.is_none() && now >= t0 + duration {
                    let cpu = process_cpu_time(self.child.0.id())?.saturating_sub(cpu0);
                    result = Some(throughput(offset - b0, now - t0, cpu));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            while rx.outstanding.len() < usize::from(depth) {
                let Some(slot) = rx.free.pop() else { break };
                rx.post(ram, slot, RX_CHUNK as u32, true)?;
            }
            rx.publish(ram)?;
            rx.wait(Duration::from_millis(20));
            rx.reap(ram, &mut used)?;
            for &(slot, len) in &used {
                let len = (len as usize).min(RX_CHUNK);
                ram.mem
                    .read_slice(&mut data[..len], GuestAddress(rx.buffer(slot)))?;
                check(&self.pattern, offset, &data[..len])?;
                offset += len as u64;
            }
            if rx.violations > 0 {
                return Err(format!(
                    "not a valid virtio device: {} used entries for buffers it did not hold, {} \
                     of them more than the ring holds at once (several entries for one buffer: \
                     vhost-device-console adds one per byte); no figure",
                    rx.violations, rx.overrun
                )
                .into());
            }
            if !used.is_empty() {
                last_progress = Instant::now();
            }
            if result.is_some() {
                // Each case has a daemon of its own: what is still on the way can stay there.
                break;
            }
            if last_progress.elapsed() > STALL {
                return Err(format!(
                    "no receive buffer came back for {STALL:?} (got {offset} bytes, client wrote {})",
                    written.load(Ordering::Relaxed)
                )
                .into());
            }
            if let Some(status) = self.child.0.try_wait()? {
                return Err(format!("{} exited ({status})", self.subject.name()).into());
            }
        }
        result.ok_or_else(|| "the case ended early".into())
    }

    /// 1 byte out, 1 byte back, one at a time.
    fn ping_pong(&mut self, warmup: Duration, duration: Duration) -> Result<Measurement> {
        self.tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let ram = &self.vmm.ram;
        let mut used = Vec::new();
        let mut latencies = Latencies::default();
        let start = Instant::now();
        let mut mark: Option<(Instant, Duration)> = None;
        let mut count = 0u64;
        let mut byte = [0u8; 1];
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((now, self.cpu()?));
                latencies = Latencies::default();
                count = 0;
            }
            if let Some((t0, cpu0)) = mark {
                if now >= t0 + duration {
                    let cpu = self.cpu()?.saturating_sub(cpu0);
                    return Ok(Measurement {
                        ops: count,
                        bytes: count,
                        elapsed: now - t0,
                        latencies,
                        backend_cpu: Some(cpu),
                    });
                }
            }
            let out = b'a' + (count % 26) as u8;
            let back = b'A' + (count % 26) as u8;
            let t = Instant::now();
            let slot = self.tx.free.pop().ok_or("no free transmit slot")?;
            ram.mem
                .write_slice(&[out], GuestAddress(self.tx.buffer(slot)))?;
            self.tx.post(ram, slot, 1, false)?;
            self.tx.publish(ram)?;
            self.tcp.read_exact(&mut byte)?;
            if byte[0] != out {
                return Err(format!("the client got {:#04x}, not {out:#04x}", byte[0]).into());
            }
            self.tcp.write_all(&[back])?;
            // The receive buffer goes in after the answer: vhost-device-console takes (and
            // loses) receive buffers that arrive while it is finishing a previous delivery.
            if self.rx.outstanding.is_empty() {
                let slot = self.rx.free.pop().ok_or("no free receive slot")?;
                self.rx.post(ram, slot, RX_CHUNK as u32, true)?;
                self.rx.publish(ram)?;
            }
            let deadline = Instant::now() + STALL;
            let mut waiting = Instant::now();
            loop {
                self.rx.reap(ram, &mut used)?;
                if let Some(&(slot, len)) = used.first() {
                    ram.mem
                        .read_slice(&mut byte, GuestAddress(self.rx.buffer(slot)))?;
                    if len != 1 || byte[0] != back {
                        return Err(format!(
                            "the guest got {len} byte(s) starting {:#04x}, not {back:#04x}",
                            byte[0]
                        )
                        .into());
                    }
                    break;
                }
                if self.rx.violations > 0 {
                    return Err("bad used entries on the receive queue".into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "the answer never reached the guest (round {count}, {} receive buffers \
                         posted)",
                        self.rx.outstanding.len()
                    )
                    .into());
                }
                self.rx.wait(Duration::from_millis(1));
                // A device that takes receive buffers and never returns them would stall us:
                // once it has taken every buffer posted and the answer is late, post one more
                // (harmless for a device that is merely slow: it finds two buffers).
                if waiting.elapsed() > LOST_AFTER && self.rx.device_took_all(ram)? {
                    let slot = self.rx.free.pop().ok_or("too many receive buffers lost")?;
                    self.rx.post(ram, slot, RX_CHUNK as u32, true)?;
                    self.rx.publish(ram)?;
                    self.lost_rx += 1;
                    waiting = Instant::now();
                }
            }
            latencies.record(t.elapsed());
            count += 1;
            self.tx.reap(ram, &mut used)?;
            if self.tx.free.is_empty() {
                self.tx.wait(Duration::from_millis(100));
                self.tx.reap(ram, &mut used)?;
            }
        }
    }

    fn finish(mut self) -> Result<()> {
        self.check_alive()?;
        let Session {
            subject,
            mut child,
            log,
            vmm,
            tcp,
            ..
        } = self;
        drop(tcp);
        drop(vmm);
        // The daemon must survive its frontend leaving.
        std::thread::sleep(Duration::from_millis(100));
        let exited = child.0.try_wait()?;
        let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.0.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.0.kill();
                let _ = child.0.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match exited {
            Some(status) if subject == Subject::Ours => Err(format!(
                "{OURS} died when the frontend left ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
            .into()),
            _ => Ok(()),
        }
    }
}

/// A daemon process, killed if still running when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn throughput(bytes: u64, elapsed: Duration, cpu: Duration) -> Measurement {
    Measurement {
        ops: bytes / 1000,
        bytes,
        elapsed,
        backend_cpu: Some(cpu),
        ..Measurement::default()
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads the stream from the client side and checks it, until `target` bytes arrived (or
/// nothing comes for a while once the target is known).
fn read_and_check(
    mut stream: TcpStream,
    pattern: &[u8],
    received: &AtomicU64,
    target: &AtomicU64,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let goal = target.load(Ordering::Relaxed);
        if offset >= goal {
            return Ok(());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err("the TCP endpoint closed".into()),
            Ok(n) => {
                let mut done = 0;
                while done < n {
                    let part = (n - done).min(pattern.len() - PERIOD);
                    check(pattern, offset, &buf[done..done + part])?;
                    offset += part as u64;
                    done += part;
                }
                received.store(offset, Ordering::Relaxed);
                quiet_since = None;
            }
            Err(e) if is_timeout(&e) => {
                if goal != u64::MAX {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        return Err(format!(
                            "the client got {offset} of the {goal} bytes the guest sent"
                        )
                        .into());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes the stream into the endpoint until `stop`.
fn write_stream(
    mut stream: TcpStream,
    pattern: &[u8],
    stop: &AtomicBool,
    written: &AtomicU64,
) -> Result<()> {
    let mut offset = 0u64;
    let chunk = pattern.len() - PERIOD;
    while !stop.load(Ordering::Relaxed) {
        match stream.write(pattern_at(pattern, offset, chunk)) {
            Ok(0) => return Err("the TCP endpoint closed".into()),
            Ok(n) => {
                offset += n as u64;
                written.store(offset, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_slices_follow_the_stream() {
        let p = make_pattern(1000);
        for offset in [0u64, 1, 88, 89, 12345] {
            let slice = pattern_at(&p, offset, 1000);
            for (i, &b) in slice.iter().enumerate() {
                assert_eq!(b, pattern_byte(offset + i as u64));
            }
            assert!(check(&p, offset, slice).is_ok());
        }
        assert!(check(&p, 5, &p[..10]).is_err());
        assert!(p.iter().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn default_args_match_the_command_line_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ConsoleArgs,
        }
        let parsed = Cli::parse_from(["console"]).args;
        assert_eq!(parsed.depth, ConsoleArgs::default().depth);
        assert_eq!(parsed.no_peer, ConsoleArgs::default().no_peer);
    }
}
