//! The workloads, the backing file they run on, and the measured interval: every queue driven
//! at once, the backend's CPU time sampled around it.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use super::client::{drive_queue, Client, REGION_PER_QUEUE};
use crate::report::{process_cpu_time, Latencies, Measurement, Result};

/// Run before each measured interval and not counted.
pub(super) const WARM_UP: Duration = Duration::from_millis(500);

/// One I/O pattern.
#[derive(Debug, Clone, Copy)]
pub(super) struct Workload {
    pub(super) name: &'static str,
    pub(super) write: bool,
    pub(super) sequential: bool,
    pub(super) block_size: usize,
    pub(super) depth: usize,
}

pub(super) const WORKLOADS: [Workload; 6] = [
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
    pub(super) fn fio_rw(&self) -> &'static str {
        match (self.write, self.sequential) {
            (false, false) => "randread",
            (true, false) => "randwrite",
            (false, true) => "read",
            (true, true) => "write",
        }
    }

    /// The part of the file (start, length) that queue `index` of `queues` works on: the whole
    /// file for random I/O, a slice of its own for sequential I/O.
    pub(super) fn range(&self, size: u64, index: usize, queues: usize) -> (u64, u64) {
        if self.sequential {
            let slice = size / queues as u64 / self.block_size as u64 * self.block_size as u64;
            (slice * index as u64, slice)
        } else {
            (0, size)
        }
    }
}

/// A small, fast pseudo-random generator (xorshift64*): offsets and fill data.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A file filled with non-zero data: each 512-byte sector starts with its own offset, the rest
/// is pseudo-random, so a daemon that returns the wrong block is caught by the spot check.
pub(super) struct BackingFile {
    pub(super) file: File,
    pub(super) size: u64,
    _temp: tempfile::TempPath,
}

impl BackingFile {
    pub(super) fn create(dir: &Path, size: u64) -> Result<BackingFile> {
        let temp = tempfile::Builder::new()
            .prefix("vhost-user-bench-blk-")
            .suffix(".img")
            .tempfile_in(dir)
            .map_err(|e| format!("creating a file in {}: {e}", dir.display()))?;
        let (mut file, path) = temp.into_parts();
        if size == 0 {
            // Nothing to fill: the caller only wants the file (an empty qcow2 image's source).
            return Ok(BackingFile {
                file,
                size,
                _temp: path,
            });
        }
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

    pub(super) fn path(&self) -> &Path {
        &self._temp
    }
}

impl Client {
    /// Runs `w` on every queue at once (warm-up, then `duration` measured).
    pub(super) fn measure(
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

pub(super) fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
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
    fn rng_offsets_stay_in_range() {
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
