//! A hostile frontend: each of the three daemons behind one fixture ([`Target`]), probes of the
//! daemon process (fds, CPU, RSS, does it answer), and a seeded, reproducible attacker
//! ([`Attacker`]) that sends mutated vhost-user messages, abuses their order, writes garbage
//! rings and shrinks guest memory, checking after every round that the daemon is still well.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::netns::{packet_socket, Netns};
use crate::{read_at_least, Buf, Daemon, Negotiate, Result, TestVmm, DATA_START};

/// Guest RAM of every connection: rings below [`DATA_START`], buffers above.
pub const RAM: u64 = 32 << 20;
pub const QUEUE_SIZE: u16 = 256;
const WAIT: Duration = Duration::from_secs(10);
const TAP: &str = "vuh0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const CONSOLE_F_MULTIPORT: u64 = 1 << 1;

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blk,
    /// blk serving a qcow2 image (4 KiB clusters: many allocations).
    BlkQcow2,
    Net,
    Console,
}

/// A daemon under attack with what it needs: a disk, a tap in a namespace of its own, or a
/// console endpoint with a client attached.
pub struct Target {
    pub kind: Kind,
    pub daemon: Daemon,
    _disk: Option<tempfile::NamedTempFile>,
    _endpoint_dir: Option<tempfile::TempDir>,
    /// net: what the tap's network sees.
    packets: Option<OwnedFd>,
    /// console: our end of the UNIX endpoint.
    client: Option<UnixStream>,
    // Last: the daemon (first field) must be gone before its namespace is deleted.
    _ns: Option<Netns>,
    tag: u32,
}

/// A request published (not yet kicked) by [`Target::publish`], and what must come out of it.
pub struct Pending {
    head: u16,
    data: Vec<u8>,
    status: u64,
    sector: u64,
}

impl Target {
    pub fn start(kind: Kind) -> Result<Target> {
        match kind {
            Kind::Net => Self::start_net(),
            _ => Self::start_plain(kind),
        }
    }

    /// The net daemon makes its tap in a namespace of its own; a packet socket on the tap
    /// sees what the guest sends.
    fn start_net() -> Result<Target> {
        crate::netns::require_root("the vhost-user-net hostile tests")?;
        Netns::remove_stale("vuh");
        let ns = Netns::new("vuh")?;
        let mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let daemon = Daemon::start_with_prefix(
            &ns.prefix(),
            "vhost-user-net",
            &["--tap", TAP, "--queue-pairs", "1", "--mac", &mac, "--up"],
        )?;
        let packets = packet_socket(&ns.name, TAP, libc::ETH_P_ALL as u16, libc::SOCK_NONBLOCK)?;
        Ok(Target {
            kind: Kind::Net,
            daemon,
            _disk: None,
            _endpoint_dir: None,
            packets: Some(packets),
            client: None,
            _ns: Some(ns),
            tag: 0,
        })
    }

