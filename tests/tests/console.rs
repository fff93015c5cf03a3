//! vhost-user-console against its real binary: the test is the VMM (vhost-user frontend) and
//! the guest's virtio-console driver (split rings in shared memfd RAM), and the endpoints' client.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost_user_tests::{read_at_least, run_to_exit, Buf, Daemon, Negotiate, Result, TestVmm};

const BIN: &str = "vhost-user-console";
const RAM: u64 = 64 << 20;
const QSIZE: u16 = 256;
const T: Duration = Duration::from_secs(20);

const F_SIZE: u64 = 1 << 0;
const F_MULTIPORT: u64 = 1 << 1;
const F_EMERG_WRITE: u64 = 1 << 2;

// Control events.
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const RESIZE: u16 = 5;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

// Queues with MULTIPORT: rx0, tx0, c_ivq, c_ovq, rx1, tx1.
const RX0: usize = 0;
const TX0: usize = 1;
const C_IVQ: usize = 2;
const C_OVQ: usize = 3;
const RX1: usize = 4;
const TX1: usize = 5;

fn single_port() -> Negotiate {
    Negotiate {
        features: !F_MULTIPORT,
        ..Negotiate::default()
    }
}

/// The daemon with `args`, plus a scratch directory for endpoint paths.
fn start(args: &[&str]) -> Result<Daemon> {
    Daemon::start(BIN, args)
}

