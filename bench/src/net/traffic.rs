//! The traffic of a turn and what is counted: the frontend's txonly / rxonly, the tap-to-guest
//! generator, and the tap's counters.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_tests::netns::{internet_checksum, Netns};

use super::peer::rx_packets;
use super::setup::Setup;
use super::{pin_to, BenchRun, NAMES};
use crate::report::{process_cpu_time, Measurement, Result, Subject};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Frames per `sendmmsg` of the generator, and distinct UDP flows among them.
const GEN_BATCH: usize = 64;
/// Delivered / offered above which the generator, not the backend, is the limit.
const GENERATOR_BOUND: f64 = 0.9;

impl Setup {
    fn counters(&self) -> Result<IfCounters> {
        if_counters(self.backend.pid(), &self.tap)
    }

    fn cpu(&self) -> Result<Duration> {
        process_cpu_time(self.backend.pid())
    }

    /// The frontend transmits `size`-byte frames; counts those that reach the tap.
    pub(super) fn guest_to_tap(&mut self, run: &BenchRun, size: usize) -> Result<Measurement> {
        self.frontend.cmd("set fwd txonly")?;
        self.frontend.cmd(&format!("set txpkts {size}"))?;
        self.frontend.cmd("start")?;
        std::thread::sleep(run.warmup);
        let (c0, cpu0, t0) = (self.counters()?, self.cpu()?, Instant::now());
        std::thread::sleep(run.duration);
        let (c1, cpu1, elapsed) = (self.counters()?, self.cpu()?, t0.elapsed());
        self.frontend.cmd("stop")?;
        let frames = c1.rx_packets.saturating_sub(c0.rx_packets);
        Ok(Measurement {
            ops: frames,
            bytes: frames * size as u64,
            elapsed,
            backend_cpu: Some(cpu1.saturating_sub(cpu0)),
            ..Measurement::default()
        })
    }

    /// The generator sends `size`-byte frames out of the tap; counts what the frontend receives.
    pub(super) fn tap_to_guest(
        &mut self,
        run: &BenchRun,
        size: usize,
    ) -> Result<(Measurement, Offered)> {
        self.frontend.cmd("set fwd rxonly")?;
        self.frontend.cmd("start")?;
        let generator =
            Generator::start(&self.ns, &self.tap, size, run.placement().generator_cpus)?;
        std::thread::sleep(run.warmup);
        let snapshot = |setup: &mut Setup| -> Result<(u64, Instant, IfCounters, Duration, u64)> {
            let before = Instant::now();
            let stats = setup.frontend.cmd("show port stats all")?;
            let after = Instant::now();
            let at = before + (after - before) / 2;
            Ok((
                rx_packets(&stats)?,
                at,
                setup.counters()?,
                setup.cpu()?,
                generator.sent(),
            ))
        };
        let (rx0, t0, c0, cpu0, sent0) = snapshot(self)?;
        std::thread::sleep(run.duration);
        let (rx1, t1, c1, cpu1, sent1) = snapshot(self)?;
        generator.stop()?;
        self.frontend.cmd("stop")?;
        let frames = rx1.saturating_sub(rx0);
        let elapsed = t1 - t0;
        let measurement = Measurement {
            ops: frames,
            bytes: frames * size as u64,
            elapsed,
            backend_cpu: Some(cpu1.saturating_sub(cpu0)),
            ..Measurement::default()
        };
        let offered = Offered {
            sent: sent1.saturating_sub(sent0),
            into_tap: c1.tx_packets.saturating_sub(c0.tx_packets),
            tap_dropped: c1.tx_dropped.saturating_sub(c0.tx_dropped),
            elapsed,
            forward_dropped: None,
        };
        Ok((measurement, offered))
    }
}

/// What the tap-to-guest generator offered during the measured interval.
pub(super) struct Offered {
    /// Frames the generator's sendmmsg accepted.
    pub(super) sent: u64,
    /// Frames the tap queued for the backend (its tx_packets).
    pub(super) into_tap: u64,
    /// Frames the tap dropped because the backend did not read them in time (its tx_dropped).
    pub(super) tap_dropped: u64,
    pub(super) elapsed: Duration,
    /// The peer's share of frames dropped on their way to the guest (over the whole turn).
    pub(super) forward_dropped: Option<f64>,
}

