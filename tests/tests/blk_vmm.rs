//! vhost-user-blk driven by our own VMM and guest driver (`vhost_user_tests::TestVmm`) for what a
//! well-behaved driver never sends: malformed chains, out-of-range sectors, writes to a
//! read-only disk, bad memory tables and ring addresses, disconnects in the middle of I/O.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_tests::*;

const DISK_SIZE: u64 = 16 << 20;
const RAM: u64 = 64 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const WAIT: Duration = Duration::from_secs(10);

fn disk(size: u64) -> Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    file.as_file().set_len(size)?;
    Ok(file)
}

fn daemon(file: &tempfile::NamedTempFile, extra: &[&str]) -> Result<Daemon> {
    let path = file.path().to_string_lossy().into_owned();
    let mut args = vec!["--file", path.as_str()];
    args.extend_from_slice(extra);
    Daemon::start("vhost-user-blk", &args)
}

/// Guest-side request builder: header, data and status buffers in guest RAM.
struct Req {
    header: u64,
    status: u64,
}

fn header(vmm: &mut TestVmm, kind: u32, sector: u64) -> Result<Req> {
    let (header, status) = vmm.blk_header(kind, sector)?;
    Ok(Req { header, status })
}

/// Submits `bufs` on queue 0 and waits for its completion.
fn round_trip(vmm: &mut TestVmm, bufs: &[Buf]) -> Result<Used> {
    let (ram, q) = vmm.queue(0);
    let head = q.submit(ram, bufs)?;
    let used = q.wait_used(ram, 1, WAIT)?;
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, head);
    Ok(used[0])
}

/// Submits `bufs` for request `r` and checks the status byte and the used length.
fn expect(
    vmm: &mut TestVmm,
    r: &Req,
    bufs: &[Buf],
    status: u8,
    used_len: u32,
    what: &str,
) -> Result<()> {
    let used = round_trip(vmm, bufs)?;
    assert_eq!((status_of(vmm, r)?, used.len), (status, used_len), "{what}");
    Ok(())
}

fn status_of(vmm: &TestVmm, req: &Req) -> Result<u8> {
    Ok(vmm.ram.read(req.status, 1)?[0])
}

/// A write of `data` at `sector` then a read back, checked.
fn write_read(vmm: &mut TestVmm, sector: u64, data: &[u8]) -> Result<()> {
    let w = header(vmm, T_OUT, sector)?;
    let buf = vmm.ram.alloc(data.len() as u64, 512);
    vmm.ram.write(buf, data)?;
    let used = round_trip(
        vmm,
        &[
            Buf::readable(w.header, 16),
            Buf::readable(buf, data.len() as u32),
            Buf::writable(w.status, 1),
        ],
    )?;
    assert_eq!((status_of(vmm, &w)?, used.len), (S_OK, 1), "write");
    let r = header(vmm, T_IN, sector)?;
    let back = vmm.ram.alloc(data.len() as u64, 512);
    let used = round_trip(
        vmm,
        &[
            Buf::readable(r.header, 16),
            Buf::writable(back, data.len() as u32),
            Buf::writable(r.status, 1),
        ],
    )?;
    assert_eq!(
        (status_of(vmm, &r)?, used.len),
        (S_OK, data.len() as u32 + 1),
        "read"
    );
    assert!(vmm.ram.read(back, data.len())? == data, "read back differs");
    Ok(())
}

fn connect(d: &Daemon, queues: usize) -> Result<TestVmm> {
    TestVmm::connect(&d.socket, RAM, queues, 256, Negotiate::default())
}

/// After a live migration (or a backend restart) a ring starts with requests the driver made
/// available, and kicked for, before: it will not kick for them again. vhost-user-backend
/// handles a newly registered ring as if kicked; this keeps us honest across its upgrades.
#[test]
fn requests_available_before_the_ring_starts_are_served_without_a_kick() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    file.as_file().write_all_at(&[0x5a; 512], 0)?;
    let d = daemon(&file, &[])?;
    let mut vmm = TestVmm::connect_unstarted(&d.socket, RAM, 1, Negotiate::default())?;
    // Configured (addresses, base, call and kick eventfds) but not yet enabled.
    vmm.start_queue_with(0, 256, false)?;
    let r = header(&mut vmm, T_IN, 0)?;
    let back = vmm.ram.alloc(512, 512);
    let (ram, q) = vmm.queue(0);
    let head = q.add_chain(
        ram,
        &[
            Buf::readable(r.header, 16),
            Buf::writable(back, 512),
            Buf::writable(r.status, 1),
        ],
    )?;
    q.publish(ram, head)?;
    vmm.frontend.set_vring_enable(0, true)?;
    let (ram, q) = vmm.queue(0);
    let used = q.wait_used(ram, 1, WAIT)?;
    assert_eq!((used[0].id, used[0].len), (head, 513));
    assert_eq!(status_of(&vmm, &r)?, S_OK);
    assert!(vmm.ram.read(back, 512)? == [0x5a; 512], "read data");
    Ok(())
}

