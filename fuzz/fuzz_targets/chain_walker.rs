//! The chain walker on hostile descriptor tables: the input is guest memory (a descriptor
//! table at 0, indirect tables and buffers anywhere), then a head, the queue size and ranges
//! to copy. Every segment it accepts must lie inside guest memory, the readable part must come
//! first, and copies out of range must fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_common::chain::ChainBuffers;
use vhost_user_common::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MEM: usize = 0x1_0000;
/// The one-entry available ring that hands the walker the input's head (past the input).
const AVAIL: u64 = MEM as u64;
const USED: u64 = MEM as u64 + 0x1000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (control, memory) = data.split_at(12);
    let head = u16::from_le_bytes([control[0], control[1]]);
    let size = u16::from_le_bytes([control[2], control[3]]).clamp(1, 1024);
    let offset = u64::from(u32::from_le_bytes([
        control[4], control[5], control[6], control[7],
    ]));
    let len = usize::from(u16::from_le_bytes([control[8], control[9]]) & 0x1fff);
    let table = u64::from(control[10]) << 8;
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM + 0x4000)]) else {
        return;
    };
    let n = memory.len().min(MEM);
    let _ = mem.write_slice(&memory[..n], GuestAddress(0));
    // The driver's available ring: one entry, `head`.
    let _ = mem.write_obj(1u16, GuestAddress(AVAIL + 2));
    let _ = mem.write_obj(head, GuestAddress(AVAIL + 4));
    let Ok(mut queue) = Queue::new(1024) else {
        return;
    };
    queue.set_size(size.next_power_of_two().min(1024));
    queue.set_desc_table_address(Some(table as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return;
    };
    let size = queue.size();
    let mut buffers = ChainBuffers::default();
    if buffers.parse_into(chain, &mem, usize::from(size)).is_err() {
        return;
    }
    let mut total = 0u64;
    for seg in buffers.readable().iter().chain(buffers.writable()) {
        assert!(mem.check_range(seg.addr, seg.len as usize));
        total += u64::from(seg.len);
    }
    assert_eq!(total, buffers.readable_len() + buffers.writable_len());
    let mut scratch = vec![0u8; len];
    let read = buffers.read_exact_at(&mem, offset, &mut scratch);
    assert_eq!(read.is_ok(), offset + len as u64 <= buffers.readable_len());
    let write = buffers.write_all_at(&mem, offset, &scratch);
    assert_eq!(write.is_ok(), offset + len as u64 <= buffers.writable_len());
    if let Ok(range) = buffers.writable_range(offset, len as u64) {
        let covered: u64 = range.map(|s| u64::from(s.len)).sum();
        assert_eq!(covered, len as u64);
    }
});