fn connect_unix(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + T;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Sends `data` on queue `q` in chains of at most `chunk` bytes, keeping up to 64 chains in
/// flight, and waits until the device has used them all.
fn send(vmm: &mut TestVmm, q: usize, data: &[u8], chunk: usize) -> Result<()> {
    let mut in_flight = 0usize;
    let mut offset = 0;
    let deadline = Instant::now() + T;
    while offset < data.len() || in_flight > 0 {
        while offset < data.len() && in_flight < 64 {
            let n = chunk.min(data.len() - offset);
            let gpa = vmm.ram.alloc(n as u64, 8);
            vmm.ram.write(gpa, &data[offset..offset + n])?;
            let queue = &mut vmm.queues[q];
            let head = queue.add_chain(&vmm.ram, &[Buf::readable(gpa, n as u32)])?;
            queue.publish(&vmm.ram, head)?;
            offset += n;
            in_flight += 1;
        }
        let queue = &mut vmm.queues[q];
        queue.notify()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let done = queue.wait_used(&vmm.ram, 1, left)?;
        assert!(done.iter().all(|u| u.len == 0), "tx used length must be 0");
        in_flight -= done.len();
    }
    Ok(())
}

/// Guest receive buffers kept posted on one queue.
struct Rx {
    q: usize,
    buf_len: u32,
    posted: HashMap<u16, (u64, u32)>,
}

impl Rx {
    fn new(q: usize, buf_len: u32) -> Rx {
        Rx {
            q,
            buf_len,
            posted: HashMap::new(),
        }
    }

    fn post(&mut self, vmm: &mut TestVmm, count: usize) -> Result<()> {
        while self.posted.len() < count {
            let gpa = vmm.ram.alloc(u64::from(self.buf_len), 8);
            let queue = &mut vmm.queues[self.q];
            let head = queue.add_chain(&vmm.ram, &[Buf::writable(gpa, self.buf_len)])?;
            queue.publish(&vmm.ram, head)?;
            self.posted.insert(head, (gpa, self.buf_len));
        }
        vmm.queues[self.q].notify()
    }

    /// Waits for `count` filled buffers and returns each one's contents.
    fn buffers(&mut self, vmm: &mut TestVmm, count: usize) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + T;
        while out.len() < count {
            self.post(vmm, 32)?;
            let left = deadline.saturating_duration_since(Instant::now());
            for used in vmm.queues[self.q].wait_used(&vmm.ram, 1, left)? {
                let (gpa, len) = self
                    .posted
                    .remove(&used.id)
                    .ok_or("device used an unknown id")?;
                assert!(used.len <= len, "used length beyond the buffer");
                out.push(vmm.ram.read(gpa, used.len as usize)?);
            }
        }
        Ok(out)
    }

    /// Waits for `want` bytes.
    fn bytes(&mut self, vmm: &mut TestVmm, want: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < want {
            for b in self.buffers(vmm, 1)? {
                out.extend(b);
            }
        }
        Ok(out)
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn unix_console_carries_both_directions_with_all_chain_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let d = start(&["--unix", &ep.to_string_lossy()])?;
    let mut client = connect_unix(&ep)?;
    client.set_read_timeout(Some(T))?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;
    assert_eq!(vmm.acked_features & F_MULTIPORT, 0);

    // One descriptor, then a three-descriptor chain, then an indirect chain.
    send(&mut vmm, TX0, b"hello ", 64)?;
    let parts: [&[u8]; 3] = [b"from ", b"the ", b"guest"];
    let mut bufs = Vec::new();
    for p in parts {
        let gpa = vmm.ram.alloc(p.len() as u64, 8);
        vmm.ram.write(gpa, p)?;
        bufs.push(Buf::readable(gpa, p.len() as u32));
    }
    vmm.queues[TX0].submit(&vmm.ram, &bufs)?;
    vmm.queues[TX0].wait_used(&vmm.ram, 1, T)?;
    let table = vmm.ram.alloc(64, 16);
    let gpa = vmm.ram.alloc(8, 8);
    vmm.ram.write(gpa, b", via ind")?;
    let head = vmm.queues[TX0].add_indirect_chain(&vmm.ram, table, &[Buf::readable(gpa, 9)])?;
    vmm.queues[TX0].publish(&vmm.ram, head)?;
    vmm.queues[TX0].notify()?;
    vmm.queues[TX0].wait_used(&vmm.ram, 1, T)?;

    let want = b"hello from the guest, via ind";
    let mut got = vec![0u8; want.len()];
    client.read_exact(&mut got)?;
    assert_eq!(&got, want);

    // Typed at the endpoint: arrives in the guest's receive buffers.
    let mut rx = Rx::new(RX0, 16);
    rx.post(&mut vmm, 8)?;
    client.write_all(b"typed at the host side")?;
    assert_eq!(rx.bytes(&mut vmm, 22)?, b"typed at the host side");
    Ok(())
}

#[test]
fn tcp_large_transfers_small_and_large_buffers() -> Result<()> {
    let d = start(&["--tcp", "127.0.0.1:0"])?;
    let addr = tcp_addr(&d)?;
    let client = TcpStream::connect(addr)?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;

    let small = pattern(512 * 1024, 1);
    let large = pattern(8 << 20, 2);
    let mut reader = client.try_clone()?;
    let total = small.len() + large.len();
    let reading = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        reader.set_read_timeout(Some(T))?;
        let mut all = vec![0u8; total];
        reader.read_exact(&mut all)?;
        Ok(all)
    });
    send(&mut vmm, TX0, &small, 61)?;
    send(&mut vmm, TX0, &large, 256 * 1024)?;
    let all = reading.join().map_err(|_| "reader panicked")??;
    assert!(
        all[..small.len()] == small[..],
        "small-buffer stream differs"
    );
    assert!(
        all[small.len()..] == large[..],
        "large-buffer stream differs"
    );

    // Host → guest, 2 MiB into 4 KiB buffers while the client writes in one go.
    let input = pattern(2 << 20, 3);
    let mut writer = client.try_clone()?;
    let to_send = input.clone();
    let writing = std::thread::spawn(move || writer.write_all(&to_send));
    let mut rx = Rx::new(RX0, 4096);
    let got = rx.bytes(&mut vmm, input.len())?;
    writing.join().map_err(|_| "writer panicked")??;
    assert_eq!(got.len(), input.len());
    assert!(got == input, "host-to-guest stream differs");

    // And 256 KiB into 61-byte buffers.
    let input = pattern(256 * 1024, 6);
    let mut writer = client.try_clone()?;
    let to_send = input.clone();
    let writing = std::thread::spawn(move || writer.write_all(&to_send));
    // The 4 KiB buffers still posted fill first, then the small ones: still one stream.
    rx.buf_len = 61;
    let got = rx.bytes(&mut vmm, input.len())?;
    writing.join().map_err(|_| "writer panicked")??;
    assert!(got == input, "small-buffer host-to-guest stream differs");
    Ok(())
}