/// A ring restarted where it stopped (QEMU stopping and continuing a VM, or a migration's
/// destination) while the driver's `used_event` lies before the restart point: the first
/// completion interrupts anyway, as Linux's vhost does. A driver waiting for an interrupt
/// that was owed before the restart would otherwise wait forever.
#[test]
fn the_first_completion_after_a_ring_restart_interrupts() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &[])?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 1, 256, Negotiate::default())?;
    assert_ne!(vmm.acked_features & VIRTIO_RING_F_EVENT_IDX, 0);
    let data = vmm.ram.alloc(512, 512);
    for sector in 0..2 {
        let status = vmm.blk_request(T_IN, sector, Buf::writable(data, 512), WAIT)?;
        assert_eq!(status, S_OK);
    }
    assert_eq!(
        vmm.restart_queue(0)?,
        2,
        "the ring stopped after two requests"
    );
    let r = header(&mut vmm, T_IN, 2)?;
    let (ram, q) = vmm.queue(0);
    // The driver asked for the interrupt of entry 1 and has not looked since.
    q.set_used_event(ram, 1)?;
    while q.was_signalled() {}
    q.submit(
        ram,
        &[
            Buf::readable(r.header, 16),
            Buf::writable(data, 512),
            Buf::writable(r.status, 1),
        ],
    )?;
    assert!(
        q.wait_signalled(WAIT),
        "no interrupt for the first completion after the restart"
    );
    assert_eq!(q.wait_used(ram, 1, WAIT)?.len(), 1);
    assert_eq!(status_of(&vmm, &r)?, S_OK);
    Ok(())
}

#[test]
fn config_space_and_features() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &["--num-queues", "3", "--queue-size", "128"])?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 3, 128, Negotiate::default())?;
    for bit in [1, 2, 6, 9, 10, 11, 12, 13, 14, 28, 29, 32] {
        assert!(
            vmm.offered_features & (1 << bit) != 0,
            "feature bit {bit} not offered"
        );
    }
    assert_eq!(
        vmm.offered_features & (1 << 5),
        0,
        "RO offered on a writable disk"
    );
    assert_eq!(vmm.frontend.get_queue_num()?, 3);
    let c = vmm.get_config(0, 60)?;
    let u32_at = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into()?),
        DISK_SIZE / 512,
        "capacity"
    );
    assert_eq!(u32_at(12), 126, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
    assert!(u32_at(36) > 0 && u32_at(40) > 0, "discard limits");
    assert!(u32_at(48) > 0 && u32_at(52) > 0, "write-zeroes limits");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    assert_eq!(c[32], 1, "write-back cache by default with FLUSH");
    // Partial reads return exactly what was asked.
    assert_eq!(vmm.get_config(34, 2)?, vec![3, 0]);
    // CONFIG_WCE: the guest switches to write-through.
    vmm.frontend
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])?;
    assert_eq!(vmm.get_config(32, 1)?, vec![0]);
    write_read(&mut vmm, 8, &[7u8; 4096])?;
    // Fields newer than what we fill read as zero (QEMU asks for its own struct's size).
    assert_eq!(vmm.get_config(200, 56)?, vec![0u8; 56]);
    drop(vmm);
    let mut vmm = TestVmm::connect(&d.socket, RAM, 3, 128, Negotiate::default())?;
    write_read(&mut vmm, 8, &[8u8; 512])?;
    Ok(())
}

#[test]
fn config_reads_past_the_config_space_are_zero_padded() -> Result<()> {
    let file = disk(1 << 20)?;
    let d = daemon(&file, &[])?;
    let mut vmm = connect(&d, 1)?;
    // As the net and console daemons answer: exactly the bytes asked for, zero past the end of
    // the config space (an empty reply would leave a rust-vmm frontend waiting forever).
    assert_eq!(vmm.get_config(250, 16)?, vec![0u8; 16]);
    assert_eq!(vmm.get_config(1024, 64)?, vec![0u8; 64]);
    let start = vmm.get_config(0, 8)?;
    assert_eq!(start, ((1u64 << 20) / 512).to_le_bytes().to_vec());
    write_read(&mut vmm, 0, &[5u8; 512])?;
    Ok(())
}

