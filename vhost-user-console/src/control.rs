//! The virtio-console layouts (virtio 1.2, 5.3): the config space, the queue layout, the
//! control messages of c_ivq / c_ovq and the device's side of the MULTIPORT handshake. No vhost
//! types here: the pump feeds in what the driver sent on c_ovq and sends what comes back on
//! c_ivq.

use vhost_user_common::ratelimit::RateLimit;
use vm_memory::ByteValued;

/// virtio-console feature bits (virtio 1.2, 5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;

/// Control events.
pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const DEVICE_REMOVE: u16 = 2;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const RESIZE: u16 = 5;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// Size of `struct virtio_console_control` (le32 id, le16 event, le16 value).
pub const HEADER_LEN: usize = 8;

/// The config space, laid out as Linux's `struct virtio_console_config` (virtio-bindings has
/// no console bindings): little-endian fields, 12 bytes.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VirtioConsoleConfig {
    pub cols: u16,
    pub rows: u16,
    pub max_nr_ports: u32,
    pub emerg_wr: u32,
}

// SAFETY: plain integers in a packed struct: no padding, and every byte pattern is a value.
unsafe impl ByteValued for VirtioConsoleConfig {}

impl VirtioConsoleConfig {
    /// The device's config space: the console's size (zeros when unknown) and the number of
    /// ports, in the guest's byte order (little-endian).
    pub fn new(size: Option<(u16, u16)>, max_nr_ports: u32) -> VirtioConsoleConfig {
        let (cols, rows) = size.unwrap_or((0, 0));
        VirtioConsoleConfig {
            cols: cols.to_le(),
            rows: rows.to_le(),
            max_nr_ports: max_nr_ports.to_le(),
            emerg_wr: 0,
        }
    }
}

/// Size of the config space.
pub const CONFIG_LEN: usize = std::mem::size_of::<VirtioConsoleConfig>();
/// Offset of `emerg_wr` in the config space.
pub const EMERG_WR_OFFSET: usize = std::mem::offset_of!(VirtioConsoleConfig, emerg_wr);

/// Queue index of port `port`'s receive queue (device → driver) with MULTIPORT:
/// rx0, tx0, c_ivq, c_ovq, rx1, tx1, ...
pub fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

/// Queue index of port `port`'s transmit queue (driver → device).
pub fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

/// The control receive queue (device → driver) and transmit queue (driver → device).
pub const C_IVQ: usize = 2;
pub const C_OVQ: usize = 3;

/// Number of virtqueues for `ports` ports with MULTIPORT.
pub fn num_queues(ports: usize) -> usize {
    2 * ports + 2
}

/// How queue `index` is named in log lines.
pub fn queue_name(index: usize) -> String {
    match index {
        C_IVQ => "c_ivq".to_string(),
        C_OVQ => "c_ovq".to_string(),
        _ => {
            let port = if index < 2 { 0 } else { (index - 2) / 2 };
            let dir = if index.is_multiple_of(2) { "rx" } else { "tx" };
            format!("port {port} {dir}")
        }
    }
}

/// One control message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlMsg {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl ControlMsg {
    /// Parses the header at the start of `bytes`; `None` when too short.
    pub fn parse(bytes: &[u8]) -> Option<ControlMsg> {
        let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        Some(ControlMsg {
            id: u32::from_le_bytes([header[0], header[1], header[2], header[3]]),
            event: u16::from_le_bytes([header[4], header[5]]),
            value: u16::from_le_bytes([header[6], header[7]]),
        })
    }

    /// The header followed by `payload`, as it goes on the wire.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.event.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }
}

fn message(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    ControlMsg { id, event, value }.encode(payload)
}

/// A RESIZE message for a console port: the spec's `struct virtio_console_resize`, cols then
/// rows. Linux read rows first until its driver was fixed to match the spec; Debian's kernels
/// (6.1.192 in Debian 12, 7.x in trixie-backports) have the fix, checked under QEMU 11 with
/// `stty size` on hvc0 (tests/tests/e2e_qemu.rs).
pub fn resize(id: u32, cols: u16, rows: u16) -> Vec<u8> {
    let mut payload = [0u8; 4];
    payload[..2].copy_from_slice(&cols.to_le_bytes());
    payload[2..].copy_from_slice(&rows.to_le_bytes());
    message(id, RESIZE, 0, &payload)
}

