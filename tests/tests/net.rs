//! vhost-user-net end to end. Each test makes a network namespace of its own, runs the daemon
//! in it (the daemon creates the tap there), and plays the VMM and guest driver over the
//! daemon's socket while a packet socket bound to the tap plays the host network.
//!
//! Needs root (namespaces, taps). Only interfaces inside the test's own namespaces are touched.

use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserFrontend;
use vhost_user_tests::netns::{internet_checksum, Netns, PacketSocket};
use vhost_user_tests::*;

const BIN: &str = "vhost-user-net";
const TAP: &str = "vuntap0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_MAC_TEXT: &str = "52:54:00:12:34:56";
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const HDR_LEN: usize = 12;
const RAM: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 256;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Counter `name` of the tap (`/sys/class/net/TAP/statistics/NAME`) inside `ns`.
fn tap_counter(ns: &Netns, name: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{TAP}/statistics/{name}");
    Ok(ns.exec(&["cat", &path])?.trim().parse()?)
}

fn start_daemon(ns: &Netns, pairs: usize, extra: &[&str]) -> Result<Daemon> {
    let pairs = pairs.to_string();
    let mut args = vec![
        "--tap",
        TAP,
        "--queue-pairs",
        &pairs,
        "--mac",
        GUEST_MAC_TEXT,
        "--up",
    ];
    args.extend_from_slice(extra);
    Daemon::start_with_prefix(&ns.prefix(), BIN, &args)
}

/// An Ethernet/IPv4/UDP frame whose flow (and so tap queue) depends on `port`.
fn udp_frame(dst: [u8; 6], src: [u8; 6], port: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&[10, 77, 0, 2]);
    ip.extend_from_slice(&[10, 77, 0, 1]);
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&9999u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|i| (i as u16).wrapping_add(port) as u8));
    f
}

fn negotiate(mergeable: bool) -> Negotiate {
    let mut n = Negotiate::default();
    if !mergeable {
        n.features &= !VIRTIO_NET_F_MRG_RXBUF;
    }
    n
}

/// Guest transmit: the 12-byte header and the frame, in `parts` descriptors or indirect.
fn guest_send(vmm: &mut TestVmm, queue: usize, frame: &[u8], indirect: bool) -> Result<u16> {
    let hdr = vmm.ram.alloc(HDR_LEN as u64, 16);
    vmm.ram.write(hdr, &[0u8; HDR_LEN])?;
    let data = vmm.ram.alloc(frame.len() as u64, 16);
    vmm.ram.write(data, frame)?;
    let bufs = [
        Buf::readable(hdr, HDR_LEN as u32),
        Buf::readable(data, frame.len() as u32),
    ];
    if indirect {
        let table = vmm.ram.alloc(64, 16);
        let (ram, q) = vmm.queue(queue);
        let head = q.add_indirect_chain(ram, table, &bufs)?;
        q.publish(ram, head)?;
        q.notify()?;
        Ok(head)
    } else {
        let (ram, q) = vmm.queue(queue);
        q.submit(ram, &bufs)
    }
}

/// Receive buffers posted by the guest, by head index.
#[derive(Default)]
struct RxBuffers {
    by_head: std::collections::HashMap<(usize, u16), (u64, u32)>,
}

impl RxBuffers {
    fn post(&mut self, vmm: &mut TestVmm, queue: usize, count: usize, len: u32) -> Result<()> {
        for _ in 0..count {
            let gpa = vmm.ram.alloc(u64::from(len), 64);
            let (ram, q) = vmm.queue(queue);
            let head = q.add_chain(ram, &[Buf::writable(gpa, len)])?;
            q.publish(ram, head)?;
            self.by_head.insert((queue, head), (gpa, len));
        }
        vmm.queues[queue].notify()?;
        Ok(())
    }

