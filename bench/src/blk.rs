//! blk benchmark: vhost-user-blk against qemu-storage-daemon's vhost-user-blk export, both driven
//! by the same frontend, and fio with io_uring on the host file as the reference.
//!
//! - **Frontend:** the `blkio` crate's `virtio-blk-vhost-user` driver (libblkio in Rust: an
//!   independent vhost-user frontend and virtio-blk driver). One driver thread per queue, each
//!   keeping QD requests in flight on its own queue (so N queues at QD 32 means 32 × N requests
//!   in flight), with buffers in one memory region allocated and mapped through blkio. A thread
//!   waits for completions by blocking on the queue's completion eventfd (`do_io` with
//!   `min_completions = 1`), then resubmits as many requests as completed and kicks once. Blocking
//!   rather than busy-polling the used ring is what a guest driver does with interrupts, and on a
//!   machine with few cores a polling client would steal the backend's CPU and measure the
//!   scheduler instead. Latency is per request, from just before the driver queues it to when its
//!   completion is seen.
//! - **Subjects** (all three in one run, interleaved case by case, so their ratios are fair even on
//!   a noisy machine): ours (`vhost-user-blk`), the peer (`qemu-storage-daemon`), and `fio
//!   --ioengine=io_uring` directly on the same file (`numjobs` = queues, same block size, pattern
//!   and queue depth per job): the cost of the I/O without any virtio in between. fio's
//!   latencies are its total latency (`lat_ns`, submission included, like ours), not `clat`: on
//!   tmpfs, io_uring does part of the work during submission.
//! - **Backings:** a file on `/dev/shm` (tmpfs: buffered I/O, the way tmpfs is used) and a
//!   file on disk (`--disk-dir`, default `/var/tmp`: O_DIRECT for every subject, i.e. `--direct`
//!   for ours, `cache.direct=on` for qsd, `--direct=1` for fio). Files are filled with
//!   non-zero data first (not sparse) and removed afterwards.
//! - **Workloads:** 4 KiB random read and write at QD 1 and QD 32; 128 KiB sequential read and
//!   write at QD 8 (each queue streams through its own slice of the file, as fio's
//!   `offset_increment` does for its jobs). QD 8 × 128 KiB = 1 MiB in flight per queue, what
//!   fio's and QEMU's sequential examples commonly use.
//! - **qsd configuration:** the file node exported directly (no format layer), its export in an
//!   iothread (`--object iothread`, with the iothread's default adaptive polling), `aio=io_uring`
//!   on tmpfs and `aio=native` with `cache.direct=on` on disk. Of `aio=threads|io_uring` ×
//!   iothread on/off (and `native` on disk), these had the best geometric mean over the
//!   workloads here (on tmpfs `aio=threads` does better on 128 KiB reads and worse on everything
//!   at 4 KiB). `--qsd-aio` and `--qsd-iothread` take lists, each combination becoming a
//!   subject, to compare again; `--ours-variant` does the same for our own flags or binaries.
//! - **Backend CPU** is the daemon process's user + system time (all its threads) over the
//!   measured interval, per request. For fio it is fio's own process time (its submitting
//!   threads and the kernel's io_uring workers) — the whole I/O path rather than a backend.
//! - **Correctness:** after connecting, each daemon must return the file's own bytes for a few
//!   random blocks, and a block written through it must be in the file and read back intact. A
//!   request error, a missing completion or a daemon that exits fails the run.
//!
//! `--quick` (CI): 256 MiB files, 1 s per case, both queue counts on tmpfs and only the smallest on
//! disk.

use std::fs::File;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::report::{process_cpu_time, Latencies, Measurement, Result, Table};
use crate::Options;

const OURS: &str = "vhost-user-blk";
const PEER: &str = "qemu-storage-daemon";
const HOST: &str = "host fio io_uring";
/// Run before each measured interval and not counted.
const WARM_UP: Duration = Duration::from_millis(500);
/// How long a driver thread waits for a completion before declaring the backend stuck.
const STUCK: Duration = Duration::from_secs(10);
/// Buffer space per queue in the frontend's memory region: enough for the largest QD × size.
const REGION_PER_QUEUE: usize = 2 << 20;

/// Which file system holds the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backing {
    /// A file on /dev/shm (tmpfs), buffered I/O.
    Shm,
    /// A file in --disk-dir, O_DIRECT for every subject.
    Disk,
}

