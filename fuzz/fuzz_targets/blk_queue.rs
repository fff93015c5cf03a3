//! A hostile virtio-blk driver: the input becomes the guest memory holding the queue's
//! descriptor table, available ring and buffers, and the queue worker then serves the ring
//! (synchronous I/O on a small disk on a memory file system). Whatever the rings, chains,
//! headers, sectors and lengths say, the worker must not panic, spin or touch memory outside
//! the guest's.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_user_backend::VringT;
use vhost_user_blk::disk::{Disk, DiskOptions};
use vhost_user_blk::executor::{EngineKind, ExecContext, Executor};
use vhost_user_blk::queue::QueueWorker;
use vhost_user_blk::request::Limits;
use vhost_user_common::testing::TestQueue;
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 16;
const MEM: usize = 0x1_0000;
const DISK: u64 = 1 << 20;

struct State {
    queue: TestQueue,
    worker: QueueWorker,
    _file: tempfile::NamedTempFile,
}

fn state() -> State {
    let file = tempfile::NamedTempFile::new_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .expect("temporary disk");
    file.as_file().set_len(DISK).expect("disk size");
    let disk = Disk::open(&DiskOptions::raw(file.path()))
    .expect("open disk");
    let ctx = Arc::new(ExecContext::new(Arc::new(disk), b"fuzz".to_vec()));
    let limits = Limits {
        capacity_sectors: DISK >> 9,
        logical_block_size: 512,
        readonly: false,
        max_discard_sectors: 64,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 64,
        max_write_zeroes_seg: 4,
    };
    let executor = Executor::new(EngineKind::Sync, false, SIZE, None).expect("executor");
    let queue = TestQueue::new(SIZE, MEM as u64, true);
    let mut worker = QueueWorker::new(0, ctx, limits, Duration::ZERO, executor, SIZE);
    worker.set_memory(queue.mem.clone());
    State {
        queue,
        worker,
        _file: file,
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    STATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let st = cell.get_or_insert_with(state);
        let mem = st.queue.memory();
        let mut image = vec![0u8; MEM];
        let n = memory.len().min(MEM);
        image[..n].copy_from_slice(&memory[..n]);
        let _ = mem.write_slice(&image, GuestAddress(0));
        let event_idx = flags & 1 != 0;
        // A fresh ring position for every input (as after SET_VRING_BASE).
        st.worker.drain();
        st.queue
            .vring
            .set_queue_next_avail(u16::from(flags >> 1) & 0x3f);
        st.queue.vring.set_queue_next_used(0);
        st.queue.vring.set_queue_event_idx(event_idx);
        let vring = st.queue.vring.clone();
        st.worker.process(&vring, event_idx);
        st.worker.process(&vring, event_idx);
        st.worker.drain();
    });
});