/// A PORT_OPEN message: the host side of port `id` opened (true) or closed.
pub fn port_open(id: u32, open: bool) -> Vec<u8> {
    message(id, PORT_OPEN, u16::from(open), &[])
}

/// What the device knows about a port when answering the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: Option<String>,
    pub console: bool,
    pub host_connected: bool,
    /// The console's size as (cols, rows), when the device has one (F_SIZE).
    pub size: Option<(u16, u16)>,
}

/// The device's handshake state for one frontend session.
#[derive(Debug, Default, Clone)]
pub struct Handshake {
    device_ready: bool,
    port_ready: Vec<bool>,
    guest_open: Vec<bool>,
}

impl Handshake {
    pub fn new(ports: usize) -> Handshake {
        Handshake {
            device_ready: false,
            port_ready: vec![false; ports],
            guest_open: vec![false; ports],
        }
    }

    /// True once the driver said PORT_READY for `port`.
    pub fn port_ready(&self, port: usize) -> bool {
        self.port_ready.get(port).copied().unwrap_or(false)
    }

    /// True while the guest has `port` open (its last PORT_OPEN said so).
    pub fn guest_open(&self, port: usize) -> bool {
        self.guest_open.get(port).copied().unwrap_or(false)
    }

    /// Handles one message from the driver and returns the messages to send back, in order.
    /// Messages about unknown ports, failures and unknown events are ignored; what they make
    /// the device log goes through `log` (the driver sends what it likes, as often as it likes).
    pub fn on_driver_message(
        &mut self,
        msg: ControlMsg,
        ports: &[PortInfo],
        log: &RateLimit,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let port = msg.id as usize;
        match msg.event {
            DEVICE_READY => {
                if msg.value != 1 {
                    log.warn(format_args!(
                        "driver failed to set up the device (DEVICE_READY 0)"
                    ));
                    return out;
                }
                self.device_ready = true;
                for id in 0..ports.len() {
                    out.push(message(id as u32, DEVICE_ADD, 1, &[]));
                }
            }
            PORT_READY => {
                let Some(info) = ports.get(port) else {
                    log.warn(format_args!("PORT_READY for unknown port {port}"));
                    return out;
                };
                if msg.value != 1 {
                    log.warn(format_args!("driver failed to add port {port}"));
                    return out;
                }
                if let Some(ready) = self.port_ready.get_mut(port) {
                    *ready = true;
                }
                if info.console {
                    out.push(message(msg.id, CONSOLE_PORT, 1, &[]));
                    // With MULTIPORT, Linux sizes a console only from RESIZE messages.
                    if let Some((cols, rows)) = info.size {
                        out.push(resize(msg.id, cols, rows));
                    }
                }
                if let Some(name) = &info.name {
                    // The driver reads the name up to the end of the buffer.
                    out.push(message(msg.id, PORT_NAME, 1, name.as_bytes()));
                }
                out.push(port_open(msg.id, info.host_connected));
            }
            PORT_OPEN => match self.guest_open.get_mut(port) {
                Some(open) => {
                    *open = msg.value != 0;
                    if log.allow() {
                        log::info!(
                            "guest {} port {port}",
                            if *open { "opened" } else { "closed" }
                        );
                    }
                }
                None => log.warn(format_args!("PORT_OPEN for unknown port {port}")),
            },
            event => {
                if log.allow() {
                    log::debug!("ignoring control event {event} for port {port}");
                }
            }
        }
        out
    }

