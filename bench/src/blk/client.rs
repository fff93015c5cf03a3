//! The frontend: a blkio `virtio-blk-vhost-user` connection, its correctness check, and the
//! driver thread that keeps one queue busy.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use super::measure::{Rng, Workload};
use crate::report::{Latencies, Result};

/// What the disk a daemon serves holds, for [`Client::spot_check`].
pub(super) enum Expect<'a> {
    /// The served file is the disk.
    Raw(&'a File),
    /// A qcow2 image holding this raw file's bytes (`Some`), or zeroes.
    Image(Option<&'a File>),
}

/// How long a driver thread waits for a completion before declaring the backend stuck.
const STUCK: Duration = Duration::from_secs(10);
/// Buffer space per queue in the frontend's memory region: enough for the largest QD × size.
pub(super) const REGION_PER_QUEUE: usize = 2 << 20;

/// A blkio `virtio-blk-vhost-user` connection: its queues and one memory region for buffers.
pub(super) struct Client {
    // Dropped in this order: the queues, then the driver (which unmaps the region).
    pub(super) queues: Vec<Blkioq>,
    pub(super) region_addr: usize,
    region_len: usize,
    _blkio: Blkio,
}

impl Client {
    pub(super) fn connect(socket: &Path, queues: u16) -> Result<Client> {
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

    /// Reads through the daemon must return the disk's bytes (`expect`); a write through it
    /// must read back, and land in the file when the file is the disk.
    pub(super) fn spot_check(&mut self, expect: &Expect, size: u64, rng: &mut Rng) -> Result<()> {
        const LEN: usize = 4096;
        let mut expected = vec![0u8; LEN];
        for _ in 0..8 {
            let offset = rng.below(size / LEN as u64) * LEN as u64;
            let ptr = self.buf(0, LEN);
            self.queues[0].read(offset, ptr, LEN, 0, ReqFlags::empty());
            wait_one(&mut self.queues[0])?;
            match expect {
                Expect::Raw(file) | Expect::Image(Some(file)) => {
                    file.read_exact_at(&mut expected, offset)?
                }
                Expect::Image(None) => expected.fill(0),
            }
            if self.copy_out(0, LEN) != expected {
                return Err(format!("read at {offset} returned other data than the disk's").into());
            }
        }
        let offset = self.round_trip(size, rng)?;
        if let Expect::Raw(file) = expect {
            file.read_exact_at(&mut expected, offset)?;
            if self.copy_out(LEN, LEN) != expected {
                return Err(format!("a write at {offset} did not reach the file").into());
            }
        }
        // Leave the region's fill as it was: later writes put non-zero data in the file.
        self.copy_in(0, &[0x5a; 2 * LEN]);
        Ok(())
    }
}

impl Client {
    /// A random block written through the daemon must read back intact (left in the region's
    /// second 4 KiB); returns its offset.
    pub(super) fn round_trip(&mut self, size: u64, rng: &mut Rng) -> Result<u64> {
        const LEN: usize = 4096;
        let offset = rng.below(size / LEN as u64) * LEN as u64;
        let pattern: Vec<u8> = (0..LEN / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        self.copy_in(0, &pattern);
        let ptr = self.buf(0, LEN);
        self.queues[0].write(offset, ptr, LEN, 0, ReqFlags::empty());
        wait_one(&mut self.queues[0])?;
        let ptr = self.buf(LEN, LEN);
        self.queues[0].read(offset, ptr, LEN, 0, ReqFlags::empty());
        wait_one(&mut self.queues[0])?;
        if self.copy_out(LEN, LEN) != pattern {
            return Err(format!("data written at {offset} read back differently").into());
        }
        // Leave the region's first block as it was: later writes put non-zero data out.
        self.copy_in(0, &[0x5a; LEN]);
        Ok(offset)
    }
}

/// One queue's driver thread: keeps `w.depth` requests in flight until `t1`, counting those that
/// complete in `[t0, t1)`, then waits for the rest.
pub(super) fn drive_queue(
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
