//! Live migration, net and console, through the daemons' real sockets (the test is the VMM, as
//! QEMU is during a migration):
//!
//! - dirty-page logging: after SET_LOG_BASE (a memfd log) and with VHOST_F_LOG_ALL acked, what
//!   the daemon writes into guest memory marks exactly the pages it wrote: the bytes of each
//!   used receive buffer (frame and virtio-net header, `num_buffers` included) and the used
//!   ring's page; nothing before LOG_ALL is acked, nothing in buffers it did not use;
//! - net's announcement: SEND_RARP puts QEMU's RARP broadcast for the MAC on the tap.
//!
//! Needs root for net (network namespaces, taps); only interfaces in the test's own namespaces
//! are touched.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vhost_user_tests::migration::{pages_of, send_rarp, DirtyLog, VHOST_F_LOG_ALL};
use vhost_user_tests::netns::{require_root, Netns, PacketSocket};
use vhost_user_tests::{Buf, Daemon, GuestRam, Negotiate, Result, TestVmm, Used};

const RAM: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 256;
const TIMEOUT: Duration = Duration::from_secs(10);
const NET: &str = "vhost-user-net";
const CONSOLE: &str = "vhost-user-console";
const TAP: &str = "vunmig0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_MAC_TEXT: &str = "52:54:00:12:34:56";
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
const HDR_LEN: usize = 12;
/// Where the tests place receive buffers: past the rings and `GuestRam::alloc`'s start.
const BUFFERS: u64 = 32 << 20;

/// What the test VMM negotiates: everything but LOG_ALL (acked later, as QEMU does when a
/// migration starts), with LOG_SHMFD (and RARP when offered) on top of the usual protocol
/// features.
fn negotiate(without: u64) -> Negotiate {
    let base = Negotiate::default();
    Negotiate {
        features: base.features & !VHOST_F_LOG_ALL & !without,
        protocol: base.protocol
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP,
    }
}

/// The dirty log, shared as QEMU does when a migration starts. From here on every request
/// waits for the daemon's acknowledgement (QEMU waits for its SET_FEATURES with LOG_ALL), so
/// that nothing the test makes the daemon write afterwards can precede LOG_ALL.
fn share_log(vmm: &mut TestVmm) -> Result<DirtyLog> {
    vmm.acknowledge_every_request();
    let log = DirtyLog::new(RAM)?;
    vmm.set_log(&log)?;
    Ok(log)
}

/// The test's dirty pages as a set.
fn dirty(log: &DirtyLog) -> Result<BTreeSet<u64>> {
    Ok(log.dirty_pages()?.into_iter().collect())
}

/// The page of queue `index`'s used ring (the test VMM's layout keeps each ring in one page).
fn used_ring_pages(vmm: &TestVmm, index: usize) -> BTreeSet<u64> {
    let q = &vmm.queues[index];
    pages_of(q.used, 6 + 8 * u64::from(q.size)).collect()
}

/// Receive buffers posted at chosen addresses: each starts `offset` bytes before a page
/// boundary, so a short write touches one page and a long one two.
struct RxBuffers {
    queue: usize,
    posted: std::collections::HashMap<u16, (u64, u32)>,
    next: u64,
}

impl RxBuffers {
    fn new(queue: usize) -> RxBuffers {
        RxBuffers {
            queue,
            posted: Default::default(),
            next: BUFFERS,
        }
    }

    fn post(&mut self, vmm: &mut TestVmm, count: usize, len: u32, offset: u64) -> Result<()> {
        for _ in 0..count {
            let gpa = self.next + 0x1000 - offset;
            self.next += 0x3000;
            let (ram, q) = vmm.queue(self.queue);
            let head = q.add_chain(ram, &[Buf::writable(gpa, len)])?;
            q.publish(ram, head)?;
            self.posted.insert(head, (gpa, len));
        }
        vmm.queues[self.queue].notify()
    }