    /// Reads the frames of `used` (in ring order): returns (header, frame) pairs.
    fn frames(
        &self,
        vmm: &TestVmm,
        queue: usize,
        used: &[Used],
    ) -> Result<Vec<([u8; HDR_LEN], Vec<u8>)>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let read = |u: &Used| -> Result<Vec<u8>> {
                let (gpa, len) = self
                    .by_head
                    .get(&(queue, u.id))
                    .ok_or("used entry for a buffer never posted")?;
                assert!(u.len <= *len, "used length beyond the buffer");
                vmm.ram.read(*gpa, u.len as usize)
            };
            let first = read(&used[i])?;
            if first.len() < HDR_LEN {
                return Err(format!("{}-byte used entry", first.len()).into());
            }
            let mut hdr = [0u8; HDR_LEN];
            hdr.copy_from_slice(&first[..HDR_LEN]);
            let count = usize::from(u16::from_le_bytes([hdr[10], hdr[11]]));
            let mut frame = first[HDR_LEN..].to_vec();
            for k in 1..count {
                let next = used.get(i + k).ok_or("merged frame cut short")?;
                frame.extend(read(next)?);
            }
            out.push((hdr, frame));
            i += count.max(1);
        }
        Ok(out)
    }
}

/// A received frame: its RX queue, virtio-net header and bytes.
type RxFrame = (usize, [u8; HDR_LEN], Vec<u8>);

