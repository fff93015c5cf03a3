//! The vhost-user glue: features, config space, queue layout, and the one worker thread that
//! moves bytes between the virtqueues and the ports' host endpoints.
//!
//! Every event (a kick, a ready ring, a readable or writable endpoint, a listener, the pty
//! timer) runs one [`ConsoleBackend::pump`]: it makes all the progress possible on every port
//! and stops where something would block. Endpoint descriptors are registered edge-triggered,
//! which is correct because once an endpoint signals, it is read until it would block (or until
//! the guest has no buffers — and then a kick, which runs the pump again, resumes it), and
//! written until it would block. Listeners and I/O descriptors have event data of their own, so
//! that a pump accepts only when a listener signalled and reads only an endpoint that signalled
//! since its last read hit EAGAIN: a kick costs no wasted `accept`/`read`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use vhost_user_common::chain::ChainBuffers;
use vhost_user_common::{lock, DaemonBackend, GuestMemory, GuestMemoryAtomic};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use crate::args::Config;
use crate::control::{self, ControlMsg, Handshake, PortInfo};
use crate::endpoint::HostPort;

type Vring = VringRwLock<GuestMemoryAtomic>;

/// Largest virtqueue offered.
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
        let mut names = Vec::new();
        for (i, port) in config.ports.iter().enumerate() {
            let label = match &port.name {
                Some(name) => format!("port {i} ({name})"),
                None => "console".to_string(),
            };
            ports.push(HostPort::open(
                &label,
                &port.endpoint,
                config.history,
                port.log.as_deref(),
            )?);
            names.push(port.name.clone());
        }
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
    pub fn cleanup_paths(&self) -> Vec<std::path::PathBuf> {
        self.ports
            .iter()
            .flat_map(HostPort::cleanup_paths)
            .collect()
    }

    pub fn ports(&self) -> &[HostPort] {
        &self.ports
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

/// A transmit chain being copied out, possibly over several pumps (back-pressure).
struct TxChain {
    head: u16,
    buffers: ChainBuffers,
    offset: u64,
}

/// State that lives for one frontend connection.
struct Session {
    handshake: Handshake,
    control_out: VecDeque<Vec<u8>>,
    tx: Vec<Option<TxChain>>,
}

/// The virtio-console device for one frontend connection. The serve loop shares it with the
/// worker thread as an `Arc`.
pub struct ConsoleBackend {
    host: Arc<Mutex<Host>>,
    session: Mutex<Session>,
    memory: Mutex<Option<GuestMemoryAtomic>>,
    acked: AtomicU64,
    features: u64,
    num_ports: usize,
    handlers: Mutex<Vec<Weak<VringEpollHandler<Arc<ConsoleBackend>>>>>,
}

impl ConsoleBackend {
    pub fn new(host: Arc<Mutex<Host>>) -> ConsoleBackend {
        let (num_ports, pty_console) = {
            let h = lock(&host);
            (h.ports.len(), h.ports.first().is_some_and(HostPort::is_pty))
        };
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | control::VIRTIO_CONSOLE_F_MULTIPORT
            | control::VIRTIO_CONSOLE_F_EMERG_WRITE;
        if pty_console {
            features |= control::VIRTIO_CONSOLE_F_SIZE;
        }
        ConsoleBackend {
            host,
            session: Mutex::new(Session {
                handshake: Handshake::new(num_ports),
                control_out: VecDeque::new(),
                tx: (0..num_ports).map(|_| None).collect(),
            }),
            memory: Mutex::new(None),
            acked: AtomicU64::new(0),
            features,
            num_ports,
            handlers: Mutex::new(Vec::new()),
        }
    }

    fn multiport(&self) -> bool {
        self.acked.load(Ordering::Acquire) & control::VIRTIO_CONSOLE_F_MULTIPORT != 0
    }

    /// Event data of the ports' I/O descriptors (pty masters, connected clients) and the pty
    /// timer; data values up to `num_queues` are the library's.
    fn io_data(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Event data of the listening sockets: only their events make the pump accept.
    fn listen_data(&self) -> u64 {
        self.num_queues() as u64 + 2
    }

    fn register_fds(&self, fds: &[RawFd], data: u64) {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        for handler in lock(&self.handlers).iter().filter_map(Weak::upgrade) {
            for &fd in fds {
                if let Err(e) = handler.register_listener(fd, events, data) {
                    log::error!("cannot watch descriptor {fd}: {e}");
                }
            }
        }
    }

    /// Makes all the progress possible on every port. `event` is the event data that woke us:
    /// a listener's makes the ports accept clients, an endpoint's that their input is read.
    fn pump(&self, vrings: &[Vring], event: u64) {
        let mut session = lock(&self.session);
        let mut host = lock(&self.host);
        let session = &mut *session;
        let host = &mut *host;
        let multiport = self.multiport();

        if let Some(timer) = &mut host.timer {
            // Non-blocking: clears an expiry if there was one.
            let _ = timer.wait();
        }
        // Host side: clients coming and going, the pty's window size.
        let accept = event == self.listen_data();
        for port in host.ports.iter_mut() {
            if event == self.io_data() {
                port.mark_readable();
            }
            let events = port.poll_host(accept);
            self.register_fds(&events.new_fds, self.io_data());
        }
        let winsize = host.ports.first().and_then(HostPort::window_size);
        if winsize.is_some() && winsize != host.winsize {
            host.winsize = winsize;
            if let Some((cols, rows)) = winsize {
                log::info!("console size is now {cols}x{rows}");
                if multiport && session.handshake.port_ready(0) {
                    push_control(session, control::resize(0, cols, rows));
                }
            }
        }

        let memory = lock(&self.memory).clone();
        let Some(memory) = memory else {
            host.ports.iter_mut().for_each(HostPort::flush);
            self.report_connections(session, host, multiport);
            return;
        };
        let guard = memory.memory();
        let mem: &GuestMemory = &guard;
        let mut used = vec![false; vrings.len()];
        let active = if multiport { host.ports.len() } else { 1 };

        if multiport {
            self.control_in(session, host, vrings, mem, &mut used);
        }
        for (id, port) in host.ports.iter_mut().enumerate() {
            if id >= active {
                port.flush();
                continue;
            }
            let (rx, tx) = (control::rx_queue(id), control::tx_queue(id));
            if let (Some(vring), Some(slot)) = (vrings.get(tx), session.tx.get_mut(id)) {
                pump_tx(port, slot, vring, mem, &mut used[tx]);
            }
            if let Some(vring) = vrings.get(rx) {
                pump_rx(port, vring, mem, &mut used[rx]);
            }
        }
        self.report_connections(session, host, multiport);
        if multiport {
            if let Some(vring) = vrings.get(control::C_IVQ) {
                control_out(session, vring, mem, &mut used[control::C_IVQ]);
            }
        }
        for (vring, _) in vrings.iter().zip(used).filter(|(_, u)| *u) {
            if vring.needs_notification().unwrap_or(true) {
                if let Err(e) = vring.signal_used_queue() {
                    log::warn!("cannot signal the guest: {e}");
                }
            }
        }
    }

    /// Tells the driver (PORT_OPEN) about clients that came or went on ready ports.
    fn report_connections(&self, session: &mut Session, host: &mut Host, multiport: bool) {
        for (id, port) in host.ports.iter_mut().enumerate() {
            if let Some(connected) = port.connection_change() {
                if multiport && session.handshake.port_ready(id) {
                    push_control(session, control::port_open(id as u32, connected));
                }
            }
        }
    }

    /// Reads the driver's control messages from c_ovq and answers them.
    fn control_in(
        &self,
        session: &mut Session,
        host: &Host,
        vrings: &[Vring],
        mem: &GuestMemory,
        used: &mut [bool],
    ) {
        let Some(vring) = vrings.get(control::C_OVQ) else {
            return;
        };
        let infos: Vec<PortInfo> = host
            .ports
            .iter()
            .zip(&host.names)
            .enumerate()
            .map(|(id, (port, name))| PortInfo {
                name: name.clone(),
                console: id == 0,
                host_connected: port.connected(),
                size: if id == 0 { host.winsize } else { None },
            })
            .collect();
        while let Some(chain) = pop(vring, mem) {
            let head = chain.head_index();
            match ChainBuffers::parse(chain, mem, MAX_QUEUE_SIZE) {
                Ok(buffers) => {
                    let len = buffers.readable_len().min(control::HEADER_LEN as u64) as usize;
                    let mut bytes = vec![0u8; len];
                    match buffers.read_exact_at(mem, 0, &mut bytes) {
                        Ok(()) => match ControlMsg::parse(&bytes) {
                            Some(msg) => {
                                log::debug!("control from driver: {msg:?}");
                                for reply in session.handshake.on_driver_message(msg, &infos) {
                                    push_control(session, reply);
                                }
                            }
                            None => log::warn!("short control message ({len} bytes) ignored"),
                        },
                        Err(e) => log::warn!("control message unreadable: {e}"),
                    }
                }
                Err(e) => log::warn!("bad control chain: {e}"),
            }
            add_used(vring, head, 0, &mut used[control::C_OVQ]);
        }
    }

    fn emergency_write(&self, byte: u8) {
        let mut host = lock(&self.host);
        if let Some(port) = host.ports.first_mut() {
            port.emergency_output(&[byte]);
            port.flush();
        }
    }

    fn config_space(&self) -> [u8; control::CONFIG_LEN] {
        let (cols, rows) = lock(&self.host).winsize.unwrap_or((0, 0));
        let mut config = [0u8; control::CONFIG_LEN];
        config[0..2].copy_from_slice(&cols.to_le_bytes());
        config[2..4].copy_from_slice(&rows.to_le_bytes());
        config[4..8].copy_from_slice(&(self.num_ports as u32).to_le_bytes());
        config
    }
}

fn push_control(session: &mut Session, message: Vec<u8>) {
    if session.control_out.len() >= CONTROL_BACKLOG {
        log::warn!("the driver takes no control messages; dropping one");
        return;
    }
    session.control_out.push_back(message);
}

/// The next available chain, re-enabling notifications (EVENT_IDX) when the ring is empty.
fn pop<'a>(vring: &Vring, mem: &'a GuestMemory) -> Option<DescriptorChain<&'a GuestMemory>> {
    {
        let state = vring.get_ref();
        if !state.get_queue().ready() || !state.is_enabled() {
            return None;
        }
    }
    for _ in 0..2 {
        let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
        if chain.is_some() {
            return chain;
        }
        // Tells the driver to kick for the next buffer; true if one arrived meanwhile.
        match vring.enable_notification() {
            Ok(true) => continue,
            _ => return None,
        }
    }
    None
}

