//! One session: a fresh daemon, this program as its frontend (the VMM and the guest's driver),
//! and the TCP client of its endpoint; the three cases as the guest and the client run them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_tests::{Daemon, Negotiate, TestVmm, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress};

use super::peer::start_daemon;
use super::ring::Ring;
use super::stream::{check, is_timeout, make_pattern, pattern_at, read_and_check, write_stream};
use super::{NAMES, OURS, QUEUE_SIZE, RAM, RX, RX_BASE, RX_CHUNK, STALL, TX, TX_BASE, TX_CHUNK};
use crate::report::{process_cpu_time, Latencies, Measurement, Result, Subject};

/// Ping-pong: how late an answer may be before the guest suspects lost receive buffers.
const LOST_AFTER: Duration = Duration::from_millis(5);

/// A daemon, the frontend connected to it, and the TCP client of its console endpoint. Field
/// order is drop order: the frontend and the client leave before the daemon is stopped.
pub(super) struct Session {
    subject: Subject,
    vmm: TestVmm,
    tx: Ring,
    rx: Ring,
    tcp: TcpStream,
    pattern: Vec<u8>,
    /// Receive buffers posted again because the device took them and never gave them back.
    pub(super) lost_rx: u64,
    /// Stopped (SIGTERM, then SIGKILL) when dropped.
    pub(super) daemon: Daemon,
}

impl Session {
    pub(super) fn start(subject: Subject, bin: &Path, dir: &Path) -> Result<Session> {
        let (daemon, port) = start_daemon(subject, bin, dir)?;
        let negotiate = Negotiate {
            features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK,
        };
        let vmm = TestVmm::connect(&daemon.socket, RAM, 4, QUEUE_SIZE, negotiate)
            .map_err(|e| format!("{}: frontend: {e}", subject.name(NAMES)))?;
        let tx = Ring::new(&vmm, TX, TX_BASE, TX_CHUNK, QUEUE_SIZE / 2)?;
        let rx = Ring::new(&vmm, RX, RX_BASE, RX_CHUNK, QUEUE_SIZE / 2)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let tcp = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("{}: TCP endpoint: {e}", subject.name(NAMES)).into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        tcp.set_nodelay(true)?;
        Ok(Session {
            subject,
            vmm,
            tx,
            rx,
            tcp,
            pattern: make_pattern(TX_CHUNK.max(RX_CHUNK)),
            lost_rx: 0,
            daemon,
        })
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.daemon.child.try_wait()? {
            return Err(format!(
                "{} died ({status}):\n{}",
                self.subject.name(NAMES),
                self.daemon.log_tail(20)
            )
            .into());
        }
        Ok(())
    }

    fn cpu(&self) -> Result<Duration> {
        process_cpu_time(self.daemon.pid())
    }

