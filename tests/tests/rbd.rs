//! vhost-user-blk on Ceph RBD images (`--rbd`), against a real one-monitor, one-OSD cluster
//! (`vhost_user_tests::ceph`), through the daemon's real socket: the blkio crate's driver for
//! conformance, our own VMM for what a driver never sends, `rbd export` for what reached the
//! cluster. Needs the daemon built with `--features rbd` (this file's `rbd` feature).
#![cfg(feature = "rbd")]

use std::time::{Duration, Instant};

use blkio::ReqFlags;
use rand::{Rng, SeedableRng};
use vhost_user_tests::blkio_client::{wait_one, Client};
use vhost_user_tests::ceph::Cluster;
use vhost_user_tests::*;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

const SIZE: u64 = 32 << 20;
/// What the daemon logs once its image is open.
const RBD_READY: &str = "librbd engine";

fn cluster() -> Result<Cluster> {
    assert!(
        ceph::installed(),
        "Ceph is not installed (apt-get install ceph-mon ceph-osd ceph-common; .ci/run does)"
    );
    Cluster::start()
}

/// The flags that point the daemon at `spec` on `cluster`.
fn rbd_args(cluster: &Cluster, spec: &str) -> Vec<String> {
    vec![
        "--rbd".into(),
        spec.into(),
        "--rbd-conf".into(),
        cluster.conf().display().to_string(),
        "--rbd-keyring".into(),
        cluster.keyring().display().to_string(),
    ]
}

fn start(cluster: &Cluster, spec: &str, extra: &[&str]) -> Result<Daemon> {
    let mut args = rbd_args(cluster, spec);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start("vhost-user-blk", &args)?;
    // The socket exists before the cluster is reached: wait for the image to be open (the
    // line that says what is served), so that a driver's own timeouts do not count it.
    daemon.wait_for_log(RBD_READY, Duration::from_secs(60))?;
    Ok(daemon)
}

/// Writes of random sizes at random offsets, each read back; flush; discard and write-zeroes
/// read back as zeroes; then the image, exported by `rbd` after the daemon left, is
/// byte-for-byte what the guest wrote.
fn conformance(extra: &[&str], queues: i32) -> Result<()> {
    let cluster = cluster()?;
    let spec = cluster.create_image("conformance", SIZE)?;
    let mut daemon = start(&cluster, &spec, extra)?;
    let mut client = Client::connect(&daemon.socket, queues)?;
    assert_eq!(client.capacity()?, SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xceff);
    let nq = client.queues.len();
    for i in 0..60 {
        let len = rng.gen_range(1..=256usize) * 512;
        let offset = rng.gen_range(0..(SIZE as usize - len) / 512) * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let ret = client.write_at(i % nq, offset as u64, 0, &data)?;
        assert_eq!(ret, 0, "write of {len} at {offset}");
        model[offset..offset + len].copy_from_slice(&data);
        let (ret, back) = client.read_at(i % nq, offset as u64, 1 << 20, len)?;
        assert_eq!(ret, 0, "read of {len} at {offset}");
        assert!(
            back == model[offset..offset + len],
            "read after write at {offset}+{len} differs"
        );
    }
    assert_eq!(client.flush()?, 0, "flush");
    // Discard (4 MiB, whole RADOS objects: they read back as zeroes), write-zeroes with and
    // without unmap, at unaligned object offsets.
    for (offset, len, how) in [
        (4usize << 20, 4usize << 20, "discard"),
        (9 << 20 | 4096, 1 << 20, "zeroes"),
        (12 << 20 | 512, 65536, "zeroes-no-unmap"),
    ] {
        let q = &mut client.queues[0];
        match how {
            "discard" => q.discard(offset as u64, len as u64, 0, ReqFlags::empty()),
            "zeroes" => q.write_zeroes(offset as u64, len as u64, 0, ReqFlags::empty()),
            _ => q.write_zeroes(offset as u64, len as u64, 0, ReqFlags::NO_UNMAP),
        }
        assert_eq!(wait_one(q)?, 0, "{how} of {len} at {offset}");
        model[offset..offset + len].fill(0);
        let back = client.buf(0, len.min(1 << 20));
        let q = &mut client.queues[0];
        q.read(offset as u64, back, len.min(1 << 20), 0, ReqFlags::empty());
        assert_eq!(wait_one(q)?, 0);
        assert!(
            client.copy_out(0, len.min(1 << 20)).iter().all(|&b| b == 0),
            "{how} does not read back as zeroes"
        );
    }
    // Past the end: refused, nothing written.
    let buf = client.buf(0, 4096);
    let q = &mut client.queues[0];
    q.read(SIZE - 512, buf, 4096, 0, ReqFlags::empty());
    assert_ne!(wait_one(q)?, 0, "a read past the end succeeded");
    q.write(SIZE, buf, 512, 0, ReqFlags::empty());
    assert_ne!(wait_one(q)?, 0, "a write past the end succeeded");
    drop(client);
    assert!(daemon.terminate()?.success(), "{}", daemon.log_tail(20));
    assert!(
        cluster.export(&spec)? == model,
        "the exported image differs from what the guest wrote"
    );
    Ok(())
}

