//! The port pump: the device's loop, between each port's virtqueues and its host endpoint.
//!
//! One [`Session::pump`] makes all the progress possible on every port and stops where
//! something would block:
//! - guest → host, [`transmit`]: transmit chains are copied to the port's endpoint until its
//!   output is full; a chain copied in part stays ours ([`TxChain`]) until the client reads
//!   (back-pressure), so nothing is lost or reordered;
//! - host → guest, [`receive`]: what the endpoint has fills receive chains;
//! - control, [`control_in`] and [`control_out`]: the driver's messages on c_ovq are answered
//!   (MULTIPORT handshake, [`crate::control`]) on c_ivq.
//!
//! Every chain is taken and returned through a [`Ring`]; each ring's used entries are
//! published, and the driver notified, once per pump. Chains are walked into scratch
//! [`ChainBuffers`] kept per queue, so nothing is allocated per chain. What a guest can make
//! the device log (bad chains, odd control messages) is rate-limited. No vhost-user glue here:
//! the backend hands in the rings, guest memory and what woke it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;
use vhost_user_common::Vring;

use vhost_user_common::chain::ChainBuffers;
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_common::ring::Ring;
use vhost_user_common::GuestMemory;
use vmm_sys_util::timerfd::TimerFd;

use crate::args::Config;
use crate::control::{self, ControlMsg, Handshake, PortInfo};
use crate::endpoint::HostPort;

/// Largest virtqueue offered, and the most descriptors a chain may have.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most bytes copied out of one transmit chain per step.
const COPY_CHUNK: usize = 64 * 1024;
/// Most control messages waiting for c_ivq buffers.
const CONTROL_BACKLOG: usize = 1024;
/// How often pty attachment and window size are checked.
const PTY_POLL: Duration = Duration::from_millis(200);

/// The ports' host sides: created once at start-up and kept across frontend connections, so a
/// reconnecting VMM finds the same pty, sockets and history.
pub struct Host {
    ports: Vec<HostPort>,
    names: Vec<Option<String>>,
    timer: Option<TimerFd>,
    /// Console (port 0) size as (cols, rows), when it is a pty.
    winsize: Option<(u16, u16)>,
}

impl Host {
    /// Opens every port's endpoint and log file.
    pub fn open(config: &Config) -> io::Result<Host> {
        let mut ports = Vec::new();
        for (i, port) in config.ports.iter().enumerate() {
            let label = match &port.name {
                Some(name) => format!("port {i} ({name})"),
                None => "console".to_string(),
            };
            let host_port =
                HostPort::open(&label, &port.endpoint, config.history, port.log.as_deref())?;
            ports.push((host_port, port.name.clone()));
        }
        Host::new(ports)
    }

    /// The host side of opened ports (port 0, the console, first) with their names.
    pub fn new(ports: Vec<(HostPort, Option<String>)>) -> io::Result<Host> {
        let (ports, names): (Vec<HostPort>, Vec<Option<String>>) = ports.into_iter().unzip();
        let timer = if ports.iter().any(HostPort::is_pty) {
            let mut timer = TimerFd::new()?;
            timer.reset(PTY_POLL, Some(PTY_POLL))?;
            set_nonblocking(timer.as_raw_fd())?;
            Some(timer)
        } else {
            None
        };
        let winsize = ports.first().and_then(HostPort::window_size);
        Ok(Host {
            ports,
            names,
            timer,
            winsize,
        })
    }

    /// Paths to remove when the daemon exits (pty links, UNIX endpoint sockets).
    pub fn cleanup_paths(&self) -> Vec<PathBuf> {
        self.ports
            .iter()
            .flat_map(HostPort::cleanup_paths)
            .collect()
    }

    pub fn ports(&self) -> &[HostPort] {
        &self.ports
    }

    /// Whether the console (port 0) is a pseudo-terminal, which has a size (F_SIZE).
    pub fn console_is_pty(&self) -> bool {
        self.ports.first().is_some_and(HostPort::is_pty)
    }

