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
//! - **qcow2** (`--backing qcow2-full,qcow2-empty`): the 4 KiB random cases on a qcow2 image in
//!   `--disk-dir` (O_DIRECT), ours (`--format qcow2`) against qsd's qcow2 driver on a file node
//!   (`--blockdev driver=qcow2`). *full*: every cluster allocated (`qemu-img convert` of the
//!   filled file); *empty*: a new image, so reads hit unallocated clusters and writes allocate
//!   (the cases run in the order read, then write). Each subject serves its own copy, made the
//!   same way; fio is left out (it would read the qcow2 file's bytes, not the disk's).
//!
//! `--quick` (CI): 256 MiB files, 1 s per case, both queue counts on tmpfs and only the smallest on
//! disk; on qcow2 64 MiB images, the smallest queue count and the QD 32 cases.

mod client;
mod measure;
mod peer;
mod rbd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use client::{Client, Expect};
use measure::{BackingFile, Rng, Workload, WORKLOADS};
use peer::{program_version, run_fio, Backend, QsdAio, QsdConfig, Toggle};

use vhost_user_tests::guest::find_program;

use crate::report::{Measurement, Result, Table};
use crate::Options;

const OURS: &str = "vhost-user-blk";
const PEER: &str = "qemu-storage-daemon";
const HOST: &str = "host fio io_uring";

/// Which file system holds the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backing {
    /// A file on /dev/shm (tmpfs), buffered I/O.
    Shm,
    /// A file in --disk-dir, O_DIRECT for every subject.
    Disk,
    /// A qcow2 image in --disk-dir with every cluster allocated, O_DIRECT.
    Qcow2Full,
    /// A new (empty) qcow2 image in --disk-dir, O_DIRECT: reads of unallocated clusters,
    /// writes that allocate.
    Qcow2Empty,
    /// An RBD image on a throwaway Ceph cluster (ours and qemu-storage-daemon only).
    Rbd,
}

impl Backing {
    fn name(self) -> &'static str {
        match self {
            Backing::Shm => "shm",
            Backing::Disk => "disk",
            Backing::Qcow2Full => "qcow2-full",
            Backing::Qcow2Empty => "qcow2-empty",
            Backing::Rbd => "rbd",
        }
    }

    fn direct(self) -> bool {
        self != Backing::Shm
    }

    fn qcow2(self) -> bool {
        matches!(self, Backing::Qcow2Full | Backing::Qcow2Empty)
    }
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
          default_values_t = [Backing::Shm, Backing::Disk, Backing::Qcow2Full, Backing::Qcow2Empty, Backing::Rbd])]
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
            backing: vec![
                Backing::Shm,
                Backing::Disk,
                Backing::Qcow2Full,
                Backing::Qcow2Empty,
                Backing::Rbd,
            ],
            disk_dir: PathBuf::from("/var/tmp"),
            subjects: vec![Subject::Ours, Subject::Qsd, Subject::Fio],
            qsd_aio: Vec::new(),
            qsd_iothread: Vec::new(),
            ours_args: None,
            ours_variant: Vec::new(),
        }
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
        if subjects.contains(&subject) && find_program(program).is_none() {
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
        if backing == Backing::Rbd {
            let with_qsd = subjects.contains(&Subject::Qsd);
            if subjects.contains(&Subject::Ours) {
                rbd::run(opts, &ours_bin, with_qsd)?;
            }
            continue;
        }
        let mut queue_counts: Vec<u16> = args.queues.iter().copied().filter(|&q| q > 0).collect();
        queue_counts.dedup();
        if opts.quick && backing != Backing::Shm {
            queue_counts.sort_unstable();
            queue_counts.truncate(1);
        }
        let mut subjects = subjects.clone();
        if backing.qcow2() {
            if let Err(e) = vhost_user_tests::qemu_img::path() {
                eprintln!("blk: {e}; skipping the qcow2 cases");
                continue;
            }
            subjects.retain(|s| *s != Subject::Fio);
        }
        let cases: Vec<(u16, Workload)> = queue_counts
            .iter()
            .flat_map(|&q| WORKLOADS.iter().map(move |w| (q, *w)))
            .filter(|(_, w)| !backing.qcow2() || (!w.sequential && (!opts.quick || w.depth > 1)))
            .filter(|(q, w)| opts.selected(&case_name(w, *q, backing)))
            .collect();
        if cases.is_empty() {
            continue;
        }
        let qsd = QsdConfig::list(args, backing);
        let title = format!(
            "blk on {}: {OURS}{} vs {qsd_version} ({}){}; \
             blkio virtio-blk-vhost-user driver, one thread per queue, QD per queue, {} s per case",
            match backing {
                Backing::Shm => "/dev/shm (tmpfs, buffered)".to_string(),
                Backing::Disk | Backing::Rbd => format!("{} (O_DIRECT)", args.disk_dir.display()),
                Backing::Qcow2Full => format!(
                    "a fully allocated qcow2 image in {} (O_DIRECT)",
                    args.disk_dir.display()
                ),
                Backing::Qcow2Empty => format!(
                    "an empty qcow2 image in {} (O_DIRECT)",
                    args.disk_dir.display()
                ),
            },
            match (backing.direct(), backing.qcow2()) {
                (_, true) => " --format qcow2 --direct",
                (true, false) => " --direct",
                (false, false) => "",
            },
            qsd.iter()
                .map(|q| q.describe(backing.qcow2()))
                .collect::<Vec<_>>()
                .join(" / "),
            if subjects.contains(&Subject::Fio) {
                " vs fio io_uring on the host"
            } else {
                ""
            },
            opts.case_duration().as_secs_f64(),
        );
        let mut table = Table::new(&title, OURS);
        eprintln!("{title}");
        let dir = match backing {
            Backing::Shm => PathBuf::from("/dev/shm"),
            _ => args.disk_dir.clone(),
        };
        let t = Instant::now();
        // qcow2 in the short mode: a quarter of the size (making the images is the slow part);
        // an empty image needs no filled source.
        let size = match backing {
            Backing::Qcow2Full | Backing::Qcow2Empty if opts.quick => size / 4,
            _ => size,
        };
        let fill = if backing == Backing::Qcow2Empty {
            0
        } else {
            size
        };
        let mut image = BackingFile::create(&dir, fill)?;
        image.size = size;
        eprintln!(
            "  {} MiB backing file {} written in {:.1} s",
            fill >> 20,
            image.path().display(),
            t.elapsed().as_secs_f64()
        );
        let target = Target::new(&image, backing, &dir)?;
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
                opts, args, &subjects, &ours_bin, &qsd, &target, backing, queues, &group,
                &mut table,
            )?;
        }
        table.print();
        println!("{}", summary(&table));
    }
    eprintln!("blk: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Geometric mean and lowest of `(ratio, case)` pairs.
fn mean_and_lowest<'a>(ratios: &[(f64, &'a str)]) -> Option<(f64, f64, &'a str)> {
    let lowest = ratios.iter().copied().min_by(|a, b| a.0.total_cmp(&b.0))?;
    let log_mean = ratios.iter().map(|(r, _)| r.ln()).sum::<f64>() / ratios.len() as f64;
    Some((log_mean.exp(), lowest.0, lowest.1))
}

