//! A client for the blk tests: the `blkio` crate's `virtio-blk-vhost-user` driver (libblkio in
//! Rust), an independent vhost-user frontend and virtio-blk driver, over a daemon's real socket.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::Result;

/// Bytes of the memory region every client maps for its buffers.
pub const REGION_SIZE: usize = 8 << 20;

/// A blkio `virtio-blk-vhost-user` connection with one mapped memory region for buffers.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32) -> Result<Client> {
        Self::connect_with(socket, num_queues, false)
    }

    pub fn connect_with(socket: &Path, num_queues: i32, read_only: bool) -> Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", &socket.to_string_lossy())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let outcome = blkio.start()?;
        let region = blkio.alloc_mem_region(REGION_SIZE)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: outcome.queues,
            region,
        })
    }

    pub fn capacity(&self) -> Result<u64> {
        Ok(self.blkio.get_u64("capacity")?)
    }

    pub fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        // SAFETY: the region is ours, mapped, and `offset + len` is inside it (checked in buf).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(offset, data.len()), data.len())
        }
    }

    pub fn copy_out(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: as in copy_in.
        unsafe { std::ptr::copy_nonoverlapping(self.buf(offset, len), out.as_mut_ptr(), len) }
        out
    }

    /// Writes `data` at disk `offset` through queue `queue`, staged at `staging` in the
    /// region; returns the request's result code (0 = success).
    pub fn write_at(
        &mut self,
        queue: usize,
        offset: u64,
        staging: usize,
        data: &[u8],
    ) -> Result<i32> {
        self.copy_in(staging, data);
        let buf = self.buf(staging, data.len());
        let q = &mut self.queues[queue];
        q.write(offset, buf, data.len(), 0, ReqFlags::empty());
        wait_one(q)
    }

    /// Reads `len` bytes at disk `offset` through queue `queue` into `staging` in the region;
    /// returns the request's result code and the bytes there afterwards.
    pub fn read_at(
        &mut self,
        queue: usize,
        offset: u64,
        staging: usize,
        len: usize,
    ) -> Result<(i32, Vec<u8>)> {
        let buf = self.buf(staging, len);
        let q = &mut self.queues[queue];
        q.read(offset, buf, len, 0, ReqFlags::empty());
        let ret = wait_one(q)?;
        Ok((ret, self.copy_out(staging, len)))
    }

    /// Flushes through queue 0; returns the request's result code.
    pub fn flush(&mut self) -> Result<i32> {
        let q = &mut self.queues[0];
        q.flush(0, ReqFlags::empty());
        wait_one(q)
    }
}

/// Waits for one completion on `q` and returns its result code (0 = success).
pub fn wait_one(q: &mut Blkioq) -> Result<i32> {
    let mut completions = [MaybeUninit::<Completion>::uninit(); 1];
    let mut timeout = Duration::from_secs(20);
    let n = q.do_io(&mut completions, 1, Some(&mut timeout), None)?;
    if n != 1 {
        return Err("no completion within 20 s".into());
    }
    // SAFETY: do_io initialised the first `n` entries.
    Ok(unsafe { completions[0].assume_init_read() }.ret)
}

/// Waits for `count` completions and returns how many failed.
pub fn wait_many(q: &mut Blkioq, count: usize) -> Result<usize> {
    let mut done = 0;
    let mut failed = 0;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..count).map(|_| MaybeUninit::uninit()).collect();
    while done < count {
        let mut timeout = Duration::from_secs(20);
        let n = q.do_io(
            &mut completions[..count - done],
            1,
            Some(&mut timeout),
            None,
        )?;
        if n == 0 {
            return Err(format!("{done} of {count} completions within 20 s").into());
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            if unsafe { c.assume_init_read() }.ret != 0 {
                failed += 1;
            }
        }
        done += n;
    }
    Ok(failed)
}
