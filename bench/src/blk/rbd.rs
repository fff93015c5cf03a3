//! RBD cases (`--backing rbd`): ours (`--rbd`) against qemu-storage-daemon's `rbd` driver, both
//! on the same image of a throwaway one-monitor, one-OSD memstore cluster on 127.0.0.1
//! (`vhost_user_tests::ceph`), driven by the same blkio client, one queue. The image is filled
//! with non-zero data first (reads of unwritten RADOS objects cost nothing).
//!
//! Both go through librbd with its cache as configured by default (qsd's `cache.direct=off`
//! turns `rbd_cache` on; ours leaves librbd's settings alone, which is the same); they take
//! the image's exclusive lock from each other once per case, with a write before the case is
//! measured.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vhost_user_tests::ceph::{self, Cluster};

use super::client::Client;
use super::measure::{Rng, Workload, WORKLOADS};
use super::peer::{program_version, Backend};
use super::{summary, OURS, PEER};
use crate::report::{Result, Table};
use crate::Options;

/// 4 KiB random at QD 1 and 32 (as for files), and 1 MiB sequential at QD 2 (the client's
/// buffers per queue hold 2 MiB).
fn workloads() -> Vec<Workload> {
    let mut list: Vec<Workload> = WORKLOADS
        .iter()
        .filter(|w| !w.sequential)
        .copied()
        .collect();
    for (name, write) in [("1m read qd2", false), ("1m write qd2", true)] {
        list.push(Workload {
            name,
            write,
            sequential: true,
            block_size: 1 << 20,
            depth: 2,
        });
    }
    list
}

/// Whether our binary was built with `--rbd` (the `rbd` feature).
fn ours_has_rbd(ours: &Path) -> bool {
    Command::new(ours)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--rbd"))
}

/// Runs the RBD cases and prints their table, or says why they are skipped.
pub(super) fn run(opts: &Options, ours_bin: &Path, with_qsd: bool) -> Result<()> {
    let cases: Vec<Workload> = workloads()
        .into_iter()
        .filter(|w| opts.selected(&format!("{} 1q rbd", w.name)))
        .collect();
    if cases.is_empty() {
        return Ok(());
    }
    if !ceph::installed() {
        eprintln!("blk: Ceph (ceph-mon, ceph-osd, ceph-common) is not installed; skipping rbd");
        return Ok(());
    }
    if !ours_has_rbd(ours_bin) {
        eprintln!(
            "blk: {} was built without the rbd feature; skipping rbd",
            ours_bin.display()
        );
        return Ok(());
    }
    let size: u64 = if opts.quick { 64 << 20 } else { 512 << 20 };
    let cluster = Cluster::start()?;
    let file = cluster.dir().join("fill");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let mut rng = Rng::new(0xf111);
        for _ in 0..size / 8 {
            out.write_all(&(rng.next() | 1).to_le_bytes())?;
        }
    }
    let spec = format!("{}/bench", ceph::POOL);
    cluster.rbd(&["import", "--no-progress", &file.to_string_lossy(), &spec])?;
    std::fs::remove_file(&file)?;
    let title = format!(
        "blk on RBD ({} MiB image, one-OSD memstore cluster on 127.0.0.1): {OURS} --rbd vs {} \
         (driver=rbd, iothread); blkio driver, one queue, {} s per case",
        size >> 20,
        program_version(PEER),
        opts.case_duration().as_secs_f64()
    );
    eprintln!("{title}");
    let mut backends = Vec::new();
    let mut ours = Command::new(ours_bin);
    ours.arg("--rbd")
        .arg(&spec)
        .arg("--rbd-conf")
        .arg(cluster.conf())
        .arg("--rbd-keyring")
        .arg(cluster.keyring());
    let mut backend = Backend::start(OURS.to_string(), ours, |c, socket| {
        c.arg("--socket-path").arg(socket);
    })?;
    backend
        .daemon
        .wait_for_log("librbd engine", Duration::from_secs(60))?;
    backends.push(backend);
    if with_qsd {
        let qsd = Command::new(PEER);
        let conf = cluster.conf().display().to_string();
        backends.push(Backend::start(PEER.to_string(), qsd, |c, socket| {
            c.arg("--blockdev")
                .arg(format!(
                    "driver=rbd,node-name=r,pool={},image=bench,conf={conf},user=admin",
                    ceph::POOL
                ))
                .arg("--object")
                .arg("iothread,id=iot0")
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path={},\
                     writable=on,num-queues=1,iothread=iot0",
                    socket.display()
                ));
        })?);
    }
    let mut rng = Rng::new(0x5eed);
    let mut served = Vec::new();
    for backend in backends {
        let mut client = Client::connect(&backend.daemon.socket, 1)
            .map_err(|e| format!("{}: connecting: {e}{}", backend.name, backend.log_tail()))?;
        client
            .round_trip(size, &mut rng)
            .map_err(|e| format!("{}: correctness check: {e}", backend.name))?;
        served.push((backend, client));
    }
    let mut table = Table::new(&title, OURS);
    for (index, w) in cases.iter().enumerate() {
        let case = format!("{} 1q rbd", w.name);
        let mut order: Vec<usize> = (0..served.len()).collect();
        if index % 2 == 1 {
            order.reverse();
        }
        let mut results = Vec::new();
        for i in order {
            let (backend, client) = &mut served[i];
            // One write first: the image's exclusive lock comes over from the other daemon
            // before the measured interval, not in it.
            client
                .round_trip(size, &mut rng)
                .map_err(|e| format!("{case}: {}: {e}", backend.name))?;
            let m = client
                .measure(w, size, backend.pid(), opts.case_duration())
                .map_err(|e| format!("{case}: {}: {e}{}", backend.name, backend.log_tail()))?;
            backend.check_alive()?;
            results.push((backend.name.clone(), m));
        }
        results.sort_by_key(|(name, _)| name != OURS);
        for (name, m) in results {
            table.push(&case, &name, m);
        }
    }
    for (backend, client) in served {
        drop(client);
        drop(backend);
    }
    table.print();
    println!("{}", summary(&table));
    Ok(())
}