    /// The console's size as (cols, rows), when known.
    pub fn winsize(&self) -> Option<(u16, u16)> {
        self.winsize
    }

    /// The listening sockets: their readiness means a client is waiting.
    pub fn listener_fds(&self) -> Vec<RawFd> {
        self.ports
            .iter()
            .filter_map(HostPort::listener_fd)
            .collect()
    }

    /// The descriptors data moves through (pty masters, connected clients).
    pub fn io_fds(&self) -> Vec<RawFd> {
        self.ports.iter().flat_map(HostPort::io_fds).collect()
    }

    /// The pty timer (attachment and window size are polled), when a port is a pty.
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// A character written to the config space's `emerg_wr`: console output at once.
    pub fn emergency_write(&mut self, byte: u8) {
        if let Some(port) = self.ports.first_mut() {
            port.emergency_output(&[byte]);
            port.flush();
        }
    }

    fn port_infos(&self) -> Vec<PortInfo> {
        self.ports
            .iter()
            .zip(&self.names)
            .enumerate()
            .map(|(id, (port, name))| PortInfo {
                name: name.clone(),
                console: id == 0,
                host_connected: port.connected(),
                size: if id == 0 { self.winsize } else { None },
            })
            .collect()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

/// What woke the pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A kick, a ring becoming ready: the rings are looked at, the endpoints are not read.
    Queue,
    /// A port's I/O descriptor (pty master, connected client) or the pty timer: the endpoints
    /// are read again.
    Io,
    /// A listening socket: the ports accept waiting clients.
    Listen,
}

/// The transmit chain being copied out, possibly over several pumps (back-pressure). Its
/// [`ChainBuffers`] is reused from chain to chain.
#[derive(Debug, Default)]
pub struct TxChain {
    head: Option<u16>,
    buffers: ChainBuffers,
    offset: u64,
}

impl TxChain {
    /// The head of the chain held back, and how many of its bytes are copied out.
    pub fn held(&self) -> Option<(u16, u64)> {
        self.head.map(|head| (head, self.offset))
    }

    fn drop_chain(&mut self) {
        self.head = None;
        self.offset = 0;
    }
}

/// One port's queue-side state.
#[derive(Debug, Default)]
struct PortQueues {
    tx: TxChain,
    /// Scratch for receive chains.
    rx: ChainBuffers,
    /// Guest bytes on their way to the endpoint (allocated once).
    copy: Vec<u8>,
}

/// The control queues' state for one frontend connection.
#[derive(Debug, Default)]
pub struct Control {
    handshake: Handshake,
    /// Messages waiting for c_ivq buffers.
    out: VecDeque<Vec<u8>>,
    /// Scratch for c_ovq and c_ivq chains.
    scratch_in: ChainBuffers,
    scratch_out: ChainBuffers,
    /// What the driver's messages make the device say (warnings, and debug chatter).
    log: RateLimit,
    chatter: RateLimit,
}

impl Control {
    pub fn new(num_ports: usize) -> Control {
        Control {
            handshake: Handshake::new(num_ports),
            ..Control::default()
        }
    }

    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// Queues a message for the driver; dropped (with a warning) beyond the backlog.
    pub fn push(&mut self, message: Vec<u8>) {
        if self.out.len() >= CONTROL_BACKLOG {
            self.log.warn(format_args!(
                "the driver takes no control messages; dropping one"
            ));
            return;
        }
        self.out.push_back(message);
    }

    /// Messages waiting for c_ivq buffers.
    pub fn pending(&self) -> usize {
        self.out.len()
    }
}

/// The device's state for one frontend connection: its rings, the transmit chains held back
/// and the MULTIPORT handshake.
pub struct Session {
    rings: Vec<Ring>,
    ports: Vec<PortQueues>,
    control: Control,
}

impl Session {
    pub fn new(num_ports: usize) -> Session {
        Session {
            rings: Vec::new(),
            ports: (0..num_ports).map(|_| PortQueues::default()).collect(),
            control: Control::new(num_ports),
        }
    }