    fn start_plain(kind: Kind) -> Result<Target> {
        match kind {
            Kind::Blk => {
                let disk = tempfile::NamedTempFile::new()?;
                disk.as_file().set_len(16 << 20)?;
                let path = disk.path().to_string_lossy().into_owned();
                let daemon = Daemon::start("vhost-user-blk", &["--file", &path])?;
                Ok(Target {
                    kind,
                    daemon,
                    _disk: Some(disk),
                    _endpoint_dir: None,
                    packets: None,
                    client: None,
                    _ns: None,
                    tag: 0,
                })
            }
            Kind::BlkQcow2 => {
                let dir = tempfile::tempdir()?;
                let image = dir.path().join("disk.qcow2");
                crate::qemu_img::create(&image, 16 << 20, "cluster_size=4096")?;
                let path = image.to_string_lossy().into_owned();
                let daemon =
                    Daemon::start("vhost-user-blk", &["--file", &path, "--format", "qcow2"])?;
                Ok(Target {
                    kind,
                    daemon,
                    _disk: None,
                    _endpoint_dir: Some(dir),
                    packets: None,
                    client: None,
                    _ns: None,
                    tag: 0,
                })
            }
            _ => {
                let dir = tempfile::tempdir()?;
                let endpoint = dir.path().join("console.sock");
                let daemon = Daemon::start(
                    "vhost-user-console",
                    &["--unix", &endpoint.to_string_lossy()],
                )?;
                let client = connect_retrying(&endpoint)?;
                client.set_nonblocking(true)?;
                Ok(Target {
                    kind,
                    daemon,
                    _disk: None,
                    _endpoint_dir: Some(dir),
                    packets: None,
                    client: Some(client),
                    _ns: None,
                    tag: 0,
                })
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.daemon.socket
    }

    pub fn num_queues(&self) -> usize {
        match self.kind {
            Kind::Blk | Kind::BlkQcow2 => 1,
            Kind::Net | Kind::Console => 2,
        }
    }

    /// The queue the guest sends on.
    pub fn tx_queue(&self) -> usize {
        match self.kind {
            Kind::Blk | Kind::BlkQcow2 => 0,
            Kind::Net | Kind::Console => 1,
        }
    }

    pub fn negotiate(&self) -> Negotiate {
        match self.kind {
            Kind::Console => Negotiate {
                features: !CONSOLE_F_MULTIPORT,
                ..Negotiate::default()
            },
            _ => Negotiate::default(),
        }
    }

    /// A new frontend connection with every queue started.
    pub fn connect(&self) -> Result<TestVmm> {
        TestVmm::connect(
            self.socket(),
            RAM,
            self.num_queues(),
            QUEUE_SIZE,
            self.negotiate(),
        )
    }

    /// Places one guest request on the tx queue with its buffers above [`DATA_START`] and
    /// publishes it, without a kick.
    pub fn publish(&mut self, vmm: &mut TestVmm) -> Result<Pending> {
        self.tag = self.tag.wrapping_add(1);
        let mut data: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(31) ^ self.tag) as u8)
            .collect();
        data[..4].copy_from_slice(&self.tag.to_le_bytes());
        let q = self.tx_queue();
        match self.kind {
            Kind::Blk | Kind::BlkQcow2 => {
                let sector = u64::from(self.tag % 64) * 8;
                let header = vmm.ram.alloc(16, 16);
                let mut bytes = [0u8; 16];
                bytes[..4].copy_from_slice(&BLK_T_OUT.to_le_bytes());
                bytes[8..].copy_from_slice(&sector.to_le_bytes());
                vmm.ram.write(header, &bytes)?;
                let buf = vmm.ram.alloc(data.len() as u64, 512);
                vmm.ram.write(buf, &data)?;
                let status = vmm.ram.alloc(1, 1);
                vmm.ram.write(status, &[0xee])?;
                let (ram, queue) = vmm.queue(q);
                let head = queue.add_chain(
                    ram,
                    &[
                        Buf::readable(header, 16),
                        Buf::readable(buf, data.len() as u32),
                        Buf::writable(status, 1),
                    ],
                )?;
                queue.publish(ram, head)?;
                Ok(Pending {
                    head,
                    data,
                    status,
                    sector,
                })
            }
            Kind::Net => {
                // Broadcast, from the guest's MAC, a local experimental ethertype.
                let mut frame = vec![0xff; 6];
                frame.extend_from_slice(&GUEST_MAC);
                frame.extend_from_slice(&[0x88, 0xb5]);
                frame.extend_from_slice(&data[..64]);
                let hdr = vmm.ram.alloc(12, 16);
                vmm.ram.write(hdr, &[0u8; 12])?;
                let buf = vmm.ram.alloc(frame.len() as u64, 16);
                vmm.ram.write(buf, &frame)?;
                let (ram, queue) = vmm.queue(q);
                let head = queue.add_chain(
                    ram,
                    &[
                        Buf::readable(hdr, 12),
                        Buf::readable(buf, frame.len() as u32),
                    ],
                )?;
                queue.publish(ram, head)?;
                Ok(Pending {
                    head,
                    data: frame,
                    status: 0,
                    sector: 0,
                })
            }
            Kind::Console => {
                self.drain_client();
                let buf = vmm.ram.alloc(data.len() as u64, 8);
                vmm.ram.write(buf, &data)?;
                let (ram, queue) = vmm.queue(q);
                let head = queue.add_chain(ram, &[Buf::readable(buf, data.len() as u32)])?;
                queue.publish(ram, head)?;
                Ok(Pending {
                    head,
                    data,
                    status: 0,
                    sector: 0,
                })
            }
        }
    }