fn tcp_addr(d: &Daemon) -> Result<std::net::SocketAddr> {
    let deadline = Instant::now() + T;
    loop {
        let log = d.log_text();
        if let Some(rest) = log.split("listening on tcp ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            return Ok(addr.parse()?);
        }
        if Instant::now() > deadline {
            return Err(format!("no tcp address in the log: {log}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn slow_reader_gets_back_pressure_without_loss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let mut d = start(&["--unix", &ep.to_string_lossy()])?;
    let mut client = connect_unix(&ep)?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;
    let data = pattern(4 << 20, 4);

    // Publish 4 MiB in 64 KiB chains without anyone reading.
    let mut heads = 0;
    for chunk in data.chunks(64 * 1024) {
        let gpa = vmm.ram.alloc(chunk.len() as u64, 8);
        vmm.ram.write(gpa, chunk)?;
        let q = &mut vmm.queues[TX0];
        let head = q.add_chain(&vmm.ram, &[Buf::readable(gpa, chunk.len() as u32)])?;
        q.publish(&vmm.ram, head)?;
        heads += 1;
    }
    vmm.queues[TX0].notify()?;
    std::thread::sleep(Duration::from_millis(500));
    let early = vmm.queues[TX0].take_used(&vmm.ram)?;
    assert!(
        early.len() < heads,
        "all {heads} chains were taken although nobody reads: no back-pressure"
    );
    assert!(d.is_running());

    // Now read slowly, in small pieces with pauses.
    client.set_read_timeout(Some(T))?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut done = early.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < data.len() {
        let n = client.read(&mut buf)?;
        assert!(n > 0, "endpoint closed early");
        got.extend_from_slice(&buf[..n]);
        if got.len() % (256 * 1024) < n {
            std::thread::sleep(Duration::from_millis(5));
        }
        done += vmm.queues[TX0].take_used(&vmm.ram)?.len();
        assert!(Instant::now() < deadline, "too slow");
    }
    assert!(got == data, "stream differs after back-pressure");
    done += vmm.queues[TX0].wait_used(&vmm.ram, heads - done, T)?.len();
    assert_eq!(done, heads, "each chain used exactly once");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vmm.queues[TX0].take_used(&vmm.ram)?.is_empty(),
        "extra used entries"
    );
    Ok(())
}

#[test]
fn next_client_gets_history_and_log_file_keeps_everything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let log = dir.path().join("console.log");
    let d = start(&[
        "--unix",
        &ep.to_string_lossy(),
        "--history",
        "1",
        "--log",
        &log.to_string_lossy(),
    ])?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;

    let mut first = connect_unix(&ep)?;
    first.set_read_timeout(Some(T))?;
    send(&mut vmm, TX0, b"boot: ", 64)?;
    let mut got = [0u8; 6];
    first.read_exact(&mut got)?;
    assert_eq!(&got, b"boot: ");
    drop(first);
    std::thread::sleep(Duration::from_millis(100));

    // Nobody attached: the guest is not blocked, output goes to the history (last 1 KiB).
    let later = pattern(3000, 5);
    send(&mut vmm, TX0, &later, 100)?;
    let mut second = connect_unix(&ep)?;
    second.set_read_timeout(Some(T))?;
    let mut replay = vec![0u8; 1024];
    second.read_exact(&mut replay)?;
    assert_eq!(replay[..], later[later.len() - 1024..]);
    send(&mut vmm, TX0, b"live", 64)?;
    let mut live = [0u8; 4];
    second.read_exact(&mut live)?;
    assert_eq!(&live, b"live");

    let logged = std::fs::read(&log)?;
    let mut want = b"boot: ".to_vec();
    want.extend_from_slice(&later);
    want.extend_from_slice(b"live");
    assert_eq!(logged, want);

    // A second client at the same time is refused; the first keeps the console.
    let mut extra = connect_unix(&ep)?;
    extra.set_read_timeout(Some(T))?;
    let mut byte = [0u8; 1];
    assert_eq!(
        extra.read(&mut byte)?,
        0,
        "the extra client should be closed"
    );
    drop(d);
    Ok(())
}

fn open_pty(path: &Path) -> Result<std::fs::File> {
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?)
}

fn set_winsize(tty: &std::fs::File, cols: u16, rows: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is an open tty.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn cols_rows(vmm: &mut TestVmm) -> Result<(u16, u16)> {
    let c = vmm.get_config(0, 4)?;
    Ok((
        u16::from_le_bytes([c[0], c[1]]),
        u16::from_le_bytes([c[2], c[3]]),
    ))
}

fn ctrl(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

fn parse_ctrl(b: &[u8]) -> (u32, u16, u16, Vec<u8>) {
    assert!(b.len() >= 8, "short control message {b:?}");
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8..].to_vec(),
    )
}

#[test]
fn pty_link_history_input_size_and_resize() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let link = dir.path().join("vm1-console");
    let d = start(&["--pty-link", &link.to_string_lossy()])?;
    assert!(std::fs::read_link(&link)?.starts_with("/dev/pts"));
    let mut vmm = TestVmm::connect(&d.socket, RAM, 4, QSIZE, Negotiate::default())?;
    assert_ne!(vmm.acked_features & F_SIZE, 0);
    assert_ne!(vmm.acked_features & F_MULTIPORT, 0);
    assert_eq!(cols_rows(&mut vmm)?, (80, 24));

    // Output before anyone attaches is not lost: it is replayed to a late `screen`.
    send(&mut vmm, TX0, b"[    0.000000] Linux version\r\n", 8)?;
    let mut tty = open_pty(&link)?;
    let early = read_at_least(&mut tty, 30, T)?;
    assert_eq!(early, b"[    0.000000] Linux version\r\n");
    send(&mut vmm, TX0, b"login: ", 64)?;
    assert_eq!(read_at_least(&mut tty, 7, T)?, b"login: ");

    let mut rx = Rx::new(RX0, 64);
    rx.post(&mut vmm, 4)?;
    tty.write_all(b"root\n")?;
    assert_eq!(rx.bytes(&mut vmm, 5)?, b"root\n");

    // MULTIPORT handshake for the console port, then a resize.
    let mut cin = Rx::new(C_IVQ, 256);
    cin.post(&mut vmm, 16)?;
    send(&mut vmm, C_OVQ, &ctrl(0, DEVICE_READY, 1), 64)?;
    let add = cin.buffers(&mut vmm, 1)?;
    assert_eq!(parse_ctrl(&add[0]), (0, DEVICE_ADD, 1, vec![]));
    send(&mut vmm, C_OVQ, &ctrl(0, PORT_READY, 1), 64)?;
    let msgs = cin.buffers(&mut vmm, 3)?;
    assert_eq!(parse_ctrl(&msgs[0]), (0, CONSOLE_PORT, 1, vec![]));
    // The initial size (80x24), as RESIZE: cols, then rows (the spec's layout).
    assert_eq!(parse_ctrl(&msgs[1]), (0, RESIZE, 0, vec![80, 0, 24, 0]));
    assert_eq!(parse_ctrl(&msgs[2]), (0, PORT_OPEN, 1, vec![]));

    set_winsize(&tty, 132, 43)?;
    let resize = cin.buffers(&mut vmm, 1)?;
    // cols, then rows.
    assert_eq!(parse_ctrl(&resize[0]), (0, RESIZE, 0, vec![132, 0, 43, 0]));
    assert_eq!(cols_rows(&mut vmm)?, (132, 43));
    drop(d);
    assert!(!link.exists(), "the link is removed at exit");
    Ok(())
}