#[test]
fn conformance_one_queue() -> Result<()> {
    conformance(&[], 1)
}

#[test]
fn conformance_two_queues_polling() -> Result<()> {
    // Two queues share the image; --poll-us makes the worker look for completions itself.
    conformance(&["--num-queues", "2", "--poll-us", "50"], 2)
}

/// A snapshot (and `--readonly`) is served read-only: VIRTIO_BLK_F_RO, writes from a driver
/// that ignores it answered with IOERR, reads of the snapshot's data.
#[test]
fn snapshots_are_read_only() -> Result<()> {
    let cluster = cluster()?;
    let mut data = vec![0u8; 1 << 20];
    data[..512].fill(0x11);
    let spec = cluster.import("snapped", &data)?;
    cluster.rbd(&["snap", "create", &format!("{spec}@s1")])?;
    for (target, extra) in [
        (format!("{spec}@s1"), &[][..]),
        (spec.clone(), &["--readonly"][..]),
    ] {
        let daemon = start(&cluster, &target, extra)?;
        let mut vmm = TestVmm::connect(&daemon.socket, 64 << 20, 1, 64, Negotiate::default())?;
        assert!(
            vmm.offered_features & (1 << 5) != 0,
            "{target}: RO not offered"
        );
        let (header, payload, status) = (
            vmm.ram.alloc(16, 16),
            vmm.ram.alloc(512, 512),
            vmm.ram.alloc(1, 1),
        );
        for (kind, writable) in [(1u32, false), (0, true)] {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            vmm.ram.write(header, &h)?;
            vmm.ram.write(payload, &[0x22; 512])?;
            vmm.ram.write(status, &[0xee])?;
            let (ram, q) = vmm.queue(0);
            let data_buf = if writable {
                Buf::writable(payload, 512)
            } else {
                Buf::readable(payload, 512)
            };
            q.submit(
                ram,
                &[
                    Buf::readable(header, 16),
                    data_buf,
                    Buf::writable(status, 1),
                ],
            )?;
            q.wait_used(ram, 1, Duration::from_secs(10))?;
            let got = vmm.ram.read(status, 1)?[0];
            if kind == 1 {
                assert_eq!(got, 1, "{target}: a write was not answered with IOERR");
            } else {
                assert_eq!(got, 0, "{target}: read failed");
                assert!(vmm.ram.read(payload, 512)?.iter().all(|&b| b == 0x11));
            }
        }
    }
    assert!(
        cluster.export(&spec)? == data,
        "a read-only image was modified"
    );
    Ok(())
}

/// One `vhost-user-blk: error: ...` line and exit status 1, within the connect timeout.
fn fails_with(args: &[String], expect: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s.sock").display().to_string();
    let mut argv = vec!["--socket-path".to_string(), socket];
    argv.extend(args.iter().cloned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (code, _, stderr) = run_to_exit("vhost-user-blk", &argv)?;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{expect}: took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 1, "{expect}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{expect}: not one error line: {stderr}");
    assert!(
        errors[0].starts_with("vhost-user-blk: error: ") && errors[0].contains(expect),
        "{expect}: {stderr}"
    );
    Ok(())
}