    /// True once DEVICE_READY arrived.
    pub fn device_ready(&self) -> bool {
        self.device_ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> Vec<PortInfo> {
        vec![
            PortInfo {
                name: None,
                console: true,
                host_connected: false,
                size: Some((80, 24)),
            },
            PortInfo {
                name: Some("org.example.agent".into()),
                console: false,
                host_connected: true,
                size: None,
            },
        ]
    }

    fn msg(id: u32, event: u16, value: u16) -> ControlMsg {
        ControlMsg { id, event, value }
    }

    #[test]
    fn header_round_trips_and_short_input_is_refused() {
        let m = msg(7, PORT_NAME, 1);
        let bytes = m.encode(b"abc");
        assert_eq!(bytes.len(), HEADER_LEN + 3);
        assert_eq!(ControlMsg::parse(&bytes), Some(m));
        assert_eq!(ControlMsg::parse(&bytes[..7]), None);
        assert_eq!(ControlMsg::parse(&[]), None);
    }

    #[test]
    fn queue_layout_skips_control_queues() {
        assert_eq!((rx_queue(0), tx_queue(0)), (0, 1));
        assert_eq!((rx_queue(1), tx_queue(1)), (4, 5));
        assert_eq!((rx_queue(2), tx_queue(2)), (6, 7));
        assert_eq!(num_queues(3), 8);
    }

    #[test]
    fn handshake_adds_names_and_opens_ports() {
        let ports = ports();
        let log = RateLimit::default();
        let mut hs = Handshake::new(2);
        let add = hs.on_driver_message(msg(0, DEVICE_READY, 1), &ports, &log);
        assert_eq!(
            add,
            vec![
                msg(0, DEVICE_ADD, 1).encode(&[]),
                msg(1, DEVICE_ADD, 1).encode(&[])
            ]
        );
        assert!(hs.device_ready());
        let console = hs.on_driver_message(msg(0, PORT_READY, 1), &ports, &log);
        assert_eq!(
            console,
            vec![
                msg(0, CONSOLE_PORT, 1).encode(&[]),
                resize(0, 80, 24),
                port_open(0, false)
            ]
        );
        let named = hs.on_driver_message(msg(1, PORT_READY, 1), &ports, &log);
        assert_eq!(
            named,
            vec![
                msg(1, PORT_NAME, 1).encode(b"org.example.agent"),
                msg(1, PORT_OPEN, 1).encode(&[])
            ]
        );
        assert!(hs.port_ready(1));
        assert!(hs
            .on_driver_message(msg(1, PORT_OPEN, 1), &ports, &log)
            .is_empty());
        assert!(hs.guest_open(1));
    }

    #[test]
    fn hostile_messages_are_ignored() {
        let ports = ports();
        let log = RateLimit::default();
        let mut hs = Handshake::new(2);
        assert!(hs
            .on_driver_message(msg(9, PORT_READY, 1), &ports, &log)
            .is_empty());
        assert!(hs
            .on_driver_message(msg(u32::MAX, PORT_OPEN, 1), &ports, &log)
            .is_empty());
        assert!(hs
            .on_driver_message(msg(0, DEVICE_READY, 0), &ports, &log)
            .is_empty());
        assert!(hs
            .on_driver_message(msg(0, 999, 1), &ports, &log)
            .is_empty());
        assert!(!hs.port_ready(9));
    }

    #[test]
    fn config_space_is_the_virtio_layout() {
        let config = VirtioConsoleConfig::new(Some((132, 43)), 2);
        assert_eq!(CONFIG_LEN, 12);
        assert_eq!(EMERG_WR_OFFSET, 8);
        assert_eq!(config.as_slice(), &[132, 0, 43, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn queues_have_names() {
        let names: Vec<String> = (0..6).map(queue_name).collect();
        assert_eq!(
            names,
            [
                "port 0 rx",
                "port 0 tx",
                "c_ivq",
                "c_ovq",
                "port 1 rx",
                "port 1 tx"
            ]
        );
    }

    #[test]
    fn resize_payload_is_cols_then_rows() {
        let bytes = resize(0, 132, 43);
        assert_eq!(ControlMsg::parse(&bytes), Some(msg(0, RESIZE, 0)));
        assert_eq!(&bytes[HEADER_LEN..], &[132, 0, 43, 0]);
    }
}