impl Backing {
    fn name(self) -> &'static str {
        match self {
            Backing::Shm => "shm",
            Backing::Disk => "disk",
        }
    }

    fn direct(self) -> bool {
        self == Backing::Disk
    }
}

/// qemu-storage-daemon's `aio=` for its file node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QsdAio {
    /// QEMU's thread pool (preadv/pwritev in worker threads).
    Threads,
    /// Linux io_uring.
    #[value(name = "io_uring")]
    IoUring,
    /// Linux AIO (needs O_DIRECT).
    Native,
}

impl QsdAio {
    fn name(self) -> &'static str {
        match self {
            QsdAio::Threads => "threads",
            QsdAio::IoUring => "io_uring",
            QsdAio::Native => "native",
        }
    }

    /// What measured fastest here for each backing.
    fn best_for(backing: Backing) -> QsdAio {
        match backing {
            Backing::Shm => QsdAio::IoUring,
            Backing::Disk => QsdAio::Native,
        }
    }
}

/// A yes/no option that can be given as a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// The subjects of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Subject {
    /// Our vhost-user-blk.
    Ours,
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd,
    /// fio with io_uring on the host file.
    Fio,
}

/// Options of `vhost-user-bench blk`.
#[derive(clap::Args, Debug, Clone)]
pub struct BlkArgs {
    /// Queue counts to measure, comma separated (one driver thread per queue).
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [1u16, 2])]
    pub queues: Vec<u16>,

    /// Backing files to measure, comma separated.
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_enum,
          default_values_t = [Backing::Shm, Backing::Disk])]
    pub backing: Vec<Backing>,

    /// Directory of the disk backing file.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub disk_dir: PathBuf,

    /// Subjects to measure, comma separated.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', value_enum,
          default_values_t = [Subject::Ours, Subject::Qsd, Subject::Fio])]
    pub subjects: Vec<Subject>,

    /// qemu-storage-daemon's aio modes, comma separated; more than one (or two --qsd-iothread
    /// values) makes each combination a subject of its own [default: the best measured here].
    #[arg(long, value_enum, value_name = "MODE,...", value_delimiter = ',')]
    pub qsd_aio: Vec<QsdAio>,

    /// Whether qemu-storage-daemon's export runs in an iothread (on) or its main loop (off),
    /// comma separated [default: the best measured here].
    #[arg(long, value_enum, value_name = "on|off,...", value_delimiter = ',')]
    pub qsd_iothread: Vec<Toggle>,

    /// Extra arguments for our daemon, whitespace separated (e.g. "--poll-us 50").
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub ours_args: Option<String>,

    /// Also measure our daemon with these arguments, as a subject of its own (repeatable; for
    /// A/B runs). A first word starting with '/' is another binary to run instead.
    #[arg(long, value_name = "[BIN] ARGS", allow_hyphen_values = true)]
    pub ours_variant: Vec<String>,
}

impl Default for BlkArgs {
    fn default() -> Self {
        BlkArgs {
            queues: vec![1, 2],
            backing: vec![Backing::Shm, Backing::Disk],
            disk_dir: PathBuf::from("/var/tmp"),
            subjects: vec![Subject::Ours, Subject::Qsd, Subject::Fio],
            qsd_aio: Vec::new(),
            qsd_iothread: Vec::new(),
            ours_args: None,
            ours_variant: Vec::new(),
        }
    }
}

/// One I/O pattern.
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    sequential: bool,
    block_size: usize,
    depth: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4k randread qd1",
        write: false,
        sequential: false,
        block_size: 4096,
        depth: 1,
    },
    Workload {
        name: "4k randread qd32",
        write: false,
        sequential: false,
        block_size: 4096,
        depth: 32,
    },
    Workload {
        name: "4k randwrite qd1",
        write: true,
        sequential: false,
        block_size: 4096,
        depth: 1,
    },
    Workload {
        name: "4k randwrite qd32",
        write: true,
        sequential: false,
        block_size: 4096,
        depth: 32,
    },
    Workload {
        name: "128k read qd8",
        write: false,
        sequential: true,
        block_size: 128 << 10,
        depth: 8,
    },
    Workload {
        name: "128k write qd8",
        write: true,
        sequential: true,
        block_size: 128 << 10,
        depth: 8,
    },
];

