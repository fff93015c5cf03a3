//! Measurements and the table they are printed in.

use std::fmt::Write as _;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The two subjects of the net and console benchmarks: our daemon and its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Ours,
    Peer,
}

/// What a device benchmark calls its two subjects.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub ours: &'static str,
    pub peer: &'static str,
}

impl Subject {
    /// The subject's name in the device's table.
    pub fn name(self, names: Names) -> &'static str {
        match self {
            Subject::Ours => names.ours,
            Subject::Peer => names.peer,
        }
    }

    /// A one-letter tag for file, namespace and interface names.
    pub fn tag(self) -> &'static str {
        match self {
            Subject::Ours => "o",
            Subject::Peer => "p",
        }
    }
}

/// What one subject (ours, a peer, the host) did in one case.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    /// Completed operations (I/O requests, frames, writes).
    pub ops: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall-clock time of the measured interval.
    pub elapsed: Duration,
    /// Per-operation latencies, when the frontend measured them.
    pub latencies: Latencies,
    /// CPU time (user + system) the backend process used during the interval, when known.
    pub backend_cpu: Option<Duration>,
}

impl Measurement {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Backend CPU microseconds per operation.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.backend_cpu?;
        (self.ops > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ops as f64)
    }

    /// How many times more operations per backend CPU-second this measurement got than
    /// `other` (the inverse ratio of their CPU per operation).
    pub fn efficiency_over(&self, other: &Measurement) -> Option<f64> {
        let (ours, theirs) = (self.cpu_us_per_op()?, other.cpu_us_per_op()?);
        (ours > 0.0).then(|| theirs / ours)
    }
}

/// Latency samples in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `p`-th percentile (0..=100), or None without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted
            .get(rank.min(sorted.len() - 1))
            .map(|&ns| Duration::from_nanos(ns))
    }

    /// For percentiles measured elsewhere (fio reports its own).
    pub fn from_percentiles(p50: Duration, p99: Duration) -> Latencies {
        // Two samples reproduce p50 and p99 under `percentile`'s rounding only approximately;
        // keep enough copies that both ranks land on the given values.
        let mut samples = vec![p50.as_nanos() as u64; 50];
        samples.extend(std::iter::repeat_n(p99.as_nanos() as u64, 2));
        samples.sort_unstable();
        Latencies(samples)
    }
}

/// User + system CPU time a process (all its threads) has used so far, from /proc/PID/stat.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/PID/stat")?
            .parse::<u64>()?)
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// One row of the table: a subject's measurement in a case.
#[derive(Debug, Clone)]
pub struct Row {
    /// The workload, e.g. "4k randread qd32 1q shm".
    pub case: String,
    /// Who served it, e.g. "vhost-user-blk", "qemu-storage-daemon", "host fio".
    pub subject: String,
    pub measurement: Measurement,
}

/// Rows of one device's benchmark, printed as a table with ratios of ours to the others.
#[derive(Debug, Default)]
pub struct Table {
    title: String,
    /// The subject whose figures are divided by the others' ("ours").
    ours: String,
    rows: Vec<Row>,
}

impl Table {
    pub fn new(title: &str, ours: &str) -> Table {
        Table {
            title: title.to_string(),
            ours: ours.to_string(),
            rows: Vec::new(),
        }
    }

    /// Adds a row and prints it at once, so a long run shows progress.
    pub fn push(&mut self, case: &str, subject: &str, measurement: Measurement) {
        let row = Row {
            case: case.to_string(),
            subject: subject.to_string(),
            measurement,
        };
        eprintln!("  {}", Self::format_row(&row, None));
        self.rows.push(row);
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn format_row(row: &Row, ratio: Option<(f64, Option<f64>)>) -> String {
        let m = &row.measurement;
        let us = |d: Option<Duration>| {
            d.map_or_else(
                || "-".to_string(),
                |d| format!("{:.1}", d.as_secs_f64() * 1e6),
            )
        };
        let times = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
        format!(
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
            row.case,
            row.subject,
            m.ops_per_sec(),
            m.mb_per_sec(),
            us(m.latencies.percentile(50.0)),
            us(m.latencies.percentile(99.0)),
            m.cpu_us_per_op()
                .map_or_else(|| "-".to_string(), |c| format!("{c:.2}")),
            times(ratio.map(|(r, _)| r)),
            times(ratio.and_then(|(_, e)| e)),
        )
    }

    /// The table as Markdown. "ours/this" is our ops/s divided by this row's ops/s, same case;
    /// "ops per CPU-s ours/this" the same for operations per backend CPU-second.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n### {}\n", self.title);
        let _ = writeln!(
            out,
            "| case | subject | ops/s | MB/s | p50 µs | p99 µs | backend CPU µs/op | ours/this | ops per CPU-s ours/this |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let ours = self
                .rows
                .iter()
                .find(|r| r.case == row.case && r.subject == self.ours);
            let ratio = match ours {
                Some(ours) if row.subject != self.ours && row.measurement.ops > 0 => Some((
                    ours.measurement.ops_per_sec() / row.measurement.ops_per_sec(),
                    ours.measurement.efficiency_over(&row.measurement),
                )),
                _ => None,
            };
            let _ = writeln!(out, "{}", Self::format_row(row, ratio));
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_samples() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_micros(51)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(Latencies::default().percentile(50.0), None);
    }

    #[test]
    fn ratio_is_ours_over_the_peer() {
        let m = |ops| Measurement {
            ops,
            elapsed: Duration::from_secs(1),
            ..Measurement::default()
        };
        let mut t = Table::new("t", "ours");
        t.push("c", "ours", m(300));
        t.push("c", "peer", m(200));
        let text = t.render();
        assert!(text.contains("| c | peer | 200 |"), "{text}");
        assert!(text.contains("1.50x"), "{text}");
    }

    #[test]
    fn efficiency_is_operations_per_cpu_second_ours_over_the_peer() {
        let m = |ops, cpu_ms| Measurement {
            ops,
            elapsed: Duration::from_secs(1),
            backend_cpu: Some(Duration::from_millis(cpu_ms)),
            ..Measurement::default()
        };
        // Ours: 1000 ops on 100 ms (100 µs/op); the peer: 500 ops on 150 ms (300 µs/op).
        assert_eq!(m(1000, 100).efficiency_over(&m(500, 150)), Some(3.0));
        let mut t = Table::new("t", "ours");
        t.push("c", "ours", m(1000, 100));
        t.push("c", "peer", m(500, 150));
        t.push(
            "c",
            "no cpu",
            Measurement {
                backend_cpu: None,
                ..m(500, 0)
            },
        );
        let text = t.render();
        assert!(text.contains("| 300.00 | 2.00x | 3.00x |"), "{text}");
        assert!(text.contains("| - | 2.00x | - |"), "{text}");
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let t = process_cpu_time(std::process::id()).expect("cpu time");
        assert!(t < Duration::from_secs(3600));
    }
}
