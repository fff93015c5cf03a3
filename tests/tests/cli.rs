//! Operator-facing behaviour of the daemons' command lines: capabilities, errors, signals.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use vhost_user_tests::{run_to_exit, Daemon, Result};

#[test]
fn blk_prints_capabilities() -> Result<()> {
    let (code, out, _) = run_to_exit("vhost-user-blk", &["--print-capabilities"])?;
    assert_eq!(code, 0);
    assert!(out.contains("\"type\": \"block\""), "{out}");
    assert!(
        out.contains("read-only") && out.contains("blk-file"),
        "{out}"
    );
    Ok(())
}

fn one_line_error(args: &[&str], expect: &str) -> Result<()> {
    let (code, _, err) = run_to_exit("vhost-user-blk", args)?;
    assert_ne!(code, 0, "{args:?} succeeded");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in {err:?}"
    );
    assert!(lines.len() <= 4, "{args:?}: error is not short: {err}");
    Ok(())
}

#[test]
fn blk_set_up_errors_are_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s.sock");
    let sock = sock.to_string_lossy();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20])?;
    let img = img.to_string_lossy();
    one_line_error(&["--file", &img], "--socket-path")?;
    one_line_error(&["--socket-path", &sock], "--file")?;
    one_line_error(
        &["--socket-path", &sock, "--fd", "3", "--file", &img],
        "exclusive",
    )?;
    one_line_error(
        &["--socket-path", &sock, "--file", "/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    )?;
    one_line_error(
        &["--socket-path", &sock, "--file", &img, "--queue-size", "3"],
        "--queue-size",
    )?;
    one_line_error(
        &["--socket-path", &sock, "--file", &img, "--bogus"],
        "--bogus",
    )?;
    one_line_error(
        &[
            "--socket-path",
            &sock,
            "--file",
            &img,
            "--poll-us",
            "5000000",
        ],
        "--poll-us",
    )?;
    one_line_error(
        &["--socket-path", "/nonexistent-dir/s.sock", "--file", &img],
        "/nonexistent-dir/s.sock",
    )?;
    one_line_error(
        &[
            "--socket-path",
            &sock,
            "--file",
            &img,
            "--socket-group",
            "no-such-group-x",
        ],
        "no-such-group-x",
    )?;
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"")?;
    one_line_error(
        &["--socket-path", &sock, "--file", &empty.to_string_lossy()],
        "empty",
    )?;
    // A socket another process is serving.
    let busy = dir.path().join("busy.sock");
    let _live = UnixListener::bind(&busy)?;
    one_line_error(
        &["--socket-path", &busy.to_string_lossy(), "--file", &img],
        "already serving",
    )?;
    Ok(())
}

/// A qcow2 image the daemon must refuse: exactly one line, in the daemon's error format,
/// naming the problem, and a non-zero exit.
fn qcow2_refused(image: &std::path::Path, extra: &[&str], expect: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s.sock");
    let (sock, image_s) = (sock.to_string_lossy(), image.to_string_lossy());
    let mut args = vec![
        "--socket-path",
        &sock,
        "--file",
        &image_s,
        "--format",
        "qcow2",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = run_to_exit("vhost-user-blk", &args)?;
    assert_ne!(code, 0, "{image_s} was served");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{image_s}: not one line: {err}");
    assert!(
        lines[0].starts_with("vhost-user-blk: error: ") && lines[0].contains(expect),
        "{image_s}: expected {expect:?} in {err:?}"
    );
    Ok(())
}

/// Overwrites `bytes` at `offset` in `path` (to damage a header).
fn patch(path: &std::path::Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all_at(bytes, offset)?;
    Ok(())
}

#[test]
fn blk_qcow2_start_up_errors_are_one_clear_line() -> Result<()> {
    use vhost_user_tests::qemu_img;
    let dir = tempfile::tempdir()?;
    let at = |name: &str| dir.path().join(name);
    let size = "64M";
    // A raw disk is never taken for qcow2.
    std::fs::write(at("plain.raw"), vec![0u8; 1 << 20])?;
    qcow2_refused(&at("plain.raw"), &[], "not a qcow2 image")?;
    // A missing backing file: its resolved name and the reason.
    let top = at("top.qcow2");
    qemu_img::run(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.raw",
            "-F",
            "raw",
        ]
        .iter()
        .copied()
        .chain([top.to_string_lossy().as_ref(), size])
        .collect::<Vec<_>>(),
    )?;
    let missing = at("missing.raw");
    qcow2_refused(&top, &[], &format!("backing file {}", missing.display()))?;
    qcow2_refused(&top, &[], "No such file")?;
    // A backing file whose format is not recorded: refused, not probed (the header extension
    // that records it is renamed to an unknown one, which readers skip).
    std::fs::write(&missing, vec![0u8; 64 << 20])?;
    let mut header = std::fs::read(&top)?;
    header.truncate(4096);
    let ext = header
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .ok_or("no backing format extension in the header")?;
    patch(&top, ext as u64, &[0x12, 0x34, 0x56, 0x78])?;
    qcow2_refused(&top, &[], "--backing-format")?;
    // Unsupported features.
    for (name, options, expect) in [
        (
            "enc.qcow2",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "qcow2 encryption",
        ),
        ("extl2.qcow2", "extended_l2=on", "extended L2"),
        ("zstd.qcow2", "compression_type=zstd", "zstd"),
        ("ext.qcow2", "data_file=ext.data", "external data file"),
    ] {
        let image = at(name);
        qemu_img::run(&[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=x",
            "-f",
            "qcow2",
            "-o",
            options,
            &image.to_string_lossy(),
            size,
        ])?;
        qcow2_refused(&image, &[], expect)?;
    }
    // Corrupt metadata: an unaligned L1 table, a refcount table in the header's cluster.
    let bad_l1 = at("bad-l1.qcow2");
    qemu_img::create(&bad_l1, 64 << 20, "")?;
    patch(&bad_l1, 40, &0x12345u64.to_be_bytes())?;
    qcow2_refused(&bad_l1, &[], "corrupt or unreadable qcow2 image")?;
    let bad_rt = at("bad-rt.qcow2");
    qemu_img::create(&bad_rt, 64 << 20, "")?;
    patch(&bad_rt, 48, &0x100u64.to_be_bytes())?;
    qcow2_refused(&bad_rt, &[], "corrupt or unreadable qcow2 image")?;
    // Marked corrupt by QEMU: repair first.
    let marked = at("marked.qcow2");
    qemu_img::create(&marked, 64 << 20, "")?;
    patch(&marked, 72, &2u64.to_be_bytes())?;
    qcow2_refused(&marked, &[], "qemu-img check -r all")?;
    Ok(())
}