#[test]
fn serial_from_flag_and_default() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    for (flag, expect) in [
        (Some("disk-serial-01"), Some("disk-serial-01")),
        (None, None),
    ] {
        let args: Vec<&str> = flag.map(|s| vec!["--serial", s]).unwrap_or_default();
        let d = daemon(&file, &args)?;
        let mut vmm = connect(&d, 1)?;
        let r = header(&mut vmm, T_GET_ID, 0)?;
        let id = vmm.ram.alloc(20, 8);
        let used = round_trip(
            &mut vmm,
            &[
                Buf::readable(r.header, 16),
                Buf::writable(id, 20),
                Buf::writable(r.status, 1),
            ],
        )?;
        assert_eq!((status_of(&vmm, &r)?, used.len), (S_OK, 21));
        let raw = vmm.ram.read(id, 20)?;
        let serial = String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .to_string();
        match expect {
            Some(s) => assert_eq!(serial, s),
            None => assert!(
                serial.starts_with("vub") && serial.len() > 4,
                "default serial {serial:?}"
            ),
        }
    }
    Ok(())
}

#[test]
fn hostile_chains_get_errors_and_the_daemon_keeps_serving() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &[])?;
    let mut vmm = connect(&d, 1)?;
    let data = vmm.ram.alloc(4096, 512);

    // Header shorter than 16 bytes: IOERR.
    let r = header(&mut vmm, T_IN, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 8),
            Buf::writable(data, 512),
            Buf::writable(r.status, 1),
        ],
        S_IOERR,
        1,
        "short header",
    )?;

    // No status byte at all: returned unanswered.
    let r = header(&mut vmm, T_FLUSH, 0)?;
    let used = round_trip(&mut vmm, &[Buf::readable(r.header, 16)])?;
    assert_eq!(used.len, 0, "no status byte");

    // A descriptor outside guest memory: returned unanswered, nothing touched.
    let r = header(&mut vmm, T_IN, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 16),
            Buf::writable(RAM - 256, 4096),
            Buf::writable(r.status, 1),
        ],
        0xee,
        0,
        "buffer outside memory",
    )?;
    let used = round_trip(
        &mut vmm,
        &[Buf::readable(u64::MAX - 8, 16), Buf::writable(r.status, 1)],
    )?;
    assert_eq!(used.len, 0, "wrapping address");

    // Read data in a device-readable buffer: IOERR.
    let r = header(&mut vmm, T_IN, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 16),
            Buf::readable(data, 512),
            Buf::writable(r.status, 1),
        ],
        S_IOERR,
        1,
        "readable read buffer",
    )?;

    // Beyond the capacity, straddling the end, and overflowing: IOERR.
    for sector in [DISK_SIZE / 512, DISK_SIZE / 512 - 1, u64::MAX] {
        let r = header(&mut vmm, T_IN, sector)?;
        expect(
            &mut vmm,
            &r,
            &[
                Buf::readable(r.header, 16),
                Buf::writable(data, 1024),
                Buf::writable(r.status, 1),
            ],
            S_IOERR,
            1,
            "sector {sector}",
        )?;
    }

    // Length not a multiple of 512: IOERR.
    let r = header(&mut vmm, T_OUT, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 16),
            Buf::readable(data, 100),
            Buf::writable(r.status, 1),
        ],
        S_IOERR,
        1,
        "partial sector",
    )?;

    // Unknown request type: UNSUPP.
    let r = header(&mut vmm, 99, 0)?;
    expect(
        &mut vmm,
        &r,
        &[Buf::readable(r.header, 16), Buf::writable(r.status, 1)],
        S_UNSUPP,
        1,
        "unknown type",
    )?;

    // Discard with a range list of the wrong size, and with flags set: errors.
    let r = header(&mut vmm, T_DISCARD, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 16),
            Buf::readable(data, 10),
            Buf::writable(r.status, 1),
        ],
        S_IOERR,
        1,
        "discard list size",
    )?;
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    range[12..16].copy_from_slice(&1u32.to_le_bytes());
    vmm.ram.write(data, &range)?;
    let r = header(&mut vmm, T_DISCARD, 0)?;
    expect(
        &mut vmm,
        &r,
        &[
            Buf::readable(r.header, 16),
            Buf::readable(data, 16),
            Buf::writable(r.status, 1),
        ],
        S_UNSUPP,
        1,
        "discard flags",
    )?;

    // An indirect table outside memory, and an indirect table pointing outside memory.
    let r = header(&mut vmm, T_IN, 0)?;
    {
        let (ram, q) = vmm.queue(0);
        let head = q.add_chain(ram, &[Buf::readable(0, 0)])?;
        GuestQueue::write_desc(ram, q.desc, head, RAM + 4096, 48, DESC_F_INDIRECT, 0)?;
        q.publish(ram, head)?;
        q.notify()?;
        let used = q.wait_used(ram, 1, WAIT)?;
        assert_eq!(used[0].len, 0, "indirect table outside memory");
    }
    let table = vmm.ram.alloc(64, 16);
    {
        let (ram, q) = vmm.queue(0);
        let head = q.add_indirect_chain(
            ram,
            table,
            &[
                Buf::readable(r.header, 16),
                Buf::writable(RAM + 8192, 512),
                Buf::writable(r.status, 1),
            ],
        )?;
        q.publish(ram, head)?;
        q.notify()?;
        let used = q.wait_used(ram, 1, WAIT)?;
        assert_eq!(used[0].len, 0, "indirect descriptor outside memory");
    }

    // A descriptor loop: the chain walk stops, the chain comes back, nothing hangs.
    {
        let (ram, q) = vmm.queue(0);
        let head = q.add_chain(ram, &[Buf::readable(0, 0)])?;
        GuestQueue::write_desc(ram, q.desc, head, r.header, 16, DESC_F_NEXT, head)?;
        q.publish(ram, head)?;
        q.notify()?;
        let used = q.wait_used(ram, 1, WAIT)?;
        assert_eq!(used[0].len, 0, "descriptor loop");
    }

    // After all that, real I/O still works, through an indirect table too.
    write_read(&mut vmm, 100, &[0x5a; 8192])?;
    let r = header(&mut vmm, T_IN, 100)?;
    let back = vmm.ram.alloc(4096, 512);
    let table = vmm.ram.alloc(48, 16);
    let (ram, q) = vmm.queue(0);
    let head = q.add_indirect_chain(
        ram,
        table,
        &[
            Buf::readable(r.header, 16),
            Buf::writable(back, 4096),
            Buf::writable(r.status, 1),
        ],
    )?;
    q.publish(ram, head)?;
    q.notify()?;
    let used = q.wait_used(ram, 1, WAIT)?;
    assert_eq!(used[0].len, 4097);
    assert!(vmm.ram.read(back, 4096)?.iter().all(|&b| b == 0x5a));
    assert!(!d.log_text().contains("panicked"));
    Ok(())
}

