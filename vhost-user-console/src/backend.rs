//! The vhost-user glue: features, config space, memory, queue layout, and event dispatch to
//! the port pump ([`crate::pump`]) on the one worker thread.
//!
//! Every event (a kick, a ready ring, a readable or writable endpoint, a listener, the pty
//! timer) runs one [`Session::pump`]. Endpoint descriptors are registered edge-triggered, which
//! is correct because once an endpoint signals, it is read until it would block (or until the
//! guest has no buffers — and then a kick, which runs the pump again, resumes it), and written
//! until it would block. Listeners and I/O descriptors have event ids of their own
//! ([`LISTEN_EVENT`], [`IO_EVENT`]), so that a pump accepts only when a listener signalled and
//! reads only an endpoint that signalled since its last read hit EAGAIN: a kick costs no wasted
//! `accept`/`read`.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vhost_user_common::device::{
    read_config, DeviceEvents, MIGRATION_FEATURES, MIGRATION_PROTOCOL_FEATURES,
};
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_common::{lock, DaemonBackend, GuestMemoryAtomic};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{ByteValued, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::control::{self, VirtioConsoleConfig};
use crate::pump::{Host, Session, Wake, MAX_QUEUE_SIZE};

/// The ports' I/O descriptors (pty masters, connected clients) and the pty timer.
pub const IO_EVENT: u16 = 0;
/// The listening sockets: only their events make the pump accept.
pub const LISTEN_EVENT: u16 = 1;

/// The virtio-console device for one frontend connection. The serve loop shares it with the
/// worker thread as an `Arc`.
pub struct ConsoleBackend {
    host: Arc<Mutex<Host>>,
    session: Mutex<Session>,
    memory: Mutex<Option<GuestMemoryAtomic>>,
    acked: AtomicU64,
    features: u64,
    num_ports: usize,
    events: DeviceEvents,
    handlers: Mutex<Vec<Weak<VringEpollHandler<Arc<ConsoleBackend>>>>>,
    /// Config writes come from the guest, as often as it likes.
    config_log: RateLimit,
}

impl ConsoleBackend {
    pub fn new(host: Arc<Mutex<Host>>) -> ConsoleBackend {
        let (num_ports, pty_console) = {
            let h = lock(&host);
            (h.ports().len(), h.console_is_pty())
        };
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging (with LOG_SHMFD below): a frontend that can migrate the
            // device gets every write into guest memory logged, as vm-memory marks them.
            | MIGRATION_FEATURES
            | control::VIRTIO_CONSOLE_F_MULTIPORT
            | control::VIRTIO_CONSOLE_F_EMERG_WRITE;
        if pty_console {
            features |= control::VIRTIO_CONSOLE_F_SIZE;
        }
        ConsoleBackend {
            host,
            session: Mutex::new(Session::new(num_ports)),
            memory: Mutex::new(None),
            acked: AtomicU64::new(0),
            features,
            num_ports,
            events: DeviceEvents::new(control::num_queues(num_ports)),
            handlers: Mutex::new(Vec::new()),
            config_log: RateLimit::default(),
        }
    }

    fn multiport(&self) -> bool {
        self.acked.load(Ordering::Acquire) & control::VIRTIO_CONSOLE_F_MULTIPORT != 0
    }

    fn register_fds(&self, fds: &[RawFd], event: u16) {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        for handler in lock(&self.handlers).iter().filter_map(Weak::upgrade) {
            for &fd in fds {
                if let Err(e) = handler.register_listener(fd, events, self.events.id(event)) {
                    log::error!("cannot watch descriptor {fd}: {e}");
                }
            }
        }
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = vhost_user_common::DirtyBitmap;
    type Vring = vhost_user_common::Vring;

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
            // Everything the pump writes into guest memory (receive data, control messages,
            // used entries) goes through vm-memory's accessors, which mark the dirty log once
            // SET_LOG_BASE has mapped it. QEMU's generic vhost-user device, the only one that
            // attaches a console, is not migratable anyway (README, "Live migration").
            | MIGRATION_PROTOCOL_FEATURES
    }

    fn reset_device(&self) {
        log::info!("device reset by the frontend");
        lock(&self.session).reset();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = VirtioConsoleConfig::new(lock(&self.host).winsize(), self.num_ports as u32);
        read_config(config.as_slice(), offset, size)
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
            lock(&self.host).emergency_write(byte);
        } else if self.config_log.allow() {
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        lock(&self.session).stop_queue(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let wake = match self.events.which(device_event) {
            Some(IO_EVENT) => Wake::Io,
            Some(LISTEN_EVENT) => Wake::Listen,
            _ => Wake::Queue,
        };
        let memory = lock(&self.memory).clone();
        let guard = memory.as_ref().map(GuestAddressSpace::memory);
        let mut session = lock(&self.session);
        let mut host = lock(&self.host);
        session.attach(vrings);
        session.pump(
            &mut host,
            guard.as_deref(),
            wake,
            self.multiport(),
            &mut |fds| self.register_fds(fds, IO_EVENT),
        );
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
        self.register_fds(&host.listener_fds(), LISTEN_EVENT);
        self.register_fds(&host.io_fds(), IO_EVENT);
        if let Some(timer) = host.timer_fd() {
            for handler in handlers {
                handler.register_listener(timer, EventSet::IN, self.events.id(IO_EVENT))?;
            }
        }
        Ok(())
    }
}