    /// Waits for `pending` to complete and checks the bytes it moved: read back from the disk,
    /// seen on the tap, or received by the console's client.
    pub fn complete(&mut self, vmm: &mut TestVmm, pending: Pending) -> Result<()> {
        let q = self.tx_queue();
        let (ram, queue) = vmm.queue(q);
        let used = queue.wait_used(ram, 1, WAIT)?;
        if used.first().map(|u| u.id) != Some(pending.head) {
            return Err(format!(
                "{:?}: used {used:?}, expected head {}",
                self.kind, pending.head
            )
            .into());
        }
        match self.kind {
            Kind::Blk | Kind::BlkQcow2 => {
                let status = vmm.ram.read(pending.status, 1)?[0];
                if status != 0 {
                    return Err(format!("blk write: status {status}").into());
                }
                let back = self.blk_read(vmm, pending.sector, pending.data.len())?;
                if back != pending.data {
                    return Err("blk: the data read back differs from the data written".into());
                }
            }
            Kind::Net => {
                let fd = self.packets.as_ref().ok_or("no packet socket")?;
                let deadline = Instant::now() + WAIT;
                loop {
                    if receive_frame(fd)?.as_deref() == Some(pending.data.as_slice()) {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err("net: the frame never reached the tap".into());
                    }
                }
            }
            Kind::Console => {
                let client = self.client.as_mut().ok_or("no console client")?;
                let deadline = Instant::now() + WAIT;
                let mut got = Vec::new();
                // Output of earlier rounds may still come first.
                while !got
                    .windows(pending.data.len())
                    .any(|w| w == pending.data.as_slice())
                {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "console: the client got {} bytes, not the {} sent",
                            got.len(),
                            pending.data.len()
                        )
                        .into());
                    }
                    got.extend(read_at_least(client, 1, Duration::from_millis(100))?);
                }
            }
        }
        Ok(())
    }

    fn blk_read(&mut self, vmm: &mut TestVmm, sector: u64, len: usize) -> Result<Vec<u8>> {
        let header = vmm.ram.alloc(16, 16);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&BLK_T_IN.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        vmm.ram.write(header, &bytes)?;
        let buf = vmm.ram.alloc(len as u64, 512);
        vmm.ram.write(buf, &vec![0u8; len])?;
        let status = vmm.ram.alloc(1, 1);
        vmm.ram.write(status, &[0xee])?;
        let (ram, queue) = vmm.queue(0);
        queue.submit(
            ram,
            &[
                Buf::readable(header, 16),
                Buf::writable(buf, len as u32),
                Buf::writable(status, 1),
            ],
        )?;
        queue.wait_used(ram, 1, WAIT)?;
        if vmm.ram.read(status, 1)?[0] != 0 {
            return Err("blk read failed".into());
        }
        vmm.ram.read(buf, len)
    }

    /// Reads and drops what the console's client has received so far (garbage a hostile round
    /// sent): the console stops taking output when its client does not read.
    pub fn drain_client(&mut self) {
        if let Some(client) = self.client.as_mut() {
            drain(client);
        }
    }

    /// One request through the device on `vmm`, bytes checked.
    pub fn exchange(&mut self, vmm: &mut TestVmm) -> Result<()> {
        let pending = self.publish(vmm)?;
        vmm.queues[self.tx_queue()].notify()?;
        self.complete(vmm, pending)
    }

    /// A fresh connection and one request through it: the daemon serves.
    pub fn serves(&mut self) -> Result<()> {
        let mut vmm = self.connect()?;
        self.exchange(&mut vmm)
    }

    /// Fails unless the daemon process still runs.
    pub fn alive(&mut self) -> Result<()> {
        if !self.daemon.is_running() {
            return Err(format!(
                "{:?} daemon died:\n{}",
                self.kind,
                tail(&self.daemon.log_text())
            )
            .into());
        }
        Ok(())
    }
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[start..]
}