fn add_used(vring: &Vring, head: u16, len: u32, used: &mut bool) {
    match vring.add_used(head, len) {
        Ok(()) => *used = true,
        Err(e) => log::warn!("cannot return descriptor {head}: {e}"),
    }
}

/// Guest → host: copies transmit chains to the port until its output is full.
fn pump_tx(
    port: &mut HostPort,
    slot: &mut Option<TxChain>,
    vring: &Vring,
    mem: &GuestMemory,
    used: &mut bool,
) {
    let mut scratch = Vec::new();
    loop {
        port.flush();
        let room = port.output_room();
        if room == 0 {
            // Back-pressure: the chain stays ours until the client reads.
            return;
        }
        let tx = match slot {
            Some(tx) => tx,
            None => {
                let Some(chain) = pop(vring, mem) else {
                    return;
                };
                let head = chain.head_index();
                match ChainBuffers::parse(chain, mem, MAX_QUEUE_SIZE) {
                    Ok(buffers) => slot.insert(TxChain {
                        head,
                        buffers,
                        offset: 0,
                    }),
                    Err(e) => {
                        log::warn!("bad transmit chain: {e}");
                        add_used(vring, head, 0, used);
                        continue;
                    }
                }
            }
        };
        let remaining = tx.buffers.readable_len().saturating_sub(tx.offset);
        let n = remaining.min(room.min(COPY_CHUNK) as u64) as usize;
        let mut failed = false;
        if n > 0 {
            scratch.resize(n, 0);
            match tx.buffers.read_exact_at(mem, tx.offset, &mut scratch) {
                Ok(()) => {
                    port.guest_output(&scratch);
                    tx.offset += n as u64;
                }
                Err(e) => {
                    log::warn!("transmit chain unreadable: {e}");
                    failed = true;
                }
            }
        }
        if failed || tx.offset >= tx.buffers.readable_len() {
            let head = tx.head;
            *slot = None;
            add_used(vring, head, 0, used);
        }
    }
}