/// Collects used entries from `queues` until `frames` frames are in, reassembling merged ones.
fn collect_rx(
    vmm: &mut TestVmm,
    rx: &RxBuffers,
    queues: &[usize],
    frames: usize,
) -> Result<Vec<RxFrame>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut pending: Vec<Vec<Used>> = vec![Vec::new(); queues.len()];
    loop {
        for (k, &q) in queues.iter().enumerate() {
            let (ram, queue) = vmm.queue(q);
            pending[k].extend(queue.take_used(ram)?);
        }
        let mut got = Vec::new();
        for (k, &q) in queues.iter().enumerate() {
            // A merged frame is published at once, so the entries are always whole frames.
            for (hdr, frame) in rx.frames(vmm, q, &pending[k])? {
                got.push((q, hdr, frame));
            }
        }
        if got.len() >= frames || Instant::now() > deadline {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_rx_header(hdr: &[u8; HDR_LEN], mergeable: bool, frame_len: usize, buf_len: u32) {
    assert_eq!(
        hdr[0] & 1,
        0,
        "NEEDS_CSUM on a frame without checksum offload"
    );
    assert_eq!(hdr[1], 0, "gso_type must be NONE");
    let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
    if mergeable {
        let expected = (frame_len + HDR_LEN).div_ceil(buf_len as usize);
        assert_eq!(usize::from(num_buffers), expected, "num_buffers");
    } else {
        assert_eq!(num_buffers, 1, "num_buffers without MRG_RXBUF");
    }
}

#[test]
fn print_capabilities_and_bad_arguments() -> Result<()> {
    let (code, out, _) = run_to_exit(BIN, &["--print-capabilities"])?;
    assert_eq!(code, 0);
    assert!(out.contains("\"net\""), "{out}");
    let (code, _, err) = run_to_exit(BIN, &["--socket-path", "/tmp/none.sock"])?;
    assert_eq!(code, 1);
    assert!(err.contains("--tap"), "{err}");
    let (code, _, err) = run_to_exit(
        BIN,
        &[
            "--socket-path",
            "/tmp/none.sock",
            "--tap",
            "t",
            "--mac",
            "zz",
        ],
    )?;
    assert_eq!(code, 1);
    assert!(err.contains("--mac"), "{err}");
    Ok(())
}

#[test]
fn features_config_and_offloads() -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 2, &["--mtu", "1400"])?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 4, QUEUE_SIZE, Negotiate::default())?;
    assert_ne!(vmm.offered_features & VIRTIO_NET_F_MQ, 0);
    assert_ne!(vmm.offered_features & VIRTIO_NET_F_MRG_RXBUF, 0);
    assert_eq!(vmm.offered_features & VIRTIO_NET_F_CTRL_VQ, 0);
    assert_ne!(vmm.offered_features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(vmm.offered_features & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_ne!(vmm.offered_features & VIRTIO_RING_F_INDIRECT_DESC, 0);
    assert_eq!(vmm.frontend.get_queue_num()?, 4);
    let config = vmm.get_config(0, 12)?;
    assert_eq!(&config[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 2, "max pairs");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400, "mtu");
    // The tap got the MTU, and the guest's receive offloads.
    assert!(ns.exec(&["ip", "link", "show", TAP])?.contains("mtu 1400"));
    daemon.wait_for_log("tap offloads 0x", TIMEOUT)?;
    let log = daemon.log_text();
    assert!(
        log.contains("tap offloads 0x1f") || log.contains("tap offloads 0xf "),
        "{log}"
    );
    Ok(())
}

fn tx_reaches_tap(pairs: usize) -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let daemon = start_daemon(&ns, pairs, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect(
        &daemon.socket,
        RAM,
        2 * pairs,
        QUEUE_SIZE,
        Negotiate::default(),
    )?;
    let mut sent = Vec::new();
    for pair in 0..pairs {
        let tx = 2 * pair + 1;
        for (n, len) in [18usize, 100, 472, 1000, 1472, 8000].iter().enumerate() {
            let frame = udp_frame(HOST_MAC, GUEST_MAC, (pair * 100 + n) as u16, *len);
            guest_send(&mut vmm, tx, &frame, n % 2 == 1)?;
            sent.push(frame);
        }
        let (ram, q) = vmm.queue(tx);
        let used = q.wait_used(ram, 6, TIMEOUT)?;
        assert!(used.iter().all(|u| u.len == 0));
    }
    let mut got = sock.receive(sent.len(), TIMEOUT)?;
    got.sort();
    sent.sort();
    assert_eq!(got.len(), sent.len(), "frames on the tap");
    assert!(got == sent, "frames differ from what the guest sent");
    assert!(daemon.log_text().contains("frontend connected"));
    Ok(())
}

/// After a live migration a transmit ring starts with frames the guest made available, and
/// kicked for, on the source: it will not kick for them again. vhost-user-backend handles a
/// newly registered ring as if kicked; this keeps us honest across its upgrades.
#[test]
fn frames_available_before_the_ring_starts_go_out_without_a_kick() -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let daemon = start_daemon(&ns, 1, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect_unstarted(&daemon.socket, RAM, 2, Negotiate::default())?;
    vmm.start_queue(0, QUEUE_SIZE)?;
    // Configured (addresses, base, call and kick eventfds) but not yet enabled.
    vmm.start_queue_with(1, QUEUE_SIZE, false)?;
    let frame = udp_frame(HOST_MAC, GUEST_MAC, 9, 200);
    let hdr = vmm.ram.alloc(HDR_LEN as u64, 16);
    vmm.ram.write(hdr, &[0u8; HDR_LEN])?;
    let data = vmm.ram.alloc(frame.len() as u64, 16);
    vmm.ram.write(data, &frame)?;
    let (ram, q) = vmm.queue(1);
    let head = q.add_chain(
        ram,
        &[
            Buf::readable(hdr, HDR_LEN as u32),
            Buf::readable(data, frame.len() as u32),
        ],
    )?;
    q.publish(ram, head)?;
    vmm.frontend.set_vring_enable(1, true)?;
    let (ram, q) = vmm.queue(1);
    let used = q.wait_used(ram, 1, TIMEOUT)?;
    assert_eq!((used[0].id, used[0].len), (head, 0));
    assert_eq!(sock.receive(1, TIMEOUT)?, vec![frame]);
    Ok(())
}

#[test]
fn tx_frames_reach_the_tap_byte_for_byte() -> Result<()> {
    tx_reaches_tap(1)
}

#[test]
fn tx_frames_from_every_pair_reach_the_tap() -> Result<()> {
    tx_reaches_tap(2)
}

fn rx_reaches_every_pair(mergeable: bool) -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 2, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 4, QUEUE_SIZE, negotiate(mergeable))?;
    assert_eq!(vmm.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0, mergeable);
    let buf_len = if mergeable { 256 } else { 2048 };
    let mut rx = RxBuffers::default();
    for q in [0, 2] {
        rx.post(&mut vmm, q, 200, buf_len)?;
    }
    daemon.wait_for_log("pair 0: tap queue attached", TIMEOUT)?;
    daemon.wait_for_log("pair 1: tap queue attached", TIMEOUT)?;
    let mut sent = Vec::new();
    for port in 0..40u16 {
        let frame = udp_frame(
            GUEST_MAC,
            HOST_MAC,
            1000 + port,
            18 + 37 * usize::from(port),
        );
        sock.send(&frame)?;
        sent.push(frame);
    }
    let got = collect_rx(&mut vmm, &rx, &[0, 2], sent.len())?;
    assert_eq!(got.len(), sent.len(), "frames in the guest");
    for (_, hdr, frame) in &got {
        assert_rx_header(hdr, mergeable, frame.len(), buf_len);
    }
    let mut frames: Vec<Vec<u8>> = got.iter().map(|(_, _, f)| f.clone()).collect();
    frames.sort();
    sent.sort();
    assert!(frames == sent, "frames differ from what the host sent");
    for q in [0, 2] {
        assert!(
            got.iter().any(|(queue, _, _)| *queue == q),
            "no frame on RX queue {q}: flows were not spread over the pairs"
        );
    }
    Ok(())
}

