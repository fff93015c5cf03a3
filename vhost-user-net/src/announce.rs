//! The guest's announcement after a live migration: a RARP broadcast from its MAC address, so
//! that the switches (a Linux bridge, Open vSwitch, a physical switch) learn at once that the
//! MAC now lives behind this host's tap, instead of sending its frames to the old host until
//! the guest happens to transmit.
//!
//! QEMU asks for it with `VHOST_USER_SEND_RARP` when a migration has completed and the guest
//! did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE; the frame is the one QEMU itself broadcasts
//! for emulated NICs (`announce_self_create` in QEMU's net/announce.c): a RARP "reverse request"
//! whose sender and target hardware addresses are the guest's MAC, padded to the 60-byte
//! Ethernet minimum. No vhost types here.

/// EtherType of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// An Ethernet frame's minimum length without its FCS; the RARP is padded to it.
pub const RARP_FRAME_LEN: usize = 60;

/// RARP operation 3: "reverse request".
const RARP_REQUEST_REVERSE: u16 = 3;

/// The RARP broadcast announcing `mac`, without a virtio-net header.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender hardware address
                                     // 28..32: sender protocol address 0.0.0.0
    f[32..38].copy_from_slice(&mac); // target hardware address
                                     // 38..42: target protocol address 0.0.0.0; the rest is padding.
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_is_qemus_announcement() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        // What QEMU 7.2's announce_self_create() builds for the same MAC.
        let mut expected = vec![0xff; 6];
        expected.extend_from_slice(&mac);
        expected.extend_from_slice(&[0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3]);
        expected.extend_from_slice(&mac);
        expected.extend_from_slice(&[0; 4]);
        expected.extend_from_slice(&mac);
        expected.extend_from_slice(&[0; 4]);
        expected.resize(60, 0);
        assert_eq!(f.to_vec(), expected);
    }
}