/// The config space says `seg_max` = the device's largest queue size - 2, and the frontend
/// may set up a smaller ring (QEMU's default is 128): a driver then sends chains, through
/// indirect tables, longer than its ring, as Linux does for large buffered reads. They are
/// served, up to what `seg_max` allows.
#[test]
fn chains_as_long_as_seg_max_allows_are_served_on_a_smaller_ring() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &["--queue-size", "256"])?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 1, 64, Negotiate::default())?;
    let seg_max = u32::from_le_bytes(vmm.get_config(12, 4)?.try_into().unwrap_or_default());
    assert_eq!(seg_max, 254);
    for (segments, served) in [(seg_max, true), (seg_max + 1, false)] {
        let r = header(&mut vmm, T_IN, 0)?;
        let data = vmm.ram.alloc(512 * u64::from(segments), 512);
        let mut bufs = vec![Buf::readable(r.header, 16)];
        bufs.extend((0..u64::from(segments)).map(|i| Buf::writable(data + 512 * i, 512)));
        bufs.push(Buf::writable(r.status, 1));
        let table = vmm.ram.alloc(16 * bufs.len() as u64, 16);
        let (ram, q) = vmm.queue(0);
        let head = q.add_indirect_chain(ram, table, &bufs)?;
        q.publish(ram, head)?;
        q.notify()?;
        let used = q.wait_used(ram, 1, WAIT)?;
        if served {
            assert_eq!(
                (status_of(&vmm, &r)?, used[0].len),
                (S_OK, 512 * segments + 1),
                "a chain of {} descriptors on a ring of 64",
                segments + 2
            );
        } else {
            assert_eq!(used[0].len, 0, "a chain longer than seg_max allows");
        }
    }
    Ok(())
}

