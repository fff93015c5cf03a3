//! Transmit batches through io_uring: one `io_uring_enter` writes a whole batch of frames to the
//! tap, where `writev` costs a system call per frame (entry, exit and the seccomp filter run
//! are most of the daemon's own CPU on small frames; the tap still takes one frame per write).
//!
//! - The entries of a batch are not linked: the kernel issues them in order, each at once, in
//!   the submitting call. (Linking them would stop the batch at a full tap, but runs every
//!   entry after the first through task work, which cost more than the system calls saved.)
//! - Every write carries `RWF_NOWAIT`: a full tap answers `EAGAIN` at once (without the flag
//!   io_uring waits for room, even on a non-blocking file). A frame after a refused one may
//!   still go out if the tap drained in between; the caller decides what that means.
//! - The tap queue is a registered file (no descriptor lookup per frame), and the ring is
//!   locked down before use (io_uring restrictions): WRITEV on that file and nothing else,
//!   whatever a bug elsewhere might put in it. io_uring operations do not pass through the
//!   seccomp filter, so this is their filter.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

/// Frames written to a tap queue with one `io_uring_enter`, in order.
pub struct TxUring {
    ring: Mutex<IoUring>,
    /// The submission queue's size: the most frames submitted at once.
    entries: usize,
}

impl std::fmt::Debug for TxUring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxUring")
            .field("entries", &self.entries)
            .finish()
    }
}