#[test]
fn rx_frames_reach_every_pair_without_mrg_rxbuf() -> Result<()> {
    rx_reaches_every_pair(false)
}

#[test]
fn rx_frames_reach_every_pair_with_mrg_rxbuf() -> Result<()> {
    rx_reaches_every_pair(true)
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

#[test]
fn rx_waits_in_the_tap_when_the_guest_has_no_buffers() -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 1, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 2, QUEUE_SIZE, negotiate(false))?;
    let mut rx = RxBuffers::default();
    rx.post(&mut vmm, 0, 2, 2048)?;
    daemon.wait_for_log("pair 0: tap queue attached", TIMEOUT)?;
    let sent: Vec<Vec<u8>> = (0..12u16)
        .map(|n| udp_frame(GUEST_MAC, HOST_MAC, 7, 100 + usize::from(n)))
        .collect();
    for frame in &sent {
        sock.send(frame)?;
    }
    let first = collect_rx(&mut vmm, &rx, &[0], 2)?;
    assert_eq!(first.len(), 2);
    // The other ten wait in the tap's queue; the daemon sleeps meanwhile.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(daemon.child.id())?;
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(daemon.child.id())? - before;
    assert!(
        spent <= 10,
        "daemon spent {spent} ticks while the guest had no buffers"
    );
    assert_eq!(tap_counter(&ns, "tx_dropped")?, 0);
    rx.post(&mut vmm, 0, 16, 2048)?;
    let rest = collect_rx(&mut vmm, &rx, &[0], 10)?;
    let frames: Vec<Vec<u8>> = first.into_iter().chain(rest).map(|(_, _, f)| f).collect();
    assert_eq!(frames, sent, "all frames, in order, none lost");
    assert!(!daemon.log_text().contains("dropped"));
    Ok(())
}

