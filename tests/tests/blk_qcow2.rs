//! qcow2 images in vhost-user-blk (`--format qcow2`), driven through the real socket by the
//! blkio driver, on images `qemu-img` made; afterwards `qemu-img check` finds no error and
//! `qemu-img compare` finds the image equal to a raw file of what the guest wrote.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::ReqFlags;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_user_tests::blkio_client::{wait_many, wait_one, Client};
use vhost_user_tests::{qemu_img, Daemon, Result};

const SIZE: u64 = 64 << 20;

fn start(image: &Path, extra: &[&str]) -> Result<Daemon> {
    let path = image.to_string_lossy().into_owned();
    let mut args = vec!["--file", path.as_str(), "--format", "qcow2"];
    args.extend_from_slice(extra);
    Daemon::start("vhost-user-blk", &args)
}

/// Content with a different value in every 512-byte sector (cheap to make, easy to misplace).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ seed ^ (i as u8 & 0x0f))
        .collect()
}

/// A raw file holding `data`.
fn raw_file(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, data)?;
    Ok(path)
}

fn checksum(path: &Path) -> Result<u64> {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&std::fs::read(path)?);
    Ok(h.finish())
}

/// Random writes (sizes 512 B..128 KiB at random sectors), with discards and write-zeroes in
/// between, each checked by reading it back; then a flush and the whole disk read and compared
/// with `model` (what the disk held before, plus what was written).
fn random_io(client: &mut Client, model: &mut [u8], rng: &mut StdRng, ops: usize) -> Result<()> {
    let size = model.len();
    for op in 0..ops {
        let sectors = rng.gen_range(1..=256usize);
        let len = sectors * 512;
        let offset = rng.gen_range(0..(size - len) / 512) * 512;
        let q = &mut client.queues[0];
        match op % 10 {
            3 => {
                q.discard(offset as u64, len as u64, 0, ReqFlags::empty());
                assert_eq!(wait_one(q)?, 0, "discard of {len} at {offset}");
                model[offset..offset + len].fill(0);
            }
            7 => {
                let flags = if rng.gen_bool(0.5) {
                    ReqFlags::NO_UNMAP
                } else {
                    ReqFlags::empty()
                };
                q.write_zeroes(offset as u64, len as u64, 0, flags);
                assert_eq!(wait_one(q)?, 0, "write-zeroes of {len} at {offset}");
                model[offset..offset + len].fill(0);
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                // Odd buffer offsets in the region: bounce buffers under O_DIRECT.
                let at = 512 * rng.gen_range(0..4usize);
                let ret = client.write_at(0, offset as u64, at, &data)?;
                assert_eq!(ret, 0, "write of {len} at {offset}");
                model[offset..offset + len].copy_from_slice(&data);
            }
        }
        let (ret, back) = client.read_at(0, offset as u64, 4 << 20, len)?;
        assert_eq!(ret, 0, "read of {len} at {offset}");
        assert!(
            back == model[offset..offset + len],
            "op {op}: data at {offset}+{len} differs right after it was written"
        );
    }
    assert_eq!(client.flush()?, 0, "flush");
    read_all_and_compare(client, model)
}

/// Reads the whole disk in 1 MiB requests and compares it with `model`.
fn read_all_and_compare(client: &mut Client, model: &[u8]) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    for (i, expected) in model.chunks(CHUNK).enumerate() {
        let buf = client.buf(0, expected.len());
        let q = &mut client.queues[0];
        q.read(
            (i * CHUNK) as u64,
            buf,
            expected.len(),
            0,
            ReqFlags::empty(),
        );
        assert_eq!(wait_one(q)?, 0, "read of MiB {i}");
        let got = client.copy_out(0, expected.len());
        if got != expected {
            let first = got.iter().zip(expected).position(|(a, b)| a != b);
            return Err(format!("MiB {i} differs from the model (first at byte {first:?})").into());
        }
    }
    Ok(())
}

