//! Copy threads for reads on memory file systems.
//!
//! On tmpfs a read or write is a memory copy the kernel cannot do asynchronously: io_uring hands
//! it to a worker thread, which costs more than the copy for small requests. So requests run
//! inline in the queue's thread. That limits a queue to one CPU, though: when a batch of reads
//! is big enough (see [`SPLIT_MIN_BYTES`]), the queue thread hands a share of it to each copy
//! thread, as one job, and copies its own share meanwhile. (Writes stay inline: writes to one
//! file take the inode's lock in the kernel, so they would not run in parallel anyway.)
//!
//! A job owns everything it touches (the requests, an `Arc` of the guest memory they point
//! into, the disk), writes the requests' status itself, and hands the finished chains back to
//! its queue through a [`DoneList`], whose eventfd wakes the queue's thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost_user_common::{lock, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::executor::{execute_sync, ExecContext};
use crate::request::{Completion, Request};

/// A batch of reads is split across threads when it moves at least this many bytes: below
/// that, waking a thread costs more than it saves.
pub const SPLIT_MIN_BYTES: u64 = 64 << 10;

struct Job {
    requests: Vec<(u16, Request)>,
    /// Keeps the guest memory the requests point into mapped until the job is done.
    mem: Arc<GuestMemory>,
    ctx: Arc<ExecContext>,
    done: Arc<DoneList>,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// The copy threads one device shares across its queues; stopped when dropped.
pub struct CopyPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl CopyPool {
    /// Starts `threads` copy threads.
    pub fn new(threads: usize) -> io::Result<CopyPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs::default()),
            ready: Condvar::new(),
        });
        let mut pool = CopyPool {
            shared,
            threads: Vec::new(),
        };
        for i in 0..threads {
            let shared = pool.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("blk-copy-{i}"))
                .spawn(move || run_jobs(&shared))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// How many copy threads there are.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    fn submit(&self, job: Job) {
        lock(&self.shared.jobs).queue.push_back(job);
        self.shared.ready.notify_one();
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        // Jobs still queued run first: each owns its memory and reports to its queue.
        lock(&self.shared.jobs).shutdown = true;
        self.shared.ready.notify_all();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn run_jobs(shared: &Shared) {
    loop {
        let job = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                if jobs.shutdown {
                    return;
                }
                jobs = shared
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        let finished: Vec<Completion> = job
            .requests
            .into_iter()
            .map(|(head, request)| {
                let status = execute_sync(&request, &job.ctx, &job.mem);
                request.finish(head, &job.mem, status)
            })
            .collect();
        job.done.push(finished);
    }
}

/// Finished jobs of one queue, and the eventfd that tells its thread.
struct DoneList {
    list: Mutex<Vec<Completion>>,
    changed: Condvar,
    eventfd: EventFd,
}

impl DoneList {
    fn push(&self, mut done: Vec<Completion>) {
        lock(&self.list).append(&mut done);
        self.changed.notify_all();
        if let Err(e) = self.eventfd.write(1) {
            log::error!("cannot signal a finished copy: {e}");
        }
    }
}

/// One queue's handle on the pool.
pub struct Offload {
    pool: Arc<CopyPool>,
    done: Arc<DoneList>,
    in_flight: usize,
}

impl Offload {
    pub fn new(pool: Arc<CopyPool>) -> io::Result<Offload> {
        Ok(Offload {
            pool,
            done: Arc::new(DoneList {
                list: Mutex::new(Vec::new()),
                changed: Condvar::new(),
                eventfd: EventFd::new(EFD_NONBLOCK)?,
            }),
            in_flight: 0,
        })
    }

    /// Wakes the queue's thread when a job finishes.
    pub fn eventfd(&self) -> RawFd {
        self.done.eventfd.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether some job has finished and waits to be reaped.
    pub fn has_finished(&self) -> bool {
        self.in_flight > 0 && !lock(&self.done.list).is_empty()
    }

    /// How many copy threads share the work.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs `requests` (reads or writes) on a copy thread, in order.
    pub fn submit(
        &mut self,
        requests: Vec<(u16, Request)>,
        mem: Arc<GuestMemory>,
        ctx: &Arc<ExecContext>,
    ) {
        if requests.is_empty() {
            return;
        }
        self.in_flight += requests.len();
        self.pool.submit(Job {
            requests,
            mem,
            ctx: ctx.clone(),
            done: self.done.clone(),
        });
    }

    /// Moves finished jobs into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.done.eventfd.read();
        let mut list = lock(&self.done.list);
        self.in_flight = self.in_flight.saturating_sub(list.len());
        out.append(&mut list);
    }

    /// Waits until every job of this queue has finished, moving them into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        while self.in_flight > 0 {
            {
                let list = lock(&self.done.list);
                if list.is_empty() {
                    // Jobs always finish (they are bounded copies); the timeout only guards
                    // against a lost wake-up.
                    let _ = self
                        .done
                        .changed
                        .wait_timeout(list, Duration::from_millis(100));
                }
            }
            self.reap(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Operation;
    use vhost_user_common::chain::Segment;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn jobs_run_and_report_to_their_queue() {
        let (file, disk) = crate::disk::temp_disk(1 << 20, false);
        std::fs::write(file.path(), vec![7u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
        let ctx = Arc::new(ExecContext::new(Arc::new(disk), Vec::new()));
        let mem = Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)])
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let pool = Arc::new(CopyPool::new(2).unwrap_or_else(|e| panic!("{e}")));
        let mut offload = Offload::new(pool).unwrap_or_else(|e| panic!("{e}"));
        let mut requests = Vec::new();
        for i in 0..4u16 {
            let request = Request {
                op: Operation::Read {
                    offset: u64::from(i) * 4096,
                    data: vec![Segment {
                        addr: GuestAddress(u64::from(i) * 8192),
                        len: 4096,
                    }],
                    len: 4096,
                },
                status: GuestAddress(u64::from(i) * 8192 + 4096),
            };
            requests.push((i, request));
        }
        let rest = requests.split_off(2);
        offload.submit(requests, mem.clone(), &ctx);
        offload.submit(rest, mem.clone(), &ctx);
        let mut out = Vec::new();
        offload.drain(&mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(offload.in_flight(), 0);
        for i in 0..4u64 {
            let status: u8 = mem
                .read_obj(GuestAddress(i * 8192 + 4096))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(status, 0);
            let byte: u8 = mem
                .read_obj(GuestAddress(i * 8192 + 100))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(byte, 7);
        }
    }
}