#[test]
fn multiport_handshake_and_named_port_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let console = dir.path().join("console.sock");
    let agent = dir.path().join("agent.sock");
    let spec = format!("name=org.example.agent,unix={}", agent.display());
    let d = start(&["--unix", &console.to_string_lossy(), "--port", &spec])?;
    let result = multiport_inner(&d, &console, &agent);
    if result.is_err() {
        eprintln!("--- daemon log ---\n{}", d.log_text());
    }
    result
}

fn multiport_inner(d: &Daemon, console: &Path, agent: &Path) -> Result<()> {
    let mut agent_client = connect_unix(agent)?;
    agent_client.set_read_timeout(Some(T))?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 6, QSIZE, Negotiate::default())?;
    assert_ne!(vmm.acked_features & F_MULTIPORT, 0);
    assert_ne!(vmm.acked_features & F_EMERG_WRITE, 0);
    assert_eq!(vmm.acked_features & F_SIZE, 0, "no pty: no size");
    let max = vmm.get_config(4, 4)?;
    assert_eq!(u32::from_le_bytes([max[0], max[1], max[2], max[3]]), 2);

    // The test plays Linux's virtio_console driver.
    let mut cin = Rx::new(C_IVQ, 256);
    cin.post(&mut vmm, 32)?;
    send(&mut vmm, C_OVQ, &ctrl(0, DEVICE_READY, 1), 64)?;
    let adds: Vec<_> = cin
        .buffers(&mut vmm, 2)?
        .iter()
        .map(|b| parse_ctrl(b))
        .collect();
    assert_eq!(
        adds,
        vec![(0, DEVICE_ADD, 1, vec![]), (1, DEVICE_ADD, 1, vec![])]
    );

    send(&mut vmm, C_OVQ, &ctrl(0, PORT_READY, 1), 64)?;
    let port0: Vec<_> = cin
        .buffers(&mut vmm, 2)?
        .iter()
        .map(|b| parse_ctrl(b))
        .collect();
    assert_eq!(
        port0,
        vec![(0, CONSOLE_PORT, 1, vec![]), (0, PORT_OPEN, 0, vec![])]
    );
    send(&mut vmm, C_OVQ, &ctrl(1, PORT_READY, 1), 64)?;
    let port1: Vec<_> = cin
        .buffers(&mut vmm, 2)?
        .iter()
        .map(|b| parse_ctrl(b))
        .collect();
    assert_eq!(
        port1,
        vec![
            (1, PORT_NAME, 1, b"org.example.agent".to_vec()),
            (1, PORT_OPEN, 1, vec![])
        ]
    );
    send(&mut vmm, C_OVQ, &ctrl(1, PORT_OPEN, 1), 64)?;

    // Data on the named port goes to its own endpoint, both ways.
    send(&mut vmm, TX1, b"agent: ping", 4)?;
    let mut got = [0u8; 11];
    agent_client.read_exact(&mut got)?;
    assert_eq!(&got, b"agent: ping");
    let mut rx1 = Rx::new(RX1, 32);
    rx1.post(&mut vmm, 4)?;
    agent_client.write_all(b"pong")?;
    assert_eq!(rx1.bytes(&mut vmm, 4)?, b"pong");

    // The console client arriving later: PORT_OPEN 1 for port 0; leaving: PORT_OPEN 0.
    let console_client = connect_unix(console)?;
    let opened = cin.buffers(&mut vmm, 1)?;
    assert_eq!(parse_ctrl(&opened[0]), (0, PORT_OPEN, 1, vec![]));
    drop(console_client);
    let closed = cin.buffers(&mut vmm, 1)?;
    assert_eq!(parse_ctrl(&closed[0]), (0, PORT_OPEN, 0, vec![]));

    // Hostile control input (short, unknown port, unknown event) changes nothing.
    send(&mut vmm, C_OVQ, &[1, 2, 3], 64)?;
    send(&mut vmm, C_OVQ, &ctrl(77, PORT_READY, 1), 64)?;
    send(&mut vmm, C_OVQ, &ctrl(0, 999, 1), 64)?;
    send(&mut vmm, TX1, b"!", 4)?;
    agent_client.read_exact(&mut got[..1])?;
    assert_eq!(got[0], b'!');
    Ok(())
}

