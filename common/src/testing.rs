//! A guest driver for in-process tests of the device cores' queue loops: guest memory, a
//! virtqueue the test fills with chains (virtio-queue's mock driver), and the `Vring`
//! the vhost-user library would hand the device. No socket, no root. (Feature `test-utils`.)

use crate::Vring;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use vhost_user_backend::VringT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use crate::{GuestMemory, GuestMemoryAtomic};

/// Where the test driver's used ring lives: the mock's own used ring starts on the available
/// ring's `used_event` field, which EVENT_IDX needs, so ours goes elsewhere.
const USED_RING: GuestAddress = GuestAddress(0x8000);
/// Guest memory below this is the rings'; buffers go above.
pub const BUFFERS: u64 = 0x1_0000;

/// One virtqueue driven by the test, over its own guest memory.
pub struct TestQueue {
    pub mem: GuestMemoryAtomic,
    pub vring: Vring,
    driver: MockSplitQueue<'static, GuestMemory>,
    next_desc: u16,
    call: File,
}

impl TestQueue {
    /// A ready, enabled queue of `size` entries over `mem_size` bytes of guest memory.
    pub fn new(size: u16, mem_size: u64, event_idx: bool) -> TestQueue {
        // The mock driver borrows the memory for its lifetime: one small leak per test queue.
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), mem_size as usize)])
                .unwrap_or_else(|e| panic!("guest memory: {e}")),
        ));
        let driver = MockSplitQueue::new(mem, size);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vring = Vring::new(atomic.clone(), size).unwrap_or_else(|e| panic!("vring: {e}"));
        vring.set_queue_size(size);
        vring
            .set_queue_info(
                driver.desc_table_addr().0,
                driver.avail_addr().0,
                USED_RING.0,
            )
            .unwrap_or_else(|e| panic!("ring addresses: {e}"));
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let call = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        vring.set_call(Some(call.try_clone().unwrap_or_else(|e| panic!("{e}"))));
        TestQueue {
            mem: atomic,
            vring,
            driver,
            next_desc: 0,
            call,
        }
    }

    /// Guest memory as the device sees it.
    pub fn memory(&self) -> std::sync::Arc<GuestMemory> {
        self.mem.memory().into_inner()
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available; returns its
    /// head. Descriptors are used round-robin from the start of the table.
    pub fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let size = self.driver_size();
        let mut head = self.next_desc % size;
        if usize::from(head) + buffers.len() > usize::from(size) {
            head = 0;
        }
        let descs: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let index = (head + i as u16) % size;
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < buffers.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, (index + 1) % size))
            })
            .collect();
        self.driver
            .add_desc_chains(&descs, head)
            .unwrap_or_else(|e| panic!("add chain: {e:?}"));
        self.next_desc = head + buffers.len() as u16;
        head
    }

    fn driver_size(&self) -> u16 {
        self.vring.get_ref().get_queue().size()
    }

    fn avail_idx_addr(&self) -> GuestAddress {
        self.driver.avail_addr().unchecked_add(2)
    }

    /// Overwrites the available index, as a broken or hostile driver would.
    pub fn set_avail_idx(&self, idx: u16) {
        self.memory()
            .write_obj(idx, self.avail_idx_addr())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sets the driver's `used_event` (EVENT_IDX: interrupt me once entry `idx` is used).
    pub fn set_used_event(&self, idx: u16) {
        let size = self.vring.get_ref().get_queue().size();
        self.memory()
            .write_obj(
                idx,
                self.driver
                    .avail_addr()
                    .unchecked_add(4 + 2 * u64::from(size)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.memory()
            .read_obj(USED_RING.unchecked_add(2))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The `avail_event` the device last wrote (EVENT_IDX: the available index at which it
    /// wants the next kick).
    pub fn avail_event(&self) -> u16 {
        let size = self.vring.get_ref().get_queue().size();
        self.mem
            .memory()
            .read_obj(USED_RING.unchecked_add(4 + 8 * u64::from(size)))
            .unwrap_or_else(|e| panic!("avail_event: {e}"))
    }

    /// The used entry at position `index` of the used ring: (head, length).
    pub fn used(&self, index: u16) -> (u32, u32) {
        let slot = u64::from(index % self.driver_size());
        let entry: [u32; 2] = self
            .memory()
            .read_obj(USED_RING.unchecked_add(4 + 8 * slot))
            .unwrap_or_else(|e| panic!("{e}"));
        (entry[0], entry[1])
    }

    /// Whether the device interrupted the driver since the last call.
    pub fn signalled(&mut self) -> bool {
        let mut count = [0u8; 8];
        self.call.read_exact(&mut count).is_ok()
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.memory()
            .write_slice(data, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.memory()
            .read_slice(&mut out, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }
}

/// A dirty-page log as SET_LOG_BASE attaches it (one bit per 4 KiB page of guest-physical
/// address space), for tests of what a device marks without a frontend.
pub struct TestLog {
    file: File,
}

/// The log's page size (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

impl TestLog {
    /// A log covering `mem`, attached to every region of it.
    pub fn attach(mem: &GuestMemory) -> TestLog {
        use std::sync::Arc;
        use vhost_user_backend::bitmap::{BitmapReplace, MemRegionBitmap, MmapLogReg};
        use vm_memory::GuestMemoryBackend;
        let end = mem.last_addr().0 + 1;
        let bytes = end.div_ceil(LOG_PAGE).div_ceil(8).max(1);
        // SAFETY: the name is a valid C string; the result is checked before use.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(bytes).unwrap_or_else(|e| panic!("{e}"));
        let log = Arc::new(
            MmapLogReg::from_file(std::os::fd::AsFd::as_fd(&file), 0, bytes)
                .unwrap_or_else(|e| panic!("log mapping: {e}")),
        );
        for region in mem.iter() {
            let bitmap =
                <crate::DirtyBitmap as BitmapReplace>::InnerBitmap::new(region, log.clone())
                    .unwrap_or_else(|e| panic!("region bitmap: {e}"));
            // The mapping's own bitmap (`GuestMemoryRegion::bitmap` gives a borrowed slice).
            std::ops::Deref::deref(region).bitmap().replace(bitmap);
        }
        TestLog { file }
    }

    /// The guest page numbers marked dirty, in order.
    pub fn dirty_pages(&self) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata().map_or(0, |m| m.len()) as usize;
        let mut bits = vec![0u8; len];
        self.file
            .read_exact_at(&mut bits, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        crate::memory::dirty_pages_in_log(&bits)
    }
}
