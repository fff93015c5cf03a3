//! net benchmark: vhost-user-net against DPDK's vhost PMD, both driven by the same frontend,
//! DPDK's virtio_user in a `dpdk-testpmd`.
//!
//! Each subject runs in a network namespace of its own, with a tap of its own:
//!
//! - ours: `vhost-user-net --tap TAP --up`, which creates the tap;
//! - the peer: a second testpmd with `--vdev net_vhost0,iface=SOCK` and `--vdev net_tap0,iface=TAP`
//!   forwarding between the two ports (`set fwd io`), its forwarding lcore on a core of its own
//!   where the machine has one.
//!
//! Cases:
//!
//! - **guest-to-tap**: the frontend runs `txonly`. What counts is the frames that reach the tap:
//!   a frame a backend writes into a tap is *received* by the interface, so its `rx_packets`
//!   (read from `/proc/BACKEND_PID/net/dev`, which shows the backend's namespace) moves.
//! - **tap-to-guest**: a generator thread in the namespace sends frames out of the tap through an
//!   AF_PACKET socket (`sendmmsg`, qdisc bypassed, 64 flows so that every tap queue gets some);
//!   what counts is what the frontend's `rxonly` received (`RX-packets`). The generator's
//!   offered rate and the tap's drops are printed under the table: when the backend delivers
//!   nearly all that was offered, the generator, not the backend, was the limit.
//!
//! Backend CPU time is the backend process's user + system time over the measured interval. A
//! DPDK backend polls, so its CPU per packet is one core divided by its packet rate.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_tests::netns::run_ok;

use crate::report::{process_cpu_time, Measurement, Result, Table};
use crate::Options;

const OURS: &str = "vhost-user-net";
const PEER: &str = "DPDK vhost PMD";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_MAC_TEXT: &str = "52:54:00:12:34:56";
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Frames per `sendmmsg` of the generator, and distinct UDP flows among them.
const GEN_BATCH: usize = 64;
/// Delivered / offered above which the generator, not the backend, is the limit.
const GENERATOR_BOUND: f64 = 0.9;

/// Options of `vhost-user-bench net`.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Queue pairs to measure, comma separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [1u16, 2])]
    pub queue_pairs: Vec<u16>,

    /// Frame sizes in bytes (Ethernet header included, no FCS), comma separated.
    #[arg(long, value_name = "BYTES,...", value_delimiter = ',', default_values_t = [64usize, 1500])]
    pub frame_sizes: Vec<usize>,

    /// The dpdk-testpmd binary (the frontend, and the peer's backend) [default: from PATH].
    #[arg(long, value_name = "PATH")]
    pub testpmd: Option<PathBuf>,

    /// Measure our daemon only.
    #[arg(long)]
    pub no_peer: bool,

    /// Rounds the subjects take turns in per case (the case's --duration is split between
    /// them; each subject's best round is reported). 1 with --quick.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rounds: u32,
}

