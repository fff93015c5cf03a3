//! vhost-user-net: a virtio-net device backend whose host side is a Linux tap interface.
//!
//! A frame goes guest → host through [`queue_pair`] (TX kick: take chains, check them with
//! [`tx`], `writev` to the [`tap`], give them back) and host → guest through [`queue_pair`]
//! (tap readable: read a frame, gather receive chains and copy it in with [`rx`], publish).
//! [`backend`] is the vhost-user glue: features, config space, memory, event dispatch.

pub mod announce;
pub mod args;
pub mod backend;
pub mod queue_pair;
pub mod rx;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod tx_uring;

use std::io;
use std::mem::size_of;
use std::sync::Arc;

use vhost_user_common::serve;
use virtio_bindings::virtio_net::{virtio_net_hdr, virtio_net_hdr_mrg_rxbuf};

pub use args::{Args, Config, ConfigError};
pub use backend::NetBackend;
use stats::Stats;
use tap::Tap;

/// Length of `struct virtio_net_hdr_mrg_rxbuf`: the header with VERSION_1 or MRG_RXBUF.
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_mrg_rxbuf>();
/// Length of the legacy `struct virtio_net_hdr` (no `num_buffers`).
pub const LEGACY_VNET_HDR_LEN: usize = size_of::<virtio_net_hdr>();

/// Names for `--print-capabilities`.
pub const CAPABILITIES: &[&str] = &["tap", "multiqueue", "mrg-rxbuf", "offloads"];

/// What `--print-capabilities` reports.
pub fn capabilities() -> String {
    vhost_user_common::caps::capabilities_json("net", CAPABILITIES)
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--tap {tap}: cannot open or create the tap: {source} (needs CAP_NET_ADMIN; an existing tap must be a tap with vnet_hdr, and multi_queue for --queue-pairs > 1)")]
    OpenTap { tap: String, source: io::Error },
    #[error("--tap {tap}: cannot configure the link: {source}")]
    ConfigureLink { tap: String, source: io::Error },
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// Opens the tap, binds the socket and serves frontends until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    let tap = Tap::open(&config.tap, usize::from(config.queue_pairs)).map_err(|source| {
        RunError::OpenTap {
            tap: config.tap.clone(),
            source,
        }
    })?;
    tap.configure_link(&config.link)
        .map_err(|source| RunError::ConfigureLink {
            tap: config.tap.clone(),
            source,
        })?;
    log::info!(
        "tap {} ready: {} queue pair(s){}",
        tap.name,
        config.queue_pairs,
        if tap.multi_queue { ", multi-queue" } else { "" }
    );
    let tap = Arc::new(tap);
    let stats = Arc::new(Stats::default());
    // The tap stays in the host's network namespace, and so does the daemon: its tap fds would
    // work from an empty one, but /proc/PID/net (the benchmark's counters) and operators' tools
    // look at the daemon's namespace.
    let needs = vhost_user_common::Needs {
        host_network: true,
        ..vhost_user_common::Needs::new(vhost_user_common::Profile::Net)
    };
    serve::run(
        "vhost-user-net",
        &config.listen,
        needs,
        || {},
        || Ok(NetBackend::new(config.clone(), tap.clone(), stats.clone())),
    )?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util {
    use vhost_user_common::GuestMemory;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::DescriptorChain;
    use vm_memory::GuestAddress;

    pub const MEM_SIZE: u64 = 0x10_0000;

    pub fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .unwrap_or_else(|e| panic!("test memory: {e}"))
    }

    /// Builds a chain of `(addr, len, flags)` descriptors in a mock queue and walks it.
    pub fn descriptors(mem: &GuestMemory, descs: &[(u64, u32, u32)]) -> Vec<Descriptor> {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { 1 } else { 0 };
                RawDescriptor::from(Descriptor::new(addr, len, (flags | next) as u16, 0))
            })
            .collect();
        let queue = MockSplitQueue::new(mem, 16);
        let chain: DescriptorChain<&GuestMemory> = queue
            .build_desc_chain(&raw)
            .unwrap_or_else(|e| panic!("mock chain: {e:?}"));
        chain.collect()
    }
}
