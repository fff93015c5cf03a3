//! The inflight buffer (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) as the frontend holds it,
//! read and written with byte offsets from the spec (QEMU docs/interop/vhost-user.rst,
//! "Inflight I/O tracking"), independently of the daemon's typed layout.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vhost::vhost_user::message::VhostUserInflight;

use crate::Result;

/// Byte layout of a queue region, from the spec (QEMU docs/interop/vhost-user.rst) and
/// libvhost-user's stride.
pub fn region_size(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 2).div_ceil(64) * 64
}

/// The inflight buffer as the frontend holds it across backend restarts.
pub struct Inflight {
    pub info: VhostUserInflight,
    pub file: File,
}

impl Inflight {
    pub fn region(&self, queue: usize) -> u64 {
        queue as u64 * region_size(self.info.queue_size)
    }
    pub fn read_u16(&self, at: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.file.read_exact_at(&mut b, at)?;
        Ok(u16::from_ne_bytes(b))
    }
    pub fn write_u16(&self, at: u64, v: u16) -> Result<()> {
        Ok(self.file.write_all_at(&v.to_ne_bytes(), at)?)
    }
    pub fn version(&self, q: usize) -> Result<u16> {
        self.read_u16(self.region(q) + 8)
    }
    pub fn desc_num(&self, q: usize) -> Result<u16> {
        self.read_u16(self.region(q) + 10)
    }
    pub fn used_idx(&self, q: usize) -> Result<u16> {
        self.read_u16(self.region(q) + 14)
    }
    pub fn set_last_batch_head(&self, q: usize, head: u16) -> Result<()> {
        self.write_u16(self.region(q) + 12, head)
    }
    pub fn set_used_idx(&self, q: usize, idx: u16) -> Result<()> {
        self.write_u16(self.region(q) + 14, idx)
    }
    pub fn desc_at(&self, q: usize, head: u16) -> u64 {
        self.region(q) + 16 + 16 * u64::from(head)
    }
    /// (inflight, next, counter) of descriptor `head`.
    pub fn desc(&self, q: usize, head: u16) -> Result<(u8, u16, u64)> {
        let mut b = [0u8; 16];
        self.file.read_exact_at(&mut b, self.desc_at(q, head))?;
        let next = u16::from_ne_bytes([b[6], b[7]]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[8..]);
        Ok((b[0], next, u64::from_ne_bytes(c)))
    }
    pub fn set_desc(
        &self,
        q: usize,
        head: u16,
        inflight: u8,
        next: u16,
        counter: u64,
    ) -> Result<()> {
        let mut b = [0u8; 16];
        b[0] = inflight;
        b[6..8].copy_from_slice(&next.to_ne_bytes());
        b[8..].copy_from_slice(&counter.to_ne_bytes());
        Ok(self.file.write_all_at(&b, self.desc_at(q, head))?)
    }
    /// Heads marked in flight, with their counters.
    pub fn in_flight(&self, q: usize) -> Result<Vec<(u16, u64)>> {
        let mut out = Vec::new();
        for head in 0..self.info.queue_size {
            let (inflight, _, counter) = self.desc(q, head)?;
            if inflight != 0 {
                out.push((head, counter));
            }
        }
        Ok(out)
    }
}