    /// Sends "hello" from the guest and waits for it on the client: the endpoint has accepted
    /// us and the device moves data.
    pub(super) fn prime(&mut self) -> Result<()> {
        let hello = b"hello\n";
        let slot = self.tx.free.pop().ok_or("no free transmit slot")?;
        self.vmm
            .ram
            .write(self.tx.buffer(slot), hello)
            .map_err(|e| format!("guest RAM: {e}"))?;
        self.tx
            .post(&self.vmm.ram, slot, hello.len() as u32, false)?;
        self.tx.publish(&self.vmm.ram)?;
        self.tcp
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let mut used = Vec::new();
        while got.len() < hello.len() || !self.tx.outstanding.is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: the guest's first output never reached the TCP client (got {:?})",
                    self.subject.name(NAMES),
                    String::from_utf8_lossy(&got)
                )
                .into());
            }
            self.check_alive()?;
            self.tx.reap(&self.vmm.ram, &mut used)?;
            if got.len() < hello.len() {
                match self.tcp.read(&mut buf) {
                    Ok(0) => return Err("the TCP endpoint closed".into()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if is_timeout(&e) => {
                        // Kick again: the endpoint may not have been accepted at the first one.
                        self.tx.kick.write(1)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                self.tx.wait(Duration::from_millis(10));
            }
        }
        if got != hello {
            return Err(format!(
                "{}: the client got {:?} instead of \"hello\"",
                self.subject.name(NAMES),
                String::from_utf8_lossy(&got)
            )
            .into());
        }
        Ok(())
    }

    /// Guest → host: `depth` transmit chains of TX_CHUNK bytes in flight; the client reads and
    /// checks everything.
    pub(super) fn guest_to_host(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
    ) -> Result<Measurement> {
        let received = AtomicU64::new(0);
        let target = AtomicU64::new(u64::MAX);
        let failed = AtomicBool::new(false);
        let reader_stream = self.tcp.try_clone()?;
        reader_stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let pattern = self.pattern.clone();
        std::thread::scope(|scope| -> Result<Measurement> {
            let reader = scope.spawn(|| {
                let r = read_and_check(reader_stream, &pattern, &received, &target);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            });
            let driven = self.drive_tx(depth, warmup, duration, &received, &failed);
            // Whatever happened, let the reader finish: it stops at the total sent, or on its
            // own timeout.
            let sent = match &driven {
                Ok((_, sent)) => *sent,
                Err(_) => 0,
            };
            target.store(sent, Ordering::Relaxed);
            let read = reader.join().map_err(|_| "the TCP reader panicked")?;
            let (m, _) = driven?;
            read?;
            Ok(m)
        })
    }

    /// The guest side of `guest_to_host`: returns the measurement and the bytes sent in all.
    fn drive_tx(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
        received: &AtomicU64,
        failed: &AtomicBool,
    ) -> Result<(Measurement, u64)> {
        let ram = &self.vmm.ram;
        let tx = &mut self.tx;
        let mut offset = 0u64;
        let mut used = Vec::new();
        let start = Instant::now();
        let mut mark: Option<(Instant, u64, Duration)> = None;
        let mut result = None;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((
                    now,
                    received.load(Ordering::Relaxed),
                    process_cpu_time(self.daemon.pid())?,
                ));
            }
            if let Some((t0, b0, cpu0)) = mark {
                if result.is_none() && now >= t0 + duration {
                    let bytes = received.load(Ordering::Relaxed) - b0;
                    let cpu = process_cpu_time(self.daemon.pid())?.saturating_sub(cpu0);
                    result = Some(throughput(bytes, now - t0, cpu));
                }
            }
            let draining = result.is_some();
            if !draining {
                while tx.outstanding.len() < usize::from(depth) {
                    let Some(slot) = tx.free.pop() else { break };
                    let data = pattern_at(&self.pattern, offset, TX_CHUNK);
                    ram.mem.write_slice(data, GuestAddress(tx.buffer(slot)))?;
                    tx.post(ram, slot, TX_CHUNK as u32, false)?;
                    offset += TX_CHUNK as u64;
                }
                tx.publish(ram)?;
            } else if tx.outstanding.is_empty() {
                break;
            }
            tx.wait(Duration::from_millis(50));
            tx.reap(ram, &mut used)?;
            if !used.is_empty() {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL {
                return Err(format!(
                    "no transmit chain came back for {STALL:?} ({} outstanding)",
                    tx.outstanding.len()
                )
                .into());
            }
            if failed.load(Ordering::Relaxed) {
                break;
            }
            if let Some(status) = self.daemon.child.try_wait()? {
                return Err(format!("{} exited ({status})", self.subject.name(NAMES)).into());
            }
        }
        if tx.violations > 0 {
            return Err(format!("{} bad used entries on the transmit queue", tx.violations).into());
        }
        let m = result.ok_or("the case ended early")?;
        Ok((m, offset))
    }

    /// Host → guest: the client writes the stream as fast as it is taken; the guest keeps
    /// `depth` receive buffers posted and checks everything.
    pub(super) fn host_to_guest(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
    ) -> Result<Measurement> {
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let writer_stream = self.tcp.try_clone()?;
        writer_stream.set_write_timeout(Some(Duration::from_millis(50)))?;
        let pattern = self.pattern.clone();
        std::thread::scope(|scope| -> Result<Measurement> {
            let writer = scope.spawn(|| write_stream(writer_stream, &pattern, &stop, &written));
            let driven = self.drive_rx(depth, warmup, duration, &stop, &written);
            stop.store(true, Ordering::Relaxed);
            let wrote = writer.join().map_err(|_| "the TCP writer panicked")?;
            let m = driven?;
            wrote?;
            Ok(m)
        })
    }

    fn drive_rx(
        &mut self,
        depth: u16,
        warmup: Duration,
        duration: Duration,
        stop: &AtomicBool,
        written: &AtomicU64,
    ) -> Result<Measurement> {
        let ram = &self.vmm.ram;
        let rx = &mut self.rx;
        let mut offset = 0u64;
        let mut used = Vec::new();
        let mut data = vec![0u8; RX_CHUNK];
        let start = Instant::now();
        let mut mark: Option<(Instant, u64, Duration)> = None;
        let mut result = None;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((now, offset, process_cpu_time(self.daemon.pid())?));
            }
            if let Some((t0, b0, cpu0)) = mark {
                if result.is_none() && now >= t0 + duration {
                    let cpu = process_cpu_time(self.daemon.pid())?.saturating_sub(cpu0);
                    result = Some(throughput(offset - b0, now - t0, cpu));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            while rx.outstanding.len() < usize::from(depth) {
                let Some(slot) = rx.free.pop() else { break };
                rx.post(ram, slot, RX_CHUNK as u32, true)?;
            }
            rx.publish(ram)?;
            rx.wait(Duration::from_millis(20));
            rx.reap(ram, &mut used)?;
            for &(slot, len) in &used {
                let len = (len as usize).min(RX_CHUNK);
                ram.mem
                    .read_slice(&mut data[..len], GuestAddress(rx.buffer(slot)))?;
                check(&self.pattern, offset, &data[..len])?;
                offset += len as u64;
            }
            if rx.violations > 0 {
                return Err(format!(
                    "not a valid virtio device: {} used entries for buffers it did not hold, {} \
                     of them more than the ring holds at once (several entries for one buffer: \
                     vhost-device-console adds one per byte); no figure",
                    rx.violations, rx.overrun
                )
                .into());
            }
            if !used.is_empty() {
                last_progress = Instant::now();
            }
            if result.is_some() {
                // Each case has a daemon of its own: what is still on the way can stay there.
                break;
            }
            if last_progress.elapsed() > STALL {
                return Err(format!(
                    "no receive buffer came back for {STALL:?} (got {offset} bytes, client wrote {})",
                    written.load(Ordering::Relaxed)
                )
                .into());
            }
            if let Some(status) = self.daemon.child.try_wait()? {
                return Err(format!("{} exited ({status})", self.subject.name(NAMES)).into());
            }
        }
        result.ok_or_else(|| "the case ended early".into())
    }

    /// 1 byte out, 1 byte back, one at a time.
    pub(super) fn ping_pong(
        &mut self,
        warmup: Duration,
        duration: Duration,
    ) -> Result<Measurement> {
        self.tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let ram = &self.vmm.ram;
        let mut used = Vec::new();
        let mut latencies = Latencies::default();
        let start = Instant::now();
        let mut mark: Option<(Instant, Duration)> = None;
        let mut count = 0u64;
        let mut byte = [0u8; 1];
        loop {
            let now = Instant::now();
            if mark.is_none() && now >= start + warmup {
                mark = Some((now, self.cpu()?));
                latencies = Latencies::default();
                count = 0;
            }
            if let Some((t0, cpu0)) = mark {
                if now >= t0 + duration {
                    let cpu = self.cpu()?.saturating_sub(cpu0);
                    return Ok(Measurement {
                        ops: count,
                        bytes: count,
                        elapsed: now - t0,
                        latencies,
                        backend_cpu: Some(cpu),
                    });
                }
            }
            let out = b'a' + (count % 26) as u8;
            let back = b'A' + (count % 26) as u8;
            let t = Instant::now();
            let slot = self.tx.free.pop().ok_or("no free transmit slot")?;
            ram.mem
                .write_slice(&[out], GuestAddress(self.tx.buffer(slot)))?;
            self.tx.post(ram, slot, 1, false)?;
            self.tx.publish(ram)?;
            self.tcp.read_exact(&mut byte)?;
            if byte[0] != out {
                return Err(format!("the client got {:#04x}, not {out:#04x}", byte[0]).into());
            }
            self.tcp.write_all(&[back])?;
            // The receive buffer goes in after the answer: vhost-device-console takes (and
            // loses) receive buffers that arrive while it is finishing a previous delivery.
            if self.rx.outstanding.is_empty() {
                let slot = self.rx.free.pop().ok_or("no free receive slot")?;
                self.rx.post(ram, slot, RX_CHUNK as u32, true)?;
                self.rx.publish(ram)?;
            }
            let deadline = Instant::now() + STALL;
            let mut waiting = Instant::now();
            loop {
                self.rx.reap(ram, &mut used)?;
                if let Some(&(slot, len)) = used.first() {
                    ram.mem
                        .read_slice(&mut byte, GuestAddress(self.rx.buffer(slot)))?;
                    if len != 1 || byte[0] != back {
                        return Err(format!(
                            "the guest got {len} byte(s) starting {:#04x}, not {back:#04x}",
                            byte[0]
                        )
                        .into());
                    }
                    break;
                }
                if self.rx.violations > 0 {
                    return Err("bad used entries on the receive queue".into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "the answer never reached the guest (round {count}, {} receive buffers \
                         posted)",
                        self.rx.outstanding.len()
                    )
                    .into());
                }
                self.rx.wait(Duration::from_millis(1));
                // A device that takes receive buffers and never returns them would stall us:
                // once it has taken every buffer posted and the answer is late, post one more
                // (harmless for a device that is merely slow: it finds two buffers).
                if waiting.elapsed() > LOST_AFTER && self.rx.device_took_all(ram)? {
                    let slot = self.rx.free.pop().ok_or("too many receive buffers lost")?;
                    self.rx.post(ram, slot, RX_CHUNK as u32, true)?;
                    self.rx.publish(ram)?;
                    self.lost_rx += 1;
                    waiting = Instant::now();
                }
            }
            latencies.record(t.elapsed());
            count += 1;
            self.tx.reap(ram, &mut used)?;
            if self.tx.free.is_empty() {
                self.tx.wait(Duration::from_millis(100));
                self.tx.reap(ram, &mut used)?;
            }
        }
    }

    pub(super) fn finish(mut self) -> Result<()> {
        self.check_alive()?;
        let Session {
            subject,
            vmm,
            tcp,
            mut daemon,
            ..
        } = self;
        drop(tcp);
        drop(vmm);
        // The daemon must survive its frontend leaving.
        std::thread::sleep(Duration::from_millis(100));
        let exited = daemon.child.try_wait()?;
        let log = daemon.log_text();
        // SIGTERM, then SIGKILL.
        drop(daemon);
        match exited {
            Some(status) if subject == Subject::Ours => {
                Err(format!("{OURS} died when the frontend left ({status}): {log}").into())
            }
            _ => Ok(()),
        }
    }
}

fn throughput(bytes: u64, elapsed: Duration, cpu: Duration) -> Measurement {
    Measurement {
        ops: bytes / 1000,
        bytes,
        elapsed,
        backend_cpu: Some(cpu),
        ..Measurement::default()
    }
}