impl Default for NetArgs {
    fn default() -> Self {
        NetArgs {
            queue_pairs: vec![1, 2],
            frame_sizes: vec![64, 1500],
            testpmd: None,
            no_peer: false,
            rounds: 3,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToTap,
    TapToGuest,
}

fn case_name(direction: Direction, size: usize, pairs: u16) -> String {
    let d = match direction {
        Direction::GuestToTap => "guest-to-tap",
        Direction::TapToGuest => "tap-to-guest",
    };
    format!("{d} {size}B {pairs}q")
}

pub fn run(opts: &Options, args: &NetArgs) -> Result<()> {
    let Some(testpmd) = find_testpmd(args.testpmd.as_deref()) else {
        eprintln!(
            "net: dpdk-testpmd not found (Debian: apt-get install dpdk dpdk-dev). It is the \
             frontend for every subject, so the net benchmark is skipped."
        );
        return Ok(());
    };
    let ours_bin = opts.daemon(OURS);
    if !ours_bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release) or pass --bin-dir",
            ours_bin.display()
        )
        .into());
    }
    if let Some(&size) = args
        .frame_sizes
        .iter()
        .find(|&&s| !(60..=1514).contains(&s))
    {
        return Err(format!("--frame-sizes {size}: must be 60 to 1514 bytes").into());
    }
    if let Some(&n) = args.queue_pairs.iter().find(|&&n| !(1..=8).contains(&n)) {
        return Err(format!("--queue-pairs {n}: must be 1 to 8").into());
    }
    let mut subjects = vec![Subject::Ours];
    if args.no_peer {
        eprintln!("net: --no-peer: measuring {OURS} only");
    } else {
        subjects.push(Subject::Peer);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err("the net benchmark needs 2 CPUs: testpmd's forwarding lcore polls one".into());
    }
    let warmup = if opts.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(500)
    };
    let rounds = if opts.quick { 1 } else { args.rounds.max(1) };
    let duration = opts.case_duration() / rounds;
    let run = BenchRun {
        testpmd,
        ours_bin,
        cores,
        warmup,
        duration,
        rounds,
        dir: tempfile::Builder::new().prefix("vub-net-").tempdir()?,
    };
    eprintln!(
        "net: {} case(s), each subject {} round(s) of {:.1} s per case taking turns, frontend: \
         DPDK virtio_user (testpmd), {cores} CPU(s)",
        args.queue_pairs.len() * args.frame_sizes.len() * 2,
        run.rounds,
        run.duration.as_secs_f64()
    );

    let mut table = Table::new(
        &format!(
            "net: vhost-user-net vs DPDK vhost PMD, frontend DPDK virtio_user (ops = frames; \
             each row is the subject's best of {} round(s) of {:.1} s)",
            run.rounds,
            run.duration.as_secs_f64()
        ),
        OURS,
    );
    let mut notes = Vec::new();
    for &pairs in &args.queue_pairs {
        let cases: Vec<(Direction, usize)> = [Direction::GuestToTap, Direction::TapToGuest]
            .into_iter()
            .flat_map(|d| args.frame_sizes.iter().map(move |&s| (d, s)))
            .filter(|&(d, s)| opts.selected(&case_name(d, s, pairs)))
            .collect();
        if cases.is_empty() {
            continue;
        }
        // Both subjects stay set up while they take turns case by case (an idle one costs
        // nothing: the peer's forwarding is stopped between its turns), so that the load of a
        // shared machine drifts over both alike.
        let mut setups = Vec::new();
        for &subject in &subjects.clone() {
            match Setup::start(&run, subject, pairs) {
                Ok(setup) => setups.push(setup),
                Err(e) if subject == Subject::Peer => {
                    eprintln!("net: the peer ({PEER}) did not start, measuring {OURS} only: {e}");
                    notes.push(format!("{PEER} could not be started: {e}"));
                    subjects.retain(|&s| s != Subject::Peer);
                }
                Err(e) => return Err(e),
            }
        }
        for (direction, size) in cases {
            let case = case_name(direction, size, pairs);
            let mut best: Vec<Option<(Measurement, Option<Offered>)>> =
                setups.iter().map(|_| None).collect();
            for round in 0..run.rounds {
                // Alternate who goes first.
                let mut order: Vec<usize> = (0..setups.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let setup = &mut setups[i];
                    if setup.failed {
                        continue;
                    }
                    let (m, offered) = match setup.run_case(&run, direction, size) {
                        Ok(result) => result,
                        Err(e) if setup.subject == Subject::Peer => {
                            // The peer's failure is a finding, not the end of the run.
                            eprintln!("  {case}, {PEER}: failed, measuring {OURS} only: {e}");
                            notes.push(format!("{case}, {PEER}: failed: {e}"));
                            setup.failed = true;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if run.rounds > 1 {
                        eprintln!(
                            "    round {}: {case}, {}: {:.0} frames/s",
                            round + 1,
                            setup.subject.name(),
                            m.ops_per_sec()
                        );
                    }
                    let better = best[i]
                        .as_ref()
                        .is_none_or(|(b, _)| m.ops_per_sec() > b.ops_per_sec());
                    if better {
                        best[i] = Some((m, offered));
                    }
                }
            }
            for (setup, best) in setups.iter().zip(best) {
                if let Some((m, offered)) = best {
                    if let Some(offered) = offered {
                        notes.push(offered.note(&case, setup.subject, &m));
                    }
                    table.push(&case, setup.subject.name(), m);
                }
            }
        }
        for setup in setups {
            if !setup.failed {
                setup.finish()?;
            }
        }
    }
    table.print();
    println!("Notes:");
    for note in &notes {
        println!("- {note}");
    }
    let p = run.placement();
    println!(
        "- CPUs: {cores}. Frontend testpmd: forwarding lcore on CPU 1 (it polls, 100%); backend \
         under test on CPU(s) {:?} (the peer's forwarding lcore polls it; our daemon's threads \
         are pinned there); tap-to-guest generator on CPU(s) {:?}{}.",
        p.backend_cpus,
        p.generator_cpus,
        if cores < 4 {
            ", sharing the frontend's core: with 2 CPUs the generator and the frontend compete, \
             and the backend has one core, so a second queue pair cannot add CPU"
        } else {
            ""
        }
    );
    Ok(())
}

fn find_testpmd(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.exists().then(|| path.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("dpdk-testpmd"))
        .find(|p| p.exists())
}

/// What every setup of one run shares.
struct BenchRun {
    testpmd: PathBuf,
    ours_bin: PathBuf,
    cores: usize,
    warmup: Duration,
    /// Length of one round, and rounds per subject and case.
    duration: Duration,
    rounds: u32,
    dir: tempfile::TempDir,
}

/// Which CPUs everyone runs on. The frontend's forwarding lcore gets a core; the backend under
/// test (the peer's forwarding lcore, or all of our daemon's threads) gets another; the
/// tap-to-guest generator shares the frontend's core on a 2- or 3-CPU machine (so that a
/// backend's core is its own), and gets a core of its own with 4 or more.
struct Placement {
    frontend_eal: Vec<String>,
    peer_eal: Vec<String>,
    backend_cpus: Vec<usize>,
    generator_cpus: Vec<usize>,
}

impl BenchRun {
    fn placement(&self) -> Placement {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        if self.cores >= 4 {
            Placement {
                frontend_eal: s(&["-l", "0,1", "--main-lcore", "0"]),
                peer_eal: s(&["-l", "2,3", "--main-lcore", "2"]),
                backend_cpus: vec![3],
                generator_cpus: vec![0],
            }
        } else {
            Placement {
                frontend_eal: s(&["-l", "0,1", "--main-lcore", "0"]),
                peer_eal: s(&["-l", "0,1", "--main-lcore", "1"]),
                backend_cpus: vec![0],
                generator_cpus: vec![1],
            }
        }
    }
}

/// Restricts the calling thread (and what it executes) to `cpus`.
fn pin_to(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes one bit of `set` for a CPU number below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// A network namespace of ours, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Netns> {
        let name = format!("vub-{tag}-{}", std::process::id());
        run_ok("ip", &["netns", "add", &name]).map_err(|e| {
            format!("cannot create a network namespace (the net benchmark needs root): {e}")
        })?;
        let ns = Netns { name };
        // No IPv6 on the taps: no router solicitations among the measured frames.
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
                 echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
            ],
        )?;
        Ok(ns)
    }

    fn exec_prefix(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An interactive testpmd driven through its prompt; its output (unbuffered through `stdbuf`)
/// goes to a file that we read back.
struct Testpmd {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    /// DPDK's runtime directory of this instance (`--file-prefix`), removed when it quits.
    runtime_dir: Option<PathBuf>,
}

impl Testpmd {
    fn start(
        what: &str,
        netns: Option<&Netns>,
        bin: &Path,
        eal: &[String],
        app: &[String],
        log: PathBuf,
    ) -> Result<Testpmd> {
        let mut command = Command::new(if netns.is_some() { "ip" } else { "stdbuf" });
        if let Some(ns) = netns {
            command.args(ns.exec_prefix()).arg("stdbuf");
        }
        command
            .arg("-o0")
            .arg(bin)
            .args(eal)
            .arg("--")
            .args(app)
            .stdin(Stdio::piped())
            .stdout(File::create(&log)?)
            .stderr(Stdio::from(File::create(log.with_extension("err"))?));
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        let runtime_dir = eal
            .iter()
            .find_map(|a| a.strip_prefix("--file-prefix="))
            .map(|prefix| Path::new("/var/run/dpdk").join(prefix));
        let mut testpmd = Testpmd {
            what: what.to_string(),
            child,
            stdin,
            log,
            runtime_dir,
        };
        testpmd.wait_prompt(0, Duration::from_secs(60))?;
        Ok(testpmd)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn died(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}):\n{}\n{}",
                self.what,
                tail(&self.output(), 30),
                tail(
                    &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default(),
                    10
                )
            )),
            _ => None,
        }
    }

    /// Waits until a prompt appears in the output after byte `from`; returns that output.
    fn wait_prompt(&mut self, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.output();
            if let Some(new) = text.get(from..) {
                if new.contains("testpmd> ") {
                    return Ok(new.to_string());
                }
            }
            if let Some(why) = self.died() {
                return Err(why.into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no prompt within {timeout:?}:\n{}",
                    self.what,
                    tail(&text, 30)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one command and returns what it printed.
    fn cmd(&mut self, command: &str) -> Result<String> {
        let from = self.output().len();
        let stdin = self.stdin.as_mut().ok_or("testpmd's stdin is closed")?;
        stdin.write_all(command.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        self.wait_prompt(from, Duration::from_secs(30))
    }

    /// Quits and waits for the process (killing it after a while).
    fn quit(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\nquit\n");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(dir) = self.runtime_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.quit();
    }
}

/// `RX-packets` summed over the ports in a `show port stats all` output.
fn rx_packets(stats: &str) -> Result<u64> {
    let mut total = 0;
    let mut found = false;
    for part in stats.split("RX-packets:").skip(1) {
        let value = part
            .split_whitespace()
            .next()
            .ok_or("empty RX-packets field")?;
        total += value.parse::<u64>()?;
        found = true;
    }
    if !found {
        return Err(format!("no RX-packets in testpmd's output:\n{stats}").into());
    }
    Ok(total)
}

/// From testpmd's `stop` output: TX-dropped / TX-total of port `port`'s forward statistics.
fn forward_drop_share(stop_output: &str, port: u32) -> Option<f64> {
    let header = format!("Forward statistics for port {port} ");
    let section = &stop_output[stop_output.find(&header)?..];
    let field = |key: &str| -> Option<u64> {
        section[section.find(key)? + key.len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (dropped, total) = (field("TX-dropped:")?, field("TX-total:")?);
    (total > 0).then(|| dropped as f64 / total as f64)
}

/// The counters of one interface, from `/proc/PID/net/dev` (the namespace of process PID).
#[derive(Debug, Clone, Copy, Default)]
struct IfCounters {
    rx_packets: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

fn if_counters(pid: u32, ifname: &str) -> Result<IfCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or(0);
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop
        return Ok(IfCounters {
            rx_packets: get(1),
            tx_packets: get(9),
            tx_dropped: get(11),
        });
    }
    Err(format!("{ifname}: not in /proc/{pid}/net/dev").into())
}

/// The backend under test.
enum Backend {
    Ours { child: Child, log: PathBuf },
    Peer(Testpmd),
}

impl Backend {
    fn pid(&self) -> u32 {
        match self {
            Backend::Ours { child, .. } => child.id(),
            Backend::Peer(testpmd) => testpmd.child.id(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Ours { child, .. } = self {
            if matches!(child.try_wait(), Ok(None)) {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(child.try_wait(), Ok(None)) {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// One subject with `pairs` queue pairs, connected to the frontend. Field order is drop order:
/// the frontend quits, then the backend, then the namespace goes.
struct Setup {
    frontend: Testpmd,
    backend: Backend,
    ns: Netns,
    tap: String,
    subject: Subject,
    /// A turn failed (the peer only: ours failing ends the run); no more turns.
    failed: bool,
}

impl Setup {
    fn start(run: &BenchRun, subject: Subject, pairs: u16) -> Result<Setup> {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", if subject == Subject::Ours { "o" } else { "p" });
        let ns = Netns::new(&format!("net{tag}"))?;
        // Interface names: at most 15 characters.
        let tap = format!("vb{tag}{}", pid % 1_000_000);
        let socket = run.dir.path().join(format!("{tag}.sock"));
        let placement = run.placement();
        let q = pairs.to_string();
        let backend = match subject {
            Subject::Ours => {
                let log = run.dir.path().join(format!("{tag}-daemon.log"));
                let out = File::create(&log)?;
                let cpus = placement.backend_cpus.clone();
                let mut command = Command::new("ip");
                // SAFETY: the closure runs in the child between fork and exec and only calls
                // sched_setaffinity, which is async-signal-safe.
                unsafe {
                    command.pre_exec(move || pin_to(&cpus));
                }
                let mut child = command
                    .args(ns.exec_prefix())
                    .arg(&run.ours_bin)
                    .arg("--socket-path")
                    .arg(&socket)
                    .args([
                        "--tap",
                        &tap,
                        "--queue-pairs",
                        &q,
                        "--mac",
                        GUEST_MAC_TEXT,
                        "--up",
                        "--log-level",
                        "warn",
                    ])
                    .stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out)
                    .spawn()?;
                let deadline = Instant::now() + Duration::from_secs(20);
                while !socket.exists() {
                    if let Some(status) = child.try_wait()? {
                        return Err(format!(
                            "{OURS} exited ({status}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        )
                        .into());
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        return Err(format!("{OURS}: socket never appeared").into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Backend::Ours { child, log }
            }
            Subject::Peer => {
                let mut eal = vec![
                    "--no-huge".to_string(),
                    "-m".into(),
                    "512".into(),
                    "--no-pci".into(),
                    format!("--file-prefix=vub-net-be-{pid}-{n}"),
                    "--vdev".into(),
                    format!("net_vhost0,iface={},queues={pairs}", socket.display()),
                    "--vdev".into(),
                    format!("net_tap0,iface={tap}"),
                ];
                eal.extend(placement.peer_eal.iter().cloned());
                let app = vec![
                    "-i".to_string(),
                    "--nb-cores=1".into(),
                    format!("--rxq={pairs}"),
                    format!("--txq={pairs}"),
                    "--total-num-mbufs=32768".into(),
                    "--forward-mode=io".into(),
                ];
                let log = run.dir.path().join(format!("{tag}-backend.log"));
                let testpmd = Testpmd::start(
                    "the peer's testpmd (vhost PMD)",
                    Some(&ns),
                    &run.testpmd,
                    &eal,
                    &app,
                    log,
                )?;
                if !socket.exists() {
                    return Err("the vhost PMD did not create its socket".into());
                }
                Backend::Peer(testpmd)
            }
        };
        let mut eal = vec![
            "--no-huge".to_string(),
            "-m".into(),
            "512".into(),
            "--no-pci".into(),
            format!("--file-prefix=vub-net-fe-{pid}-{n}"),
            "--vdev".into(),
            format!("net_virtio_user0,path={},queues={pairs}", socket.display()),
        ];
        eal.extend(placement.frontend_eal.iter().cloned());
        let app = vec![
            "-i".to_string(),
            "--nb-cores=1".into(),
            format!("--rxq={pairs}"),
            format!("--txq={pairs}"),
            "--total-num-mbufs=32768".into(),
        ];
        let log = run.dir.path().join(format!("{tag}-frontend.log"));
        let frontend = Testpmd::start(
            "the frontend testpmd (virtio_user)",
            None,
            &run.testpmd,
            &eal,
            &app,
            log,
        )?;
        let mut setup = Setup {
            frontend,
            backend,
            ns,
            tap,
            subject,
            failed: false,
        };
        // Let the rings come up (ours attaches a tap queue when its RX ring is enabled).
        std::thread::sleep(Duration::from_millis(500));
        setup.check_alive()?;
        Ok(setup)
    }

    /// One turn at a case: the measurement, and for tap-to-guest what was offered.
    fn run_case(
        &mut self,
        run: &BenchRun,
        direction: Direction,
        size: usize,
    ) -> Result<(Measurement, Option<Offered>)> {
        self.activate()?;
        let (m, offered) = match direction {
            Direction::GuestToTap => (self.guest_to_tap(run, size)?, None),
            Direction::TapToGuest => {
                let (m, offered) = self.tap_to_guest(run, size)?;
                (m, Some(offered))
            }
        };
        let dropped = self.deactivate()?;
        self.check_alive()?;
        let offered = offered.map(|mut o| {
            o.forward_dropped = dropped;
            o
        });
        Ok((m, offered))
    }

    /// The peer's forwarding runs only during its turns (it polls a core while it runs).
    fn activate(&mut self) -> Result<()> {
        if let Backend::Peer(testpmd) = &mut self.backend {
            testpmd.cmd("start")?;
        }
        Ok(())
    }

    /// Stops the peer's forwarding; returns the share of the frames it forwarded towards the
    /// guest that it dropped (the guest's ring was full: the vhost PMD does not push back).
    fn deactivate(&mut self) -> Result<Option<f64>> {
        if let Backend::Peer(testpmd) = &mut self.backend {
            let out = testpmd.cmd("stop")?;
            return Ok(forward_drop_share(&out, 0));
        }
        Ok(None)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Backend::Ours { child, log } = &mut self.backend {
            if let Some(status) = child.try_wait()? {
                return Err(format!(
                    "{OURS} died ({status}):\n{}",
                    tail(&std::fs::read_to_string(log).unwrap_or_default(), 30)
                )
                .into());
            }
        }
        if let Backend::Peer(testpmd) = &mut self.backend {
            if let Some(why) = testpmd.died() {
                return Err(why.into());
            }
        }
        if let Some(why) = self.frontend.died() {
            return Err(why.into());
        }
        Ok(())
    }

    fn counters(&self) -> Result<IfCounters> {
        if_counters(self.backend.pid(), &self.tap)
    }

    fn cpu(&self) -> Result<Duration> {
        process_cpu_time(self.backend.pid())
    }

    /// The frontend transmits `size`-byte frames; counts those that reach the tap.
    fn guest_to_tap(&mut self, run: &BenchRun, size: usize) -> Result<Measurement> {
        self.frontend.cmd("set fwd txonly")?;
        self.frontend.cmd(&format!("set txpkts {size}"))?;
        self.frontend.cmd("start")?;
        std::thread::sleep(run.warmup);
        let (c0, cpu0, t0) = (self.counters()?, self.cpu()?, Instant::now());
        std::thread::sleep(run.duration);
        let (c1, cpu1, elapsed) = (self.counters()?, self.cpu()?, t0.elapsed());
        self.frontend.cmd("stop")?;
        let frames = c1.rx_packets.saturating_sub(c0.rx_packets);
        Ok(Measurement {
            ops: frames,
            bytes: frames * size as u64,
            elapsed,
            backend_cpu: Some(cpu1.saturating_sub(cpu0)),
            ..Measurement::default()
        })
    }

    /// The generator sends `size`-byte frames out of the tap; counts what the frontend receives.
    fn tap_to_guest(&mut self, run: &BenchRun, size: usize) -> Result<(Measurement, Offered)> {
        self.frontend.cmd("set fwd rxonly")?;
        self.frontend.cmd("start")?;
        let generator =
            Generator::start(&self.ns, &self.tap, size, run.placement().generator_cpus)?;
        std::thread::sleep(run.warmup);
        let snapshot = |setup: &mut Setup| -> Result<(u64, Instant, IfCounters, Duration, u64)> {
            let before = Instant::now();
            let stats = setup.frontend.cmd("show port stats all")?;
            let after = Instant::now();
            let at = before + (after - before) / 2;
            Ok((
                rx_packets(&stats)?,
                at,
                setup.counters()?,
                setup.cpu()?,
                generator.sent(),
            ))
        };
        let (rx0, t0, c0, cpu0, sent0) = snapshot(self)?;
        std::thread::sleep(run.duration);
        let (rx1, t1, c1, cpu1, sent1) = snapshot(self)?;
        generator.stop()?;
        self.frontend.cmd("stop")?;
        let frames = rx1.saturating_sub(rx0);
        let elapsed = t1 - t0;
        let measurement = Measurement {
            ops: frames,
            bytes: frames * size as u64,
            elapsed,
            backend_cpu: Some(cpu1.saturating_sub(cpu0)),
            ..Measurement::default()
        };
        let offered = Offered {
            sent: sent1.saturating_sub(sent0),
            into_tap: c1.tx_packets.saturating_sub(c0.tx_packets),
            tap_dropped: c1.tx_dropped.saturating_sub(c0.tx_dropped),
            elapsed,
            forward_dropped: None,
        };
        Ok((measurement, offered))
    }

    fn finish(mut self) -> Result<()> {
        self.check_alive()?;
        self.frontend.quit();
        // The daemon must survive its frontend leaving.
        std::thread::sleep(Duration::from_millis(200));
        if let Backend::Ours { child, log } = &mut self.backend {
            if let Some(status) = child.try_wait()? {
                return Err(format!(
                    "{OURS} died when the frontend left ({status}):\n{}",
                    tail(&std::fs::read_to_string(log).unwrap_or_default(), 30)
                )
                .into());
            }
        }
        Ok(())
    }
}

/// What the tap-to-guest generator offered during the measured interval.
struct Offered {
    /// Frames the generator's sendmmsg accepted.
    sent: u64,
    /// Frames the tap queued for the backend (its tx_packets).
    into_tap: u64,
    /// Frames the tap dropped because the backend did not read them in time (its tx_dropped).
    tap_dropped: u64,
    elapsed: Duration,
    /// The peer's share of frames dropped on their way to the guest (over the whole turn).
    forward_dropped: Option<f64>,
}

impl Offered {
    fn note(&self, case: &str, subject: Subject, delivered: &Measurement) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let offered = self.sent as f64 / secs;
        let ratio = if self.sent > 0 {
            delivered.ops as f64 / self.sent as f64
        } else {
            0.0
        };
        let limit = if ratio >= GENERATOR_BOUND {
            "generator-bound: the backend took nearly all that was offered"
        } else {
            "backend-bound"
        };
        let forward = match self.forward_dropped {
            Some(share) if share >= 0.005 => format!(
                "; its forwarding dropped {:.0}% of the frames bound for the guest (ring full)",
                share * 100.0
            ),
            _ => String::new(),
        };
        format!(
            "{case}, {}: offered {:.0} frames/s, tap queued {:.0}/s and dropped {:.0}/s, \
             delivered {:.0}/s ({:.0}% of offered): {limit}{forward}",
            subject.name(),
            offered,
            self.into_tap as f64 / secs,
            self.tap_dropped as f64 / secs,
            delivered.ops_per_sec(),
            ratio * 100.0,
        )
    }
}

/// Sends frames out of a tap (towards the backend) as fast as it can, from a thread.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Drop for Generator {
    fn drop(&mut self) {
        // A case that failed half-way must not leave the thread sending.
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Generator {
    fn start(ns: &Netns, tap: &str, size: usize, cpus: Vec<usize>) -> Result<Generator> {
        let fd = packet_socket(&ns.name, tap)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let frames: Vec<Vec<u8>> = (0..GEN_BATCH)
            .map(|i| udp_frame(size, 10_000 + i as u16))
            .collect();
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name("net-generator".into())
                .spawn(move || {
                    pin_to(&cpus)?;
                    generate(fd, frames, &stop, &sent)
                })?
        };
        Ok(Generator {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| "the generator thread panicked")?,
            None => Ok(()),
        }
    }
}

fn generate(fd: OwnedFd, frames: Vec<Vec<u8>>, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let mut iovecs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds `msgs.len()` initialised headers whose iovecs point into
        // `frames`, all alive and unmodified for the duration of the call.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
            failures = 0;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                // The tap's queue is stopped: back-pressure, not a failure.
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            failures += 1;
            if failures > 100_000 {
                return Err(format!("the generator cannot send: {e}").into());
            }
            std::thread::yield_now();
        }
    }
    Ok(())
}

/// An AF_PACKET socket sending out of `ifname` in namespace `netns`, bypassing the qdisc.
fn packet_socket(netns: &str, ifname: &str) -> Result<OwnedFd> {
    // Protocol 0: the socket sends but receives nothing.
    let fd = vhost_user_tests::netns::packet_socket(netns, ifname, 0, 0)?;
    let one: libc::c_int = 1;
    // SAFETY: PACKET_QDISC_BYPASS takes an int; the pointer and length describe `one`.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

/// A `size`-byte Ethernet/IPv4/UDP frame from the host to the guest's MAC.
fn udp_frame(size: usize, src_port: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(size, 0xa5);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_requested_size_and_a_valid_ip_header() {
        for size in [60, 64, 1500, 1514] {
            let f = udp_frame(size, 1234);
            assert_eq!(f.len(), size);
            assert_eq!(checksum(&f[14..34]), 0);
        }
    }

    #[test]
    fn forward_drops_are_read_from_the_stop_output() {
        let text = "  ---- Forward statistics for port 0  ----\n  RX-packets: 5 RX-dropped: 0 \
                    RX-total: 5\n  TX-packets: 75 TX-dropped: 25 TX-total: 100\n";
        assert_eq!(forward_drop_share(text, 0), Some(0.25));
        assert_eq!(forward_drop_share(text, 1), None);
    }

    #[test]
    fn rx_packets_are_summed_over_ports() {
        let text = "  RX-packets: 10  RX-missed: 0\n ...\n  RX-packets: 5 RX-missed: 0\n";
        assert_eq!(rx_packets(text).ok(), Some(15));
        assert!(rx_packets("nothing").is_err());
    }

    #[test]
    fn default_args_match_the_command_line_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: NetArgs,
        }
        let parsed = Cli::parse_from(["net"]).args;
        let default = NetArgs::default();
        assert_eq!(parsed.queue_pairs, default.queue_pairs);
        assert_eq!(parsed.frame_sizes, default.frame_sizes);
        assert_eq!(parsed.no_peer, default.no_peer);
        assert_eq!(parsed.rounds, default.rounds);
    }
}
