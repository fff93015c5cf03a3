//! The one-command demo (`scripts/demo.sh` builds and runs it, as root): a QEMU guest (TCG)
//! with a vhost-user-blk disk (a 1 GiB file, 2 queues) and a vhost-user-net NIC (a tap in a
//! network namespace the demo creates, 2 queue pairs). The guest runs fio and iperf3; the demo
//! prints the results and the exact daemon and QEMU command lines, and removes everything it
//! created when it ends, Ctrl-C included.
//!
//! `--qemu 7.2` (the default: Debian 12's own QEMU) or `--qemu 11` (the newest QEMU in Debian,
//! from trixie-backports, run from a Debian 13 root the demo builds once with debootstrap; the
//! guest then boots the newest Debian kernel). The command lines printed are that QEMU's.

use std::fs;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost_user_tests::guest::{Guest, GuestKernel};
use vhost_user_tests::netns::{require_root, Background, Netns};
use vhost_user_tests::qemu::{FioTerse, GuestOutput, Logs, Qemu, QemuVersion, Vm, VmConfig};
use vhost_user_tests::{Daemon, Result};

const NETNS_PREFIX: &str = "vudemo";
const TAP: &str = "vudemo0";
const GUEST_MAC: &str = "52:54:00:de:e0:01";
const HOST_IP: &str = "10.99.0.1";
const GUEST_IP: &str = "10.99.0.2";
const PORT: u16 = 5201;
const PAIRS: u16 = 2;
const DISK_SIZE: u64 = 1 << 30;
const FIO_SECONDS: u32 = 5;
const IPERF_SECONDS: u32 = 5;

/// (job name, fio --rw, block size, what to call it)
const FIO_JOBS: [(&str, &str, &str, &str); 4] = [
    ("randwrite4k", "randwrite", "4k", "4k random write"),
    ("randread4k", "randread", "4k", "4k random read"),
    ("seqwrite128k", "write", "128k", "128k sequential write"),
    ("seqread128k", "read", "128k", "128k sequential read"),
];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vhost-user-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn guest_script() -> String {
    let mut s = format!(
        "ip link set eth0 up\nip addr add {GUEST_IP}/24 dev eth0\n\
         echo \"E2E blk_queues=$(ls /sys/block/vda/mq | wc -l)\"\n\
         echo \"E2E net_queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\"\n"
    );
    for (name, rw, bs, _) in FIO_JOBS {
        s += &format!(
            "echo \"E2E phase=fio {name}\"\n\
             fio --name={name} --filename=/dev/vda --ioengine=io_uring --iodepth=16 --direct=1 \
             --rw={rw} --bs={bs} --size=256M --runtime={FIO_SECONDS} --time_based \
             --output-format=terse --terse-version=3 > /tmp/{name}.out 2>&1\n\
             echo \"E2E fio_{name}=$(grep '^3;' /tmp/{name}.out)\"\n"
        );
    }
    s += &format!("ping -c 2 -W 3 {HOST_IP} > /dev/null 2>&1\necho \"E2E ping_rc=$?\"\n");
    for (dir, flag, what) in [("tx", "", "guest to host"), ("rx", " -R", "host to guest")] {
        s += &format!("echo \"E2E phase=iperf3 {what}\"\n");
        for i in 0..PAIRS {
            s += &format!(
                "taskset {mask} timeout 60 iperf3 -c {HOST_IP} -p {port} -t {IPERF_SECONDS} -f m{flag} > /tmp/{dir}{i}.out 2>&1 &\nP{i}=$!\n",
                mask = 1u32 << i,
                port = PORT + i
            );
        }
        for i in 0..PAIRS {
            s += &format!(
                "wait $P{i}\necho \"E2E iperf_{dir}{i}=$(awk '/receiver/ {{ v = $(NF-2) }} END {{ print v }}' /tmp/{dir}{i}.out)\"\n"
            );
        }
    }
    s
}

/// `--qemu 7.2|11` (also `$VHOST_DEMO_QEMU`).
fn qemu_choice() -> Result<(QemuVersion, GuestKernel)> {
    let mut args = std::env::args().skip(1);
    let mut choice = std::env::var("VHOST_DEMO_QEMU").unwrap_or_else(|_| "7.2".to_string());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--qemu" => choice = args.next().ok_or("--qemu needs a version: 7.2 or 11")?,
            other => match other.strip_prefix("--qemu=") {
                Some(v) => choice = v.to_string(),
                None => {
                    return Err(format!(
                        "unknown argument {other:?} (usage: vhost-user-demo [--qemu 7.2|11])"
                    )
                    .into())
                }
            },
        }
    }
    match choice.as_str() {
        "7.2" | "7" | "72" => Ok((QemuVersion::Qemu72, GuestKernel::Host)),
        "11" => Ok((QemuVersion::Qemu11, GuestKernel::Newest)),
        other => Err(format!("--qemu {other:?}: expected 7.2 or 11").into()),
    }
}