#[test]
fn start_up_errors_are_one_line() -> Result<()> {
    let cluster = cluster()?;
    let spec = cluster.create_image("exists", 1 << 20)?;
    let with = |spec: &str, extra: &[&str]| {
        let mut args = rbd_args(&cluster, spec);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    fails_with(&with("nopool/img", &[]), "pool \"nopool\" does not exist")?;
    fails_with(&with("rbd/noimage", &[]), "rbd/noimage: no such image")?;
    fails_with(
        &with(&format!("{spec}@nosnap"), &[]),
        "no such image or snapshot",
    )?;
    let mut args = with(&spec, &[]);
    args[5] = "/nonexistent/keyring".into();
    fails_with(&args, "--rbd-keyring /nonexistent/keyring")?;
    let mut args = with(&spec, &[]);
    args[3] = "/nonexistent/ceph.conf".into();
    fails_with(&args, "--rbd-conf /nonexistent/ceph.conf")?;
    // A monitor that is not there: nothing listens on the port any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = cluster.dir().join("unreachable.conf");
    std::fs::write(
        &conf,
        format!("[global]\nmon host = v2:127.0.0.1:{closed}\n"),
    )?;
    let mut args = with(&spec, &["--rbd-connect-timeout", "3"]);
    args[3] = conf.display().to_string();
    fails_with(&args, "cannot reach the Ceph cluster")?;
    Ok(())
}

/// The OSD stops while requests wait for it: they complete once it is back (no error, no
/// hang), and the data is there.
#[test]
fn requests_wait_for_a_restarted_osd() -> Result<()> {
    let mut cluster = cluster()?;
    let spec = cluster.create_image("osd-restart", SIZE)?;
    let daemon = start(&cluster, &spec, &["--rbd-io-timeout", "60"])?;
    let mut client = Client::connect(&daemon.socket, 1)?;
    client.copy_in(0, &[0x5a; 65536]);
    let buf = client.buf(0, 65536);
    client.queues[0].write(0, buf, 65536, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut client.queues[0])?, 0);
    cluster.stop_osd()?;
    client.copy_in(65536, &[0xa5; 65536]);
    let buf = client.buf(65536, 65536);
    client.queues[0].write(1 << 20, buf, 65536, 0, ReqFlags::empty());
    std::thread::sleep(Duration::from_secs(2));
    let mut early = [std::mem::MaybeUninit::<blkio::Completion>::uninit(); 1];
    let done = client.queues[0].do_io(&mut early, 0, Some(&mut Duration::from_millis(0)), None)?;
    assert_eq!(done, 0, "a write completed while the OSD was down");
    cluster.start_osd()?;
    let back_at = Instant::now();
    let mut done = [std::mem::MaybeUninit::<blkio::Completion>::uninit(); 1];
    let n = client.queues[0].do_io(&mut done, 1, Some(&mut Duration::from_secs(90)), None)?;
    assert_eq!(n, 1, "the write did not complete after the OSD came back");
    // SAFETY: do_io initialised the first `n` entries.
    let ret = unsafe { done[0].assume_init_read() }.ret;
    eprintln!(
        "the write completed {:?} after the OSD was back",
        back_at.elapsed()
    );
    assert_eq!(ret, 0, "{}", daemon.log_tail(10));
    let back = client.buf(1 << 20, 65536);
    client.queues[0].read(1 << 20, back, 65536, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut client.queues[0])?, 0);
    assert!(client.copy_out(1 << 20, 65536).iter().all(|&b| b == 0xa5));
    let back = client.buf(2 << 20, 65536);
    client.queues[0].read(0, back, 65536, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut client.queues[0])?, 0);
    assert!(client.copy_out(2 << 20, 65536).iter().all(|&b| b == 0x5a));
    Ok(())
}

/// Without FLUSH negotiated the device must write through: with librbd's cache in write-back
/// mode, every write the guest saw complete is on the cluster even if the daemon is SIGKILLed
/// right after (no exit flush).
#[test]
fn write_through_without_flush_survives_sigkill() -> Result<()> {
    let cluster = cluster()?;
    let spec = cluster.create_image("write-through", SIZE)?;
    let conf = std::fs::read_to_string(cluster.conf())?.replace(
        "[client]\n",
        "[client]\nrbd cache = true\nrbd cache policy = writeback\n\
         rbd cache writethrough until flush = false\nrbd cache max dirty age = 30\n",
    );
    let writeback_conf = cluster.dir().join("writeback.conf");
    std::fs::write(&writeback_conf, conf)?;
    let mut args = rbd_args(&cluster, &spec);
    args[3] = writeback_conf.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start("vhost-user-blk", &args)?;
    daemon.wait_for_log(RBD_READY, Duration::from_secs(60))?;
    let no_flush = Negotiate {
        features: !(1u64 << 9),
        ..Negotiate::default()
    };
    let mut vmm = TestVmm::connect(&daemon.socket, 64 << 20, 1, 64, no_flush)?;
    assert_eq!(vmm.acked_features & (1 << 9), 0, "FLUSH was negotiated");
    let payload = vmm.ram.alloc(65536, 4096);
    let mut model = vec![0u8; SIZE as usize];
    for (i, sector) in [0u64, 2048, 40000].into_iter().enumerate() {
        let fill = 0x30 + i as u8;
        vmm.ram.write(payload, &[fill; 65536])?;
        let status = vmm.blk_request(
            VIRTIO_BLK_T_OUT,
            sector,
            Buf::readable(payload, 65536),
            Duration::from_secs(10),
        )?;
        assert_eq!(status, 0, "write {i} failed");
        let at = (sector * 512) as usize;
        model[at..at + 65536].fill(fill);
    }
    daemon.child.kill()?;
    daemon.child.wait()?;
    assert!(
        cluster.export(&spec)? == model,
        "writes the guest saw complete were lost with the daemon"
    );
    Ok(())
}

/// A monitor named by host name: resolved before the sandbox hides /etc/hosts.
#[test]
fn mon_host_by_name_under_the_sandbox() -> Result<()> {
    let cluster = cluster()?;
    let spec = cluster.create_image("by-name", 1 << 20)?;
    let conf = std::fs::read_to_string(cluster.conf())?
        .replace("mon host = v2:127.0.0.1:", "mon host = v2:localhost:");
    let named = cluster.dir().join("named.conf");
    std::fs::write(&named, conf)?;
    let mut args = rbd_args(&cluster, &spec);
    args[3] = named.display().to_string();
    args.extend(["--sandbox".into(), "namespace".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start("vhost-user-blk", &args)?;
    daemon.wait_for_log(RBD_READY, Duration::from_secs(60))?;
    Ok(())
}