/// Host → guest: fills receive chains with what the endpoint has.
fn pump_rx(port: &mut HostPort, vring: &Vring, mem: &GuestMemory, used: &mut bool) {
    loop {
        if port.pending_input().is_empty() {
            return;
        }
        let Some(chain) = pop(vring, mem) else {
            // No buffers: input waits (bounded), the endpoint is not read further.
            return;
        };
        let head = chain.head_index();
        let written = match ChainBuffers::parse(chain, mem, MAX_QUEUE_SIZE) {
            Ok(buffers) => {
                let data = port.pending_input();
                let n = data.len().min(buffers.writable_len() as usize);
                match buffers.write_all_at(mem, 0, &data[..n]) {
                    Ok(()) => n,
                    Err(e) => {
                        log::warn!("receive chain unwritable: {e}");
                        0
                    }
                }
            }
            Err(e) => {
                log::warn!("bad receive chain: {e}");
                0
            }
        };
        port.consume_input(written);
        add_used(vring, head, written as u32, used);
    }
}

/// Device → driver: delivers queued control messages into c_ivq buffers.
fn control_out(session: &mut Session, vring: &Vring, mem: &GuestMemory, used: &mut bool) {
    while !session.control_out.is_empty() {
        let Some(chain) = pop(vring, mem) else {
            return;
        };
        let head = chain.head_index();
        let mut written = 0;
        match ChainBuffers::parse(chain, mem, MAX_QUEUE_SIZE) {
            Ok(buffers) => {
                if let Some(message) = session.control_out.pop_front() {
                    let n = message.len().min(buffers.writable_len() as usize);
                    match buffers.write_all_at(mem, 0, &message[..n]) {
                        Ok(()) => written = n,
                        Err(e) => log::warn!("control buffer unwritable: {e}"),
                    }
                }
            }
            Err(e) => log::warn!("bad control buffer: {e}"),
        }
        add_used(vring, head, written as u32, used);
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        control::num_queues(self.num_ports)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        if features & control::VIRTIO_CONSOLE_F_MULTIPORT == 0 && self.num_ports > 1 {
            log::warn!("the driver did not accept MULTIPORT: only the console port works");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            // QEMU >= 8.2 then sends RESET_DEVICE on a virtio reset (driver unbind, reboot);
            // the library disables the rings, clears the features and calls reset_device().
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        log::info!("device reset by the frontend");
        let mut session = lock(&self.session);
        session.handshake = Handshake::new(self.num_ports);
        session.control_out.clear();
        session.tx.iter_mut().for_each(|t| *t = None);
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Exactly `size` bytes, whatever the range: a short or empty reply makes the rust-vmm
        // frontend (Cloud Hypervisor) wait for the missing bytes forever. Bytes beyond the
        // config space read as zero; the library bounds `size` (at most 4 KiB).
        let config = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        match start.checked_add(buf.len()) {
            Some(end) if end <= control::CONFIG_LEN => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "config write {offset}+{} is outside the config space",
                        buf.len()
                    ),
                ))
            }
        }
        // QEMU's generic vhost-user device (11.x) forwards a guest's config write as the whole
        // config space (offset 0, 12 bytes): take emerg_wr from wherever the write covers it.
        let emerg = control::EMERG_WR_OFFSET
            .checked_sub(start)
            .and_then(|at| buf.get(at));
        if let Some(&byte) = emerg {
            self.emergency_write(byte);
        } else {
            log::debug!("ignoring a write to read-only config at {offset}");
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        // A region past the end of its file would SIGBUS the daemon on first touch.
        vhost_user_common::memory::check_backing(&mem.memory())?;
        *lock(&self.memory) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker: a console moves little data, and one thread keeps ports simple.
        let n = self.num_queues();
        vec![if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        vhost_user_common::exit_event_pair()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        self.pump(vrings, u64::from(device_event));
        Ok(())
    }
}

impl DaemonBackend for ConsoleBackend {
    fn register_listeners(
        self: &Arc<Self>,
        handlers: &[Arc<VringEpollHandler<Arc<Self>>>],
    ) -> io::Result<()> {
        *lock(&self.handlers) = handlers.iter().map(Arc::downgrade).collect();
        let host = lock(&self.host);
        let listeners: Vec<RawFd> = host
            .ports
            .iter()
            .filter_map(HostPort::listener_fd)
            .collect();
        let io: Vec<RawFd> = host.ports.iter().flat_map(HostPort::io_fds).collect();
        self.register_fds(&listeners, self.listen_data());
        self.register_fds(&io, self.io_data());
        if let Some(timer) = &host.timer {
            for handler in handlers {
                handler.register_listener(timer.as_raw_fd(), EventSet::IN, self.io_data())?;
            }
        }
        Ok(())
    }
}