    /// Waits for `count` used entries; returns them with the pages their bytes are in.
    fn wait(&mut self, vmm: &mut TestVmm, count: usize) -> Result<(Vec<Used>, BTreeSet<u64>)> {
        let (ram, q) = vmm.queue(self.queue);
        let used = q.wait_used(ram, count, TIMEOUT)?;
        let mut written = BTreeSet::new();
        for u in &used {
            let (gpa, len) = self
                .posted
                .get(&u.id)
                .copied()
                .ok_or("used entry for a buffer never posted")?;
            assert!(u.len <= len, "used length beyond the buffer");
            if u.len > 0 {
                written.extend(pages_of(gpa, u64::from(u.len)));
            }
        }
        Ok((used, written))
    }

    /// The bytes of `used` (in ring order), joined.
    fn bytes(&self, ram: &GuestRam, used: &[Used]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for u in used {
            let (gpa, _) = self.posted[&u.id];
            out.extend(ram.read(gpa, u.len as usize)?);
        }
        Ok(out)
    }
}

/// Pages as hex guest addresses, for failure messages.
fn show(pages: &BTreeSet<u64>) -> String {
    let list: Vec<String> = pages.iter().map(|p| format!("{:#x}", p * 0x1000)).collect();
    format!("[{}]", list.join(", "))
}

fn assert_pages(what: &str, got: &BTreeSet<u64>, want: &BTreeSet<u64>) {
    assert!(
        got == want,
        "{what}: dirty pages {} but the daemon wrote {} (missing {}, extra {})",
        show(got),
        show(want),
        show(&want.difference(got).copied().collect()),
        show(&got.difference(want).copied().collect()),
    );
}

// ---------------------------------------------------------------------------------------------
// net

/// A namespace without IPv6 (no router solicitations or MLD reports reach the guest's buffers
/// uninvited), the daemon in it on tap `vunmig0`, and a packet socket on the tap.
fn net_setup(pairs: u16) -> Result<(Netns, Daemon, PacketSocket)> {
    require_root("the net migration tests")?;
    let ns = Netns::without_ipv6("vunmig")?;
    let pairs = pairs.to_string();
    let daemon = Daemon::start_with_prefix(
        &ns.prefix(),
        NET,
        &[
            "--tap",
            TAP,
            "--queue-pairs",
            &pairs,
            "--mac",
            GUEST_MAC_TEXT,
            "--up",
        ],
    )?;
    let sock = PacketSocket::open(&ns, TAP)?;
    Ok((ns, daemon, sock))
}

