//! The guest driver's side of one virtqueue, as the benchmark drives it.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vhost_user_tests::{GuestRam, TestVmm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::report::Result;

/// The guest side of one split virtqueue with single-descriptor chains: descriptor `slot` always
/// points at buffer `slot`, so a used entry's id names the buffer.
pub(super) struct Ring {
    pub(super) size: u16,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
    pub(super) base: u64,
    pub(super) chunk: usize,
    pub(super) avail_idx: u16,
    pub(super) published: u16,
    pub(super) last_used: u16,
    /// Slots the device holds, with the length posted.
    pub(super) outstanding: HashMap<u16, u32>,
    pub(super) free: Vec<u16>,
    /// Used entries for a slot the device did not hold, or more entries than the ring has.
    pub(super) violations: u64,
    /// Of those: entries beyond the ring's size at once (several for one buffer).
    pub(super) overrun: u64,
}

impl Ring {
    pub(super) fn new(
        vmm: &TestVmm,
        index: usize,
        base: u64,
        chunk: usize,
        depth: u16,
    ) -> Result<Ring> {
        let q = &vmm.queues[index];
        Ok(Ring {
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            kick: q.kick.try_clone()?,
            call: q.call.try_clone()?,
            base,
            chunk,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            outstanding: HashMap::new(),
            free: (0..depth).rev().collect(),
            violations: 0,
            overrun: 0,
        })
    }

    pub(super) fn buffer(&self, slot: u16) -> u64 {
        self.base + u64::from(slot) * self.chunk as u64
    }

    /// Makes buffer `slot` (its first `len` bytes) available; visible after `publish`.
    pub(super) fn post(
        &mut self,
        ram: &GuestRam,
        slot: u16,
        len: u32,
        writable: bool,
    ) -> Result<()> {
        let at = self.desc + 16 * u64::from(slot);
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&self.buffer(slot).to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&(if writable { 2u16 } else { 0 }).to_le_bytes());
        ram.mem.write_slice(&desc, GuestAddress(at))?;
        let entry = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        ram.mem.write_obj(slot.to_le(), GuestAddress(entry))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.outstanding.insert(slot, len);
        Ok(())
    }

    /// Publishes the posted chains and kicks if the device asked for it (EVENT_IDX).
    pub(super) fn publish(&mut self, ram: &GuestRam) -> Result<()> {
        if self.avail_idx == self.published {
            return Ok(());
        }
        fence(Ordering::SeqCst);
        ram.mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )?;
        fence(Ordering::SeqCst);
        let event_at = self.used + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(ram.mem.load(GuestAddress(event_at), Ordering::Acquire)?);
        let (new, old) = (self.avail_idx, self.published);
        self.published = new;
        // vring_need_event(event, new, old)
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kick.write(1)?;
        }
        Ok(())
    }

    /// Takes the used entries (slot, len), asks for an interrupt at the next one, and checks
    /// once more for entries that came meanwhile. Several entries for one slot in one call
    /// count once, with the largest length (vhost-device-console adds one per byte).
    pub(super) fn reap(&mut self, ram: &GuestRam, out: &mut Vec<(u16, u32)>) -> Result<()> {
        out.clear();
        loop {
            let idx = u16::from_le(
                ram.mem
                    .load(GuestAddress(self.used + 2), Ordering::Acquire)?,
            );
            fence(Ordering::SeqCst);
            let mut pending = idx.wrapping_sub(self.last_used);
            if pending == 0 {
                break;
            }
            if pending > self.size {
                // The device wrote more entries than the ring holds: the oldest are gone.
                self.violations += u64::from(pending - self.size);
                self.overrun += u64::from(pending - self.size);
                self.last_used = idx.wrapping_sub(self.size);
                pending = self.size;
            }
            for _ in 0..pending {
                let slot_at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
                let mut entry = [0u8; 8];
                ram.mem.read_slice(&mut entry, GuestAddress(slot_at))?;
                let id = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let len = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
                self.last_used = self.last_used.wrapping_add(1);
                match out.iter_mut().find(|(s, _)| u32::from(*s) == id) {
                    Some(seen) => seen.1 = seen.1.max(len),
                    None => match u16::try_from(id) {
                        Ok(slot) if self.outstanding.contains_key(&slot) => out.push((slot, len)),
                        _ => self.violations += 1,
                    },
                }
            }
            ram.mem.store(
                self.last_used.to_le(),
                GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
                Ordering::Release,
            )?;
            fence(Ordering::SeqCst);
        }
        for &(slot, _) in out.iter() {
            self.outstanding.remove(&slot);
            self.free.push(slot);
        }
        Ok(())
    }

    /// True when the device has taken (popped) every chain published: its `avail_event`
    /// (EVENT_IDX) is the driver's avail index.
    pub(super) fn device_took_all(&self, ram: &GuestRam) -> Result<bool> {
        let event_at = self.used + 4 + 8 * u64::from(self.size);
        let event = u16::from_le(ram.mem.load(GuestAddress(event_at), Ordering::Acquire)?);
        Ok(event == self.published)
    }

    /// Waits up to `timeout` for an interrupt.
    pub(super) fn wait(&self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = timeout.as_millis().clamp(1, 1000) as i32;
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        let _ = self.call.read();
    }
}
