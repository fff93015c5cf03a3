//! The subjects besides the frontend: our daemon and qemu-storage-daemon started on a socket
//! (through the tests crate's [`Daemon`]), and fio run on the host file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_tests::Daemon;

use super::measure::{sleep_until, BackingFile, Workload, WARM_UP};
use super::{Backing, BlkArgs};
use crate::report::{process_cpu_time, Latencies, Measurement, Result};

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
    pub(super) fn name(self) -> &'static str {
        match self {
            QsdAio::Threads => "threads",
            QsdAio::IoUring => "io_uring",
            QsdAio::Native => "native",
        }
    }

    /// What measured fastest here for each backing.
    pub(super) fn best_for(backing: Backing) -> QsdAio {
        match backing {
            Backing::Shm => QsdAio::IoUring,
            // qcow2 images are on the same disk, opened O_DIRECT too. (RBD has no aio: qsd's
            // rbd driver is librbd's own asynchronous API.)
            Backing::Disk | Backing::Qcow2Full | Backing::Qcow2Empty | Backing::Rbd => {
                QsdAio::Native
            }
        }
    }
}

/// A yes/no option that can be given as a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// A backend serving a socket under the name its rows get; stopped (SIGTERM, then SIGKILL)
/// when dropped.
pub(super) struct Backend {
    pub(super) name: String,
    pub(super) daemon: Daemon,
}

impl Backend {
    /// Starts `command` once `add_socket` has added the socket path it is to serve.
    pub(super) fn start(
        name: String,
        mut command: Command,
        add_socket: impl FnOnce(&mut Command, &Path),
    ) -> Result<Backend> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("blk.sock");
        add_socket(&mut command, &socket);
        let daemon =
            Daemon::start_command(command, socket, dir).map_err(|e| format!("{name}: {e}"))?;
        Ok(Backend { name, daemon })
    }

    pub(super) fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        match self.daemon.child.try_wait()? {
            Some(status) => {
                Err(format!("{} exited ({status}){}", self.name, self.log_tail()).into())
            }
            None => Ok(()),
        }
    }

    /// The end of what the daemon logged, for error messages.
    pub(super) fn log_tail(&self) -> String {
        let tail = self.daemon.log_tail(10).replace('\n', "\n    ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n  {} log:\n    {tail}", self.name)
        }
    }
}

/// How qemu-storage-daemon is configured.
pub(super) struct QsdConfig {
    aio: QsdAio,
    iothread: bool,
    direct: bool,
}

impl QsdConfig {
    /// The configurations `--qsd-aio` × `--qsd-iothread` ask for.
    pub(super) fn list(args: &BlkArgs, backing: Backing) -> Vec<QsdConfig> {
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

    pub(super) fn describe(&self, qcow2: bool) -> String {
        format!(
            "{}aio={}, cache.direct={}{}",
            if qcow2 { "driver=qcow2, " } else { "" },
            self.aio.name(),
            if self.direct { "on" } else { "off" },
            if self.iothread { ", iothread" } else { "" }
        )
    }

    /// Arguments exporting `image`: the file node itself, or with `qcow2` a qcow2 node on it.
    pub(super) fn args(
        &self,
        c: &mut Command,
        image: &Path,
        qcow2: bool,
        socket: &Path,
        queues: u16,
    ) {
        c.arg("--blockdev").arg(format!(
            "driver=file,node-name=f,filename={},cache.direct={},aio={}",
            image.display(),
            if self.direct { "on" } else { "off" },
            self.aio.name()
        ));
        let node = if qcow2 {
            c.arg("--blockdev").arg(format!(
                "driver=qcow2,node-name=q,file=f,cache.direct={}",
                if self.direct { "on" } else { "off" }
            ));
            "q"
        } else {
            "f"
        };
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,\
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

/// fio with io_uring on the file itself: `numjobs` = queues, `iodepth` = QD per job.
pub(super) fn run_fio(
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

/// "qemu-storage-daemon 7.2.22", from its --version.
pub(super) fn program_version(program: &str) -> String {
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