/// Serves `image`, runs random I/O against it, stops the daemon (SIGTERM flushes), and checks
/// the image with qemu-img against a raw copy of the model.
fn serve_and_verify(image: &Path, extra: &[&str], model: &mut [u8], seed: u64) -> Result<()> {
    let mut daemon = start(image, extra)?;
    let mut client = Client::connect(&daemon.socket, 1)?;
    assert_eq!(client.capacity()?, model.len() as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    random_io(&mut client, model, &mut rng, 200)?;
    drop(client);
    let status = daemon.terminate()?;
    assert!(
        status.success(),
        "daemon: {status}: {}",
        daemon.log_tail(20)
    );
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    qemu_img::check(image, false)?;
    let dir = image.parent().ok_or("image without a directory")?;
    let raw = raw_file(dir, "model.raw", model)?;
    qemu_img::compare_with_raw(&raw, image)
}

fn fresh(options: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.qcow2");
    qemu_img::create(&image, SIZE, options)?;
    Ok((dir, image))
}

#[test]
fn qcow2_read_after_write_io_uring() -> Result<()> {
    let (_dir, image) = fresh("")?;
    serve_and_verify(&image, &[], &mut vec![0u8; SIZE as usize], 1)
}

#[test]
fn qcow2_small_clusters_sync_engine() -> Result<()> {
    let (_dir, image) = fresh("cluster_size=4096")?;
    serve_and_verify(
        &image,
        &["--io-engine", "sync", "--num-queues", "2"],
        &mut vec![0u8; SIZE as usize],
        2,
    )
}

#[test]
fn qcow2_tiny_clusters_direct_io() -> Result<()> {
    let (_dir, image) = fresh("cluster_size=512")?;
    serve_and_verify(&image, &["--direct"], &mut vec![0u8; SIZE as usize], 3)
}

#[test]
fn qcow2_v2_image() -> Result<()> {
    let (_dir, image) = fresh("compat=0.10")?;
    serve_and_verify(&image, &[], &mut vec![0u8; SIZE as usize], 4)
}

/// An image of compressed clusters (`qemu-img convert -c`): reads decompress, writes replace
/// them with normal clusters.
#[test]
fn qcow2_compressed_clusters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = pattern(SIZE as usize, 0x5a);
    let raw = raw_file(dir.path(), "source.raw", &model)?;
    let image = dir.path().join("compressed.qcow2");
    qemu_img::convert_to_qcow2(&raw, &image, true)?;
    std::fs::remove_file(&raw)?;
    serve_and_verify(&image, &[], &mut model, 5)
}

/// base.raw <- mid.qcow2 <- top.qcow2, with relative backing names, the daemon running
/// elsewhere: reads fall through to the layer that has the data, writes go to the top, and the
/// lower layers are not changed by a byte.
#[test]
fn qcow2_backing_chain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = pattern(SIZE as usize, 0xa5);
    let base = raw_file(dir.path(), "base.raw", &model)?;
    let mid = dir.path().join("mid.qcow2");
    qemu_img::create_over(&mid, "base.raw", "raw")?;
    // The middle layer gets data of its own (and zeroes over some of the base).
    let base_sum = checksum(&base)?;
    serve_and_verify(&mid, &[], &mut model, 6)?;
    assert_eq!(checksum(&base)?, base_sum, "the base changed under mid");
    let top = dir.path().join("top.qcow2");
    qemu_img::create_over(&top, "mid.qcow2", "qcow2")?;
    let mid_sum = checksum(&mid)?;
    serve_and_verify(&top, &["--num-queues", "2"], &mut model, 7)?;
    assert_eq!(checksum(&base)?, base_sum, "the base changed under top");
    assert_eq!(checksum(&mid)?, mid_sum, "mid changed under top");
    let info = qemu_img::run(&["info", "--backing-chain", &top.to_string_lossy()])?;
    assert!(
        info.contains("mid.qcow2") && info.contains("base.raw"),
        "{info}"
    );
    Ok(())
}

