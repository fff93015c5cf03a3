//! vhost-user-blk: a virtio-blk device backed by a file or block device, served over vhost-user.
//!
//! A request's path, in three files: [`backend`] (the vhost-user glue: features, config space,
//! memory, one thread per queue, event dispatch) → [`queue`] (the per-queue worker: takes chains
//! through the ring layer, starts requests, returns them to the used ring) → [`executor`]
//! (io_uring, inline with copy threads, or synchronous). Around them:
//! - [`request`]: virtio-blk request parsing and answering (no vhost types, no I/O).
//! - [`disk`]: the backing store.
//! - [`pool`]: copy threads sharing batches of reads on memory file systems.

pub mod args;
pub mod backend;
pub mod disk;
pub mod executor;
pub mod pool;
pub mod qcow2;
pub mod queue;
pub mod request;

use std::sync::Arc;

use vhost_user_common::serve;

pub use args::{Args, Config};
use backend::{BlkBackend, DeviceSettings};
use disk::{Disk, DiskError};

/// What `--print-capabilities` reports (QEMU's vhost-user.json "block" features).
pub fn capabilities() -> String {
    vhost_user_common::caps::capabilities_json("block", &["read-only", "blk-file"])
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// Opens the disk, binds the socket and serves frontends until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    let disk = Arc::new(Disk::open(&config.disk)?);
    let serial = config
        .serial
        .clone()
        .unwrap_or_else(|| disk.default_serial());
    log::info!(
        "{}: {} bytes{}{}{}, {} queue(s) of {}, serial {serial:?}, {:?} engine{}",
        disk.path().display(),
        disk.size(),
        disk.describe_format(),
        if disk.readonly() { ", read-only" } else { "" },
        if disk.direct() { ", O_DIRECT" } else { "" },
        config.num_queues,
        config.queue_size,
        config.engine,
        if config.poll.is_zero() {
            String::new()
        } else {
            format!(", polling {} µs", config.poll.as_micros())
        },
    );
    let settings = DeviceSettings {
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        serial: serial.into_bytes(),
        engine: config.engine,
        logical_block_size: config.logical_block_size,
        poll: config.poll,
    };
    let exit_disk = disk.clone();
    let on_exit = move || {
        // Whatever the guest wrote reaches stable storage before we go.
        if let Err(e) = exit_disk.flush() {
            log::error!("{}: flush at exit failed: {e}", exit_disk.path().display());
        }
    };
    let needs = vhost_user_common::Needs::new(vhost_user_common::Profile::Blk);
    serve::run("vhost-user-blk", &config.listen, needs, on_exit, || {
        Ok(BlkBackend::new(disk.clone(), settings.clone()))
    })?;
    Ok(())
}
