//! vhost-user-net: a virtio-net device backend whose host side is a Linux tap interface.
//!
//! A frame goes guest → host through [`backend`] (TX kick) → [`tx`] (header + frame segments)
//! → [`tap`] (`writev`), and host → guest through [`tap`] (`read`) → [`rx`] (header,
//! buffer merging) → [`backend`] (used ring, interrupt).

pub mod args;
pub mod backend;
pub mod rx;
pub mod stats;
pub mod tap;
pub mod tx;

pub use args::{Args, Config, ConfigError};
pub use backend::NetBackend;

/// Length of `struct virtio_net_hdr_mrg_rxbuf`: the header with VERSION_1 or MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 12;
/// Length of the legacy `struct virtio_net_hdr` (no `num_buffers`).
pub const LEGACY_VNET_HDR_LEN: usize = 10;

/// Names for `--print-capabilities`.
pub const CAPABILITIES: &[&str] = &["tap", "multiqueue", "mrg-rxbuf", "offloads"];

#[cfg(test)]
pub(crate) mod test_util {
    use vhost_user_common::chain::{ChainBuffers, ChainError};
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

    /// Builds a chain of `(addr, len, flags)` descriptors in a mock queue and parses it.
    pub fn chain_buffers(
        mem: &GuestMemory,
        descs: &[(u64, u32, u32)],
    ) -> Result<ChainBuffers, ChainError> {
        ChainBuffers::parse(descriptors(mem, descs), mem, 16)
    }
}
