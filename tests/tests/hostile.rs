//! Issue 13: a hostile frontend against all three daemons, over their real sockets.
//!
//! One regression test per bug (a rejected memory table, memory that shrinks under the daemon,
//! a descriptor leaked per connection, an available index far ahead) for blk, net and console,
//! and a seeded attacker (`HOSTILE_SEED`, `HOSTILE_ROUNDS`) that checks after every round that
//! the daemon lives, answers, idles and does not grow.
//!
//! Needs root (the net daemon's tap lives in a network namespace the test creates).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vhost::VhostBackend;
use vhost::VhostUserMemoryRegionInfo;
use vhost_user_tests::hostile::*;
use vhost_user_tests::{Result, VIRTIO_RING_F_EVENT_IDX};

/// Runs `body` against a fresh `kind` daemon. A daemon that hangs must fail the test, not hang
/// it: after `limit` the daemon is killed, which unblocks the body's socket calls.
fn bounded(
    kind: Kind,
    limit: Duration,
    body: impl FnOnce(&mut Target) -> Result<()> + Send + 'static,
) -> Result<()> {
    let mut t = Target::start(kind)?;
    let pid = t.pid();
    let (done, finished) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let result = body(&mut t).map_err(|e| e.to_string());
        let _ = done.send(());
        (result, t)
    });
    let timed_out = finished.recv_timeout(limit).is_err();
    if timed_out {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let (result, t) = match runner.join() {
        Ok(done) => done,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    if timed_out {
        return Err(format!(
            "{kind:?}: no result within {limit:?} (daemon hung?); its log:\n{}",
            t.daemon.log_text()
        )
        .into());
    }
    Ok(result?)
}

const LIMIT: Duration = Duration::from_secs(60);

/// Bug 2: with the rings running and a request waiting, a SET_MEM_TABLE whose region extends
/// past the end of its memfd is refused (the library then ends the connection). The worker
/// that takes the request must still see the old table: the request's buffers lie beyond the
/// short memfd's end, so the rejected table would kill the daemon with SIGBUS. Then the daemon
/// serves the next connection.
fn rejected_memory_table(t: &mut Target) -> Result<()> {
    let kind = t.kind;
    let mut vmm = t.connect()?;
    t.exchange(&mut vmm)?;
    t.publish(&mut vmm)?;
    // The rings lie above the short memfd's first page: any worker that sees the rejected table
    // faults at once. Kicks keep the worker busy while the table is handled.
    let short = memfd(4096)?;
    let kick = vmm.queues[t.tx_queue()].kick.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let kicking = stop.clone();
    let kicker = std::thread::spawn(move || {
        while !kicking.load(Ordering::Relaxed) {
            let _ = kick.write(1);
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: vmm.ram.host_addr(0)?,
        mmap_offset: 0,
        mmap_handle: short.as_raw_fd(),
    };
    // The test frontend does not always wait for the daemon's verdict: the log says it.
    let _ = vmm.frontend.set_mem_table(&[region]);
    let refused = eventually(Duration::from_secs(5), || {
        Ok(t.daemon.log_text().contains("extends past the end of its"))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = kicker.join();
    assert!(
        refused,
        "{kind:?}: a region past its file's end was not refused"
    );
    t.alive()?;
    drop(vmm);
    t.serves()?;
    t.alive()
}

#[test]
fn blk_rejected_memory_table_keeps_the_old_one() -> Result<()> {
    bounded(Kind::Blk, LIMIT, rejected_memory_table)
}

#[test]
fn net_rejected_memory_table_keeps_the_old_one() -> Result<()> {
    bounded(Kind::Net, LIMIT, rejected_memory_table)
}

#[test]
fn console_rejected_memory_table_keeps_the_old_one() -> Result<()> {
    bounded(Kind::Console, LIMIT, rejected_memory_table)
}

/// Bug 3: the frontend shrinks its memfd after SET_MEM_TABLE, under a request the daemon is
/// about to process. The daemon survives: it either gets EFAULT from a system call on the lost
/// pages (net's writes to the tap) or survives the SIGBUS and drops that connection with one log
/// line. Then it serves the next connection.
fn shrunk_memory(t: &mut Target) -> Result<()> {
    const REPORT: &str = "truncated the file behind guest memory";
    let kind = t.kind;
    let mut vmm = t.connect()?;
    t.exchange(&mut vmm)?;
    // Its buffers lie above DATA_START; the rings below stay.
    t.publish(&mut vmm)?;
    vmm.ram.file.set_len(vhost_user_tests::DATA_START)?;
    let q = t.tx_queue();
    vmm.queues[q].notify()?;
    // Done when the request comes back or the connection is dropped.
    let (ram, queue) = vmm.queue(q);
    let _ = queue.wait_used(ram, 1, Duration::from_secs(3));
    t.alive()?;
    // blk and console copy the request through their own mapping, so they take the fault; net
    // hands the buffers to the tap's writev, which gets EFAULT instead.
    if kind != Kind::Net {
        eventually(Duration::from_secs(5), || {
            Ok(t.daemon.log_text().contains(REPORT))
        })?;
    }
    let reports = t.daemon.log_text().matches(REPORT).count();
    let expected = usize::from(kind != Kind::Net);
    assert_eq!(
        reports, expected,
        "{kind:?}: reports of the broken connection"
    );
    // Nothing of the test's own mapping above DATA_START may be touched from here on.
    drop(vmm);
    t.serves()?;
    t.alive()
}

#[test]
fn blk_survives_memory_shrunk_under_a_request() -> Result<()> {
    bounded(Kind::Blk, LIMIT, shrunk_memory)
}

#[test]
fn net_survives_memory_shrunk_under_a_request() -> Result<()> {
    bounded(Kind::Net, LIMIT, shrunk_memory)
}

#[test]
fn console_survives_memory_shrunk_under_a_request() -> Result<()> {
    bounded(Kind::Console, LIMIT, shrunk_memory)
}

/// The descriptor count once two reads 100 ms apart agree (a closed session's teardown may
/// still be closing descriptors).
fn settled_fd_count(pid: u32) -> Result<usize> {
    let mut last = fd_count(pid)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid)?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Bug 4: 200 connect / disconnect cycles leave the daemon's descriptor count where it was.
fn no_fd_leak(t: &mut Target) -> Result<()> {
    const CYCLES: usize = 200;
    let kind = t.kind;
    t.serves()?;
    answers_within(t.socket(), Duration::from_secs(2))?;
    let pid = t.pid();
    let before = settled_fd_count(pid)?;
    for _ in 0..CYCLES {
        drop(t.connect()?);
    }
    answers_within(t.socket(), Duration::from_secs(2))?;
    // The last session's teardown may still be closing descriptors.
    let settled = eventually(Duration::from_secs(5), || Ok(fd_count(pid)? <= before + 4))?;
    let after = fd_count(pid)?;
    assert!(
        settled,
        "{kind:?}: {before} descriptors before {CYCLES} connections, {after} after"
    );
    t.alive()
}

#[test]
fn blk_does_not_leak_a_descriptor_per_connection() -> Result<()> {
    bounded(Kind::Blk, LIMIT, no_fd_leak)
}

#[test]
fn net_does_not_leak_a_descriptor_per_connection() -> Result<()> {
    bounded(Kind::Net, LIMIT, no_fd_leak)
}

#[test]
fn console_does_not_leak_a_descriptor_per_connection() -> Result<()> {
    bounded(Kind::Console, LIMIT, no_fd_leak)
}

/// Bug 1: with EVENT_IDX negotiated, the guest sets every available index more than the queue
/// size ahead and kicks. Within 2 s the daemon answers a new connection; then it idles (no CPU)
/// and its log stays small.
fn avail_far_ahead(t: &mut Target) -> Result<()> {
    let kind = t.kind;
    let mut vmm = t.connect()?;
    assert_ne!(
        vmm.acked_features & VIRTIO_RING_F_EVENT_IDX,
        0,
        "{kind:?}: EVENT_IDX not negotiated"
    );
    t.exchange(&mut vmm)?;
    let log_before = log_len(&t.daemon);
    for q in 0..vmm.queues.len() {
        let (ram, queue) = vmm.queue(q);
        let raw = ram.read(queue.avail + 2, 2)?;
        let idx = u16::from_le_bytes([raw[0], raw[1]]);
        let ahead = idx.wrapping_add(queue.size).wrapping_add(7);
        ram.write(queue.avail + 2, &ahead.to_le_bytes())?;
        queue.notify()?;
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(vmm);
    answers_within(t.socket(), Duration::from_secs(2))?;
    let pid = t.pid();
    let ticks = cpu_over(pid, Duration::from_secs(1))?;
    assert!(
        ticks <= 10,
        "{kind:?}: {ticks} ticks of CPU in 1 s of idling"
    );
    let grown = log_len(&t.daemon) - log_before;
    assert!(grown <= 16 << 10, "{kind:?}: the log grew {grown} bytes");
    t.serves()?;
    t.alive()
}

#[test]
fn blk_avail_index_far_ahead_costs_only_its_queue() -> Result<()> {
    bounded(Kind::Blk, LIMIT, avail_far_ahead)
}

#[test]
fn net_avail_index_far_ahead_costs_only_its_queue() -> Result<()> {
    bounded(Kind::Net, LIMIT, avail_far_ahead)
}

#[test]
fn console_avail_index_far_ahead_costs_only_its_queue() -> Result<()> {
    bounded(Kind::Console, LIMIT, avail_far_ahead)
}

/// The seeded attacker: mutated messages, order abuse, garbage rings (available indices far
/// ahead included), shrinking memory. `HOSTILE_SEED` replays a run; `HOSTILE_ROUNDS` (default
/// 16 per daemon) makes it longer.
fn attacker(kind: Kind) -> Result<()> {
    let mut options = Options::from_env(16);
    options.avail_far_ahead = true;
    // About 10 s per 16 rounds here; a long run gets time in proportion.
    let limit = LIMIT + Duration::from_secs(u64::from(options.rounds) * 3);
    bounded(kind, limit, move |t| Attacker::new(t, options)?.run())
}

#[test]
fn blk_survives_a_hostile_frontend() -> Result<()> {
    attacker(Kind::Blk)
}

#[test]
fn blk_qcow2_survives_a_hostile_frontend() -> Result<()> {
    attacker(Kind::BlkQcow2)
}

#[test]
fn blk_qcow2_survives_memory_shrunk_under_a_request() -> Result<()> {
    bounded(Kind::BlkQcow2, LIMIT, shrunk_memory)
}

#[test]
fn net_survives_a_hostile_frontend() -> Result<()> {
    attacker(Kind::Net)
}

#[test]
fn console_survives_a_hostile_frontend() -> Result<()> {
    attacker(Kind::Console)
}
