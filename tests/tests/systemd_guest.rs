//! The .deb under a real systemd: a Debian 12 guest (QEMU, TCG) boots with systemd as PID 1,
//! installs the package and uses the three daemons through their socket units as an operator
//! would (tests/tests/systemd_guest.sh): socket activation, readiness, reconnects, restarts,
//! crash restarts, stops, the read-only paths seen from inside the services' mount
//! namespaces, the unprivileged user and its capabilities, journal priorities, the console's
//! file modes, a misconfigured instance, purge, and `systemd-analyze security`.
//!
//! Needs root, `qemu-system-x86_64`, `debootstrap`, `mkfs.ext4`, `busybox`, a reachable
//! Debian mirror the first time (the image is cached under `<target>/systemd-guest/`), and the
//! .deb from `cargo xtask deb`. The evidence of each run is kept in
//! `<target>/e2e-logs/systemd_guest/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vhost_user_tests::guest::target_dir;
use vhost_user_tests::netns::require_root;
use vhost_user_tests::qemu::{GuestOutput, Logs};
use vhost_user_tests::systemd_guest::{cache_dir, make_payload, SystemdGuest};
use vhost_user_tests::Result;

const SCRIPT: &str = include_str!("systemd_guest.sh");
const TIMEOUT: Duration = Duration::from_secs(900);

/// The .deb `cargo xtask deb` built: `<target>/debian/vhost-user-daemons_*.deb`.
fn deb() -> Result<PathBuf> {
    let dir = target_dir().join("debian");
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("vhost-user-daemons_{version}_")) && n.ends_with(".deb")
            })
        })
        .ok_or_else(|| {
            format!(
                "no vhost-user-daemons_{version}_*.deb in {}: run `cargo xtask deb` first \
                 (scripts/test.sh does)",
                dir.display()
            )
            .into()
        })
}

/// What each key must be; `None`: a check of its own below.
fn expected() -> BTreeMap<&'static str, &'static str> {
    let ok = [
        "install",
        "user",
        "kvm_group",
        "enable",
        "blk_io",
        "blk_reconnect",
        "blk_same_pid",
        "blk_io_uring",
        "blk_run_writable",
        "blk_run_test_w",
        "blk_etc_writable",
        "blk_images_writable",
        "blk_restart",
        "blk_restart_pid",
        "blk_after_restart",
        "blk_after_crash",
        "blk_stop",
        "blk_reactivated",
        "console_start",
        "console_vhost_user",
        "console_operator",
        "console_operator_connects",
        "console_operator_reads_log",
        "console_nobody_connects",
        "console_nobody_reads_log",
        "console_run_writable",
        "net_connect",
        "net_run_writable",
        "net_io_uring",
        "bad_fixed",
        "purge",
    ];
    let mut expected: BTreeMap<&str, &str> = ok.iter().map(|k| (*k, "ok")).collect();
    expected.extend([
        ("pid1", "systemd"),
        // Activation: nothing runs before the first frontend.
        ("blk_before", "inactive"),
        ("blk_after", "active"),
        ("blk_socket_mode", "660 root kvm"),
        ("blk_type", "notify"),
        ("blk_user", "vhost-user"),
        ("blk_caps", "0000000000000000"),
        ("blk_netns", "private"),
        ("blk_own_timestamps", "0"),
        ("blk_crash_restarts", "1"),
        ("blk_stopped", "inactive"),
        ("blk_socket_after_stop", "active"),
        ("console_endpoint_mode", "660 vhost-user kvm"),
        ("console_log_mode", "640 vhost-user kvm"),
        ("console_user", "vhost-user"),
        ("net_active", "active"),
        ("net_tap", "present"),
        ("net_user", "vhost-user"),
        // CAP_NET_ADMIN (bit 12) and nothing else.
        // CAP_NET_ADMIN creates the tap; the daemon drops it before serving.
        ("net_caps", "0000000000000000"),
        // A misconfigured instance fails without restarting and keeps its socket.
        ("bad_socket", "active"),
        ("bad_service", "failed"),
        ("bad_restarts", "0"),
        ("purge_links", "0"),
        ("purge_not_found", "0"),
        ("done", "1"),
    ]);
    expected
}

fn check(out: &GuestOutput) -> Vec<String> {
    let mut failures = Vec::new();
    for (key, want) in expected() {
        match out.get(key) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("{key}: expected {want:?}, got {got:?}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    // Priorities: the warning at 4, info at 6; the fatal line at 3 (err) with its fix.
    // bad_attempts: several connections each started (and failed) the bad instance, and
    // its socket was still there for the next one.
    for (key, least) in [
        ("blk_warn_priority", 1),
        ("blk_info_priority", 1),
        ("bad_attempts", 2),
        // The enabled d0, c0, n0 and bad sockets: what purge has to remove.
        ("links_before_purge", 4),
    ] {
        if !out.get_u64(key).is_ok_and(|n| n >= least) {
            failures.push(format!("{key}: {:?}", out.get(key).ok()));
        }
    }
    let err = out.get("bad_err_line").unwrap_or_default();
    if !(err.contains("os error 30")
        && err.contains("ReadWritePaths=")
        && err.contains("systemctl edit vhost-user-blk@bad.service"))
    {
        failures.push(format!(
            "bad_err_line: no err-priority error line naming the fix: {err:?}"
        ));
    }
    for (daemon, limit) in [("blk", 2.0), ("console", 2.0), ("net", 2.5)] {
        let key = format!("security_vhost-user-{daemon}");
        match out.get_f64(&key) {
            Ok(exposure) if exposure <= limit => {}
            other => failures.push(format!("{key}: {other:?}, more than {limit}")),
        }
    }
    failures
}

#[test]
fn the_package_under_systemd() {
    let started = Instant::now();
    let logs = match Logs::new("systemd_guest") {
        Ok(logs) => logs,
        Err(e) => panic!("cannot create the log directory: {e}"),
    };
    let result = (|| -> Result<GuestOutput> {
        require_root("the systemd guest test")?;
        let guest = SystemdGuest::build(&cache_dir())?;
        let deb = deb()?;
        let payload_dir = tempfile::tempdir()?;
        fs::write(payload_dir.path().join("run.sh"), SCRIPT)?;
        fs::copy(&deb, payload_dir.path().join("vhost-user-daemons.deb"))?;
        fs::copy(
            env!("CARGO_BIN_EXE_vhost-user-probe"),
            payload_dir.path().join("vhost-user-probe"),
        )?;
        let payload = logs.path("payload.img");
        make_payload(payload_dir.path(), &payload)?;
        let serial = guest.run(&payload, &logs, TIMEOUT);
        let _ = fs::remove_file(&payload);
        Ok(GuestOutput::parse(&serial?))
    })();
    eprintln!("systemd guest: {:.1} s", started.elapsed().as_secs_f64());
    let out = match result {
        Ok(out) => out,
        Err(e) => panic!("systemd guest failed: {e}\n{}", logs.report()),
    };
    for (key, value) in &out.pairs {
        eprintln!("  {key}={value}");
    }
    let failures = check(&out);
    assert!(
        failures.is_empty(),
        "under systemd:\n  {}\n{}",
        failures.join("\n  "),
        logs.report()
    );
}