fn connect_retrying(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One frame from a non-blocking packet socket (waits up to 100 ms), ignoring our own sends.
fn receive_frame(fd: &OwnedFd) -> Result<Option<Vec<u8>>> {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
    let mut buf = vec![0u8; 70_000];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Ok(None);
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// User + system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Ticks of CPU `pid` uses during `window`.
pub fn cpu_over(pid: u32, window: Duration) -> Result<u64> {
    let before = cpu_ticks(pid)?;
    std::thread::sleep(window);
    Ok(cpu_ticks(pid)?.saturating_sub(before))
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// Fails unless the daemon on `socket` takes a new connection and answers GET_FEATURES within
/// `limit` (the attempt runs in a thread of its own, abandoned if it hangs).
pub fn answers_within(socket: &Path, limit: Duration) -> Result<()> {
    let socket = socket.to_owned();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| -> Result<u64> {
            let frontend = Frontend::connect(&socket, 1)?;
            frontend.set_owner()?;
            Ok(frontend.get_features()?)
        })();
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });
    let start = Instant::now();
    match rx.recv_timeout(limit) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("a new connection failed: {e}").into()),
        // Slow or hung? The answer tells.
        Err(_) => Err(match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(result) => format!(
                "no answer to a new connection within {limit:?}; {result:?} after {:?}",
                start.elapsed()
            ),
            Err(_) => {
                format!("no answer to a new connection within {limit:?}, nor after 20 s more")
            }
        }
        .into()),
    }
}

/// Waits until `f` holds (polling), up to `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the attacker may do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rounds to run.
    pub rounds: u32,
    /// The first round (HOSTILE_FIRST): replays one failing round of a seed.
    pub first: u32,
    pub seed: u64,
    /// Let garbage rings publish an available index more than the queue size ahead, and let
    /// shrinking memory take the rings (issue 13, bug 1: blk and net spin on it until the ring
    /// layer of issue 10 lands).
    pub avail_far_ahead: bool,
}

impl Options {
    /// From HOSTILE_SEED, HOSTILE_ROUNDS and HOSTILE_FIRST, with `rounds` by default and a seed from the clock
    /// (printed, so a failure can be replayed).
    pub fn from_env(rounds: u32) -> Options {
        let seed = std::env::var("HOSTILE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let rounds = std::env::var("HOSTILE_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(rounds);
        let first = std::env::var("HOSTILE_FIRST")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Options {
            rounds,
            first,
            seed,
            avail_far_ahead: true,
        }
    }
}

/// The attack kinds of one round.
#[derive(Debug, Clone, Copy)]
enum Attack {
    Mutated,
    Disorder,
    GarbageRings,
    ShrinkMemory,
}

/// A seeded attacker against one daemon.
pub struct Attacker<'a> {
    target: &'a mut Target,
    options: Options,
    baseline_fds: usize,
    baseline_rss: u64,
}

/// Descriptor growth tolerated across rounds (a worker or a log file may come and go).
const FD_SLACK: usize = 8;
/// RSS growth tolerated across rounds, KiB.
const RSS_SLACK_KIB: u64 = 32 << 10;
/// CPU ticks (1/100 s) an idle daemon may use in the idle window.
const IDLE_TICKS: u64 = 5;
const IDLE_WINDOW: Duration = Duration::from_millis(300);