fn run() -> Result<bool> {
    let (version, kernel) = qemu_choice()?;
    require_root("the demo")?;
    if version == QemuVersion::Qemu11 {
        println!("==> Preparing QEMU 11 (a Debian 13 root with trixie-backports' QEMU; built once, about a minute)");
    }
    let qemu = Qemu::get(version)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    Netns::remove_stale(NETNS_PREFIX);

    println!("==> Preparing the guest (Debian kernel + busybox, fio, iperf3; cached after the first run)");
    let guest = Guest::with_kernel(kernel)?;
    println!("    kernel {}, {}", guest.release, guest.initrd.display());
    let logs = Logs::new("demo")?;
    let work = tempfile::tempdir()?;
    let disk = work.path().join("disk.img");
    fs::File::create(&disk)?.set_len(DISK_SIZE)?;
    let disk_arg = disk.to_string_lossy().into_owned();

    println!("==> Starting the daemons");
    let blk_args = ["--file", disk_arg.as_str(), "--num-queues", "2"];
    let blk = Daemon::start("vhost-user-blk", &blk_args)?;
    let _keep_blk = logs.keep(&blk, "vhost-user-blk.log");

    let ns = Netns::new(NETNS_PREFIX)?;
    let pairs = PAIRS.to_string();
    let host_cidr = format!("{HOST_IP}/24");
    let net_args = [
        "--tap",
        TAP,
        "--queue-pairs",
        pairs.as_str(),
        "--mac",
        GUEST_MAC,
        "--host-ip",
        host_cidr.as_str(),
    ];
    let net = Daemon::start_with_prefix(&ns.prefix(), "vhost-user-net", &net_args)?;
    let _keep_net = logs.keep(&net, "vhost-user-net.log");
    let mut servers: Vec<Background> = Vec::new();
    for i in 0..PAIRS {
        let port = (PORT + i).to_string();
        servers.push(ns.spawn(
            &["iperf3", "-s", "-p", &port],
            &logs.path(&format!("iperf3-server-{i}.log")),
        )?);
        ns.wait_for_listener(PORT + i, Duration::from_secs(10))?;
    }

    let mut config = VmConfig::new(&qemu, guest_script())
        .blk(&blk.socket, 2, false)
        .net(&net.socket, PAIRS, GUEST_MAC);
    config.keep_initrd = true;
    let mut vm = Vm::start(&guest, &config, &logs)?;
    println!("==> Command lines (copy them to run the same setup by hand)");
    println!(
        "  # the disk daemon: a {} GiB sparse file, 2 queues",
        DISK_SIZE >> 30
    );
    println!("  {}", blk.command_line);
    println!(
        "  # the network daemon, in network namespace {} (tap {TAP}, host side {HOST_IP}/24)",
        ns.name
    );
    println!("  ip netns add {}", ns.name);
    println!("  {}", net.command_line);
    for i in 0..PAIRS {
        println!("  ip netns exec {} iperf3 -s -p {}", ns.name, PORT + i);
    }
    println!(
        "  # the guest ({} under TCG; with KVM use accel=kvm)",
        qemu.banner
    );
    println!("  {}", vm.command);
    println!(
        "==> Guest running (QEMU pid {}); the run takes about a minute",
        vm.pid()
    );

    let serial = vm.serial.clone();
    let printed = std::cell::Cell::new(0usize);
    let progress = || {
        let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
        let phases: Vec<String> = GuestOutput::parse(&text)
            .pairs
            .into_iter()
            .filter(|(k, _)| k == "phase" || k == "booted")
            .map(|(k, v)| {
                if k == "booted" {
                    "guest booted".to_string()
                } else {
                    v
                }
            })
            .collect();
        for phase in &phases[printed.get().min(phases.len())..] {
            println!("    {phase}");
        }
        printed.set(phases.len());
        interrupted.load(Ordering::Relaxed)
    };
    let result = vm.finish(Duration::from_secs(600), &progress);
    drop(vm);
    drop(servers);
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            if interrupted.load(Ordering::Relaxed) {
                println!("==> Interrupted: cleaning up");
                return Ok(false);
            }
            return Err(format!("{e}\n{}", logs.report()).into());
        }
    };
    Ok(report(&out, &logs, &ns.name))
}

/// Prints the results; false if a part of the demo failed.
fn report(out: &GuestOutput, logs: &Logs, ns: &str) -> bool {
    let mut ok = true;
    println!();
    println!("==> Results (a TCG guest on emulated CPUs: expect a fraction of what KVM gives)");
    println!(
        "  vhost-user-blk: {} blk-mq queue(s) in the guest; fio, io_uring, iodepth 16, {FIO_SECONDS} s each",
        out.get("blk_queues").unwrap_or("?")
    );
    for (name, _, _, what) in FIO_JOBS {
        match out.get(&format!("fio_{name}")).and_then(FioTerse::parse) {
            Ok(fio) if fio.error() == 0 => {
                let (iops, bw) = if fio.read_kib() > 0 {
                    (fio.read_iops(), fio.read_bw_kib_s())
                } else {
                    (fio.write_iops(), fio.write_bw_kib_s())
                };
                println!("    {what:<24} {iops:>9.0} IOPS {:>9.1} MiB/s", bw / 1024.0);
            }
            Ok(fio) => {
                ok = false;
                println!("    {what:<24} FAILED (fio error {})", fio.error());
            }
            Err(e) => {
                ok = false;
                println!("    {what:<24} FAILED ({e})");
            }
        }
    }
    println!(
        "  vhost-user-net: {} queue pair(s) in the guest, tap in netns {ns}; iperf3, {PAIRS} streams, {IPERF_SECONDS} s",
        out.get("net_queues").unwrap_or("?")
    );
    if out.get("ping_rc").ok() != Some("0") {
        ok = false;
        println!("    ping {HOST_IP}: FAILED");
    }
    for (dir, what) in [("tx", "guest -> host"), ("rx", "host -> guest")] {
        let mut total = 0.0;
        let mut all = true;
        for i in 0..PAIRS {
            match out.get_f64(&format!("iperf_{dir}{i}")) {
                Ok(mbps) if mbps > 0.0 => total += mbps,
                _ => all = false,
            }
        }
        if all {
            println!("    {what:<24} {total:>9.0} Mbit/s");
        } else {
            ok = false;
            println!("    {what:<24} FAILED");
        }
    }
    if !ok {
        println!("{}", logs.report());
    }
    println!("==> Logs of this run: {}", logs.dir.display());
    ok
}
