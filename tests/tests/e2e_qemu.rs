//! End to end under QEMU: a real Linux guest (Debian's kernel, busybox, fio, iperf3) drives the
//! daemons through QEMU's vhost-user-blk-pci and vhost-user virtio-net devices.
//!
//! Needs root, `qemu-system-x86_64`, and the packages .ci/run installs (qemu-system-x86,
//! ipxe-qemu, seabios, fio, iperf3, busybox-static, cpio, iproute2); the first run downloads the
//! guest kernel with `apt-get download` and caches the guest under `<target>/e2e-guest/`. The
//! guest runs under TCG (no KVM needed), so the figures printed are low.
//!
//! Each test boots its own guest; the tests run one at a time (TCG guests are CPU-heavy). Each
//! keeps its evidence in `<target>/e2e-logs/<test>/` (serial console, QEMU output, daemon logs,
//! command lines); a failure prints their tails.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vhost_user_tests::guest::Guest;
use vhost_user_tests::netns::{require_root, Background, Netns};
use vhost_user_tests::qemu::{ensure, FioTerse, GuestOutput, Logs, Vm, VmConfig};
use vhost_user_tests::{Daemon, Result};

/// Serialises the tests of this file: two TCG guests at once would starve each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `body` with the evidence directory of test `name`; on failure, panics with the error
/// and the tails of the run's logs.
fn e2e(name: &str, body: impl FnOnce(&Logs, &Guest) -> Result<()>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let logs = match Logs::new(name) {
        Ok(logs) => logs,
        Err(e) => panic!("{name}: cannot create the log directory: {e}"),
    };
    let result = require_root(name)
        .and_then(|()| vhost_user_tests::qemu::qemu_binary().map(|_| ()))
        .and_then(|()| Guest::get())
        .and_then(|guest| body(&logs, &guest));
    eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
    if let Err(e) = result {
        panic!("{name} failed: {e}\n{}", logs.report());
    }
}

/// What `yes TAG | head -c LEN` writes.
fn yes_pattern(tag: &str, len: usize) -> Vec<u8> {
    format!("{tag}\n").bytes().cycle().take(len).collect()
}

