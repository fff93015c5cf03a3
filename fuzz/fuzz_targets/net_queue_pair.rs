//! A hostile virtio-net driver: the input becomes the guest memory of a transmit ring and of a
//! receive ring (descriptor tables, available rings, buffers and headers), and the frames a
//! tap hands over. The queue pair moves frames both ways: it must not panic or spin, every
//! iovec it gives the tap must lie in guest memory, and what it writes into receive buffers
//! must fit them.
#![no_main]

use std::cell::{Cell, RefCell};
use std::io;

use libfuzzer_sys::fuzz_target;
use vhost_user_backend::VringT;
use vhost_user_common::ring::Ring;
use vhost_user_common::testing::TestQueue;
use vhost_user_net::queue_pair::{Framing, QueuePair, TapIo};
use vhost_user_net::stats::Stats;
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 16;
const MEM: usize = 0x1_0000;

/// A tap that hands out the input's frames and reads every byte of what it is given.
struct FuzzTap<'a> {
    frames: RefCell<std::slice::Chunks<'a, u8>>,
    written: Cell<usize>,
}

impl TapIo for FuzzTap<'_> {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(frame) = self.frames.borrow_mut().next() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let mut total = 0;
        for iov in iovecs {
            // SAFETY: the caller vouches for the iovecs; reading each byte is what a tap does
            // (and what the sanitizer checks).
            let bytes =
                unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) };
            std::hint::black_box(bytes.iter().fold(0u8, |acc, &b| acc ^ b));
            total += bytes.len();
        }
        self.written.set(self.written.get() + total);
        Ok(total)
    }
}

struct State {
    rx: TestQueue,
    tx: TestQueue,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn load(queue: &TestQueue, image: &[u8]) {
    let mut memory = vec![0u8; MEM];
    let n = image.len().min(MEM);
    memory[..n].copy_from_slice(&image[..n]);
    let _ = queue.memory().write_slice(&memory, GuestAddress(0));
    queue.vring.set_queue_next_avail(0);
    queue.vring.set_queue_next_used(0);
    queue.vring.set_queue_ready(true);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let split = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
    let (images, frames) = data[3..].split_at(split);
    let (rx_image, tx_image) = images.split_at(images.len() / 2);
    STATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let st = cell.get_or_insert_with(|| State {
            rx: TestQueue::new(SIZE, MEM as u64, true),
            tx: TestQueue::new(SIZE, MEM as u64, true),
        });
        load(&st.rx, rx_image);
        load(&st.tx, tx_image);
        let framing = Framing {
            hdr_len: if flags & 1 != 0 { 12 } else { 10 },
            mergeable: flags & 2 != 0,
        };
        let frame_len = usize::from(flags >> 2).max(1) * 8;
        let tap = FuzzTap {
            frames: RefCell::new(frames.chunks(frame_len)),
            written: Cell::new(0),
        };
        let stats = Stats::default();
        let mut pair = QueuePair::new(0);
        let mut rx = Ring::new(st.rx.vring.clone(), "pair 0 RX");
        let mut tx = Ring::new(st.tx.vring.clone(), "pair 0 TX");
        pair.process_tx(&mut tx, &st.tx.memory(), &tap, framing, &stats);
        pair.process_rx(&mut rx, &st.rx.memory(), &tap, framing, &stats);
        pair.return_held(&mut rx);
        rx.complete(&st.rx.memory());
    });
});