#[test]
fn readonly_disk_answers_writes_with_ioerr() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    file.as_file().write_all_at(&[0x11; 512], 0)?;
    let d = daemon(&file, &["--readonly"])?;
    let mut vmm = connect(&d, 1)?;
    assert!(vmm.offered_features & (1 << 5) != 0, "RO not offered");
    let data = vmm.ram.alloc(512, 512);
    vmm.ram.write(data, &[0x22; 512])?;
    let r = header(&mut vmm, T_OUT, 0)?;
    let used = round_trip(
        &mut vmm,
        &[
            Buf::readable(r.header, 16),
            Buf::readable(data, 512),
            Buf::writable(r.status, 1),
        ],
    )?;
    assert_eq!((status_of(&vmm, &r)?, used.len), (S_IOERR, 1));
    let mut on_disk = [0u8; 512];
    file.as_file().read_exact_at(&mut on_disk, 0)?;
    assert!(
        on_disk.iter().all(|&b| b == 0x11),
        "read-only disk was modified"
    );
    Ok(())
}

#[test]
fn memory_table_and_ring_addresses_outside_the_regions() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &[])?;
    {
        let vmm = TestVmm::connect_unstarted(&d.socket, RAM, 1, Negotiate::default())?;
        vmm.frontend.set_vring_num(0, 256)?;
        let outside = vmm.ram.host_addr(0)? + RAM + 0x10_0000;
        let config = VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: outside,
            used_ring_addr: outside + 0x1000,
            avail_ring_addr: outside + 0x2000,
            log_addr: None,
        };
        // Refused: the daemon logs it and drops the connection (the frontend sees an error on
        // this call or the next).
        let set = vmm.frontend.set_vring_addr(0, &config);
        let next = vmm.frontend.get_features();
        assert!(
            set.is_err() || next.is_err(),
            "ring outside memory accepted"
        );
    }
    {
        // A region whose offset lies beyond the end of its file cannot be mapped.
        let vmm = TestVmm::connect_unstarted(&d.socket, RAM, 1, Negotiate::default())?;
        let mut bad: VhostUserMemoryRegionInfo = vmm.ram.region_info()?;
        bad.mmap_offset = 1 << 40;
        bad.guest_phys_addr = 1 << 32;
        let set = vmm.frontend.set_mem_table(&[bad]);
        let next = vmm.frontend.get_features();
        assert!(set.is_err() || next.is_err(), "unmappable region accepted");
    }
    // The daemon is still there for the next VMM.
    let mut vmm = connect(&d, 1)?;
    write_read(&mut vmm, 0, &[1u8; 512])?;
    Ok(())
}

#[test]
fn disconnect_mid_io_then_reconnect_and_continue() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &[])?;
    for round in 0..3u8 {
        let mut vmm = connect(&d, 1)?;
        // Queue up many writes and leave without waiting for them.
        for i in 0..64u64 {
            let r = header(&mut vmm, T_OUT, i * 128)?;
            let buf = vmm.ram.alloc(65536, 4096);
            vmm.ram.write(buf, &vec![round; 65536])?;
            let (ram, q) = vmm.queue(0);
            let head = q.add_chain(
                ram,
                &[
                    Buf::readable(r.header, 16),
                    Buf::readable(buf, 65536),
                    Buf::writable(r.status, 1),
                ],
            )?;
            q.publish(ram, head)?;
        }
        vmm.queues[0].notify()?;
        drop(vmm);
    }
    let mut vmm = connect(&d, 1)?;
    write_read(&mut vmm, 4, &[0x77; 4096])?;
    let mut vmm2 = vmm;
    write_read(&mut vmm2, 9000, &[0x78; 512])?;
    drop(vmm2);
    let mut vmm = connect(&d, 1)?;
    write_read(&mut vmm, 12, &[0x79; 1024])?;
    Ok(())
}

#[test]
fn without_event_idx_and_with_flush() -> Result<()> {
    let file = disk(DISK_SIZE)?;
    let d = daemon(&file, &["--io-engine", "sync"])?;
    let negotiate = Negotiate {
        features: !(VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC),
        ..Negotiate::default()
    };
    let mut vmm = TestVmm::connect(&d.socket, RAM, 1, 256, negotiate)?;
    assert_eq!(vmm.acked_features & VIRTIO_RING_F_EVENT_IDX, 0);
    write_read(&mut vmm, 3, &[9u8; 2048])?;
    let r = header(&mut vmm, T_FLUSH, 0)?;
    let used = round_trip(
        &mut vmm,
        &[Buf::readable(r.header, 16), Buf::writable(r.status, 1)],
    )?;
    assert_eq!((status_of(&vmm, &r)?, used.len), (S_OK, 1));
    let mut on_disk = [0u8; 2048];
    file.as_file().read_exact_at(&mut on_disk, 3 * 512)?;
    assert!(on_disk.iter().all(|&b| b == 9));
    Ok(())
}