/// Waits until the daemon has logged `text` `times` times.
fn wait_for_log(daemon: &Daemon, text: &str, times: usize) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while daemon.log_text().matches(text).count() < times {
        if Instant::now() > deadline {
            return Err(format!("daemon never logged {text:?}:\n{}", daemon.log_text()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// An Ethernet frame to the guest: IPv4 with a payload of `len` bytes numbered by `seed`.
fn frame_to_guest(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    // A minimal IPv4 header (protocol 253, "experimentation"): the tap does not look inside.
    let total = (20 + len) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 253, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 78, 0, 1, 10, 78, 0, 2]);
    f.extend_from_slice(&ip);
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// Net RX with a dirty log: nothing is marked while LOG_ALL is not acked; then every frame
/// marks exactly the pages of the bytes written into its receive buffers (header included)
/// and the used ring's page.
fn net_rx_marks_exactly_what_it_wrote(mergeable: bool) -> Result<()> {
    let (_ns, daemon, sock) = net_setup(1)?;
    let without = if mergeable { 0 } else { VIRTIO_NET_F_MRG_RXBUF };
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 2, QUEUE_SIZE, negotiate(without))?;
    assert_eq!(vmm.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0, mergeable);
    assert!(
        vmm.offered_features & VHOST_F_LOG_ALL != 0,
        "LOG_ALL not offered"
    );
    assert!(vmm.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    let log = share_log(&mut vmm)?;

    // Small buffers with merging (a frame spans several), whole-frame ones without. Each
    // starts 12 bytes before a page boundary: the virtio-net header (with `num_buffers`) is
    // alone in the first buffer's first page, so an unlogged header write shows.
    let buf_len = if mergeable { 700 } else { 2048 };
    let mut rx = RxBuffers::new(0);
    rx.post(&mut vmm, 64, buf_len, HDR_LEN as u64)?;
    wait_for_log(&daemon, "pair 0: tap queue attached", 1)?;

    // Before LOG_ALL: the log is mapped but nothing is marked.
    let early = frame_to_guest(1000, 1);
    sock.send(&early)?;
    let want = if mergeable { 2 } else { 1 };
    let (used, _) = rx.wait(&mut vmm, want)?;
    assert_eq!(rx.bytes(&vmm.ram, &used)?[HDR_LEN..], early[..]);
    std::thread::sleep(Duration::from_millis(100));
    assert_pages("before LOG_ALL", &dirty(&log)?, &BTreeSet::new());

    // QEMU acks LOG_ALL once the log is set: from now on every write is logged.
    vmm.log_all(true)?;
    let mut sent = Vec::new();
    // Frames of several sizes: one or two buffers with merging, one page or two of payload.
    for (n, len) in [100usize, 600, 1400].into_iter().enumerate() {
        let f = frame_to_guest(len, n as u8 + 2);
        sock.send(&f)?;
        sent.push(f);
    }
    let total: usize = sent
        .iter()
        .map(|f| {
            if mergeable {
                (f.len() + HDR_LEN).div_ceil(buf_len as usize)
            } else {
                1
            }
        })
        .sum();
    let (used, mut written) = rx.wait(&mut vmm, total)?;
    // The frames arrived whole (the header's num_buffers says how many buffers each took).
    let mut i = 0;
    for f in &sent {
        let first = rx.bytes(&vmm.ram, &used[i..=i])?;
        let count = usize::from(u16::from_le_bytes([first[10], first[11]]));
        assert_eq!(
            count,
            if mergeable {
                (f.len() + HDR_LEN).div_ceil(buf_len as usize)
            } else {
                1
            }
        );
        assert_eq!(rx.bytes(&vmm.ram, &used[i..i + count])?[HDR_LEN..], f[..]);
        i += count;
    }
    // Give the daemon's worker time to finish its pass (re-arming kicks writes the used ring).
    std::thread::sleep(Duration::from_millis(100));
    written.extend(used_ring_pages(&vmm, 0));
    assert_pages("net RX with LOG_ALL", &dirty(&log)?, &written);
    assert!(
        written.len() >= 4,
        "the test wrote too few pages to mean anything"
    );

    // QEMU clears LOG_ALL when the migration ends: logging stops.
    log.clear()?;
    vmm.log_all(false)?;
    sock.send(&frame_to_guest(300, 9))?;
    rx.wait(&mut vmm, 1)?;
    std::thread::sleep(Duration::from_millis(100));
    assert_pages("after LOG_ALL is cleared", &dirty(&log)?, &BTreeSet::new());
    Ok(())
}

#[test]
fn net_rx_with_mrg_rxbuf_marks_exactly_its_buffers_and_the_used_ring() -> Result<()> {
    net_rx_marks_exactly_what_it_wrote(true)
}

#[test]
fn net_rx_without_mrg_rxbuf_marks_exactly_its_buffers_and_the_used_ring() -> Result<()> {
    net_rx_marks_exactly_what_it_wrote(false)
}

/// Net TX with a dirty log: the daemon only reads the guest's frames; it writes (and marks)
/// the used ring's page only.
#[test]
fn net_tx_marks_only_the_used_ring() -> Result<()> {
    let (_ns, daemon, sock) = net_setup(1)?;
    let mut vmm = TestVmm::connect(&daemon.socket, RAM, 2, QUEUE_SIZE, negotiate(0))?;
    wait_for_log(&daemon, "pair 0: tap queue attached", 1)?;
    let log = share_log(&mut vmm)?;
    vmm.log_all(true)?;
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental EtherType
    frame.extend_from_slice(&[0x5a; 200]);
    let gpa = BUFFERS;
    vmm.ram.write(gpa, &frame)?;
    let (ram, q) = vmm.queue(1);
    q.submit(ram, &[Buf::readable(gpa, frame.len() as u32)])?;
    q.wait_used(ram, 1, TIMEOUT)?;
    let got = sock.receive(usize::MAX, Duration::from_millis(300))?;
    assert!(
        got.iter().any(|f| f[..] == frame[HDR_LEN..]),
        "the frame did not reach the tap"
    );
    assert_pages(
        "net TX with LOG_ALL",
        &dirty(&log)?,
        &used_ring_pages(&vmm, 1),
    );
    Ok(())
}

/// SEND_RARP (what QEMU sends on the destination when a migration completes) puts QEMU's RARP
/// broadcast for the MAC on the tap: before the rings run (the tap queue is still detached
/// then) and while they run.
#[test]
fn send_rarp_puts_a_rarp_for_the_mac_on_the_tap() -> Result<()> {
    let (_ns, daemon, sock) = net_setup(1)?;
    let mut vmm = TestVmm::connect_unstarted(&daemon.socket, RAM, 2, negotiate(0))?;
    assert!(
        vmm.protocol.contains(VhostUserProtocolFeatures::RARP),
        "RARP not offered"
    );
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let check = |frames: Vec<Vec<u8>>, when: &str| -> Result<()> {
        let rarps: Vec<&Vec<u8>> = frames
            .iter()
            .filter(|f| f.get(12..14) == Some(&[0x80, 0x35][..]))
            .collect();
        assert_eq!(
            rarps.len(),
            1,
            "{when}: RARP frames on the tap: {frames:02x?}"
        );
        let f = rarps[0];
        assert_eq!(f.len(), 60, "{when}: padded to the Ethernet minimum");
        assert_eq!(f[0..6], [0xff; 6], "{when}: broadcast");
        assert_eq!(f[6..12], mac, "{when}: source MAC");
        assert_eq!(
            f[14..22],
            [0, 1, 8, 0, 6, 4, 0, 3],
            "{when}: Ethernet/IPv4, reverse request"
        );
        assert_eq!(f[22..28], mac, "{when}: sender hardware address");
        assert_eq!(f[28..32], [0; 4], "{when}: sender protocol address");
        assert_eq!(f[32..38], mac, "{when}: target hardware address");
        assert!(
            f[38..].iter().all(|&b| b == 0),
            "{when}: zero address and padding"
        );
        Ok(())
    };
    assert_eq!(send_rarp(&vmm.frontend, mac)?, 0, "SEND_RARP refused");
    check(
        sock.receive(usize::MAX, Duration::from_millis(300))?,
        "rings stopped",
    )?;
    wait_for_log(&daemon, "announced 52:54:00:ab:cd:ef", 1)?;
    // The queue was attached for the write only.
    wait_for_log(&daemon, "pair 0: tap queue detached", 1)?;

    for q in 0..2 {
        vmm.start_queue(q, QUEUE_SIZE)?;
    }
    let mut rx = RxBuffers::new(0);
    rx.post(&mut vmm, 8, 2048, 0)?;
    // Attached for the first RARP, then by the worker once the guest's RX ring runs.
    wait_for_log(&daemon, "pair 0: tap queue attached", 2)?;
    assert_eq!(send_rarp(&vmm.frontend, mac)?, 0, "SEND_RARP refused");
    check(
        sock.receive(usize::MAX, Duration::from_millis(300))?,
        "rings running",
    )?;
    // The tap queue stayed attached: frames still reach the guest.
    let f = frame_to_guest(64, 3);
    sock.send(&f)?;
    let (used, _) = rx.wait(&mut vmm, 1)?;
    assert_eq!(rx.bytes(&vmm.ram, &used)?[HDR_LEN..], f[..]);
    assert!(daemon.log_text().contains("frontend connected"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// console

/// Console RX with a dirty log: the bytes typed at the endpoint mark exactly the pages of the
/// receive buffers they landed in and the used rings' pages; nothing before LOG_ALL.
#[test]
fn console_rx_marks_exactly_its_buffers_and_the_used_ring() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let daemon = Daemon::start(CONSOLE, &["--unix", &ep.to_string_lossy()])?;
    let deadline = Instant::now() + TIMEOUT;
    let mut client = loop {
        match UnixStream::connect(&ep) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let mut vmm = TestVmm::connect(
        &daemon.socket,
        RAM,
        2,
        QUEUE_SIZE,
        negotiate(VIRTIO_CONSOLE_F_MULTIPORT),
    )?;
    assert!(
        vmm.offered_features & VHOST_F_LOG_ALL != 0,
        "LOG_ALL not offered"
    );
    let log = share_log(&mut vmm)?;
    let mut rx = RxBuffers::new(0);
    rx.post(&mut vmm, 16, 1024, 0x100)?;

    client.write_all(b"before LOG_ALL")?;
    let (used, _) = rx.wait(&mut vmm, 1)?;
    assert_eq!(rx.bytes(&vmm.ram, &used)?, b"before LOG_ALL");
    std::thread::sleep(Duration::from_millis(100));
    assert_pages("console before LOG_ALL", &dirty(&log)?, &BTreeSet::new());

    vmm.log_all(true)?;
    // 200 bytes stay in the first page of a buffer; 1024 fill one across the boundary.
    let mut written = BTreeSet::new();
    for len in [200usize, 1024] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        client.write_all(&data)?;
        let mut got = Vec::new();
        while got.len() < len {
            let (used, pages) = rx.wait(&mut vmm, 1)?;
            got.extend(rx.bytes(&vmm.ram, &used)?);
            written.extend(pages);
        }
        assert_eq!(got, data);
    }
    std::thread::sleep(Duration::from_millis(100));
    // Every pump pass also re-arms the transmit ring's kick (EVENT_IDX's avail_event, in the
    // transmit ring's used ring): that page is written, and must be marked, too.
    written.extend(used_ring_pages(&vmm, 0));
    written.extend(used_ring_pages(&vmm, 1));
    assert_pages("console RX with LOG_ALL", &dirty(&log)?, &written);
    assert!(
        written.len() >= 3,
        "the test wrote too few pages to mean anything"
    );
    Ok(())
}

/// A hostile frontend's dirty log that claims more bytes than its file has (mmap accepts it;
/// the first mark past the end would raise SIGBUS) is refused at SET_LOG_BASE: the frontend
/// loses its connection, the daemon lives on and serves the next one.
#[test]
fn a_dirty_log_larger_than_its_file_is_refused() -> Result<()> {
    use std::os::fd::AsRawFd;
    use vhost::VhostUserDirtyLogRegion;
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let mut daemon = Daemon::start(CONSOLE, &["--unix", &ep.to_string_lossy()])?;
    let vmm = TestVmm::connect(
        &daemon.socket,
        RAM,
        2,
        QUEUE_SIZE,
        negotiate(VIRTIO_CONSOLE_F_MULTIPORT),
    )?;
    let fd =
        nix::sys::memfd::memfd_create(c"short-log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(1024)?;
    let refused = vmm.frontend.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }),
    );
    assert!(
        refused.is_err(),
        "a log past the end of its file was accepted"
    );
    drop(vmm);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        daemon.is_running(),
        "the daemon died: {}",
        daemon.log_tail(10)
    );
    // The next frontend is served, and its (fitting) log works.
    let vmm = TestVmm::connect(
        &daemon.socket,
        RAM,
        2,
        QUEUE_SIZE,
        negotiate(VIRTIO_CONSOLE_F_MULTIPORT),
    )?;
    let mut vmm = vmm;
    share_log(&mut vmm)?;
    assert!(daemon
        .log_text()
        .contains("does not fit in its 1024-byte file"));
    Ok(())
}