fn random_tag() -> String {
    format!("e2e-{:016x}", rand::random::<u64>())
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// vhost-user-blk

const BLK: &str = "vhost-user-blk";
const DISK_SIZE: u64 = 256 << 20;
const BLK_SERIAL: &str = "E2E-SERIAL-0042";
/// fio's verified random writes cover [0, FIO_SIZE).
const FIO_SIZE: u64 = 32 << 20;
/// The guest writes a known pattern here with dd...
const PATTERN_OFFSET: u64 = 64 << 20;
const PATTERN_LEN: usize = 8192;
/// ...fills this range and discards it...
const DISCARD_OFFSET: u64 = 128 << 20;
const DISCARD_LEN: u64 = 16 << 20;
/// ...and reads a line the host wrote here before boot.
const SEED_OFFSET: u64 = 200 << 20;

/// A sparse disk image with `host-seeded-TAG\n` at SEED_OFFSET.
fn make_disk(dir: &std::path::Path, tag: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("disk.img");
    let file = fs::File::create(&path)?;
    file.set_len(DISK_SIZE)?;
    file.write_all_at(format!("host-seeded-{tag}\n").as_bytes(), SEED_OFFSET)?;
    Ok(path)
}

/// Guest shell lines that report the seeded line the guest reads through the daemon.
fn read_seed_script() -> String {
    format!(
        "echo \"E2E host_seed=$(dd if=/dev/vda bs=512 skip={} count=1 iflag=direct 2>/dev/null | head -n 1)\"\n",
        SEED_OFFSET / 512
    )
}

#[test]
fn blk_two_queues_fio_verify_pattern_and_discard() {
    e2e(
        "blk_two_queues_fio_verify_pattern_and_discard",
        |logs, guest| {
            let tag = random_tag();
            let dir = tempfile::tempdir()?;
            let disk = make_disk(dir.path(), &tag)?;
            let disk_arg = disk.to_string_lossy().into_owned();
            let daemon = Daemon::start(
                BLK,
                &[
                    "--file",
                    &disk_arg,
                    "--num-queues",
                    "2",
                    "--serial",
                    BLK_SERIAL,
                ],
            )?;
            let _keep = logs.keep(&daemon.log, "vhost-user-blk.log");
            logs.note_command(&format!(
                "{BLK} --socket-path {} --file {disk_arg} --num-queues 2 --serial {BLK_SERIAL}",
                daemon.socket.display()
            ));

            let pattern_block = PATTERN_OFFSET / 4096;
            let script = format!(
                r#"echo "E2E size_sectors=$(cat /sys/block/vda/size)"
echo "E2E mq=$(ls /sys/block/vda/mq | wc -l)"
echo "E2E ro=$(cat /sys/block/vda/ro)"
echo "E2E serial=$(cat /sys/block/vda/serial)"
echo "E2E discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)"
{seed}fio --name=verify --filename=/dev/vda --ioengine=io_uring --iodepth=16 --direct=1 \
    --rw=randwrite --bs=4k --size={fio_size} --verify=crc32c --do_verify=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out 2> /tmp/fio.err
echo "E2E fio_rc=$?"
echo "E2E fio=$(grep '^3;' /tmp/fio.out)"
cat /tmp/fio.err
yes {tag} | head -c {PATTERN_LEN} > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 seek={pattern_block} oflag=direct conv=fsync 2>/dev/null
echo "E2E pattern_write_rc=$?"
dd if=/dev/vda bs=4096 skip={pattern_block} count={pattern_blocks} iflag=direct 2>/dev/null | cmp - /tmp/pattern
echo "E2E pattern_readback_rc=$?"
dd if=/dev/urandom of=/dev/vda bs=1M seek={discard_mib} count={discard_len_mib} oflag=direct conv=fsync 2>/dev/null
echo "E2E discard_fill_rc=$?"
blkdiscard -o {DISCARD_OFFSET} -l {DISCARD_LEN} /dev/vda
echo "E2E discard_rc=$?"
sync
echo "E2E io_errors=$(dmesg | grep -c -i 'I/O error')"
"#,
                seed = read_seed_script(),
                fio_size = FIO_SIZE,
                pattern_blocks = PATTERN_LEN / 4096,
                discard_mib = DISCARD_OFFSET >> 20,
                discard_len_mib = DISCARD_LEN >> 20,
            );
            let config = VmConfig::new(script).blk(&daemon.socket, 2, false);
            let mut vm = Vm::start(guest, &config, logs)?;
            let out = vm.finish(BOOT_TIMEOUT, &|| false)?;
            let boot_s = vm.elapsed().as_secs_f64();
            drop(vm);

            // What the guest saw of the device.
            ensure(out.get_u64("size_sectors")? == DISK_SIZE / 512, || {
                format!(
                    "guest sees {:?} sectors, the disk has {}",
                    out.get("size_sectors"),
                    DISK_SIZE / 512
                )
            })?;
            ensure(out.get_u64("mq")? == 2, || {
                format!(
                    "guest has {} blk-mq queues, expected 2",
                    out.get("mq").unwrap_or("?")
                )
            })?;
            ensure(out.get("ro")? == "0", || {
                "the disk is read-only in the guest".into()
            })?;
            ensure(out.get("serial")? == BLK_SERIAL, || {
                format!(
                    "guest serial {:?}, expected {BLK_SERIAL:?}",
                    out.get("serial")
                )
            })?;
            ensure(out.get_u64("discard_max_bytes")? > 0, || {
                "the guest sees no discard support".into()
            })?;
            let seed = format!("host-seeded-{tag}");
            ensure(out.get("host_seed")? == seed, || {
                format!(
                    "guest read {:?} where the host wrote {seed:?}",
                    out.get("host_seed")
                )
            })?;

            // fio: verified random writes through both queues.
            let fio = FioTerse::parse(out.get("fio")?)?;
            ensure(out.get_u64("fio_rc")? == 0 && fio.error() == 0, || {
                format!(
                    "fio failed: rc {:?}, error {}",
                    out.get("fio_rc"),
                    fio.error()
                )
            })?;
            ensure(
                fio.write_kib() == FIO_SIZE / 1024 && fio.read_kib() == FIO_SIZE / 1024,
                || {
                    format!(
                        "fio wrote {} KiB and verified {} KiB, expected {} each",
                        fio.write_kib(),
                        fio.read_kib(),
                        FIO_SIZE / 1024
                    )
                },
            )?;
            eprintln!(
            "blk: fio 4k randwrite+verify (io_uring, iodepth 16): write {:.0} IOPS ({:.1} MiB/s), verify read {:.0} IOPS ({:.1} MiB/s); boot+run {boot_s:.1} s",
            fio.write_iops(),
            fio.write_bw_kib_s() / 1024.0,
            fio.read_iops(),
            fio.read_bw_kib_s() / 1024.0,
        );

            // The pattern reached the host file, byte for byte.
            ensure(
                out.get_u64("pattern_write_rc")? == 0 && out.get_u64("pattern_readback_rc")? == 0,
                || "dd of the pattern failed or read back different data in the guest".into(),
            )?;
            let expected = yes_pattern(&tag, PATTERN_LEN);
            let on_disk = read_at(&disk, PATTERN_OFFSET, PATTERN_LEN)?;
            ensure(on_disk == expected, || {
                format!(
                    "host file at {PATTERN_OFFSET:#x} holds {:?}..., the guest wrote {:?}...",
                    String::from_utf8_lossy(&on_disk[..48]),
                    String::from_utf8_lossy(&expected[..48])
                )
            })?;

            // Discard punched a hole: the 16 MiB filled and then discarded take no space.
            ensure(
                out.get_u64("discard_fill_rc")? == 0 && out.get_u64("discard_rc")? == 0,
                || "filling or discarding the range failed in the guest".into(),
            )?;
            let allocated = fs::metadata(&disk)?.blocks() * 512;
            ensure(
                (FIO_SIZE..FIO_SIZE + DISCARD_LEN / 2).contains(&allocated),
                || {
                    format!(
                    "host file has {allocated} bytes allocated: expected about {FIO_SIZE} (fio's data) \
                     and not the discarded {DISCARD_LEN} bytes on top"
                )
                },
            )?;
            eprintln!(
                "blk: after discard the image holds {} KiB",
                allocated / 1024
            );
            ensure(out.get_u64("io_errors")? == 0, || {
                "the guest kernel logged I/O errors".into()
            })?;
            Ok(())
        },
    );
}

#[test]
fn blk_readonly_export_refuses_guest_writes() {
    e2e("blk_readonly_export_refuses_guest_writes", |logs, guest| {
        let tag = random_tag();
        let dir = tempfile::tempdir()?;
        let disk = make_disk(dir.path(), &tag)?;
        let first_block = yes_pattern(&tag, 4096);
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)?
            .write_all_at(&first_block, 0)?;
        let disk_arg = disk.to_string_lossy().into_owned();
        let daemon = Daemon::start(BLK, &["--file", &disk_arg, "--readonly"])?;
        let _keep = logs.keep(&daemon.log, "vhost-user-blk.log");

        let script = format!(
            r#"echo "E2E ro=$(cat /sys/block/vda/ro)"
{seed}dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2> /tmp/dd.err
echo "E2E write_rc=$?"
echo "E2E write_error=$(grep -m 1 '^dd:' /tmp/dd.err)"
"#,
            seed = read_seed_script()
        );
        let config = VmConfig::new(script).blk(&daemon.socket, 1, false);
        let mut vm = Vm::start(guest, &config, logs)?;
        let out = vm.finish(BOOT_TIMEOUT, &|| false)?;
        drop(vm);

        ensure(out.get("ro")? == "1", || {
            format!(
                "/sys/block/vda/ro is {:?} on a --readonly export",
                out.get("ro")
            )
        })?;
        let seed = format!("host-seeded-{tag}");
        ensure(out.get("host_seed")? == seed, || {
            format!(
                "guest read {:?} where the host wrote {seed:?}",
                out.get("host_seed")
            )
        })?;
        ensure(out.get_u64("write_rc")? != 0, || {
            "a write to the read-only disk succeeded in the guest".into()
        })?;
        eprintln!(
            "blk readonly: the guest's write failed: {}",
            out.get("write_error")?
        );
        ensure(read_at(&disk, 0, 4096)? == first_block, || {
            "the host file changed under a read-only export".into()
        })?;
        Ok(())
    });
}

