//! Each daemon started with its defaults runs sandboxed and under seccomp while it serves I/O
//! through its socket: `/proc/PID/status` shows a seccomp filter (`Seccomp: 2`), NoNewPrivs and
//! no capabilities, its root is not the host's, and SIGTERM still ends it cleanly (exit 0,
//! socket removed from inside the sandbox). With `--sandbox none --seccomp none` none of that
//! holds, which shows the checks can fail.
//!
//! Needs root (namespaces; net's tap).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost_user_tests::netns::Netns;
use vhost_user_tests::*;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const RAM: u64 = 64 << 20;
const T: Duration = Duration::from_secs(10);

/// What /proc says about a daemon's confinement.
#[derive(Debug, PartialEq, Eq)]
struct Confinement {
    seccomp: String,
    no_new_privs: String,
    cap_eff: String,
    cap_bnd: String,
    own_root: bool,
}

fn confinement(d: &Daemon) -> Result<Confinement> {
    let pid = d.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let theirs = std::fs::metadata(format!("/proc/{pid}/root/"))?;
    let ours = std::fs::metadata("/")?;
    Ok(Confinement {
        seccomp: field("Seccomp:"),
        no_new_privs: field("NoNewPrivs:"),
        cap_eff: field("CapEff:"),
        cap_bnd: field("CapBnd:"),
        own_root: (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()),
    })
}

fn confined() -> Confinement {
    Confinement {
        seccomp: "2".into(),
        no_new_privs: "1".into(),
        cap_eff: "0000000000000000".into(),
        cap_bnd: "0000000000000000".into(),
        own_root: true,
    }
}

/// SIGTERM ends the daemon with status 0 and its socket file is gone.
fn terminates_cleanly(mut d: Daemon) -> Result<()> {
    let status = d.terminate()?;
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    assert!(!d.socket.exists(), "socket left behind:\n{}", d.log_text());
    assert!(!d.log_text().contains("audit"), "{}", d.log_text());
    Ok(())
}

/// One 4 KiB write and read back through virtio-blk queue 0.
fn blk_write_read(d: &Daemon) -> Result<()> {
    let mut vmm = TestVmm::connect(&d.socket, RAM, 1, 64, Negotiate::default())?;
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let buf = vmm.ram.alloc(4096, 512);
    vmm.ram.write(buf, &data)?;
    let status = vmm.blk_request(VIRTIO_BLK_T_OUT, 8, Buf::readable(buf, 4096), T)?;
    assert_eq!(status, 0, "write status");
    let back = vmm.ram.alloc(4096, 512);
    let status = vmm.blk_request(VIRTIO_BLK_T_IN, 8, Buf::writable(back, 4096), T)?;
    assert_eq!(status, 0, "read status");
    assert!(vmm.ram.read(back, 4096)? == data, "read back differs");
    Ok(())
}

fn blk_disk() -> Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    file.as_file().set_len(16 << 20)?;
    Ok(file)
}

#[test]
fn blk_serves_io_sandboxed_and_filtered_by_default() -> Result<()> {
    let disk = blk_disk()?;
    let d = Daemon::start(
        "vhost-user-blk",
        &["--file", &disk.path().to_string_lossy()],
    )?;
    blk_write_read(&d)?;
    // A second connection: worker threads (and blk's copy pool) start again under the filter.
    blk_write_read(&d)?;
    assert_eq!(confinement(&d)?, confined(), "{}", d.log_text());
    terminates_cleanly(d)
}

#[test]
fn without_sandbox_and_seccomp_nothing_is_confined() -> Result<()> {
    let disk = blk_disk()?;
    let path = disk.path().to_string_lossy();
    let d = Daemon::start(
        "vhost-user-blk",
        &["--file", &path, "--sandbox", "none", "--seccomp", "none"],
    )?;
    blk_write_read(&d)?;
    let c = confinement(&d)?;
    assert_eq!(c.seccomp, "0");
    assert!(!c.own_root);
    // Capabilities are dropped whatever the sandbox mode.
    assert_eq!(c.cap_eff, "0000000000000000");
    terminates_cleanly(d)
}

#[test]
fn blk_runs_as_another_user() -> Result<()> {
    let disk = blk_disk()?;
    let path = disk.path().to_string_lossy();
    let d = Daemon::start("vhost-user-blk", &["--file", &path, "--user", "nobody"])?;
    blk_write_read(&d)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id()))?;
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    let nobody = nix::unistd::User::from_name("nobody")?.ok_or("no user nobody")?;
    let want = nobody.uid.as_raw().to_string();
    assert!(uid.split_whitespace().skip(1).all(|id| id == want), "{uid}");
    assert_eq!(confinement(&d)?, confined(), "{}", d.log_text());
    // The socket's directory (a root-only temporary directory) is not nobody's: the socket
    // stays behind, the exit is still clean.
    let mut d = d;
    let status = d.terminate()?;
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    Ok(())
}

