//! What every vhost-user daemon in this workspace shares: the command-line conventions of QEMU's
//! vhost-user backends, logging, signal handling, the listen / accept / re-listen loop with
//! systemd socket activation and readiness, bounds-checked access to descriptor chains, the
//! ring layer (`ring`) through which every chain is taken and returned, and inflight I/O
//! tracking on its hooks (`inflight`: restart without losing a request).

pub mod caps;
pub mod chain;
pub mod cli;
pub mod device;
pub mod inflight;
pub mod logging;
pub mod memory;
pub mod ratelimit;
pub mod ring;
pub mod sandbox;
pub mod seccomp;
pub mod serve;
pub mod sigbus;
pub mod signals;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use cli::{ListenArgs, ListenConfig, ListenSource};
pub use sandbox::Needs;
pub use seccomp::Profile;
pub use serve::{bind, run, serve, BoundListener, DaemonBackend};

/// The dirty-page log of a guest memory region: empty until the frontend sends SET_LOG_BASE
/// (live migration), then every write through vm-memory marks its pages.
pub type DirtyBitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
/// Guest memory as the rust-vmm backend crates hand it to a backend, with its dirty-page log.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// The atomically swappable view of guest memory the frontend updates with SET_MEM_TABLE.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemory>;
/// A virtqueue as the backend library keeps it, over that memory.
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic>;

/// Locks `mutex`, recovering from poisoning: a panic in one worker must not take the whole
/// device down, and the device state behind these locks stays usable.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh `(consumer, notifier)` eventfd pair for `VhostUserBackend::exit_event`.
///
/// Each worker thread needs its own pair: the library registers the consumer in that thread's
/// epoll and `serve` fires the notifier when the frontend leaves, so the workers can be joined.
pub fn exit_event_pair() -> Option<(
    vmm_sys_util::event::EventConsumer,
    vmm_sys_util::event::EventNotifier,
)> {
    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            log::error!("cannot create a worker exit eventfd: {e}");
            None
        }
    }
}
