//! Small answers every device gives the vhost-user library the same way: config-space reads
//! and the event ids of the device's own file descriptors.

use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VHOST_USER_CONFIG_SIZE,
};

use crate::ratelimit::RateLimit;

/// The virtio feature a device offers to be live-migratable: `VHOST_F_LOG_ALL` (bit 26). QEMU
/// refuses to migrate a VM whose backend lacks it; it acks the bit while a migration runs and
/// clears it when the migration ends or fails, and the device logs its writes to guest memory
/// only in between (see [`crate::ring::Ring::wrote`]).
pub const MIGRATION_FEATURES: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// The protocol feature that goes with [`MIGRATION_FEATURES`]: SET_LOG_BASE hands the device the
/// dirty-page log as a shared memory file descriptor.
pub const MIGRATION_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::LOG_SHMFD;

/// Reads past a device's config space are answered, and said (a frontend asks for its own
/// idea of the layout), at a bounded rate.
static PAST_THE_END: RateLimit = RateLimit::new(Duration::from_secs(1), 10);

/// `size` bytes of the config space `space` from `offset`, zero past its end.
///
/// A frontend may read any range of the config space the protocol allows (up to 4 KiB): the
/// answer is always exactly `size` bytes (the library fails the request otherwise, and a
/// frontend such as rust-vmm's then waits forever for the payload). Ranges past what the
/// protocol allows, which the library already refuses, get an empty answer.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    match offset.checked_add(size) {
        Some(end) if end <= VHOST_USER_CONFIG_SIZE => {}
        _ => {
            log::warn!("config read of {size} bytes at {offset} is beyond the protocol's limit");
            return Vec::new();
        }
    }
    if u64::from(offset) + u64::from(size) > space.len() as u64 {
        PAST_THE_END.warn(format_args!(
            "config read of {size} bytes at {offset} is outside the config space ({} bytes): \
             the rest reads as zeros",
            space.len()
        ));
    }
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize + size as usize).min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

/// Event ids for a device's own file descriptors (an io_uring's eventfd, a tap, an endpoint).
///
/// The library delivers them to `handle_event` as `device_event`; ids up to `num_queues` are
/// its own (one per ring, then the exit event), so a device's ids start after those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEvents {
    first: u16,
}

impl DeviceEvents {
    pub fn new(num_queues: usize) -> DeviceEvents {
        DeviceEvents {
            first: u16::try_from(num_queues + 1).unwrap_or(u16::MAX),
        }
    }

    /// The id of the device's event number `n` (0, 1, ...), as `register_listener` takes it.
    pub fn id(&self, n: u16) -> u64 {
        u64::from(self.first) + u64::from(n)
    }

    /// Which of the device's events `device_event` is, if it is one of them.
    pub fn which(&self, device_event: u16) -> Option<u16> {
        device_event.checked_sub(self.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_exact_and_zero_padded() {
        let space = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(read_config(&space, 0, 4), vec![1, 2, 3, 4]);
        assert_eq!(read_config(&space, 4, 4), vec![5, 6, 0, 0]);
        assert_eq!(read_config(&space, 100, 8), vec![0; 8]);
        assert_eq!(read_config(&space, 0, 0), Vec::<u8>::new());
        assert!(read_config(&space, u32::MAX, 8).is_empty());
        assert!(read_config(&space, 4095, 2).is_empty());
        assert_eq!(read_config(&space, 4094, 2), vec![0, 0]);
    }

    #[test]
    fn device_events_follow_the_library_ones() {
        let events = DeviceEvents::new(2);
        assert_eq!(events.id(0), 3);
        assert_eq!(events.id(1), 4);
        assert_eq!(events.which(3), Some(0));
        assert_eq!(events.which(4), Some(1));
        assert_eq!(events.which(2), None);
        assert_eq!(events.which(0), None);
    }
}