#[test]
fn unprivileged_blk_sandboxes_itself_in_a_user_namespace() -> Result<()> {
    // Hosts (or containers) that forbid unprivileged user namespaces: nothing to test.
    let allowed = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["unshare", "--user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !allowed {
        eprintln!("unprivileged user namespaces not allowed here; skipped");
        return Ok(());
    }
    let disk = blk_disk()?;
    std::fs::set_permissions(
        disk.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )?;
    let path = disk.path().to_string_lossy();
    // Started as nobody without capabilities; the socket's directory is made nobody's first
    // ($3 is the socket path the fixture passes).
    let prefix = [
        "sh",
        "-c",
        "chmod 0777 \"${3%/*}\" && exec setpriv --reuid=nobody --regid=nogroup \
         --clear-groups --inh-caps=-all --bounding-set=-all \"$@\"",
        "sh",
    ];
    let d = Daemon::start_with_prefix(&prefix, "vhost-user-blk", &["--file", &path])?;
    blk_write_read(&d)?;
    assert!(
        d.log_text()
            .contains("sandbox: user and namespaces entered"),
        "{}",
        d.log_text()
    );
    assert_eq!(confinement(&d)?, confined(), "{}", d.log_text());
    terminates_cleanly(d)
}

#[test]
fn chroot_mode_and_log_mode() -> Result<()> {
    let disk = blk_disk()?;
    let path = disk.path().to_string_lossy();
    let mut d = Daemon::start(
        "vhost-user-blk",
        &["--file", &path, "--sandbox", "chroot", "--seccomp", "log"],
    )?;
    blk_write_read(&d)?;
    let c = confinement(&d)?;
    assert_eq!((c.seccomp.as_str(), c.own_root), ("2", true));
    // In a chroot the socket can't be removed at exit; the exit itself is clean.
    let status = d.terminate()?;
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    Ok(())
}

#[test]
fn console_serves_a_unix_endpoint_sandboxed_and_filtered_by_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let endpoint = dir.path().join("console.sock");
    let d = Daemon::start(
        "vhost-user-console",
        &["--unix", &endpoint.to_string_lossy()],
    )?;
    let deadline = Instant::now() + T;
    let mut client = loop {
        match UnixStream::connect(&endpoint) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    client.set_read_timeout(Some(T))?;
    // Multiport off: port 0's transmit queue is queue 1.
    let negotiate = Negotiate {
        features: !(1u64 << 1),
        ..Negotiate::default()
    };
    let mut vmm = TestVmm::connect(&d.socket, RAM, 2, 64, negotiate)?;
    let gpa = vmm.ram.alloc(32, 8);
    vmm.ram.write(gpa, b"out of the sandbox")?;
    let (ram, q) = vmm.queue(1);
    q.submit(ram, &[Buf::readable(gpa, 18)])?;
    q.wait_used(ram, 1, T)?;
    let mut got = [0u8; 18];
    client.read_exact(&mut got)?;
    assert_eq!(&got, b"out of the sandbox");
    assert_eq!(confinement(&d)?, confined(), "{}", d.log_text());
    terminates_cleanly(d)?;
    // The endpoint socket the console created is removed at exit too (its directory is kept
    // visible in the sandbox for that).
    assert!(!endpoint.exists());
    Ok(())
}

#[test]
fn net_serves_its_tap_sandboxed_and_filtered_by_default() -> Result<()> {
    netns::require_root("net sandbox test")?;
    let ns = Netns::new("vun-sbx")?;
    let d = Daemon::start_with_prefix(
        &ns.prefix(),
        "vhost-user-net",
        &["--tap", "vusbx0", "--queue-pairs", "2", "--up"],
    )?;
    let sock = netns::packet_socket(
        &ns.name,
        "vusbx0",
        libc::ETH_P_ALL as u16,
        libc::SOCK_NONBLOCK,
    )?;
    let mut vmm = TestVmm::connect(&d.socket, RAM, 4, 64, Negotiate::default())?;
    // One frame on each pair's transmit queue (the second pair's tap queue is attached with
    // TUNSETQUEUE after the sandbox is up).
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    frame.extend_from_slice(b"sandboxed frame payload.......................");
    for tx in [1, 3] {
        let gpa = vmm.ram.alloc(frame.len() as u64, 8);
        vmm.ram.write(gpa, &frame)?;
        let (ram, q) = vmm.queue(tx);
        q.submit(ram, &[Buf::readable(gpa, frame.len() as u32)])?;
        q.wait_used(ram, 1, T)?;
    }
    let mut seen = 0;
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 2048];
    let mut file = std::fs::File::from(sock);
    while seen < 2 && Instant::now() < deadline {
        match file.read(&mut buf) {
            Ok(n) if buf[..n] == frame[12..] => seen += 1,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(seen, 2, "frames on the tap");
    let c = confinement(&d)?;
    // net keeps the host's network namespace, everything else is as for the others.
    assert_eq!(c, confined(), "{}", d.log_text());
    terminates_cleanly(d)
}