/// Per subject other than ours: the geometric mean of ours/this (ops/s) over the cases, the
/// worst case, and in how many cases our median latency was lower; then the same means of
/// operations per backend CPU-second, over every case and over the QD32 ones.
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
        let mut throughput: Vec<(f64, &str)> = Vec::new();
        let mut lower_p50 = 0usize;
        let mut efficiency: Vec<(f64, &str)> = Vec::new();
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
            throughput.push((a.ops_per_sec() / b.ops_per_sec(), &row.case));
            if let Some(e) = a.efficiency_over(b) {
                efficiency.push((e, &row.case));
            }
            if let (Some(x), Some(y)) = (a.latencies.percentile(50.0), b.latencies.percentile(50.0))
            {
                lower_p50 += usize::from(x < y);
            }
        }
        if let Some((mean, low, case)) = mean_and_lowest(&throughput) {
            let count = throughput.len();
            out.push_str(&format!(
                "- ours / {subject}: geometric mean {mean:.2}x over {count} cases, lowest {low:.2}x \
                 ({case}); lower p50 latency in {lower_p50} of {count}\n"
            ));
        }
        if let Some((mean, low, case)) = mean_and_lowest(&efficiency) {
            out.push_str(&format!(
                "- ours / {subject}, operations per backend CPU-second: geometric mean \
                 {mean:.2}x over {} cases, lowest {low:.2}x ({case})",
                efficiency.len()
            ));
            let qd32: Vec<(f64, &str)> = efficiency
                .iter()
                .copied()
                .filter(|(_, case)| case.contains("qd32"))
                .collect();
            if let Some((mean, low, case)) = mean_and_lowest(&qd32) {
                out.push_str(&format!(
                    "; QD32: {mean:.2}x over {}, lowest {low:.2}x ({case})",
                    qd32.len()
                ));
            }
            out.push('\n');
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
    target: &Target,
    backing: Backing,
    queues: u16,
    workloads: &[Workload],
    table: &mut Table,
) -> Result<()> {
    let image = target.source;
    let mut rng = Rng::new(0x5eed ^ u64::from(queues));
    let mut served: Vec<(Backend, Client)> = Vec::new();
    let mut backends = Vec::new();
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
                        .arg(target.image_for(backends.len())?)
                        .arg("--num-queues")
                        .arg(queues.to_string());
                    if backing.direct() {
                        command.arg("--direct");
                    }
                    if backing.qcow2() {
                        command.args(["--format", "qcow2"]);
                    }
                    if let Some(extra) = &extra {
                        command.args(extra.split_whitespace());
                    }
                    backends.push(Backend::start(name, command, |c, socket| {
                        c.arg("--socket-path").arg(socket);
                    })?);
                }
            }
            Subject::Qsd => {
                for config in qsd {
                    let name = if qsd.len() == 1 {
                        PEER.to_string()
                    } else {
                        format!("{PEER} {}", config.describe(backing.qcow2()))
                    };
                    let file = target.image_for(backends.len())?;
                    backends.push(Backend::start(name, Command::new(PEER), |c, socket| {
                        config.args(c, &file, backing.qcow2(), socket, queues);
                    })?);
                }
            }
            Subject::Fio => {}
        }
    }
    for backend in backends {
        let mut client = Client::connect(&backend.daemon.socket, queues)
            .map_err(|e| format!("{}: connecting: {e}{}", backend.name, backend.log_tail()))?;
        client
            .spot_check(&target.expect(), image.size, &mut rng)
            .map_err(|e| format!("{}: correctness check: {e}", backend.name))?;
        served.push((backend, client));
    }
    let mut failed = vec![false; served.len()];
    for (index, w) in workloads.iter().enumerate() {
        let case = case_name(w, queues, backing);
        let mut results: Vec<(String, Measurement)> = Vec::new();
        // Alternate which backend goes first, so neither always runs on a cooler (or hotter)
        // machine.
        let mut order: Vec<usize> = (0..served.len()).collect();
        if index % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if failed[i] {
                continue;
            }
            let (backend, client) = &mut served[i];
            let measured = client
                .measure(w, image.size, backend.pid(), opts.case_duration())
                .map_err(|e| format!("{case}: {}: {e}{}", backend.name, backend.log_tail()).into())
                .and_then(|m| backend.check_alive().map(|()| m));
            match measured {
                Ok(m) => results.push((backend.name.clone(), m)),
                // Our failure fails the run; a peer's is reported, and the peer sits out the
                // rest of this table (its connection may hold requests that never complete).
                Err(e) if backend.name.starts_with(OURS) => return Err(e),
                Err(e) => {
                    println!(
                        "note: {e}; {} is left out of the cases after this one",
                        backend.name
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
    // The clients disconnect before their backends are stopped.
    for (backend, client) in served {
        drop(client);
        drop(backend);
    }
    Ok(())
}

/// What the daemons of one table serve: the filled raw file itself, or each its own qcow2 image
/// made from it (or empty), so that no two daemons share an image's metadata.
struct Target<'a> {
    source: &'a BackingFile,
    backing: Backing,
    /// Where the qcow2 copies are made (removed with it).
    copies: Option<tempfile::TempDir>,
}

impl<'a> Target<'a> {
    fn new(source: &'a BackingFile, backing: Backing, dir: &Path) -> Result<Target<'a>> {
        let copies = if backing.qcow2() {
            Some(
                tempfile::Builder::new()
                    .prefix("vhost-user-bench-qcow2-")
                    .tempdir_in(dir)?,
            )
        } else {
            None
        };
        Ok(Target {
            source,
            backing,
            copies,
        })
    }

    /// The file the `index`th daemon of a group serves: a new qcow2 image for each.
    fn image_for(&self, index: usize) -> Result<PathBuf> {
        use vhost_user_tests::qemu_img;
        let Some(dir) = &self.copies else {
            return Ok(self.source.path().to_path_buf());
        };
        let image = dir.path().join(format!("{index}.qcow2"));
        let _ = std::fs::remove_file(&image);
        let t = Instant::now();
        if self.backing == Backing::Qcow2Full {
            qemu_img::convert_to_qcow2(self.source.path(), &image, false)?;
        } else {
            qemu_img::create(&image, self.source.size, "")?;
        }
        eprintln!(
            "  qcow2 image {} made in {:.1} s",
            image.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(image)
    }

    /// What reads must return.
    fn expect(&self) -> Expect<'a> {
        match self.backing {
            Backing::Qcow2Full => Expect::Image(Some(&self.source.file)),
            Backing::Qcow2Empty => Expect::Image(None),
            Backing::Shm | Backing::Disk | Backing::Rbd => Expect::Raw(&self.source.file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn summary_gives_operations_per_cpu_second_over_all_and_qd32_cases() {
        use std::time::Duration;
        let m = |ops, cpu_ms| Measurement {
            ops,
            elapsed: Duration::from_secs(1),
            backend_cpu: Some(Duration::from_millis(cpu_ms)),
            ..Measurement::default()
        };
        let mut t = Table::new("t", OURS);
        // qd1: ours 2x the ops on the same CPU (4x per CPU-second); qd32: 1x per CPU-second.
        t.push("4k randread qd1 1q shm", OURS, m(2000, 100));
        t.push("4k randread qd1 1q shm", "qsd", m(1000, 200));
        t.push("4k randread qd32 1q shm", OURS, m(1000, 100));
        t.push("4k randread qd32 1q shm", "qsd", m(1000, 100));
        let text = summary(&t);
        assert!(
            text.contains(
                "- ours / qsd: geometric mean 1.41x over 2 cases, lowest 1.00x \
                 (4k randread qd32 1q shm); lower p50 latency in 0 of 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "operations per backend CPU-second: geometric mean 2.00x over 2 cases, \
                 lowest 1.00x (4k randread qd32 1q shm); QD32: 1.00x over 1"
            ),
            "{text}"
        );
    }
}