/// The daemon is SIGKILLed while the guest runs a verified fio job, and restarted on the same
/// socket a second later; QEMU (`reconnect=1`) reconnects by itself.
///
/// What happens to the requests in flight (QEMU 7.2, no INFLIGHT_SHMFD, which we do not
/// offer): QEMU cannot GET_VRING_BASE from a dead backend ("vhost VQ 0 ring restore failed"
/// in its log), so it rewinds each queue's last_avail_idx to the guest-visible used index and
/// hands that to the new daemon with SET_VRING_BASE. Every request the guest made available but
/// was not completed is taken from the ring again and executed by the new daemon. The guest sees
/// no error, only one request that takes as long as the outage (1-2 s): fio's verify passes and
/// the kernel logs no I/O error.
///
/// The rewind is exact only when requests complete in ring order. The daemon completes io_uring
/// requests in the order they finish: a request completed out of order before the kill is
/// taken again (its descriptors may already carry a new request) and an older one still
/// pending is skipped, so the guest waits for it forever (virtio-blk has no timeout). Measured
/// here with fio on io_uring at iodepth 32 (the same kill and restart, 23 runs): 22 passed
/// verification like above, 1 hung until QEMU was killed (cause not captured; it fits the
/// hazard above). With one request in flight (psync, one job, as here) the order cannot be
/// broken, so that is what this test asserts; deeper queues need INFLIGHT_SHMFD (not
/// implemented) to survive a backend crash reliably.
#[test]
fn blk_daemon_killed_mid_io_and_restarted_guest_io_completes() {
    e2e(
        "blk_daemon_killed_mid_io_and_restarted_guest_io_completes",
        |logs, guest| {
            let tag = random_tag();
            let dir = tempfile::tempdir()?;
            let disk = make_disk(dir.path(), &tag)?;
            let disk_arg = disk.to_string_lossy().into_owned();
            let socket = dir.path().join("blk.sock");
            let args = ["--file", disk_arg.as_str(), "--num-queues", "2"];
            let mut first = Daemon::start_at(BLK, &args, socket.clone(), tempfile::tempdir()?)?;
            let _keep_first = logs.keep(&first.log, "vhost-user-blk.first.log");

            let fio_size: u64 = 48 << 20;
            let after_offset: u64 = 96 << 20;
            let script = format!(
                r#"fio --name=restart --filename=/dev/vda --ioengine=psync --direct=1 --rw=randwrite \
    --bs=4k --size={fio_size} --verify=crc32c --do_verify=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out 2> /tmp/fio.err &
FIO=$!
n=0
while [ "$(awk '{{print $5}}' /sys/block/vda/stat)" -lt 2000 ] && kill -0 $FIO 2>/dev/null && [ $n -lt 600 ]; do
    sleep 0.1; n=$((n + 1))
done
echo "E2E io_running=$(awk '{{print $5}}' /sys/block/vda/stat)"
wait $FIO
echo "E2E fio_rc=$?"
echo "E2E fio=$(grep '^3;' /tmp/fio.out)"
cat /tmp/fio.err
yes {tag} | head -c {PATTERN_LEN} > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 seek={after_block} oflag=direct conv=fsync 2>/dev/null
echo "E2E after_write_rc=$?"
dd if=/dev/vda bs=4096 skip={after_block} count={blocks} iflag=direct 2>/dev/null | cmp - /tmp/pattern
echo "E2E after_readback_rc=$?"
echo "E2E io_errors=$(dmesg | grep -c -i 'I/O error')"
"#,
                after_block = after_offset / 4096,
                blocks = PATTERN_LEN / 4096,
            );
            let config = VmConfig::new(script).blk(&socket, 2, true);
            let mut vm = Vm::start(guest, &config, logs)?;
            vm.wait_for("io_running", BOOT_TIMEOUT)?;
            std::thread::sleep(Duration::from_millis(500));
            ensure(first.log_text().contains("frontend connected"), || {
                "QEMU never connected to the first daemon".into()
            })?;
            first.child.kill()?; // SIGKILL, this PID only
            first.child.wait()?;
            let killed_at = Instant::now();
            eprintln!(
                "restart: daemon killed {:.1} s after QEMU started",
                vm.elapsed().as_secs_f64()
            );
            std::thread::sleep(Duration::from_secs(1));
            let second = Daemon::start_at(BLK, &args, socket.clone(), tempfile::tempdir()?)?;
            let _keep_second = logs.keep(&second.log, "vhost-user-blk.second.log");
            let out = vm.finish(BOOT_TIMEOUT, &|| false)?;
            drop(vm);
            eprintln!(
                "restart: guest finished {:.1} s after the kill",
                killed_at.elapsed().as_secs_f64()
            );

            ensure(second.log_text().contains("frontend connected"), || {
                "QEMU never reconnected to the restarted daemon".into()
            })?;
            let fio = FioTerse::parse(out.get("fio")?)?;
            ensure(out.get_u64("fio_rc")? == 0 && fio.error() == 0, || {
                format!(
                    "fio failed across the restart: rc {:?}, error {}",
                    out.get("fio_rc"),
                    fio.error()
                )
            })?;
            ensure(
                fio.write_kib() == fio_size / 1024 && fio.read_kib() == fio_size / 1024,
                || {
                    format!(
                        "fio wrote {} KiB and verified {} KiB, expected {} each",
                        fio.write_kib(),
                        fio.read_kib(),
                        fio_size / 1024
                    )
                },
            )?;
            // One request waited out the outage: the job really spanned the restart.
            let stall_ms = fio.write_clat_max_us().max(fio.read_clat_max_us()) / 1000.0;
            eprintln!(
                "restart: fio psync 4k randwrite+verify: {:.0} write IOPS, longest request {stall_ms:.0} ms (the outage)",
                fio.write_iops()
            );
            ensure(stall_ms >= 800.0, || {
                format!(
                    "no fio request took longer than {stall_ms:.0} ms: the kill did not land during the job"
                )
            })?;
            ensure(
                out.get_u64("after_write_rc")? == 0 && out.get_u64("after_readback_rc")? == 0,
                || "I/O after the reconnect failed or read back different data".into(),
            )?;
            let expected = yes_pattern(&tag, PATTERN_LEN);
            ensure(
                read_at(&disk, after_offset, PATTERN_LEN)? == expected,
                || "the pattern written after the reconnect is not in the host file".into(),
            )?;
            ensure(out.get_u64("io_errors")? == 0, || {
                "the guest kernel logged I/O errors across the restart".into()
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// vhost-user-net

const NET: &str = "vhost-user-net";
const GUEST_MAC: &str = "52:54:00:e2:e0:01";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const IPERF_PORT: u16 = 5201;

/// The guest script: ping, then `pairs` iperf3 clients at once, client `i` pinned to vCPU `i`
/// (the driver maps vCPU i to TX queue i, and the tap steers each flow's replies to the queue it
/// came from), both directions; per-queue counters from `ethtool -S` around each phase.
fn net_script(pairs: u16) -> String {
    let mut s = format!(
        r#"ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo "E2E rx_queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
ping -c 3 -W 3 {HOST_IP} > /tmp/ping.out 2>&1
echo "E2E ping_rc=$?"
cat /tmp/ping.out
stats() {{
    ethtool -S eth0 | awk -v p="$1" '/queue_[0-9]+_(packets|bytes):/ {{ k = $1; sub(":", "", k); print "E2E " p k "=" $2 }}'
}}
stats start_
"#
    );
    for (dir, flag) in [("tx", ""), ("rx", " -R")] {
        for i in 0..pairs {
            s += &format!(
                "taskset {mask} timeout 60 iperf3 -c {HOST_IP} -p {port} -t 3 -f m{flag} > /tmp/{dir}{i}.out 2>&1 &\nP{i}=$!\n",
                mask = 1u32 << i,
                port = IPERF_PORT + i,
            );
        }
        for i in 0..pairs {
            s += &format!(
                "wait $P{i}\necho \"E2E iperf_{dir}{i}_rc=$?\"\n\
                 echo \"E2E iperf_{dir}{i}_mbps=$(awk '/receiver/ {{ v = $(NF-2) }} END {{ print v }}' /tmp/{dir}{i}.out)\"\n\
                 tail -n 4 /tmp/{dir}{i}.out\n"
            );
        }
        s += &format!("stats after_{dir}_\n");
    }
    s
}

/// The packets counter of `queue` (e.g. `tx_queue_1`) between two `stats` snapshots.
fn queue_delta(out: &GuestOutput, from: &str, to: &str, queue: &str) -> Result<u64> {
    let a = out.get_u64(&format!("{from}{queue}_packets"))?;
    let b = out.get_u64(&format!("{to}{queue}_packets"))?;
    Ok(b.saturating_sub(a))
}

/// Waits for the daemon's end-of-session line and returns its (tx, rx) frame counts.
fn session_totals(daemon: &Daemon) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log_text();
        if let Some(line) = log.lines().rev().find(|l| l.contains("session totals:")) {
            let number_before = |word: &str| -> Option<u64> {
                let at = line.find(word)?;
                line[at + word.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            };
            if let (Some(tx), Some(rx)) = (number_before("totals: tx "), number_before(", rx ")) {
                return Ok((tx, rx));
            }
        }
        if Instant::now() > deadline {
            return Err("the daemon logged no session totals after QEMU left".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn net_end_to_end(logs: &Logs, guest: &Guest, pairs: u16) -> Result<()> {
    let ns = Netns::new("vue2e")?;
    let pairs_arg = pairs.to_string();
    let host_cidr = format!("{HOST_IP}/24");
    let daemon_args = [
        "--tap",
        "vue2e0",
        "--queue-pairs",
        pairs_arg.as_str(),
        "--mac",
        GUEST_MAC,
        "--host-ip",
        host_cidr.as_str(),
    ];
    let daemon = Daemon::start_with_prefix(&ns.prefix(), NET, &daemon_args)?;
    let _keep = logs.keep(&daemon.log, "vhost-user-net.log");
    logs.note_command(&format!(
        "ip netns exec {} {NET} --socket-path {} {}",
        ns.name,
        daemon.socket.display(),
        daemon_args.join(" ")
    ));
    let mut servers: Vec<Background> = Vec::new();
    for i in 0..pairs {
        let port = (IPERF_PORT + i).to_string();
        servers.push(ns.spawn(
            &["iperf3", "-s", "-p", &port],
            &logs.path(&format!("iperf3-server-{i}.log")),
        )?);
        ns.wait_for_listener(IPERF_PORT + i, Duration::from_secs(10))?;
    }

    let config = VmConfig::new(net_script(pairs)).net(&daemon.socket, pairs, GUEST_MAC);
    let mut vm = Vm::start(guest, &config, logs)?;
    let out = vm.finish(BOOT_TIMEOUT, &|| false)?;
    drop(vm);

    ensure(out.get_u64("rx_queues")? == u64::from(pairs), || {
        format!(
            "the guest uses {:?} queue pairs, expected {pairs}",
            out.get("rx_queues")
        )
    })?;
    ensure(out.get_u64("ping_rc")? == 0, || {
        format!("the guest cannot ping {HOST_IP} through the daemon")
    })?;
    let mut totals = [0.0f64; 2];
    for (d, dir) in ["tx", "rx"].iter().enumerate() {
        for i in 0..pairs {
            let rc = out.get_u64(&format!("iperf_{dir}{i}_rc"))?;
            let mbps = out.get_f64(&format!("iperf_{dir}{i}_mbps")).unwrap_or(0.0);
            ensure(rc == 0 && mbps > 0.0, || {
                format!("iperf3 client {i} ({dir}) failed: rc {rc}, {mbps} Mbit/s")
            })?;
            totals[d] += mbps;
        }
    }
    eprintln!(
        "net ({pairs} pair(s), {pairs} iperf3 stream(s) each way, TCG guest): guest->host {:.0} Mbit/s, host->guest {:.0} Mbit/s",
        totals[0], totals[1]
    );
    // Every queue pair moved traffic both ways (the guest's per-queue counters).
    for i in 0..pairs {
        let tx = queue_delta(&out, "start_", "after_tx_", &format!("tx_queue_{i}"))?;
        let rx = queue_delta(&out, "after_tx_", "after_rx_", &format!("rx_queue_{i}"))?;
        eprintln!("net: queue pair {i}: {tx} packets sent by the guest, {rx} received");
        ensure(tx > 100 && rx > 100, || {
            format!("queue pair {i} carried too little: {tx} TX packets, {rx} RX packets")
        })?;
    }
    drop(servers);
    let (tx_frames, rx_frames) = session_totals(&daemon)?;
    eprintln!("net: the daemon moved {tx_frames} frames guest->tap and {rx_frames} tap->guest");
    ensure(tx_frames > 1000 && rx_frames > 1000, || {
        format!("daemon totals too low: tx {tx_frames}, rx {rx_frames}")
    })?;
    Ok(())
}

#[test]
fn net_one_pair_ping_and_iperf3_both_ways() {
    e2e("net_one_pair_ping_and_iperf3_both_ways", |logs, guest| {
        net_end_to_end(logs, guest, 1)
    });
}

#[test]
fn net_two_queue_pairs_both_carry_traffic() {
    e2e("net_two_queue_pairs_both_carry_traffic", |logs, guest| {
        net_end_to_end(logs, guest, 2)
    });
}