impl TxUring {
    /// A ring for batches of up to `entries` frames to `fd` (which it keeps open), restricted
    /// to WRITEV on it.
    pub fn new(fd: RawFd, entries: u32) -> io::Result<TxUring> {
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let submitter = ring.submitter();
        submitter.register_files(&[fd])?;
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
            Restriction::sqe_flags_allowed(squeue::Flags::FIXED_FILE.bits()),
        ])?;
        submitter.register_enable_rings()?;
        let entries = ring.params().sq_entries() as usize;
        Ok(TxUring {
            ring: Mutex::new(ring),
            entries,
        })
    }

    /// Writes `frames` (ranges of `iovecs`) to the file in order and pushes one result per
    /// frame onto `results`, until every frame has one or a submission ends with the file
    /// full (`WouldBlock`). Frames after a `WouldBlock` within a submission were tried too. A
    /// range outside `iovecs` is written as an empty frame (which a tap refuses).
    ///
    /// An `Err` means the ring itself failed: frames after the last result may or may not
    /// have been sent, and the caller should stop using this ring.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable for the whole call.
    pub unsafe fn write_frames(
        &self,
        iovecs: &[libc::iovec],
        frames: &[(usize, usize)],
        results: &mut Vec<io::Result<usize>>,
    ) -> io::Result<()> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut codes = [0i32; 256];
        for chunk in frames.chunks(self.entries.min(codes.len())) {
            {
                let mut queue = ring.submission();
                for (position, &(from, to)) in chunk.iter().enumerate() {
                    let frame = iovecs.get(from..to).unwrap_or_default();
                    let entry = opcode::Writev::new(
                        types::Fixed(0),
                        frame.as_ptr(),
                        u32::try_from(frame.len()).unwrap_or(u32::MAX),
                    )
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(position as u64);
                    // SAFETY: the entry's iovec array is `frame`, borrowed from `iovecs` for
                    // the whole call, and we wait below for every entry to complete before
                    // returning; the buffers it describes are the caller's contract.
                    unsafe { queue.push(&entry) }.map_err(|_| {
                        io::Error::other("the transmit ring has no room for its own batch")
                    })?;
                }
            }
            let mut completed = 0;
            while completed < chunk.len() {
                match ring.submit_and_wait(chunk.len() - completed) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for cqe in ring.completion() {
                    if let Some(code) = codes.get_mut(cqe.user_data() as usize) {
                        *code = cqe.result();
                        completed += 1;
                    }
                }
            }
            for &code in codes.iter().take(chunk.len()) {
                results.push(if code >= 0 {
                    Ok(code as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                });
            }
            if codes.get(chunk.len().wrapping_sub(1)) == Some(&-libc::EAGAIN) {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn iovec(bytes: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        }
    }

    /// A non-blocking packet-mode pipe: one write is one "frame", as on a tap.
    fn packet_pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe {
            libc::pipe2(
                fds.as_mut_ptr(),
                libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_DIRECT,
            )
        };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn read_packet(fd: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    #[test]
    fn frames_are_written_in_order_each_gathered_from_its_iovecs() {
        let (reader, writer) = packet_pipe();
        let ring = TxUring::new(writer.as_raw_fd(), 4).unwrap_or_else(|e| panic!("io_uring: {e}"));
        let parts: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 3 + usize::from(i)]).collect();
        // Ten frames of two iovecs each, more than one ring's worth.
        let iovecs: Vec<libc::iovec> = parts.iter().flat_map(|p| [iovec(p), iovec(p)]).collect();
        let frames: Vec<(usize, usize)> = (0..10).map(|i| (2 * i, 2 * i + 2)).collect();
        let mut results = Vec::new();
        // SAFETY: the iovecs describe `parts`, alive for the call.
        unsafe { ring.write_frames(&iovecs, &frames, &mut results) }
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(results.len(), 10);
        for (i, part) in parts.iter().enumerate() {
            assert_eq!(results[i].as_ref().ok(), Some(&(2 * part.len())));
            let packet = read_packet(&reader).unwrap_or_else(|| panic!("frame {i} missing"));
            assert_eq!(packet, [part.clone(), part.clone()].concat(), "frame {i}");
        }
        assert!(read_packet(&reader).is_none(), "nothing more was written");
    }

    #[test]
    fn a_full_file_ends_the_batch_with_would_block() {
        let (reader, writer) = packet_pipe();
        let ring = TxUring::new(writer.as_raw_fd(), 8).unwrap_or_else(|e| panic!("io_uring: {e}"));
        let page = vec![7u8; 4096];
        let iovecs = [iovec(&page)];
        // A pipe holds 16 pages: 40 one-page frames cannot all fit, and nothing drains it.
        let frames = vec![(0, 1); 40];
        let mut results = Vec::new();
        // SAFETY: the iovec describes `page`, alive for the call.
        unsafe { ring.write_frames(&iovecs, &frames, &mut results) }
            .unwrap_or_else(|e| panic!("{e}"));
        let written = results.iter().take_while(|r| r.is_ok()).count();
        assert_eq!(written, 16);
        assert!(
            results.len() < 40,
            "no submission after one that ended full"
        );
        assert!(results[written..]
            .iter()
            .all(|r| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)));
        let mut read = 0;
        while read_packet(&reader).is_some() {
            read += 1;
        }
        assert_eq!(read, written);
    }

    #[test]
    fn a_refused_frame_is_reported_and_the_next_ones_are_written() {
        let (reader, writer) = packet_pipe();
        let ring = TxUring::new(writer.as_raw_fd(), 8).unwrap_or_else(|e| panic!("io_uring: {e}"));
        let bytes = [1u8, 2, 3];
        let iovecs = [
            iovec(&bytes),
            libc::iovec {
                // Unmapped: the kernel refuses the frame with EFAULT.
                iov_base: 8 as *mut libc::c_void,
                iov_len: 8,
            },
        ];
        let frames = [(0, 1), (1, 2), (0, 1), (0, 1)];
        let mut results = Vec::new();
        // SAFETY: the kernel checks the unmapped iovec and fails the write with EFAULT; the
        // others describe `bytes`.
        unsafe { ring.write_frames(&iovecs, &frames, &mut results) }
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(results.len(), 4);
        assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok());
        assert_eq!(
            results[1].as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::EFAULT))
        );
        let packets: Vec<_> = std::iter::from_fn(|| read_packet(&reader)).collect();
        assert_eq!(packets, vec![bytes.to_vec(); 3]);
    }

    #[test]
    fn other_operations_are_refused_by_the_ring() {
        let (_reader, writer) = packet_pipe();
        let ring = TxUring::new(writer.as_raw_fd(), 2).unwrap_or_else(|e| panic!("io_uring: {e}"));
        let mut ring = ring.ring.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = [1u8];
        let iov = [iovec(&bytes)];
        let other_fd = opcode::Writev::new(types::Fd(2), iov.as_ptr(), 1).build();
        for entry in [opcode::Nop::new().build(), other_fd] {
            // SAFETY: a NOP references no memory; the WRITEV's iovec describes `bytes`.
            unsafe { ring.submission().push(&entry) }.unwrap_or_else(|e| panic!("{e}"));
            ring.submit_and_wait(1).unwrap_or_else(|e| panic!("{e}"));
            let cqe = ring
                .completion()
                .next()
                .unwrap_or_else(|| panic!("no completion"));
            assert_eq!(cqe.result(), -libc::EACCES);
        }
    }
}