impl Offered {
    pub(super) fn note(&self, case: &str, subject: Subject, delivered: &Measurement) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let offered = self.sent as f64 / secs;
        let ratio = if self.sent > 0 {
            delivered.ops as f64 / self.sent as f64
        } else {
            0.0
        };
        let limit = if ratio >= GENERATOR_BOUND {
            "generator-bound: the backend took nearly all that was offered"
        } else {
            "backend-bound"
        };
        let forward = match self.forward_dropped {
            Some(share) if share >= 0.005 => format!(
                "; its forwarding dropped {:.0}% of the frames bound for the guest (ring full)",
                share * 100.0
            ),
            _ => String::new(),
        };
        format!(
            "{case}, {}: offered {:.0} frames/s, tap queued {:.0}/s and dropped {:.0}/s, \
             delivered {:.0}/s ({:.0}% of offered): {limit}{forward}",
            subject.name(NAMES),
            offered,
            self.into_tap as f64 / secs,
            self.tap_dropped as f64 / secs,
            delivered.ops_per_sec(),
            ratio * 100.0,
        )
    }
}

/// Sends frames out of a tap (towards the backend) as fast as it can, from a thread.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Drop for Generator {
    fn drop(&mut self) {
        // A case that failed half-way must not leave the thread sending.
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Generator {
    fn start(ns: &Netns, tap: &str, size: usize, cpus: Vec<usize>) -> Result<Generator> {
        let fd = packet_socket(&ns.name, tap)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let frames: Vec<Vec<u8>> = (0..GEN_BATCH)
            .map(|i| udp_frame(size, 10_000 + i as u16))
            .collect();
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name("net-generator".into())
                .spawn(move || {
                    pin_to(&cpus)?;
                    generate(fd, frames, &stop, &sent)
                })?
        };
        Ok(Generator {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| "the generator thread panicked")?,
            None => Ok(()),
        }
    }
}

fn generate(fd: OwnedFd, frames: Vec<Vec<u8>>, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let mut iovecs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds `msgs.len()` initialised headers whose iovecs point into
        // `frames`, all alive and unmodified for the duration of the call.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
            failures = 0;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                // The tap's queue is stopped: back-pressure, not a failure.
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            failures += 1;
            if failures > 100_000 {
                return Err(format!("the generator cannot send: {e}").into());
            }
            std::thread::yield_now();
        }
    }
    Ok(())
}

/// An AF_PACKET socket sending out of `ifname` in namespace `netns`, bypassing the qdisc.
fn packet_socket(netns: &str, ifname: &str) -> Result<OwnedFd> {
    // Protocol 0: the socket sends but receives nothing.
    let fd = vhost_user_tests::netns::packet_socket(netns, ifname, 0, 0)?;
    let one: libc::c_int = 1;
    // SAFETY: PACKET_QDISC_BYPASS takes an int; the pointer and length describe `one`.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

/// A `size`-byte Ethernet/IPv4/UDP frame from the host to the guest's MAC.
fn udp_frame(size: usize, src_port: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(size, 0xa5);
    f
}

/// The counters of one interface, from `/proc/PID/net/dev` (the namespace of process PID).
#[derive(Debug, Clone, Copy, Default)]
struct IfCounters {
    rx_packets: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

fn if_counters(pid: u32, ifname: &str) -> Result<IfCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or(0);
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop
        return Ok(IfCounters {
            rx_packets: get(1),
            tx_packets: get(9),
            tx_dropped: get(11),
        });
    }
    Err(format!("{ifname}: not in /proc/{pid}/net/dev").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_requested_size_and_a_valid_ip_header() {
        for size in [60, 64, 1500, 1514] {
            let f = udp_frame(size, 1234);
            assert_eq!(f.len(), size);
            assert_eq!(internet_checksum(&f[14..34]), 0);
        }
    }
}