#[test]
fn blk_socket_mode_and_clean_exit_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20])?;
    let img_s = img.to_string_lossy().into_owned();
    let mut d = Daemon::start("vhost-user-blk", &["--file", &img_s])?;
    assert_eq!(
        std::fs::metadata(&d.socket)?.permissions().mode() & 0o777,
        0o600
    );
    let status = d.terminate()?;
    assert!(status.success(), "exit status {status}");
    assert!(!d.socket.exists(), "socket file left behind");
    let mut d = Daemon::start(
        "vhost-user-blk",
        &["--file", &img_s, "--socket-mode", "0660"],
    )?;
    assert_eq!(
        std::fs::metadata(&d.socket)?.permissions().mode() & 0o777,
        0o660
    );
    assert!(d.terminate()?.success());
    Ok(())
}

#[test]
fn blk_serves_an_inherited_listening_socket() -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20])?;
    let sock = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&sock)?;
    let fd = listener.as_raw_fd();
    // Clear close-on-exec so the child inherits the socket under the same number.
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    let mut child = Command::new(vhost_user_tests::binary("vhost-user-blk"))
        .args(["--fd", &fd.to_string(), "--file", &img.to_string_lossy()])
        .stdin(Stdio::null())
        .spawn()?;
    drop(listener);
    let vmm = vhost_user_tests::TestVmm::connect(
        &sock,
        16 << 20,
        1,
        64,
        vhost_user_tests::Negotiate::default(),
    );
    let _ = child.kill();
    let _ = child.wait();
    let vmm = vmm?;
    assert!(vmm.offered_features & vhost_user_tests::VIRTIO_F_VERSION_1 != 0);
    Ok(())
}

/// Under journald (`JOURNAL_STREAM` names stderr), the fatal line carries priority 3 (err);
/// on any other stderr it is unchanged.
#[test]
fn fatal_line_has_the_err_priority_only_under_journald() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s.sock");
    let missing = dir.path().join("missing.img");
    let args = [
        "--file",
        missing.to_str().unwrap_or_default(),
        "--socket-path",
        sock.to_str().unwrap_or_default(),
    ];
    let stderr = dir.path().join("stderr");
    let file = std::fs::File::create(&stderr)?;
    let meta = file.metadata()?;
    let status = std::process::Command::new(vhost_user_tests::binary("vhost-user-blk"))
        .args(args)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .status()?;
    assert!(!status.success());
    let text = std::fs::read_to_string(&stderr)?;
    assert!(
        text.starts_with("<3>vhost-user-blk: error: ") && text.contains("missing.img"),
        "{text:?}"
    );
    // Any other stderr (a pipe here, whatever JOURNAL_STREAM says): no prefix.
    let (code, _, err) = run_to_exit("vhost-user-blk", &args)?;
    assert_ne!(code, 0);
    assert!(err.starts_with("vhost-user-blk: error: "), "{err:?}");
    Ok(())
}