#[test]
fn emergency_write_and_config_bounds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let d = start(&["--unix", &ep.to_string_lossy()])?;
    let mut client = connect_unix(&ep)?;
    client.set_read_timeout(Some(T))?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;
    std::thread::sleep(Duration::from_millis(50));
    for c in b"SOS" {
        vmm.frontend.set_config(
            8,
            VhostUserConfigFlags::WRITABLE,
            &u32::from(*c).to_le_bytes(),
        )?;
    }
    let mut got = [0u8; 3];
    client.read_exact(&mut got)?;
    assert_eq!(&got, b"SOS");
    // QEMU 11's generic vhost-user device writes the whole config space (cols, rows,
    // max_nr_ports, emerg_wr) for a guest's write to emerg_wr.
    let mut whole = [0u8; 12];
    whole[..2].copy_from_slice(&80u16.to_le_bytes());
    whole[2..4].copy_from_slice(&24u16.to_le_bytes());
    whole[4..8].copy_from_slice(&1u32.to_le_bytes());
    whole[8..].copy_from_slice(&u32::from(b'!').to_le_bytes());
    vmm.frontend
        .set_config(0, VhostUserConfigFlags::WRITABLE, &whole)?;
    let mut bang = [0u8; 1];
    client.read_exact(&mut bang)?;
    assert_eq!(&bang, b"!");

    // Exactly `size` bytes, also beyond the 12-byte config space (zeros there).
    assert_eq!(vmm.get_config(0, 12)?.len(), 12);
    assert_eq!(vmm.get_config(4, 4)?, 1u32.to_le_bytes());
    assert_eq!(vmm.get_config(8, 8)?, vec![0u8; 8]);
    assert_eq!(vmm.get_config(200, 16)?, vec![0u8; 16]);
    drop(vmm);
    // The daemon serves the next VMM.
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;
    send(&mut vmm, TX0, b"again", 64)?;
    let mut again = [0u8; 5];
    client.read_exact(&mut again)?;
    assert_eq!(&again, b"again");
    Ok(())
}