impl<'a> Attacker<'a> {
    /// Measures the daemon's baseline after one ordinary session.
    pub fn new(target: &'a mut Target, options: Options) -> Result<Attacker<'a>> {
        target.serves()?;
        answers_within(target.socket(), Duration::from_secs(2))?;
        let pid = target.pid();
        let baseline_fds = fd_count(pid)?;
        let baseline_rss = rss_kib(pid)?;
        Ok(Attacker {
            target,
            options,
            baseline_fds,
            baseline_rss,
        })
    }

    /// Runs every round; the error names the seed and round that broke the daemon.
    pub fn run(&mut self) -> Result<()> {
        eprintln!(
            "hostile {:?}: HOSTILE_SEED={} HOSTILE_ROUNDS={}",
            self.target.kind, self.options.seed, self.options.rounds
        );
        for round in self.options.first..self.options.rounds {
            let seed = self.options.seed ^ (u64::from(round) << 32) ^ u64::from(round);
            let mut rng = StdRng::seed_from_u64(seed);
            let attack = match rng.gen_range(0..4) {
                0 => Attack::Mutated,
                1 => Attack::Disorder,
                2 => Attack::GarbageRings,
                _ => Attack::ShrinkMemory,
            };
            // The attack itself may fail in any way (the daemon rightly refuses things): only
            // the checks after it count.
            let _ = self.attack(attack, &mut rng);
            self.check().map_err(|e| {
                format!(
                    "{:?}, HOSTILE_SEED={} round {round} ({attack:?}): {e}\nthe daemon's log \
                     ends:\n{}",
                    self.target.kind,
                    self.options.seed,
                    tail(&self.target.daemon.log_text())
                )
            })?;
        }
        // The daemon still does real work after all that.
        self.target.serves()
    }

    fn check(&mut self) -> Result<()> {
        self.target.alive()?;
        self.target.drain_client();
        answers_within(self.target.socket(), Duration::from_secs(2))?;
        let pid = self.target.pid();
        let ticks = cpu_over(pid, IDLE_WINDOW)?;
        if ticks > IDLE_TICKS {
            return Err(format!("busy while idle: {ticks} ticks in {IDLE_WINDOW:?}").into());
        }
        // Teardown of the last connection may still be closing descriptors.
        let limit = self.baseline_fds + FD_SLACK;
        if !eventually(Duration::from_secs(2), || Ok(fd_count(pid)? <= limit))? {
            return Err(format!(
                "descriptors grew from {} to {}",
                self.baseline_fds,
                fd_count(pid)?
            )
            .into());
        }
        let rss = rss_kib(pid)?;
        if rss > self.baseline_rss + RSS_SLACK_KIB {
            return Err(format!("RSS grew from {} to {rss} KiB", self.baseline_rss).into());
        }
        self.target.alive()
    }

    fn attack(&mut self, attack: Attack, rng: &mut StdRng) -> Result<()> {
        match attack {
            Attack::Mutated => self.mutated(rng, false),
            Attack::Disorder => self.mutated(rng, true),
            Attack::GarbageRings => self.garbage_rings(rng),
            Attack::ShrinkMemory => self.shrink_memory(rng),
        }
    }

    /// Raw messages over a fresh connection: random or plausible requests in any order, with
    /// mutated flags, sizes, payloads and descriptors. `disorder` keeps messages well-formed
    /// (right sizes) so that they get past parsing and test the order and the values.
    fn mutated(&mut self, rng: &mut StdRng, disorder: bool) -> Result<()> {
        let mut conn = UnixStream::connect(self.target.socket())?;
        conn.set_nonblocking(true)?;
        let ram = memfd(if rng.gen_bool(0.5) { RAM } else { 4096 })?;
        let count = rng.gen_range(1..40);
        for _ in 0..count {
            let msg = Message::random(rng, disorder, self.options.avail_far_ahead, &ram)?;
            if send_message(&conn, &msg).is_err() {
                break;
            }
            drain(&mut conn);
            if rng.gen_bool(0.1) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        drain(&mut conn);
        Ok(())
    }

    /// A proper session whose rings then fill with garbage: random descriptors (addresses,
    /// lengths, flags, next), random available entries and indices, random used-event words;
    /// then kicks.
    fn garbage_rings(&mut self, rng: &mut StdRng) -> Result<()> {
        let vmm = self.target.connect()?;
        for _ in 0..rng.gen_range(1..4) {
            for q in 0..vmm.queues.len() {
                let (desc, avail, size) = {
                    let queue = &vmm.queues[q];
                    (queue.desc, queue.avail, u64::from(queue.size))
                };
                for i in 0..size {
                    let addr: u64 = match rng.gen_range(0..4) {
                        0 => rng.gen(),
                        1 => rng.gen_range(0..RAM),
                        2 => RAM - rng.gen_range(0..64),
                        _ => rng.gen_range(DATA_START..RAM),
                    };
                    let len: u32 = match rng.gen_range(0..3) {
                        0 => rng.gen(),
                        1 => rng.gen_range(0..4096),
                        _ => rng.gen_range(0..16),
                    };
                    let flags: u16 = rng.gen_range(0..8);
                    let next: u16 = if rng.gen_bool(0.8) {
                        rng.gen_range(0..size as u16)
                    } else {
                        rng.gen()
                    };
                    crate::GuestQueue::write_desc(
                        &vmm.ram, desc, i as u16, addr, len, flags, next,
                    )?;
                }
                for slot in 0..size {
                    let head: u16 = if rng.gen_bool(0.9) {
                        rng.gen_range(0..size as u16)
                    } else {
                        rng.gen()
                    };
                    vmm.ram.write(avail + 4 + 2 * slot, &head.to_le_bytes())?;
                }
                let word = |at: u64| -> Result<u16> {
                    let raw = vmm.ram.read(at, 2)?;
                    Ok(u16::from_le_bytes([raw[0], raw[1]]))
                };
                let current = word(avail + 2)?;
                let ahead = if self.options.avail_far_ahead && rng.gen_bool(0.3) {
                    rng.gen()
                } else {
                    // Forward only, and never more than the queue size beyond the used index:
                    // then never more than that beyond the device's next index either.
                    let used = word(vmm.queues[q].used + 2)?;
                    let room = (size as u16).saturating_sub(current.wrapping_sub(used));
                    rng.gen_range(0..=room)
                };
                vmm.ram
                    .write(avail + 2, &current.wrapping_add(ahead).to_le_bytes())?;
                // used_event (EVENT_IDX) and avail flags.
                vmm.queues[q].set_used_event(&vmm.ram, rng.gen())?;
                vmm.ram
                    .write(avail, &rng.gen_range(0u16..2).to_le_bytes())?;
                vmm.queues[q].notify()?;
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        }
        // Maybe the frontend asks for the rings back before it goes.
        if rng.gen_bool(0.5) {
            for q in 0..vmm.queues.len() {
                let _ = vmm.frontend.get_vring_base(q);
            }
        }
        Ok(())
    }

    /// A proper session with requests in flight whose memfd then shrinks.
    fn shrink_memory(&mut self, rng: &mut StdRng) -> Result<()> {
        let mut vmm = self.target.connect()?;
        if rng.gen_bool(0.5) {
            self.target.exchange(&mut vmm)?;
        }
        for _ in 0..rng.gen_range(1..8) {
            self.target.publish(&mut vmm)?;
        }
        // From nothing left to most of it; below DATA_START the rings go too, and read as
        // zeros from then on: an available index far behind, i.e. far ahead (bug 1).
        let choice = if self.options.avail_far_ahead {
            rng.gen_range(0..3)
        } else {
            2
        };
        let keep = match choice {
            0 => 0,
            1 => rng.gen_range(0..DATA_START) & !0xfff,
            _ => rng.gen_range(DATA_START..RAM) & !0xfff,
        };
        vmm.ram.file.set_len(keep)?;
        for q in 0..vmm.queues.len() {
            vmm.queues[q].notify()?;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(10..60)));
        // No access to the lost part from here on: the test process would get SIGBUS.
        Ok(())
    }
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> Result<std::fs::File> {
    let fd = nix::sys::memfd::memfd_create(
        c"vhost-user-hostile",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let file = std::fs::File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

/// One raw vhost-user message.
struct Message {
    request: u32,
    flags: u32,
    /// The size the header claims.
    size: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Requests worth sending, with the payload size each expects.
const REQUESTS: &[(FrontendReq, usize)] = &[
    (FrontendReq::GET_FEATURES, 0),
    (FrontendReq::SET_FEATURES, 8),
    (FrontendReq::SET_OWNER, 0),
    (FrontendReq::RESET_OWNER, 0),
    (FrontendReq::SET_MEM_TABLE, 8 + 32),
    (FrontendReq::SET_LOG_BASE, 16),
    (FrontendReq::SET_VRING_NUM, 8),
    (FrontendReq::SET_VRING_ADDR, 40),
    (FrontendReq::SET_VRING_BASE, 8),
    (FrontendReq::GET_VRING_BASE, 8),
    (FrontendReq::SET_VRING_KICK, 8),
    (FrontendReq::SET_VRING_CALL, 8),
    (FrontendReq::SET_VRING_ERR, 8),
    (FrontendReq::GET_PROTOCOL_FEATURES, 0),
    (FrontendReq::SET_PROTOCOL_FEATURES, 8),
    (FrontendReq::GET_QUEUE_NUM, 0),
    (FrontendReq::SET_VRING_ENABLE, 8),
    (FrontendReq::GET_CONFIG, 12 + 64),
    (FrontendReq::SET_CONFIG, 12 + 8),
    (FrontendReq::GET_INFLIGHT_FD, 24),
    (FrontendReq::SET_INFLIGHT_FD, 24),
    (FrontendReq::GET_MAX_MEM_SLOTS, 0),
    (FrontendReq::ADD_MEM_REG, 8 + 32),
    (FrontendReq::REM_MEM_REG, 8 + 32),
    (FrontendReq::RESET_DEVICE, 0),
];

impl Message {
    fn random(
        rng: &mut StdRng,
        disorder: bool,
        far_ahead: bool,
        ram: &std::fs::File,
    ) -> Result<Message> {
        let (request, expected) = if !disorder && rng.gen_bool(0.1) {
            (rng.gen_range(0..64), rng.gen_range(0..64))
        } else {
            let (req, size) = REQUESTS[rng.gen_range(0..REQUESTS.len())];
            (req as u32, size)
        };
        let mut flags = 1u32;
        if rng.gen_bool(0.3) {
            flags |= 0x8; // NEED_REPLY
        }
        if !disorder && rng.gen_bool(0.1) {
            flags = rng.gen();
        }
        let mut payload = vec![0u8; expected];
        fill_payload(rng, request, &mut payload, far_ahead, ram);
        let mut size = payload.len() as u32;
        if !disorder && rng.gen_bool(0.2) {
            size = match rng.gen_range(0..3) {
                0 => rng.gen(),
                1 => rng.gen_range(0..4096),
                _ => size.wrapping_add(rng.gen_range(1..16)),
            };
            payload.resize((size as usize).min(4096), 0);
            rng.fill(&mut payload[..]);
        }
        let mut fds = Vec::new();
        let with_fd = matches!(
            FrontendReq::try_from(request),
            Ok(FrontendReq::SET_MEM_TABLE
                | FrontendReq::ADD_MEM_REG
                | FrontendReq::SET_VRING_KICK
                | FrontendReq::SET_VRING_CALL
                | FrontendReq::SET_VRING_ERR
                | FrontendReq::SET_LOG_BASE
                | FrontendReq::SET_INFLIGHT_FD)
        );
        let nfds = if with_fd && rng.gen_bool(0.8) {
            1
        } else {
            rng.gen_range(0..3) * usize::from(rng.gen_bool(0.1))
        };
        for _ in 0..nfds {
            let fd: OwnedFd = match rng.gen_range(0..4) {
                0 => ram.try_clone()?.into(),
                1 => crate::dup_file(&EventFd::new(libc::EFD_NONBLOCK)?)?.into(),
                2 => std::fs::File::open("/dev/null")?.into(),
                _ => memfd(rng.gen_range(0..3) * 4096)?.into(),
            };
            fds.push(fd);
        }
        Ok(Message {
            request,
            flags,
            size,
            payload,
            fds,
        })
    }
}

/// Plausible payloads: a vring index, a size, addresses inside or outside `ram`, features.
/// Without `far_ahead`, rings start at index 0 (their memory reads zeros): a random base would
/// be an available index far ahead (bug 1).
fn fill_payload(
    rng: &mut StdRng,
    request: u32,
    payload: &mut [u8],
    far_ahead: bool,
    ram: &std::fs::File,
) {
    rng.fill(payload);
    let ram_len = ram.metadata().map(|m| m.len()).unwrap_or(0);
    let index = if rng.gen_bool(0.7) {
        rng.gen_range(0u32..4)
    } else {
        rng.gen()
    };
    let small = |rng: &mut StdRng| -> u32 {
        match rng.gen_range(0..4) {
            0 => 0,
            1 => 1 << rng.gen_range(0..16),
            2 => rng.gen_range(0..70000),
            _ => rng.gen(),
        }
    };
    match FrontendReq::try_from(request) {
        Ok(
            FrontendReq::SET_VRING_NUM
            | FrontendReq::SET_VRING_BASE
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::SET_VRING_ENABLE,
        ) if payload.len() >= 8 => {
            payload[..4].copy_from_slice(&index.to_le_bytes());
            let value = if request == FrontendReq::SET_VRING_ENABLE as u32 {
                rng.gen_range(0u32..3)
            } else if request == FrontendReq::SET_VRING_BASE as u32 && !far_ahead {
                0
            } else {
                small(rng)
            };
            payload[4..8].copy_from_slice(&value.to_le_bytes());
        }
        Ok(
            FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR,
        ) if payload.len() >= 8 => {
            // Index in the low byte, bit 8: no fd.
            let value = u64::from(index & 0xff) | if rng.gen_bool(0.2) { 0x100 } else { 0 };
            payload[..8].copy_from_slice(&value.to_le_bytes());
        }
        Ok(FrontendReq::SET_MEM_TABLE | FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG)
            if payload.len() >= 40 =>
        {
            // nregions / padding, then one region: gpa, size, uaddr, offset.
            let n: u32 = if rng.gen_bool(0.8) {
                1
            } else {
                rng.gen_range(0..12)
            };
            payload[..4].copy_from_slice(&n.to_le_bytes());
            payload[4..8].fill(0);
            let gpa: u64 = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
            let size: u64 = match rng.gen_range(0..4) {
                0 => ram_len,
                1 => ram_len + 4096 * rng.gen_range(1..1000),
                2 => 0,
                _ => rng.gen(),
            };
            let offset: u64 = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
            payload[8..16].copy_from_slice(&gpa.to_le_bytes());
            payload[16..24].copy_from_slice(&size.to_le_bytes());
            payload[24..32].copy_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
            payload[32..40].copy_from_slice(&offset.to_le_bytes());
        }
        Ok(FrontendReq::SET_VRING_ADDR) if payload.len() >= 40 => {
            payload[..4].copy_from_slice(&index.to_le_bytes());
            for field in 0..4 {
                let at = 8 + 8 * field;
                let value: u64 = if rng.gen_bool(0.6) {
                    0x7f00_0000_0000 + rng.gen_range(0..ram_len.max(1))
                } else {
                    rng.gen()
                };
                payload[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        Ok(FrontendReq::SET_FEATURES | FrontendReq::SET_PROTOCOL_FEATURES)
            if payload.len() >= 8 && rng.gen_bool(0.5) =>
        {
            payload[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        }
        Ok(FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG) if payload.len() >= 12 => {
            let offset = small(rng);
            let size = if rng.gen_bool(0.7) {
                (payload.len() - 12) as u32
            } else {
                small(rng)
            };
            payload[..4].copy_from_slice(&offset.to_le_bytes());
            payload[4..8].copy_from_slice(&size.to_le_bytes());
        }
        _ => {}
    }
}

fn send_message(conn: &UnixStream, msg: &Message) -> Result<()> {
    let mut bytes = Vec::with_capacity(12 + msg.payload.len());
    bytes.extend_from_slice(&msg.request.to_le_bytes());
    bytes.extend_from_slice(&msg.flags.to_le_bytes());
    bytes.extend_from_slice(&msg.size.to_le_bytes());
    bytes.extend_from_slice(&msg.payload);
    let raw: Vec<i32> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let control = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let control: &[nix::sys::socket::ControlMessage] = if raw.is_empty() { &[] } else { &control };
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [std::io::IoSlice::new(&bytes[sent..])];
        let cmsgs = if sent == 0 { control } else { &[] };
        match nix::sys::socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &iov,
            cmsgs,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and drops whatever the daemon replied.
fn drain(conn: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let _ = conn.flush();
}

/// Where a daemon kept its log, for tests that measure its growth.
pub fn log_len(daemon: &Daemon) -> u64 {
    std::fs::metadata(&daemon.log).map(|m| m.len()).unwrap_or(0)
}