#[test]
fn hostile_chains_are_dropped_and_the_daemon_keeps_serving() -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 1, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 2, QUEUE_SIZE, negotiate(false))?;
    let outside = RAM + 0x1000;

    // TX: a descriptor outside guest memory, and a chain too short for the header.
    let (ram, q) = vmm.queue(1);
    q.submit(ram, &[Buf::readable(outside, 64)])?;
    let short = vmm.ram.alloc(8, 8);
    let (ram, q) = vmm.queue(1);
    q.submit(ram, &[Buf::readable(short, 8)])?;
    let used = q.wait_used(ram, 2, TIMEOUT)?;
    assert_eq!(used.len(), 2);
    let good = udp_frame(HOST_MAC, GUEST_MAC, 5, 200);
    guest_send(&mut vmm, 1, &good, false)?;
    let (ram, q) = vmm.queue(1);
    q.wait_used(ram, 1, TIMEOUT)?;
    assert_eq!(sock.receive(1, TIMEOUT)?, vec![good]);

    // RX: a chain outside memory and one too small for the header come back empty.
    let mut rx = RxBuffers::default();
    let (ram, q) = vmm.queue(0);
    let bad_outside = q.submit(ram, &[Buf::writable(outside, 2048)])?;
    let tiny = vmm.ram.alloc(8, 8);
    let (ram, q) = vmm.queue(0);
    let bad_tiny = q.submit(ram, &[Buf::writable(tiny, 8)])?;
    // Then a 256-byte chain: a 1000-byte frame cannot fit it (dropped), a 100-byte one can.
    rx.post(&mut vmm, 0, 1, 256)?;
    daemon.wait_for_log("pair 0: tap queue attached", TIMEOUT)?;
    sock.send(&udp_frame(GUEST_MAC, HOST_MAC, 6, 1000))?;
    daemon.wait_for_log("larger than the guest's receive buffers", TIMEOUT)?;
    let small = udp_frame(GUEST_MAC, HOST_MAC, 6, 100);
    sock.send(&small)?;
    let (ram, q) = vmm.queue(0);
    let used = q.wait_used(ram, 3, TIMEOUT)?;
    assert_eq!(
        used[0],
        Used {
            id: bad_outside,
            len: 0
        }
    );
    assert_eq!(
        used[1],
        Used {
            id: bad_tiny,
            len: 0
        }
    );
    let frames = rx.frames(&vmm, 0, &used[2..])?;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1, small);

    // Still serving: more frames both ways.
    rx.post(&mut vmm, 0, 4, 2048)?;
    let again = udp_frame(GUEST_MAC, HOST_MAC, 8, 300);
    sock.send(&again)?;
    let got = collect_rx(&mut vmm, &rx, &[0], 1)?;
    assert_eq!(got[0].2, again);
    let out = udp_frame(HOST_MAC, GUEST_MAC, 9, 64);
    guest_send(&mut vmm, 1, &out, true)?;
    assert_eq!(sock.receive(1, TIMEOUT)?, vec![out]);
    assert!(daemon.is_running());
    let log = daemon.log_text();
    assert!(log.contains("outside guest memory"), "{log}");
    Ok(())
}

#[test]
fn receive_chains_held_for_a_frame_go_back_when_the_ring_stops() -> Result<()> {
    use vhost::VhostBackend;
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 1, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 2, QUEUE_SIZE, negotiate(true))?;
    // One 256-byte buffer: with MRG_RXBUF the daemon takes it for a 1000-byte frame, then
    // waits for more (EVENT_IDX: it asks for a kick at the next buffer, avail_event = 1).
    let mut rx = RxBuffers::default();
    rx.post(&mut vmm, 0, 1, 256)?;
    daemon.wait_for_log("pair 0: tap queue attached", TIMEOUT)?;
    sock.send(&udp_frame(GUEST_MAC, HOST_MAC, 6, 1000))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (ram, q) = vmm.queue(0);
        let avail_event = ram.read(q.used + 4 + 8 * u64::from(q.size), 2)?;
        if avail_event == [1, 0] {
            break;
        }
        if Instant::now() > deadline {
            return Err("the daemon never took the receive buffer".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ram, q) = vmm.queue(0);
    assert!(
        q.take_used(ram)?.is_empty(),
        "one buffer cannot hold the frame"
    );
    // GET_VRING_BASE stops the ring: the held buffer comes back, empty.
    assert_eq!(vmm.frontend.get_vring_base(0)?, 1);
    let (ram, q) = vmm.queue(0);
    assert_eq!(q.take_used(ram)?, vec![Used { id: 0, len: 0 }]);
    Ok(())
}