#[test]
fn print_capabilities_and_one_line_errors() -> Result<()> {
    let (code, out, _) = run_to_exit(BIN, &["--print-capabilities"])?;
    assert_eq!(code, 0);
    assert!(out.contains("\"type\": \"console\""), "{out}");

    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s.sock");
    let sock = sock.to_string_lossy();
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--socket-path", &sock, "--bogus"], "--bogus"),
        (
            vec!["--socket-path", &sock, "--unix", "/tmp/a", "--tcp", "1"],
            "exclusive",
        ),
        (vec!["--socket-path", &sock, "--tcp", "nowhere"], "nowhere"),
        (
            vec!["--socket-path", &sock, "--port", "unix=/tmp/x"],
            "name=",
        ),
        (
            vec!["--socket-path", &sock, "--unix", "/nonexistent-dir/c.sock"],
            "/nonexistent-dir/c.sock",
        ),
    ];
    for (args, expect) in cases {
        let (code, _, err) = run_to_exit(BIN, &args)?;
        assert_ne!(code, 0, "{args:?} succeeded");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    Ok(())
}

#[test]
fn hostile_chains_are_returned_once_and_never_crash() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let mut d = start(&["--unix", &ep.to_string_lossy()])?;
    let mut client = connect_unix(&ep)?;
    client.set_read_timeout(Some(T))?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, QSIZE, single_port())?;

    // Transmit: a buffer beyond guest RAM, one whose end wraps the address space, a
    // device-writable one; then good data.
    let q = &mut vmm.queues[TX0];
    q.submit(&vmm.ram, &[Buf::readable(RAM - 16, 64)])?;
    q.submit(&vmm.ram, &[Buf::readable(u64::MAX - 8, 64)])?;
    q.submit(&vmm.ram, &[Buf::writable(0x0200_0000, 64)])?;
    let used = q.wait_used(&vmm.ram, 3, T)?;
    assert_eq!(used.len(), 3, "each bad chain used exactly once");
    assert!(used.iter().all(|u| u.len == 0));
    send(&mut vmm, TX0, b"still here", 64)?;
    let mut got = [0u8; 10];
    client.read_exact(&mut got)?;
    assert_eq!(&got, b"still here");

    // Receive: a buffer outside RAM and a device-readable one take no data; the next good
    // buffer gets all of it, in order.
    client.write_all(b"input")?;
    std::thread::sleep(Duration::from_millis(50));
    let q = &mut vmm.queues[RX0];
    q.submit(&vmm.ram, &[Buf::writable(RAM + 4096, 64)])?;
    q.submit(&vmm.ram, &[Buf::readable(0x0200_0000, 64)])?;
    let used = q.wait_used(&vmm.ram, 2, T)?;
    assert!(used.iter().all(|u| u.len == 0), "{used:?}");
    let mut rx = Rx::new(RX0, 64);
    assert_eq!(rx.bytes(&mut vmm, 5)?, b"input");
    assert!(d.is_running());
    Ok(())
}