impl Workload {
    fn fio_rw(&self) -> &'static str {
        match (self.write, self.sequential) {
            (false, false) => "randread",
            (true, false) => "randwrite",
            (false, true) => "read",
            (true, true) => "write",
        }
    }

    /// The part of the file (start, length) that queue `index` of `queues` works on: the whole
    /// file for random I/O, a slice of its own for sequential I/O.
    fn range(&self, size: u64, index: usize, queues: usize) -> (u64, u64) {
        if self.sequential {
            let slice = size / queues as u64 / self.block_size as u64 * self.block_size as u64;
            (slice * index as u64, slice)
        } else {
            (0, size)
        }
    }
}

/// A small, fast pseudo-random generator (xorshift64*): offsets and fill data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs the blk benchmark and prints one table per backing.
pub fn run(opts: &Options, args: &BlkArgs) -> Result<()> {
    let started = Instant::now();
    let size: u64 = if opts.quick { 256 << 20 } else { 1 << 30 };
    let ours_bin = opts.daemon(OURS);
    let mut subjects = args.subjects.clone();
    subjects.dedup();
    if subjects.contains(&Subject::Ours) && !ours_bin.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release` (or point --bin-dir at it)",
            ours_bin.display()
        )
        .into());
    }
    for (subject, program) in [(Subject::Qsd, PEER), (Subject::Fio, "fio")] {
        if subjects.contains(&subject) && !on_path(program) {
            eprintln!("blk: {program} is not installed; skipping it");
            subjects.retain(|s| *s != subject);
        }
    }
    let qsd_version = if subjects.contains(&Subject::Qsd) {
        program_version(PEER)
    } else {
        String::new()
    };
    for &backing in &args.backing {
        let mut queue_counts: Vec<u16> = args.queues.iter().copied().filter(|&q| q > 0).collect();
        queue_counts.dedup();
        if opts.quick && backing == Backing::Disk {
            queue_counts.sort_unstable();
            queue_counts.truncate(1);
        }
        let cases: Vec<(u16, Workload)> = queue_counts
            .iter()
            .flat_map(|&q| WORKLOADS.iter().map(move |w| (q, *w)))
            .filter(|(q, w)| opts.selected(&case_name(w, *q, backing)))
            .collect();
        if cases.is_empty() {
            continue;
        }
        let qsd = QsdConfig::list(args, backing);
        let title = format!(
            "blk on {}: {OURS}{} vs {qsd_version} ({}) vs fio io_uring on the host; \
             blkio virtio-blk-vhost-user driver, one thread per queue, QD per queue, {} s per case",
            match backing {
                Backing::Shm => "/dev/shm (tmpfs, buffered)".to_string(),
                Backing::Disk => format!("{} (O_DIRECT)", args.disk_dir.display()),
            },
            if backing.direct() { " --direct" } else { "" },
            qsd.iter()
                .map(QsdConfig::describe)
                .collect::<Vec<_>>()
                .join(" / "),
            opts.case_duration().as_secs_f64(),
        );
        let mut table = Table::new(&title, OURS);
        eprintln!("{title}");
        let dir = match backing {
            Backing::Shm => PathBuf::from("/dev/shm"),
            Backing::Disk => args.disk_dir.clone(),
        };
        let t = Instant::now();
        let image = BackingFile::create(&dir, size)?;
        eprintln!(
            "  {} MiB backing file {} written in {:.1} s",
            size >> 20,
            image.path().display(),
            t.elapsed().as_secs_f64()
        );
        for &queues in &queue_counts {
            let group: Vec<Workload> = cases
                .iter()
                .filter(|(q, _)| *q == queues)
                .map(|(_, w)| *w)
                .collect();
            if group.is_empty() {
                continue;
            }
            run_group(
                opts, args, &subjects, &ours_bin, &qsd, &image, backing, queues, &group, &mut table,
            )?;
        }
        table.print();
        println!("{}", summary(&table));
    }
    eprintln!("blk: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Per subject other than ours: the geometric mean of ours/this (ops/s) over the cases, the
/// worst case, and in how many cases our median latency was lower.
fn summary(table: &Table) -> String {
    let rows = table.rows();
    let mut subjects: Vec<&str> = Vec::new();
    for row in rows {
        if row.subject != OURS && !subjects.contains(&row.subject.as_str()) {
            subjects.push(&row.subject);
        }
    }
    let mut out = String::new();
    for subject in subjects {
        let mut log_sum = 0.0;
        let mut count = 0usize;
        let mut worst: Option<(f64, &str)> = None;
        let mut lower_p50 = 0usize;
        for row in rows.iter().filter(|r| r.subject == subject) {
            let Some(ours) = rows
                .iter()
                .find(|r| r.case == row.case && r.subject == OURS)
            else {
                continue;
            };
            let (a, b) = (&ours.measurement, &row.measurement);
            if a.ops == 0 || b.ops == 0 {
                continue;
            }
            let ratio = a.ops_per_sec() / b.ops_per_sec();
            log_sum += ratio.ln();
            count += 1;
            if worst.is_none_or(|(w, _)| ratio < w) {
                worst = Some((ratio, &row.case));
            }
            if let (Some(x), Some(y)) = (a.latencies.percentile(50.0), b.latencies.percentile(50.0))
            {
                lower_p50 += usize::from(x < y);
            }
        }
        if let Some((w, case)) = worst {
            out.push_str(&format!(
                "- ours / {subject}: geometric mean {:.2}x over {count} cases, lowest {w:.2}x \
                 ({case}); lower p50 latency in {lower_p50} of {count}\n",
                (log_sum / count as f64).exp()
            ));
        }
    }
    out
}

fn case_name(w: &Workload, queues: u16, backing: Backing) -> String {
    format!("{} {queues}q {}", w.name, backing.name())
}

/// One backing and queue count: both daemons started and connected once, then every workload
/// run on each subject in turn.
#[allow(clippy::too_many_arguments)]
fn run_group(
    opts: &Options,
    args: &BlkArgs,
    subjects: &[Subject],
    ours_bin: &Path,
    qsd: &[QsdConfig],
    image: &BackingFile,
    backing: Backing,
    queues: u16,
    workloads: &[Workload],
    table: &mut Table,
) -> Result<()> {
    let mut rng = Rng::new(0x5eed ^ u64::from(queues));
    let mut served: Vec<(Daemon, Client)> = Vec::new();
    let mut daemons = Vec::new();
    for &subject in subjects {
        match subject {
            Subject::Ours => {
                let main = (
                    OURS.to_string(),
                    ours_bin.to_path_buf(),
                    args.ours_args.clone(),
                );
                let variants = args.ours_variant.iter().map(|spec| {
                    let mut words = spec.split_whitespace().peekable();
                    let bin = match words.peek() {
                        Some(w) if w.starts_with('/') => PathBuf::from(words.next().unwrap_or("")),
                        _ => ours_bin.to_path_buf(),
                    };
                    let extra = words.collect::<Vec<_>>().join(" ");
                    (format!("{OURS} [{spec}]"), bin, Some(extra))
                });
                for (name, bin, extra) in std::iter::once(main).chain(variants) {
                    let mut command = Command::new(bin);
                    command
                        .arg("--file")
                        .arg(image.path())
                        .arg("--num-queues")
                        .arg(queues.to_string());
                    if backing.direct() {
                        command.arg("--direct");
                    }
                    if let Some(extra) = &extra {
                        command.args(extra.split_whitespace());
                    }
                    daemons.push(Daemon::start(name, command, |c, socket| {
                        c.arg("--socket-path").arg(socket);
                    })?);
                }
            }
            Subject::Qsd => {
                for config in qsd {
                    let name = if qsd.len() == 1 {
                        PEER.to_string()
                    } else {
                        format!("{PEER} {}", config.describe())
                    };
                    daemons.push(Daemon::start(name, Command::new(PEER), |c, socket| {
                        config.args(c, image.path(), socket, queues);
                    })?);
                }
            }
            Subject::Fio => {}
        }
    }
    for daemon in daemons {
        let mut client = Client::connect(&daemon.socket, queues)
            .map_err(|e| format!("{}: connecting: {e}{}", daemon.name, daemon.log_tail()))?;
        client
            .spot_check(&image.file, image.size, &mut rng)
            .map_err(|e| format!("{}: correctness check: {e}", daemon.name))?;
        served.push((daemon, client));
    }
    let mut failed = vec![false; served.len()];
    for (index, w) in workloads.iter().enumerate() {
        let case = case_name(w, queues, backing);
        let mut results: Vec<(String, Measurement)> = Vec::new();
        // Alternate which daemon goes first, so neither always runs on a cooler (or hotter)
        // machine.
        let mut order: Vec<usize> = (0..served.len()).collect();
        if index % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if failed[i] {
                continue;
            }
            let (daemon, client) = &mut served[i];
            let measured = client
                .measure(w, image.size, daemon.pid(), opts.case_duration())
                .map_err(|e| format!("{case}: {}: {e}{}", daemon.name, daemon.log_tail()).into())
                .and_then(|m| daemon.check_alive().map(|()| m));
            match measured {
                Ok(m) => results.push((daemon.name.clone(), m)),
                // Our failure fails the run; a peer's is reported, and the peer sits out the
                // rest of this table (its connection may hold requests that never complete).
                Err(e) if daemon.name.starts_with(OURS) => return Err(e),
                Err(e) => {
                    println!(
                        "note: {e}; {} is left out of the cases after this one",
                        daemon.name
                    );
                    failed[i] = true;
                }
            }
        }
        if subjects.contains(&Subject::Fio) {
            let m = run_fio(image, w, queues, backing.direct(), opts.case_duration())
                .map_err(|e| format!("{case}: fio: {e}"))?;
            results.push((HOST.to_string(), m));
        }
        // Rows in a fixed order: ours, the peer(s), the host.
        results.sort_by_key(|(name, _)| (name != OURS, !name.starts_with(OURS), name == HOST));
        for (name, m) in results {
            table.push(&case, &name, m);
        }
    }
    // The clients disconnect before their daemons are stopped.
    for (daemon, client) in served {
        drop(client);
        drop(daemon);
    }
    Ok(())
}

/// How qemu-storage-daemon is configured.
struct QsdConfig {
    aio: QsdAio,
    iothread: bool,
    direct: bool,
}

impl QsdConfig {
    /// The configurations `--qsd-aio` × `--qsd-iothread` ask for.
    fn list(args: &BlkArgs, backing: Backing) -> Vec<QsdConfig> {
        let aios = if args.qsd_aio.is_empty() {
            vec![QsdAio::best_for(backing)]
        } else {
            args.qsd_aio.clone()
        };
        let iothreads = if args.qsd_iothread.is_empty() {
            vec![Toggle::On]
        } else {
            args.qsd_iothread.clone()
        };
        aios.iter()
            .flat_map(|&aio| {
                iothreads.iter().map(move |&t| QsdConfig {
                    aio,
                    iothread: t == Toggle::On,
                    direct: backing.direct(),
                })
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "aio={}, cache.direct={}{}",
            self.aio.name(),
            if self.direct { "on" } else { "off" },
            if self.iothread { ", iothread" } else { "" }
        )
    }

    fn args(&self, c: &mut Command, image: &Path, socket: &Path, queues: u16) {
        c.arg("--blockdev").arg(format!(
            "driver=file,node-name=f,filename={},cache.direct={},aio={}",
            image.display(),
            if self.direct { "on" } else { "off" },
            self.aio.name()
        ));
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,\
             num-queues={queues}",
            socket.display()
        );
        if self.iothread {
            c.arg("--object").arg("iothread,id=iot0");
            export.push_str(",iothread=iot0");
        }
        c.arg("--export").arg(export);
    }
}

/// A file filled with non-zero data: each 512-byte sector starts with its own offset, the rest
/// is pseudo-random, so a daemon that returns the wrong block is caught by the spot check.
struct BackingFile {
    file: File,
    size: u64,
    _temp: tempfile::TempPath,
}

impl BackingFile {
    fn create(dir: &Path, size: u64) -> Result<BackingFile> {
        let temp = tempfile::Builder::new()
            .prefix("vhost-user-bench-blk-")
            .suffix(".img")
            .tempfile_in(dir)
            .map_err(|e| format!("creating a file in {}: {e}", dir.display()))?;
        let (mut file, path) = temp.into_parts();
        const CHUNK: usize = 1 << 20;
        let mut rng = Rng::new(0xb10c);
        let base: Vec<u8> = (0..CHUNK / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        let mut chunk = base.clone();
        let mut offset = 0u64;
        while offset < size {
            for (i, sector) in chunk.chunks_exact_mut(512).enumerate() {
                let stamp = (offset + (i as u64) * 512) ^ 0xa5a5_0000_0000_0001;
                sector[..8].copy_from_slice(&stamp.to_le_bytes());
            }
            let n = CHUNK.min((size - offset) as usize);
            file.write_all(&chunk[..n])
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            offset += n as u64;
        }
        file.sync_all()?;
        Ok(BackingFile {
            file,
            size,
            _temp: path,
        })
    }

    fn path(&self) -> &Path {
        &self._temp
    }
}

/// A backend process serving a socket; stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    name: String,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(
        name: String,
        mut command: Command,
        add_socket: impl FnOnce(&mut Command, &Path),
    ) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("blk.sock");
        let log = dir.path().join("daemon.log");
        add_socket(&mut command, &socket);
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        let mut daemon = Daemon {
            name,
            child,
            socket,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.socket.exists() {
            daemon.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: socket never appeared{}",
                    daemon.name,
                    daemon.log_tail()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => {
                Err(format!("{} exited ({status}){}", self.name, self.log_tail()).into())
            }
            None => Ok(()),
        }
    }

    /// The end of what the daemon logged, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n    ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n  {} log:\n    {tail}", self.name)
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not
            // yet reaped (so not reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blkio `virtio-blk-vhost-user` connection: its queues and one memory region for buffers.
struct Client {
    // Dropped in this order: the queues, then the driver (which unmaps the region).
    queues: Vec<Blkioq>,
    region_addr: usize,
    region_len: usize,
    _blkio: Blkio,
}

impl Client {
    fn connect(socket: &Path, queues: u16) -> Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", &socket.to_string_lossy())?;
        blkio.connect()?;
        blkio.set_i32("num-queues", i32::from(queues))?;
        let outcome = blkio.start()?;
        let region_len = REGION_PER_QUEUE * usize::from(queues);
        let region = blkio.alloc_mem_region(region_len)?;
        blkio.map_mem_region(&region)?;
        // Written data is non-zero too.
        // SAFETY: the region was just allocated and mapped for us, `region_len` bytes long.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region_len) };
        Ok(Client {
            queues: outcome.queues,
            region_addr: region.addr,
            region_len,
            _blkio: blkio,
        })
    }

    /// Address of the `len` bytes at `offset` in the region.
    fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.region_len);
        (self.region_addr + offset) as *mut u8
    }

    /// A copy of the `len` bytes at `offset` in the region.
    fn copy_out(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: `buf` checked that the range is inside the region, which stays mapped for the
        // life of `self`; no request is in flight on it (callers wait for completions).
        unsafe { std::ptr::copy_nonoverlapping(self.buf(offset, len), out.as_mut_ptr(), len) };
        out
    }

    /// Copies `data` into the region at `offset`.
    fn copy_in(&self, offset: usize, data: &[u8]) {
        // SAFETY: as in `copy_out`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(offset, data.len()), data.len())
        };
    }

    /// Reads through the daemon must return the file's bytes; a write through it must land in
    /// the file and read back.
    fn spot_check(&mut self, file: &File, size: u64, rng: &mut Rng) -> Result<()> {
        const LEN: usize = 4096;
        let mut expected = vec![0u8; LEN];
        for _ in 0..8 {
            let offset = rng.below(size / LEN as u64) * LEN as u64;
            let ptr = self.buf(0, LEN);
            self.queues[0].read(offset, ptr, LEN, 0, ReqFlags::empty());
            wait_one(&mut self.queues[0])?;
            file.read_exact_at(&mut expected, offset)?;
            if self.copy_out(0, LEN) != expected {
                return Err(format!("read at {offset} returned other data than the file's").into());
            }
        }
        let offset = rng.below(size / LEN as u64) * LEN as u64;
        let pattern: Vec<u8> = (0..LEN / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        self.copy_in(0, &pattern);
        let ptr = self.buf(0, LEN);
        self.queues[0].write(offset, ptr, LEN, 0, ReqFlags::empty());
        wait_one(&mut self.queues[0])?;
        file.read_exact_at(&mut expected, offset)?;
        if expected != pattern {
            return Err(format!("a write at {offset} did not reach the file").into());
        }
        let ptr = self.buf(LEN, LEN);
        self.queues[0].read(offset, ptr, LEN, 0, ReqFlags::empty());
        wait_one(&mut self.queues[0])?;
        if self.copy_out(LEN, LEN) != pattern {
            return Err(format!("data written at {offset} read back differently").into());
        }
        // Leave the region's fill as it was: later writes put non-zero data in the file.
        self.copy_in(0, &[0x5a; 2 * LEN]);
        Ok(())
    }

    /// Runs `w` on every queue at once (warm-up, then `duration` measured).
    fn measure(
        &mut self,
        w: &Workload,
        size: u64,
        backend: u32,
        duration: Duration,
    ) -> Result<Measurement> {
        let t0 = Instant::now() + WARM_UP;
        let t1 = t0 + duration;
        let queues = self.queues.len();
        let region_addr = self.region_addr;
        let (results, cpu) = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .map(|(i, q)| {
                    let base = region_addr + i * REGION_PER_QUEUE;
                    let range = w.range(size, i, queues);
                    let seed = 0x1234_5678 ^ ((i as u64) << 32) ^ t0.elapsed().as_nanos() as u64;
                    scope.spawn(move || drive_queue(q, base, w, range, t0, t1, seed))
                })
                .collect();
            sleep_until(t0);
            let cpu0 = process_cpu_time(backend);
            sleep_until(t1);
            let cpu1 = process_cpu_time(backend);
            let results: Vec<Result<(u64, Latencies)>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("driver thread panicked".into()))
                })
                .collect();
            let cpu = match (cpu0, cpu1) {
                (Ok(a), Ok(b)) => Some(b.saturating_sub(a)),
                _ => None,
            };
            (results, cpu)
        });
        let mut m = Measurement {
            elapsed: duration,
            backend_cpu: cpu,
            ..Measurement::default()
        };
        for result in results {
            let (ops, latencies) = result?;
            m.ops += ops;
            m.latencies.extend(latencies);
        }
        m.bytes = m.ops * w.block_size as u64;
        if m.ops == 0 {
            return Err("no request completed in the measured interval".into());
        }
        Ok(m)
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// One queue's driver thread: keeps `w.depth` requests in flight until `t1`, counting those that
/// complete in `[t0, t1)`, then waits for the rest.
fn drive_queue(
    q: &mut Blkioq,
    base: usize,
    w: &Workload,
    (start, len): (u64, u64),
    t0: Instant,
    t1: Instant,
    seed: u64,
) -> Result<(u64, Latencies)> {
    let bs = w.block_size;
    let blocks = (len / bs as u64).max(1);
    let mut rng = Rng::new(seed);
    let mut next_seq = 0u64;
    let mut submitted_at = vec![Instant::now(); w.depth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies = Latencies::default();
    let mut ops = 0u64;
    let mut submit = |q: &mut Blkioq, slot: usize, submitted_at: &mut [Instant]| {
        let block = if w.sequential {
            let b = next_seq;
            next_seq = (next_seq + 1) % blocks;
            b
        } else {
            rng.below(blocks)
        };
        let offset = start + block * bs as u64;
        let buf = (base + slot * bs) as *mut u8;
        submitted_at[slot] = Instant::now();
        if w.write {
            q.write(offset, buf, bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, bs, slot, ReqFlags::empty());
        }
    };
    for slot in 0..w.depth {
        submit(q, slot, &mut submitted_at);
    }
    let mut in_flight = w.depth;
    while in_flight > 0 {
        let mut timeout = STUCK;
        let n = q.do_io(&mut completions, 1, Some(&mut timeout), None)?;
        if n == 0 {
            return Err(format!("no completion within {} s", STUCK.as_secs()).into());
        }
        let now = Instant::now();
        let counted = now >= t0 && now < t1;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                )
                .into());
            }
            let slot = c.user_data;
            let Some(&at) = submitted_at.get(slot) else {
                return Err(format!("completion for unknown request {slot}").into());
            };
            if counted {
                ops += 1;
                latencies.record(now - at);
            }
            if now < t1 {
                submit(q, slot, &mut submitted_at);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok((ops, latencies))
}

/// Waits for one completion and fails unless it succeeded.
fn wait_one(q: &mut Blkioq) -> Result<()> {
    let mut completions = [MaybeUninit::<Completion>::uninit(); 1];
    let mut timeout = STUCK;
    let n = q.do_io(&mut completions, 1, Some(&mut timeout), None)?;
    if n != 1 {
        return Err(format!("no completion within {} s", STUCK.as_secs()).into());
    }
    // SAFETY: do_io initialised the first `n` entries.
    let ret = unsafe { completions[0].assume_init_read() }.ret;
    if ret != 0 {
        return Err(format!(
            "request failed: {}",
            std::io::Error::from_raw_os_error(-ret)
        )
        .into());
    }
    Ok(())
}

/// fio with io_uring on the file itself: `numjobs` = queues, `iodepth` = QD per job.
fn run_fio(
    image: &BackingFile,
    w: &Workload,
    queues: u16,
    direct: bool,
    duration: Duration,
) -> Result<Measurement> {
    let mut command = Command::new("fio");
    command
        .arg("--name=host")
        .arg(format!("--filename={}", image.path().display()))
        .args([
            "--ioengine=io_uring",
            "--thread",
            "--group_reporting",
            "--time_based",
        ])
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--rw={}", w.fio_rw()))
        .arg(format!("--bs={}", w.block_size))
        .arg(format!("--iodepth={}", w.depth))
        .arg(format!("--numjobs={queues}"))
        .arg(format!("--ramp_time={}ms", WARM_UP.as_millis()))
        .arg(format!("--runtime={}ms", duration.as_millis().max(1)))
        .args(["--randrepeat=0", "--norandommap", "--lat_percentiles=1"])
        .args(["--percentile_list=50:99", "--output-format=json"]);
    if w.sequential {
        let (_, slice) = w.range(image.size, 0, usize::from(queues));
        command
            .arg(format!("--size={slice}"))
            .arg(format!("--offset_increment={slice}"));
    }
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting fio: {e}"))?;
    // fio's CPU time is sampled over (most of) its measured interval, from outside: its own
    // accounting leaves out the io_uring worker threads that do the copies on tmpfs.
    let spawned = Instant::now();
    let pid = child.id();
    let settle = Duration::from_millis(50).min(duration / 4);
    sleep_until(spawned + WARM_UP + settle);
    let cpu0 = process_cpu_time(pid).ok();
    let sampled_from = Instant::now();
    sleep_until(spawned + WARM_UP + duration);
    let cpu1 = process_cpu_time(pid).ok();
    let sampled = sampled_from.elapsed();
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(format!(
            "fio failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("fio's output is not JSON: {e}"))?;
    let job = &json["jobs"][0][if w.write { "write" } else { "read" }];
    let iops = job["iops"].as_f64().ok_or("fio: no iops in its output")?;
    let percentile = |p: &str| -> Result<Duration> {
        let ns = job["lat_ns"]["percentile"][p]
            .as_u64()
            .ok_or_else(|| format!("fio: no lat_ns percentile {p}"))?;
        Ok(Duration::from_nanos(ns))
    };
    let ops = (iops * duration.as_secs_f64()).round() as u64;
    let backend_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if !sampled.is_zero() => Some(Duration::from_secs_f64(
            b.saturating_sub(a).as_secs_f64() * duration.as_secs_f64() / sampled.as_secs_f64(),
        )),
        _ => None,
    };
    Ok(Measurement {
        ops,
        bytes: ops * w.block_size as u64,
        elapsed: duration,
        latencies: Latencies::from_percentiles(percentile("50.000000")?, percentile("99.000000")?),
        backend_cpu,
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// "qemu-storage-daemon 7.2.22", from its --version.
fn program_version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = text.lines().next()?.to_string();
            let version = line.split_whitespace().nth(2)?.to_string();
            Some(format!("{program} {version}"))
        })
        .unwrap_or_else(|| program.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_queues_get_disjoint_slices() {
        let w = WORKLOADS[4];
        assert!(w.sequential);
        let size = 1 << 30;
        let (a, alen) = w.range(size, 0, 2);
        let (b, blen) = w.range(size, 1, 2);
        assert_eq!((a, b), (0, alen));
        assert_eq!(alen, blen);
        assert!(b + blen <= size);
        assert_eq!(WORKLOADS[1].range(size, 1, 2), (0, size));
    }

    #[test]
    fn default_args_are_the_command_lines_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            blk: BlkArgs,
        }
        let parsed = Cli::parse_from(["x"]).blk;
        let default = BlkArgs::default();
        assert_eq!(parsed.queues, default.queues);
        assert_eq!(parsed.backing, default.backing);
        assert_eq!(parsed.subjects, default.subjects);
        assert_eq!(parsed.disk_dir, default.disk_dir);
    }

    #[test]
    fn rng_offsets_stay_in_range() {
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
