//! The console's control channel and config space from a hostile driver: the input is a
//! stream of control messages (8-byte headers with any id, event and value, plus payloads)
//! answered by the MULTIPORT handshake, then config reads at any offset and size. Replies must
//! be well-formed messages about known ports, and config reads exactly as long as asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_common::device::read_config;
use vhost_user_common::ratelimit::RateLimit;
use vhost_user_console::control::{
    ControlMsg, Handshake, PortInfo, VirtioConsoleConfig, HEADER_LEN,
};
use vm_memory::ByteValued;

fuzz_target!(|data: &[u8]| {
    let Some((&ports, rest)) = data.split_first() else {
        return;
    };
    let ports = usize::from(ports % 8) + 1;
    let infos: Vec<PortInfo> = (0..ports)
        .map(|id| PortInfo {
            name: (id > 0).then(|| format!("port{id}")),
            console: id == 0,
            host_connected: id % 2 == 0,
            size: (id == 0).then_some((80, 24)),
        })
        .collect();
    let log = RateLimit::default();
    let mut handshake = Handshake::new(ports);
    for chunk in rest.chunks(HEADER_LEN + 4) {
        let Some(msg) = ControlMsg::parse(chunk) else {
            continue;
        };
        for reply in handshake.on_driver_message(msg, &infos, &log) {
            let parsed = ControlMsg::parse(&reply);
            assert!(parsed.is_some(), "a reply too short to be a message");
            if let Some(reply) = parsed {
                assert!((reply.id as usize) < ports, "a reply about an unknown port");
            }
        }
    }
    let config = VirtioConsoleConfig::new(Some((80, 24)), ports as u32);
    for pair in rest.chunks_exact(4) {
        let offset = u32::from(u16::from_le_bytes([pair[0], pair[1]]));
        let size = u32::from(u16::from_le_bytes([pair[2], pair[3]]) % 512);
        let bytes = read_config(config.as_slice(), offset, size);
        assert!(bytes.is_empty() || bytes.len() == size as usize);
    }
});