#[test]
fn a_flood_of_bad_chains_is_logged_at_a_bounded_rate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = dir.path().join("console.sock");
    let mut d = start(&["--unix", &ep.to_string_lossy()])?;
    let mut client = connect_unix(&ep)?;
    client.set_read_timeout(Some(T))?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 4, QSIZE, Negotiate::default())?;
    assert_ne!(vmm.acked_features & F_MULTIPORT, 0);
    std::thread::sleep(Duration::from_millis(100));
    let before = d.log_text().lines().count();

    // 10,000 bad chains: half on tx0 (a buffer beyond guest RAM), half on c_ovq (short control
    // messages), in batches, each used exactly once with length 0.
    const FLOOD: usize = 10_000;
    const BATCH: usize = 100;
    let short = vmm.ram.alloc(8, 8);
    vmm.ram.write(short, &[1, 2, 3])?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < FLOOD {
        for (q, buf) in [
            (TX0, Buf::readable(RAM - 16, 64)),
            (C_OVQ, Buf::readable(short, 3)),
        ] {
            let queue = &mut vmm.queues[q];
            for _ in 0..BATCH / 2 {
                let head = queue.add_chain(&vmm.ram, &[buf])?;
                queue.publish(&vmm.ram, head)?;
            }
            queue.notify()?;
        }
        for q in [TX0, C_OVQ] {
            let used = vmm.queues[q].wait_used(&vmm.ram, BATCH / 2, T)?;
            assert_eq!(used.len(), BATCH / 2, "each bad chain used exactly once");
            assert!(used.iter().all(|u| u.len == 0), "{used:?}");
        }
        sent += BATCH;
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log_text();
    let flood_lines: Vec<&str> = log.lines().skip(before).collect();
    // Each ring lets 10 messages a second through: two rings, every second begun.
    let allowed = 2 * 10 * (elapsed.as_secs() as usize + 1) + 10;
    assert!(
        flood_lines.len() <= allowed,
        "{} log lines for {FLOOD} bad chains in {elapsed:?} (at most {allowed}):\n{}",
        flood_lines.len(),
        flood_lines.join("\n")
    );
    assert!(log.contains("bad transmit chain"), "{log}");
    assert!(log.contains("short control message"), "{log}");

    // Still served: data on tx0, and the control handshake.
    send(&mut vmm, TX0, b"still served", 64)?;
    let mut got = [0u8; 12];
    client.read_exact(&mut got)?;
    assert_eq!(&got, b"still served");
    let mut cin = Rx::new(C_IVQ, 256);
    cin.post(&mut vmm, 8)?;
    send(&mut vmm, C_OVQ, &ctrl(0, DEVICE_READY, 1), 64)?;
    let add = cin.buffers(&mut vmm, 1)?;
    assert_eq!(parse_ctrl(&add[0]), (0, DEVICE_ADD, 1, vec![]));
    assert!(d.is_running());
    Ok(())
}