    /// Takes the device's vrings (the first time: the library hands the same ones to every
    /// event).
    pub fn attach(&mut self, vrings: &[Vring]) {
        if self.rings.len() != vrings.len() {
            self.rings = vrings
                .iter()
                .enumerate()
                .map(|(i, vring)| Ring::new(vring.clone(), control::queue_name(i)))
                .collect();
        }
    }

    /// The device was reset: the handshake starts over, held chains and queued messages go.
    pub fn reset(&mut self) {
        self.control.handshake = Handshake::new(self.ports.len());
        self.control.out.clear();
        for port in &mut self.ports {
            port.tx.drop_chain();
        }
        self.rings.iter_mut().for_each(Ring::reset);
    }

    /// The frontend stopped queue `index` (GET_VRING_BASE): when it sets the queue up again,
    /// it is served again even if it was marked broken.
    pub fn stop_queue(&mut self, index: usize) {
        if let Some(ring) = self.rings.get_mut(index) {
            ring.reset();
        }
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The transmit chain port `port` holds back, if any (see [`TxChain::held`]).
    pub fn held_tx(&self, port: usize) -> Option<(u16, u64)> {
        self.ports.get(port).and_then(|p| p.tx.held())
    }

    /// Makes all the progress possible on every port: host events first (clients coming and
    /// going, the pty's size), then with guest memory (`None` before the frontend sent it) the
    /// control messages from the driver, each port's transmit and receive queue, and the
    /// control messages to the driver. `watch` is given descriptors of newly accepted clients,
    /// for the worker's epoll.
    pub fn pump(
        &mut self,
        host: &mut Host,
        mem: Option<&GuestMemory>,
        wake: Wake,
        multiport: bool,
        watch: &mut dyn FnMut(&[RawFd]),
    ) {
        if let Some(timer) = &mut host.timer {
            // Non-blocking: clears an expiry if there was one.
            let _ = timer.wait();
        }
        for port in host.ports.iter_mut() {
            if wake == Wake::Io {
                port.mark_readable();
            }
            let events = port.poll_host(wake == Wake::Listen);
            if !events.new_fds.is_empty() {
                watch(&events.new_fds);
            }
        }
        let winsize = host.ports.first().and_then(HostPort::window_size);
        if winsize.is_some() && winsize != host.winsize {
            host.winsize = winsize;
            if let Some((cols, rows)) = winsize {
                log::info!("console size is now {cols}x{rows}");
                if multiport && self.control.handshake.port_ready(0) {
                    self.control.push(control::resize(0, cols, rows));
                }
            }
        }

        let Some(mem) = mem else {
            host.ports.iter_mut().for_each(HostPort::flush);
            self.report_connections(host, multiport);
            return;
        };
        if multiport {
            if let Some(ring) = self.rings.get_mut(control::C_OVQ) {
                control_in(ring, mem, &mut self.control, || host.port_infos());
            }
        }
        let active = if multiport { host.ports.len() } else { 1 };
        for (id, (port, queues)) in host.ports.iter_mut().zip(&mut self.ports).enumerate() {
            if id >= active {
                port.flush();
                continue;
            }
            if let Some(ring) = self.rings.get_mut(control::tx_queue(id)) {
                transmit(port, &mut queues.tx, &mut queues.copy, ring, mem);
            }
            if let Some(ring) = self.rings.get_mut(control::rx_queue(id)) {
                receive(port, &mut queues.rx, ring, mem);
            }
        }
        self.report_connections(host, multiport);
        if multiport {
            if let Some(ring) = self.rings.get_mut(control::C_IVQ) {
                control_out(ring, mem, &mut self.control);
            }
        }
    }

    /// Tells the driver (PORT_OPEN) about clients that came or went on ready ports.
    fn report_connections(&mut self, host: &mut Host, multiport: bool) {
        for (id, port) in host.ports.iter_mut().enumerate() {
            if let Some(connected) = port.connection_change() {
                if multiport && self.control.handshake.port_ready(id) {
                    self.control.push(control::port_open(id as u32, connected));
                }
            }
        }
    }
}

/// Guest → host: copies transmit chains from `ring` to `port` until its output is full. A
/// chain copied in part stays in `tx` and is finished by a later call. Transmit chains are
/// returned with a used length of 0.
pub fn transmit(
    port: &mut HostPort,
    tx: &mut TxChain,
    copy: &mut Vec<u8>,
    ring: &mut Ring,
    mem: &GuestMemory,
) {
    port.flush();
    if !ring.is_usable() {
        return;
    }
    loop {
        port.flush();
        let room = port.output_room();
        if room == 0 {
            // Back-pressure: the chain stays ours until the client reads.
            break;
        }
        let head = match tx.head {
            Some(head) => head,
            None => {
                let Some(chain) = ring.pop(mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Err(e) = tx.buffers.parse_into(chain, mem, MAX_QUEUE_SIZE) {
                    ring.guest_error(format_args!("bad transmit chain: {e}"));
                    ring.push_used(head, 0);
                    continue;
                }
                tx.head = Some(head);
                tx.offset = 0;
                head
            }
        };
        let remaining = tx.buffers.readable_len().saturating_sub(tx.offset);
        let n = remaining.min(room.min(COPY_CHUNK) as u64) as usize;
        let mut failed = false;
        if n > 0 {
            if copy.len() < COPY_CHUNK {
                copy.resize(COPY_CHUNK, 0);
            }
            let bytes = &mut copy[..n];
            match tx.buffers.read_exact_at(mem, tx.offset, bytes) {
                Ok(()) => {
                    port.guest_output(bytes);
                    tx.offset += n as u64;
                }
                Err(e) => {
                    ring.guest_error(format_args!("transmit chain unreadable: {e}"));
                    failed = true;
                }
            }
        }
        if failed || tx.offset >= tx.buffers.readable_len() {
            tx.drop_chain();
            ring.push_used(head, 0);
        }
    }
    ring.complete(mem);
}

/// Host → guest: fills receive chains from `ring` with what `port`'s endpoint has. `scratch`
/// is walked into for each chain.
pub fn receive(
    port: &mut HostPort,
    scratch: &mut ChainBuffers,
    ring: &mut Ring,
    mem: &GuestMemory,
) {
    if port.pending_input().is_empty() || !ring.is_usable() {
        return;
    }
    while !port.pending_input().is_empty() {
        let Some(chain) = ring.pop(mem) else {
            // No buffers: input waits (bounded), the endpoint is not read further.
            break;
        };
        let head = chain.head_index();
        let written = match scratch.parse_into(chain, mem, MAX_QUEUE_SIZE) {
            Ok(()) => {
                let data = port.pending_input();
                let n = data.len().min(scratch.writable_len() as usize);
                match scratch.write_all_at(mem, 0, &data[..n]) {
                    Ok(()) => n,
                    Err(e) => {
                        ring.guest_error(format_args!("receive chain unwritable: {e}"));
                        0
                    }
                }
            }
            Err(e) => {
                ring.guest_error(format_args!("bad receive chain: {e}"));
                0
            }
        };
        port.consume_input(written);
        ring.push_used(head, written as u32);
    }
    ring.complete(mem);
}

/// Driver → device: reads the driver's control messages from c_ovq (`ring`) and queues the
/// answers. `ports` describes the ports, asked for at most once per call.
pub fn control_in(
    ring: &mut Ring,
    mem: &GuestMemory,
    control: &mut Control,
    ports: impl Fn() -> Vec<PortInfo>,
) {
    if !ring.is_usable() {
        return;
    }
    let mut infos: Option<Vec<PortInfo>> = None;
    while let Some(chain) = ring.pop(mem) {
        let head = chain.head_index();
        let buffers = &mut control.scratch_in;
        match buffers.parse_into(chain, mem, MAX_QUEUE_SIZE) {
            Ok(()) => {
                let len = buffers.readable_len().min(control::HEADER_LEN as u64) as usize;
                let mut header = [0u8; control::HEADER_LEN];
                match buffers.read_exact_at(mem, 0, &mut header[..len]) {
                    Ok(()) => match ControlMsg::parse(&header[..len]) {
                        Some(msg) => {
                            if control.chatter.allow() {
                                log::debug!("control from driver: {msg:?}");
                            }
                            let infos = infos.get_or_insert_with(&ports);
                            let replies =
                                control
                                    .handshake
                                    .on_driver_message(msg, infos, &control.log);
                            for reply in replies {
                                control.push(reply);
                            }
                        }
                        None => ring.guest_error(format_args!(
                            "short control message ({len} bytes) ignored"
                        )),
                    },
                    Err(e) => ring.guest_error(format_args!("control message unreadable: {e}")),
                }
            }
            Err(e) => ring.guest_error(format_args!("bad control chain: {e}")),
        }
        ring.push_used(head, 0);
    }
    ring.complete(mem);
}

/// Device → driver: delivers queued control messages into c_ivq (`ring`) buffers, one message
/// per buffer (cut to the buffer's size).
pub fn control_out(ring: &mut Ring, mem: &GuestMemory, control: &mut Control) {
    if control.out.is_empty() || !ring.is_usable() {
        return;
    }
    while !control.out.is_empty() {
        let Some(chain) = ring.pop(mem) else {
            break;
        };
        let head = chain.head_index();
        let buffers = &mut control.scratch_out;
        let mut written = 0;
        match buffers.parse_into(chain, mem, MAX_QUEUE_SIZE) {
            Ok(()) => {
                if let Some(message) = control.out.pop_front() {
                    let n = message.len().min(buffers.writable_len() as usize);
                    match buffers.write_all_at(mem, 0, &message[..n]) {
                        Ok(()) => written = n,
                        Err(e) => ring.guest_error(format_args!("control buffer unwritable: {e}")),
                    }
                }
            }
            Err(e) => ring.guest_error(format_args!("bad control buffer: {e}")),
        }
        ring.push_used(head, written as u32);
    }
    ring.complete(mem);
}

#[cfg(test)]
mod tests {
    //! The pump driven directly: `MockSplitQueue` rings in test memory play the guest driver,
    //! a UNIX-socket endpoint in a temporary directory is the port, the test is its client.

    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    use crate::control::{
        ControlMsg, CONSOLE_PORT, DEVICE_ADD, DEVICE_READY, PORT_OPEN, PORT_READY,
    };
    use crate::endpoint::EndpointSpec;

    const SIZE: u16 = 16;
    const MEM_SIZE: usize = 4 << 20;
    /// Guest buffers start here; rings live below.
    const DATA: u64 = 0x10_0000;
    const RX0: usize = 0;
    const TX0: usize = 1;
    const C_IVQ: usize = 2;
    const C_OVQ: usize = 3;

    /// The driver's side of one queue.
    struct GuestQueue {
        mock: MockSplitQueue<'static, GuestMemory>,
        /// Our own used ring: the mock's starts on the avail ring's `used_event`.
        used: GuestAddress,
        next_desc: u16,
        avail_idx: u16,
        last_used: u16,
    }

    struct Fixture {
        mem: &'static GuestMemory,
        queues: Vec<GuestQueue>,
        vrings: Vec<Vring>,
        session: Session,
        host: Host,
        client: UnixStream,
        next_data: u64,
        _dir: tempfile::TempDir,
    }

    fn ok<T, E: std::fmt::Debug>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// rx0, tx0, c_ivq, c_ovq, started; the console on a UNIX socket with a client attached.
    fn fixture() -> Fixture {
        let mem: &'static GuestMemory = Box::leak(Box::new(ok(GuestMemory::from_ranges(&[(
            GuestAddress(0),
            MEM_SIZE,
        )]))));
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut queues = Vec::new();
        let mut vrings = Vec::new();
        for q in 0..4u64 {
            let mock = MockSplitQueue::create(mem, GuestAddress(q * 0x1000), SIZE);
            let used = GuestAddress(0x8000 + q * 0x1000);
            let vring = ok(Vring::new(atomic.clone(), SIZE));
            vring.set_queue_size(SIZE);
            ok(vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, used.0));
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            queues.push(GuestQueue {
                mock,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            });
            vrings.push(vring);
        }
        let dir = ok(tempfile::tempdir());
        let path = dir.path().join("console.sock");
        let port = ok(HostPort::open(
            "console",
            &EndpointSpec::Unix {
                path: path.clone(),
                access: crate::endpoint::FileAccess::ENDPOINT_DEFAULT,
            },
            4096,
            None,
        ));
        let host = ok(Host::new(vec![(port, None)]));
        let client = ok(UnixStream::connect(&path));
        ok(client.set_read_timeout(Some(Duration::from_secs(10))));
        let mut session = Session::new(1);
        session.attach(&vrings);
        let mut f = Fixture {
            mem,
            queues,
            vrings,
            session,
            host,
            client,
            next_data: DATA,
            _dir: dir,
        };
        f.pump(Wake::Listen, true);
        assert!(f.host.ports()[0].connected(), "the client is attached");
        f
    }

    impl Fixture {
        fn pump(&mut self, wake: Wake, multiport: bool) {
            self.session
                .pump(&mut self.host, Some(self.mem), wake, multiport, &mut |_| {});
        }

        fn alloc(&mut self, len: u32) -> u64 {
            let addr = self.next_data;
            self.next_data += u64::from(len).next_multiple_of(64);
            assert!(self.next_data <= MEM_SIZE as u64, "test memory exhausted");
            addr
        }

        /// A device-readable buffer holding `data`.
        fn readable(&mut self, data: &[u8]) -> (u64, u32, bool) {
            let addr = self.alloc(data.len() as u32);
            ok(self.mem.write_slice(data, GuestAddress(addr)));
            (addr, data.len() as u32, false)
        }

        /// A device-writable buffer of `len` bytes.
        fn writable(&mut self, len: u32) -> (u64, u32, bool) {
            (self.alloc(len), len, true)
        }

        /// Makes a chain of `bufs` (addr, len, device-writable) available on queue `q`;
        /// returns its head.
        fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
            let queue = &mut self.queues[q];
            if usize::from(queue.next_desc) + bufs.len() > usize::from(SIZE) {
                queue.next_desc = 0;
            }
            let head = queue.next_desc;
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let index = head + i as u16;
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let desc = Descriptor::new(addr, len, flags, index + 1);
                ok(queue
                    .mock
                    .desc_table()
                    .store(index, RawDescriptor::from(desc)));
            }
            queue.next_desc += bufs.len() as u16;
            let avail = queue.mock.avail_addr();
            let slot = u64::from(queue.avail_idx % SIZE);
            ok(self
                .mem
                .write_obj(head, GuestAddress(avail.0 + 4 + 2 * slot)));
            queue.avail_idx = queue.avail_idx.wrapping_add(1);
            ok(self
                .mem
                .write_obj(queue.avail_idx, GuestAddress(avail.0 + 2)));
            head
        }

        /// Used entries (head, len) the device returned on queue `q` since the last call.
        fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
            let queue = &mut self.queues[q];
            let idx: u16 = ok(self.mem.read_obj(GuestAddress(queue.used.0 + 2)));
            let mut out = Vec::new();
            while queue.last_used != idx {
                let slot = u64::from(queue.last_used % SIZE);
                let entry: [u32; 2] =
                    ok(self.mem.read_obj(GuestAddress(queue.used.0 + 4 + 8 * slot)));
                out.push((entry[0] as u16, entry[1]));
                queue.last_used = queue.last_used.wrapping_add(1);
            }
            out
        }

        fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            ok(self.mem.read_slice(&mut buf, GuestAddress(addr)));
            buf
        }

        /// A call eventfd on queue `q`; reading it gives the number of interrupts.
        fn call(&self, q: usize) -> File {
            // SAFETY: eventfd has no memory arguments; the result is checked before use.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let reader = ok(file.try_clone());
            self.vrings[q].set_call(Some(file));
            reader
        }
    }

    fn interrupts(call: &mut File) -> u64 {
        let mut count = [0u8; 8];
        match call.read_exact(&mut count) {
            Ok(()) => u64::from_ne_bytes(count),
            Err(_) => 0,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn guest_bytes_reach_the_endpoint_in_order() {
        let mut f = fixture();
        let mut call = f.call(TX0);
        let a = f.readable(b"hello ");
        let b1 = f.readable(b"from ");
        let b2 = f.readable(b"the ");
        let b3 = f.readable(b"guest");
        let c = f.readable(b", in order");
        let heads = [
            f.add_chain(TX0, &[a]),
            f.add_chain(TX0, &[b1, b2, b3]),
            f.add_chain(TX0, &[c]),
        ];
        f.pump(Wake::Queue, false);
        let want = b"hello from the guest, in order";
        let mut got = vec![0u8; want.len()];
        ok(f.client.read_exact(&mut got));
        assert_eq!(&got, want);
        let used = f.take_used(TX0);
        assert_eq!(used, heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
        assert_eq!(interrupts(&mut call), 1, "one interrupt for the pump");
    }

    #[test]
    fn host_bytes_land_in_receive_chains_with_their_lengths() {
        let mut f = fixture();
        let mut call = f.call(RX0);
        ok(f.client.write_all(b"typed at the host"));
        let bufs = [f.writable(8), f.writable(3), f.writable(5), f.writable(8)];
        let heads = [
            f.add_chain(RX0, &[bufs[0]]),
            // One chain over two descriptors.
            f.add_chain(RX0, &[bufs[1], bufs[2]]),
            f.add_chain(RX0, &[bufs[3]]),
        ];
        f.pump(Wake::Io, false);
        assert_eq!(
            f.take_used(RX0),
            vec![(heads[0], 8), (heads[1], 8), (heads[2], 1)]
        );
        assert_eq!(f.read_guest(bufs[0].0, 8), b"typed at");
        assert_eq!(f.read_guest(bufs[1].0, 3), b" th");
        assert_eq!(f.read_guest(bufs[2].0, 5), b"e hos");
        assert_eq!(f.read_guest(bufs[3].0, 1), b"t");
        assert_eq!(interrupts(&mut call), 1, "one interrupt for the pump");

        // Nothing more to read: a kick takes no buffer.
        let spare = f.writable(8);
        f.add_chain(RX0, &[spare]);
        f.pump(Wake::Queue, false);
        assert!(f.take_used(RX0).is_empty());
    }

    #[test]
    fn back_pressure_keeps_a_partly_copied_chain() {
        let mut f = fixture();
        let big = pattern(1 << 20);
        let first = f.readable(&big);
        let second = f.readable(b"tail");
        let heads = [f.add_chain(TX0, &[first]), f.add_chain(TX0, &[second])];
        f.pump(Wake::Queue, false);
        // Nobody reads: the socket and the port's output buffer fill, the chain stays ours.
        let (held, copied) = f
            .session
            .held_tx(0)
            .unwrap_or_else(|| panic!("no chain held"));
        assert_eq!(held, heads[0]);
        assert!(copied > 0 && copied < big.len() as u64, "{copied}");
        assert!(f.take_used(TX0).is_empty(), "nothing returned yet");

        // The client reads everything; the pump finishes the chain, then takes the next.
        let mut reader = ok(f.client.try_clone());
        let total = big.len() + 4;
        let reading = std::thread::spawn(move || {
            let mut all = vec![0u8; total];
            reader.read_exact(&mut all).map(|()| all)
        });
        let mut used = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Pumped until the client has it all: the last bytes may wait in the port's output.
        while used.len() < 2 || !reading.is_finished() {
            assert!(Instant::now() < deadline, "chains not returned: {used:?}");
            std::thread::sleep(Duration::from_millis(1));
            f.pump(Wake::Io, false);
            used.extend(f.take_used(TX0));
        }
        assert_eq!(used, vec![(heads[0], 0), (heads[1], 0)]);
        assert!(f.session.held_tx(0).is_none());
        let all = ok(ok(reading.join().map_err(|_| "reader panicked")));
        assert!(all[..big.len()] == big[..], "stream differs");
        assert_eq!(&all[big.len()..], b"tail");
    }

    /// Control messages the device put in c_ivq since the last call, with their used lengths
    /// (the buffers were made available in order, one descriptor each: head `h` is `bufs[h]`).
    fn control_messages(f: &mut Fixture, bufs: &[(u64, u32, bool)]) -> Vec<(ControlMsg, u32)> {
        f.take_used(C_IVQ)
            .into_iter()
            .map(|(head, len)| {
                let bytes = f.read_guest(bufs[usize::from(head)].0, len as usize);
                let msg = ControlMsg::parse(&bytes).unwrap_or_else(|| panic!("short: {bytes:?}"));
                (msg, len)
            })
            .collect()
    }

    #[test]
    fn control_messages_are_answered() {
        let mut f = fixture();
        let bufs: Vec<_> = (0..8).map(|_| f.writable(64)).collect();
        for buf in &bufs {
            f.add_chain(C_IVQ, &[*buf]);
        }
        let msg = |id, event, value| ControlMsg { id, event, value };

        let ready = f.readable(&msg(0, DEVICE_READY, 1).encode(&[]));
        f.add_chain(C_OVQ, &[ready]);
        f.pump(Wake::Queue, true);
        assert_eq!(f.take_used(C_OVQ).len(), 1);
        assert_eq!(
            control_messages(&mut f, &bufs),
            vec![(msg(0, DEVICE_ADD, 1), 8)]
        );

        // A short message and an unknown port change nothing; PORT_READY for the console is
        // answered with CONSOLE_PORT and PORT_OPEN (a client is attached).
        let short = f.readable(&[1, 2, 3]);
        let unknown = f.readable(&msg(9, PORT_READY, 1).encode(&[]));
        let port_ready = f.readable(&msg(0, PORT_READY, 1).encode(&[]));
        f.add_chain(C_OVQ, &[short]);
        f.add_chain(C_OVQ, &[unknown]);
        f.add_chain(C_OVQ, &[port_ready]);
        f.pump(Wake::Queue, true);
        assert_eq!(f.take_used(C_OVQ).len(), 3);
        assert_eq!(
            control_messages(&mut f, &bufs),
            vec![(msg(0, CONSOLE_PORT, 1), 8), (msg(0, PORT_OPEN, 1), 8)]
        );
        assert!(f.session.control().handshake().port_ready(0));
        assert_eq!(f.session.control().pending(), 0);

        // The client leaves: PORT_OPEN 0.
        ok(f.client.shutdown(std::net::Shutdown::Both));
        f.pump(Wake::Io, true);
        assert_eq!(
            control_messages(&mut f, &bufs),
            vec![(msg(0, PORT_OPEN, 0), 8)]
        );
    }
}