/// `--backing` serves an image whose backing file moved; `--readonly` serves it unchanged.
#[test]
fn qcow2_backing_override_and_readonly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = pattern(SIZE as usize, 0x33);
    let base = raw_file(dir.path(), "moved.raw", &model)?;
    let top = dir.path().join("top.qcow2");
    qemu_img::run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        &top.to_string_lossy(),
        &SIZE.to_string(),
    ])?;
    let top_sum = checksum(&top)?;
    let base_arg = base.to_string_lossy().into_owned();
    let daemon = start(&top, &["--readonly", "--backing", &base_arg])?;
    let mut client = Client::connect_with(&daemon.socket, 1, true)?;
    read_all_and_compare(&mut client, &model)?;
    drop(client);
    drop(daemon);
    assert_eq!(checksum(&top)?, top_sum, "a read-only image changed");
    Ok(())
}

/// Four queues allocate clusters at once, each in its own part of the disk, interleaved at
/// cluster granularity so that they share L2 tables and refcount blocks.
#[test]
fn qcow2_queues_allocate_concurrently() -> Result<()> {
    const QUEUES: usize = 4;
    const LEN: usize = 16 << 10;
    const ROUNDS: usize = 64;
    let (_dir, image) = fresh("cluster_size=16384")?;
    let daemon = start(&image, &["--num-queues", "4"])?;
    let mut client = Client::connect(&daemon.socket, QUEUES as i32)?;
    let region = client.region;
    let per_queue = vhost_user_tests::blkio_client::REGION_SIZE / QUEUES;
    let queues = std::mem::take(&mut client.queues);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let base = region.addr + qi * per_queue;
            std::thread::spawn(move || -> std::result::Result<(), String> {
                for round in 0..ROUNDS {
                    let at = ((round * QUEUES + qi) * LEN) as u64;
                    let fill = (qi * ROUNDS + round) as u8 | 1;
                    // SAFETY: each thread uses its own quarter of the mapped region.
                    unsafe { std::ptr::write_bytes(base as *mut u8, fill, LEN) };
                    q.write(at, base as *mut u8, LEN, 0, ReqFlags::empty());
                    if wait_many(&mut q, 1).map_err(|e| e.to_string())? != 0 {
                        return Err(format!("queue {qi}: write {round} failed"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "queue thread panicked")??;
    }
    client.queues = Vec::new();
    drop(client);
    let mut client = Client::connect(&daemon.socket, 1)?;
    let mut model = vec![0u8; SIZE as usize];
    for round in 0..ROUNDS {
        for qi in 0..QUEUES {
            let at = (round * QUEUES + qi) * LEN;
            model[at..at + LEN].fill((qi * ROUNDS + round) as u8 | 1);
        }
    }
    read_all_and_compare(&mut client, &model)?;
    drop(client);
    drop(daemon);
    qemu_img::check(&image, false)?;
    Ok(())
}

/// SIGKILL during random writes on two queues: `qemu-img check` finds no corruption (leaked
/// clusters are allowed), and what was flushed before reads back after a restart.
#[test]
fn qcow2_sigkill_during_writes_leaves_a_consistent_image() -> Result<()> {
    const FLUSHED: usize = 8 << 20;
    let (_dir, image) = fresh("cluster_size=65536")?;
    let mut daemon = start(&image, &["--num-queues", "2"])?;
    let mut client = Client::connect(&daemon.socket, 2)?;
    // The first 8 MiB: written and flushed.
    let flushed = pattern(FLUSHED, 0x77);
    for (i, chunk) in flushed.chunks(1 << 20).enumerate() {
        assert_eq!(client.write_at(0, (i << 20) as u64, 0, chunk)?, 0);
    }
    assert_eq!(client.flush()?, 0, "flush");
    // Then random writes after it on both queues, many in flight, until the kill.
    let region = client.region;
    let queues = std::mem::take(&mut client.queues);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let stop = stop.clone();
            let base = region.addr + qi * (4 << 20);
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(qi as u64);
                // SAFETY: each thread uses its own half of the mapped region.
                unsafe { std::ptr::write_bytes(base as *mut u8, 0xee, 4 << 20) };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..16usize {
                        let len = 512 * rng.gen_range(1..=128usize);
                        let at = rng.gen_range(FLUSHED as u64 / 512..(SIZE - len as u64) / 512);
                        let buf = (base + i * (128 << 10)) as *mut u8;
                        q.write(at * 512, buf, len, 0, ReqFlags::empty());
                    }
                    // The daemon may die with these in flight: stop waiting then.
                    if wait_many(&mut q, 16).is_err() {
                        break;
                    }
                }
                q
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    let _ = daemon.child.wait();
    // The writers use the client's memory: they end (their last batch times out) before it is
    // unmapped.
    for writer in writers {
        drop(writer.join().map_err(|_| "writer thread panicked")?);
    }
    drop(client);
    let report = qemu_img::check(&image, true)?;
    assert!(!report.contains("ERROR"), "{report}");
    let daemon = start(&image, &[])?;
    let mut client = Client::connect(&daemon.socket, 1)?;
    for (i, expected) in flushed.chunks(1 << 20).enumerate() {
        let buf = client.buf(0, expected.len());
        let q = &mut client.queues[0];
        q.read((i << 20) as u64, buf, expected.len(), 0, ReqFlags::empty());
        assert_eq!(wait_one(q)?, 0);
        assert!(
            client.copy_out(0, expected.len()) == expected,
            "flushed MiB {i} did not survive the kill"
        );
    }
    Ok(())
}

/// Data the guest wrote through the daemon reads back through QEMU's own qcow2 driver.
#[test]
fn qcow2_data_written_reads_back_in_qemu_img() -> Result<()> {
    let (dir, image) = fresh("")?;
    let daemon = start(&image, &[])?;
    let mut client = Client::connect(&daemon.socket, 1)?;
    let data = pattern(3 << 20, 0x42);
    assert_eq!(client.write_at(0, 5 << 20, 0, &data)?, 0);
    assert_eq!(client.flush()?, 0);
    // After a flush the image is consistent even while the daemon still runs.
    let out = dir.path().join("out.raw");
    qemu_img::run(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &image.to_string_lossy(),
        &out.to_string_lossy(),
    ])?;
    let file = std::fs::File::open(&out)?;
    let mut back = vec![0u8; data.len()];
    file.read_exact_at(&mut back, 5 << 20)?;
    assert!(back == data, "qemu-img reads other data");
    Ok(())
}

/// Broken metadata found while serving (an L2 entry with reserved bits set) fails the
/// requests that need it with IOERR, logged at a bounded rate; the rest of the disk is served
/// and the image file is not touched.
#[test]
fn qcow2_metadata_error_at_run_time_fails_requests_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = pattern(SIZE as usize, 0x11);
    let raw = raw_file(dir.path(), "source.raw", &model)?;
    let image = dir.path().join("broken.qcow2");
    qemu_img::run(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &raw.to_string_lossy(),
        &image.to_string_lossy(),
    ])?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)?;
    let mut l1 = [0u8; 8];
    file.read_exact_at(&mut l1, 40)?;
    let l1 = u64::from_be_bytes(l1);
    // With 4 KiB clusters an L2 table maps 2 MiB: the first entry of the second table gets
    // reserved bits set (the cluster at 2 MiB).
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, l1 + 8)?;
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    file.write_all_at(&((1u64 << 63) | 0x1234).to_be_bytes(), l2)?;
    drop(file);
    let mut daemon = start(&image, &[])?;
    let mut client = Client::connect(&daemon.socket, 1)?;
    let before = checksum(&image)?;
    let buf = client.buf(0, 4096);
    for _ in 0..50 {
        let q = &mut client.queues[0];
        q.read(2 << 20, buf, 4096, 0, ReqFlags::empty());
        assert_ne!(
            wait_one(q)?,
            0,
            "a read through a broken L2 table succeeded"
        );
    }
    client.copy_in(0, &[0xff; 4096]);
    let q = &mut client.queues[0];
    q.write(2 << 20, buf, 4096, 0, ReqFlags::empty());
    assert_ne!(
        wait_one(q)?,
        0,
        "a write through a broken L2 table succeeded"
    );
    // Elsewhere the disk is served.
    q.read(9 << 20, buf, 4096, 0, ReqFlags::empty());
    assert_eq!(wait_one(q)?, 0);
    assert!(client.copy_out(0, 4096) == model[9 << 20..(9 << 20) + 4096]);
    assert_eq!(
        checksum(&image)?,
        before,
        "a failed request changed the image"
    );
    drop(client);
    assert!(daemon.terminate()?.success());
    let log = daemon.log_text();
    let lines = log.lines().filter(|l| l.contains("failed:")).count();
    assert!(
        (1..=12).contains(&lines),
        "{lines} error lines for 51 failures:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// A driver without FLUSH gets a write-through device: every write, allocating ones included,
/// is durable (data and the metadata that maps it) when it completes. Killed right after, the
/// daemon leaves an image that `qemu-img check` finds clean and that holds every write.
#[test]
fn qcow2_write_through_without_flush_survives_sigkill() -> Result<()> {
    kill_after_scattered_writes(false)
}

/// With the write cache on, writes that allocate L2 tables (scattered, 4 KiB clusters: one L2
/// table per 2 MiB) and then SIGKILL: no L1 entry may point at a cluster whose refcount never
/// reached the file (imago writes L1 entries at once, refcounts later).
#[test]
fn qcow2_new_l2_tables_survive_sigkill_with_the_write_cache_on() -> Result<()> {
    kill_after_scattered_writes(true)
}

fn kill_after_scattered_writes(writeback: bool) -> Result<()> {
    use vhost_user_tests::{Buf, Negotiate, TestVmm};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    let (_dir, image) = fresh("cluster_size=4096")?;
    let mut daemon = start(&image, &[])?;
    let negotiate = Negotiate {
        features: if writeback {
            u64::MAX
        } else {
            !VIRTIO_BLK_F_FLUSH
        },
        ..Negotiate::default()
    };
    let mut vmm = TestVmm::connect(&daemon.socket, 64 << 20, 1, 256, negotiate)?;
    assert_eq!(vmm.acked_features & VIRTIO_BLK_F_FLUSH != 0, writeback);
    let data = vmm.ram.alloc(8192, 512);
    // Scattered sectors: each write allocates a cluster (and, far apart, L2 tables).
    let sectors: Vec<u64> = (0..24u64).map(|i| i * 5003 % (SIZE / 512 - 16)).collect();
    for (n, &sector) in sectors.iter().enumerate() {
        vmm.ram.write(data, &pattern(8192, n as u8))?;
        let status = vmm.blk_request(
            VIRTIO_BLK_T_OUT,
            sector,
            Buf::readable(data, 8192),
            Duration::from_secs(10),
        )?;
        assert_eq!(status, 0, "write {n}: status");
    }
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    let _ = daemon.child.wait();
    drop(vmm);
    let report = qemu_img::check(&image, writeback)?;
    assert!(!report.contains("ERROR"), "{report}");
    if writeback {
        // Unflushed writes may be lost: only consistency is promised.
        return Ok(());
    }
    assert!(!report.contains("Leaked"), "{report}");
    let flat = image.with_extension("raw");
    qemu_img::convert_to_raw(&image, &flat)?;
    let file = std::fs::File::open(&flat)?;
    for (n, &sector) in sectors.iter().enumerate() {
        let mut back = vec![0u8; 8192];
        file.read_exact_at(&mut back, sector * 512)?;
        // Later writes may overlap earlier ones: check the bytes no later write covered.
        let later: Vec<u64> = sectors[n + 1..].to_vec();
        for (i, chunk) in back.chunks(512).enumerate() {
            let s = sector + i as u64;
            if later.iter().any(|&l| (l..l + 16).contains(&s)) {
                continue;
            }
            let expected = &pattern(8192, n as u8)[i * 512..(i + 1) * 512];
            assert!(chunk == expected, "write {n}, sector {s}: lost in the kill");
        }
    }
    Ok(())
}