#[test]
fn disabled_pair_is_not_served() -> Result<()> {
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 2, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    // The guest uses one pair only: QEMU leaves the other pairs' rings disabled.
    let mut vmm = TestVmm::connect_unstarted(&daemon.socket, RAM, 4, negotiate(false))?;
    for q in 0..4 {
        vmm.start_queue_with(q, QUEUE_SIZE, q < 2)?;
    }
    let mut rx = RxBuffers::default();
    rx.post(&mut vmm, 0, 64, 2048)?;
    rx.post(&mut vmm, 2, 64, 2048)?;
    daemon.wait_for_log("pair 0: tap queue attached", TIMEOUT)?;
    // A disabled TX ring is not processed.
    let frame = udp_frame(HOST_MAC, GUEST_MAC, 1, 100);
    guest_send(&mut vmm, 3, &frame, false)?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(vmm.queues[3].take_used(&vmm.ram)?.is_empty());
    assert!(sock.receive(1, Duration::from_millis(200))?.is_empty());
    // Every flow lands on the enabled pair.
    let sent: Vec<Vec<u8>> = (0..16u16)
        .map(|p| udp_frame(GUEST_MAC, HOST_MAC, 2000 + p, 80))
        .collect();
    for f in &sent {
        sock.send(f)?;
    }
    let got = collect_rx(&mut vmm, &rx, &[0, 2], sent.len())?;
    assert_eq!(got.len(), sent.len());
    assert!(got.iter().all(|(q, _, _)| *q == 0));
    // Enabling the pair later serves the frame that waited on its TX ring.
    vmm.frontend.set_vring_enable(2, true)?;
    vmm.frontend.set_vring_enable(3, true)?;
    vmm.queues[3].notify()?;
    let (ram, q) = vmm.queue(3);
    q.wait_used(ram, 1, TIMEOUT)?;
    assert_eq!(sock.receive(1, TIMEOUT)?, vec![frame]);
    Ok(())
}

fn testpmd() -> std::path::PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = std::path::Path::new(dir).join("dpdk-testpmd");
        if path.exists() {
            return path;
        }
    }
    panic!(
        "dpdk-testpmd not found: this test needs DPDK (Debian: apt-get install -y dpdk dpdk-dev)"
    );
}

/// Packet counters from testpmd's last `show port stats all`.
fn last_stat(output: &str, key: &str) -> Option<u64> {
    let at = output.rfind(key)?;
    output[at + key.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn dpdk_testpmd_drives_the_daemon() -> Result<()> {
    let testpmd = testpmd();
    let ns = Netns::without_ipv6("vun-test")?;
    let mut daemon = start_daemon(&ns, 2, &[])?;
    let sock = PacketSocket::open(&ns, TAP)?;
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("testpmd.log");
    let prefix = format!("vun-testpmd-{}", std::process::id());
    let vdev = format!("net_virtio_user0,path={},queues=2", daemon.socket.display());
    let mut child = Command::new(testpmd)
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "--file-prefix",
            &prefix,
            "--vdev",
            &vdev,
            "--",
            "-i",
            "--nb-cores=1",
            "--rxq=2",
            "--txq=2",
            "--total-num-mbufs=32768",
        ])
        .stdin(Stdio::piped())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(dir.path().join("testpmd.err"))?)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !output().contains("testpmd>") {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            return Err(format!("testpmd did not start:\n{}", output()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut say = |cmd: &str| -> Result<()> {
        stdin.write_all(cmd.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    };
    // Guest → tap.
    let before = tap_counter(&ns, "rx_packets")?;
    say("set fwd txonly")?;
    say("set txpkts 64")?;
    say("start")?;
    std::thread::sleep(Duration::from_secs(2));
    say("stop")?;
    std::thread::sleep(Duration::from_millis(500));
    let on_tap = tap_counter(&ns, "rx_packets")? - before;
    // Tap → guest.
    say("clear port stats all")?;
    say("set fwd rxonly")?;
    say("start")?;
    daemon.wait_for_log("pair 1: tap queue attached", TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(500));
    for port in 0..100u16 {
        sock.send(&udp_frame(GUEST_MAC, HOST_MAC, 3000 + port, 200))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    say("show port stats all")?;
    std::thread::sleep(Duration::from_millis(500));
    say("stop")?;
    say("quit")?;
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = output();
    eprintln!("testpmd sent {on_tap} frames to the tap");
    assert!(on_tap > 1000, "only {on_tap} frames on the tap:\n{text}");
    let rx_packets = last_stat(&text, "RX-packets:").ok_or("no RX-packets in testpmd output")?;
    assert!(
        rx_packets >= 100,
        "testpmd received {rx_packets} of 100:\n{text}"
    );
    assert!(daemon.log_text().contains("frontend connected"));
    Ok(())
}
