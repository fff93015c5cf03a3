//! vhost-user-blk: a virtio-blk device backed by a file or block device, served over vhost-user.
//!
//! A request's path, in three files: [`backend`] (the vhost-user glue: features, config space,
//! memory, one thread per queue, event dispatch) → [`queue`] (the per-queue worker: takes chains
//! through the ring layer, starts requests, returns them to the used ring) → [`executor`]
//! (io_uring, inline with copy threads, or synchronous). Around them:
//! - [`request`]: virtio-blk request parsing and answering (no vhost types, no I/O).
//! - [`store`]: the backing store: [`disk`] (a file or block device) or [`rbd`] (a Ceph RBD
//!   image, with the `rbd` feature).
//! - [`pool`]: copy threads sharing batches of reads on memory file systems.

pub mod args;
pub mod backend;
pub mod disk;
pub mod executor;
pub mod pool;
pub mod qcow2;
pub mod queue;
pub mod rbd;
pub mod request;
pub mod store;

use std::sync::{Arc, OnceLock};

use vhost_user_common::{serve, Needs, Profile};

pub use args::{Args, Config};
use backend::{BlkBackend, DeviceSettings};
use disk::{Disk, DiskError};
use store::Store;

/// What `--print-capabilities` reports (QEMU's vhost-user.json "block" features).
pub fn capabilities() -> String {
    vhost_user_common::caps::capabilities_json("block", &["read-only", "blk-file"])
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[cfg(feature = "rbd")]
    #[error(transparent)]
    Rbd(#[from] rbd::RbdError),
    #[error("--rbd: this vhost-user-blk was built without RBD support (cargo feature `rbd`)")]
    NoRbd,
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// Opens the disk, binds the socket and serves frontends until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    if let Some(options) = &config.rbd {
        #[cfg(feature = "rbd")]
        {
            // ceph.conf and the keyring are read now, while they are visible and the process
            // has one thread; the cluster is reached from inside the sandbox (librados starts
            // threads, which the sandbox must not find), and the sandbox keeps the host's
            // network for it.
            let prepared = rbd::Prepared::new(options)?;
            let mut needs = Needs::new(Profile::BlkRbd);
            needs.host_network = true;
            return serve_store(&config, needs, move || {
                Ok(Store::Rbd(Arc::new(prepared.connect()?)))
            });
        }
        #[cfg(not(feature = "rbd"))]
        {
            let _ = options;
            return Err(RunError::NoRbd);
        }
    }
    let disk = Arc::new(Disk::open(&config.disk)?);
    serve_store(&config, Needs::new(Profile::Blk), move || {
        Ok(Store::File(disk))
    })
}

/// Serves the store `open` returns; `open` runs inside the sandbox, before the first
/// connection (a file is already open by then; an RBD image connects there).
fn serve_store(
    config: &Config,
    needs: Needs,
    open: impl FnOnce() -> Result<Store, RunError>,
) -> Result<(), RunError> {
    let opened: Arc<OnceLock<(Store, DeviceSettings)>> = Arc::default();
    let setup = || {
        let store = open().map_err(|e| e.to_string())?;
        let settings = device_settings(config, &store);
        let _ = opened.set((store, settings));
        Ok(())
    };
    let exit_store = opened.clone();
    let on_exit = move || {
        // Whatever the guest wrote reaches stable storage before we go.
        if let Some((store, _)) = exit_store.get() {
            if let Err(e) = store.flush() {
                log::error!("{}: flush at exit failed: {e}", store.name());
            }
        }
    };
    serve::run_with_setup(
        "vhost-user-blk",
        &config.listen,
        needs,
        on_exit,
        setup,
        || match opened.get() {
            Some((store, settings)) => Ok(BlkBackend::with_store(store.clone(), settings.clone())),
            None => Err(std::io::Error::other("the backing store is not open")),
        },
    )?;
    Ok(())
}

/// The device's settings for `store`; logs what is served.
fn device_settings(config: &Config, store: &Store) -> DeviceSettings {
    let serial = config
        .serial
        .clone()
        .unwrap_or_else(|| store.default_serial());
    let direct = store.file().is_some_and(|disk| disk.direct());
    log::info!(
        "{}: {} bytes{}{}{}, {} queue(s) of {}, serial {serial:?}, {} engine{}",
        store.name(),
        store.size(),
        store
            .file()
            .map(|disk| disk.describe_format())
            .unwrap_or_default(),
        if store.readonly() { ", read-only" } else { "" },
        if direct { ", O_DIRECT" } else { "" },
        config.num_queues,
        config.queue_size,
        match store {
            Store::File(_) => format!("{:?}", config.engine),
            #[cfg(feature = "rbd")]
            Store::Rbd(_) => "librbd".to_string(),
        },
        if config.poll.is_zero() {
            String::new()
        } else {
            format!(", polling {} µs", config.poll.as_micros())
        },
    );
    DeviceSettings {
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        serial: serial.into_bytes(),
        engine: config.engine,
        logical_block_size: config.logical_block_size,
        poll: config.poll,
    }
}
