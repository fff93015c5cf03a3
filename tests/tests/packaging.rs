//! What `dist/` ships: the systemd units (checked by `systemd-analyze verify` and against the
//! hardening they promise), the QEMU vhost-user descriptors (checked against each binary's
//! `--print-capabilities`), and socket activation with `Type=notify` readiness, end to end.
//! And what `cargo xtask` generates from the clap definitions: the man pages (every flag
//! `--help` lists, rendered by groff without a warning) and the shell completions.
//! The Debian package itself is checked in `deb.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_tests::{binary, run_to_exit, Negotiate, Result, TestVmm};

const DAEMONS: [&str; 3] = ["blk", "net", "console"];

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// `Key=value` lines of a unit file, every value of a key in order (comments skipped).
fn unit_settings(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("{}: not Key=value: {line}", path.display()))?;
        settings
            .entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    Ok(settings)
}

fn one<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{key}: expected exactly one setting, found {other:?}"),
    }
}

/// `systemd-analyze`, or a failure that says how to get it: the check must not skip silently.
fn systemd_analyze() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found in PATH: install Debian's `systemd` package (.ci/run does)"
        )
    })
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    let analyze = systemd_analyze();
    // `verify` wants an instance (not a template) and an ExecStart binary that exists: copy the
    // units as instance "test" next to each other, ExecStart pointing at the built binaries.
    let dir = tempfile::tempdir()?;
    let mut units = Vec::new();
    for daemon in DAEMONS {
        let name = format!("vhost-user-{daemon}");
        let source = dist().join("systemd");
        let service = std::fs::read_to_string(source.join(format!("{name}@.service")))?;
        let installed = format!("ExecStart=/usr/bin/{name} ");
        assert!(
            service.contains(&installed),
            "{name}@.service: no `{installed}`"
        );
        let built = format!("ExecStart={} ", binary(&name).display());
        let service_path = dir.path().join(format!("{name}@test.service"));
        std::fs::write(&service_path, service.replace(&installed, &built))?;
        let socket_path = dir.path().join(format!("{name}@test.socket"));
        std::fs::copy(source.join(format!("{name}@.socket")), &socket_path)?;
        units.push(service_path);
        units.push(socket_path);
    }
    let out = Command::new(&analyze)
        .arg("verify")
        .arg("--man=no")
        .args(&units)
        .current_dir(dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values, only warning: any output is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn units_declare_activation_notify_and_hardening() -> Result<()> {
    for daemon in DAEMONS {
        let name = format!("vhost-user-{daemon}");
        let dir = dist().join("systemd");
        let socket = unit_settings(&dir.join(format!("{name}@.socket")))?;
        assert_eq!(
            one(&socket, "ListenStream"),
            format!("/run/vhost-user/{daemon}/%i.sock")
        );
        assert_eq!(one(&socket, "SocketMode"), "0660");
        assert_eq!(one(&socket, "Accept"), "no");
        assert_eq!(one(&socket, "SocketGroup"), "kvm");
        // A failing daemon must not be retriggered at once by the client that started it.
        assert_eq!(one(&socket, "FlushPending"), "yes");

        let service = unit_settings(&dir.join(format!("{name}@.service")))?;
        let expected = [
            ("Type", "notify".to_string()),
            (
                "EnvironmentFile",
                format!("/etc/vhost-user/{daemon}/%i.conf"),
            ),
            ("ExecStart", format!("/usr/bin/{name} --sandbox none $ARGS")),
            ("Restart", "on-failure".to_string()),
            ("NoNewPrivileges", "yes".to_string()),
            ("ProtectSystem", "strict".to_string()),
            ("PrivateTmp", "yes".to_string()),
            ("ProtectHome", "yes".to_string()),
            ("LockPersonality", "yes".to_string()),
            ("MemoryDenyWriteExecute", "yes".to_string()),
            ("SystemCallArchitectures", "native".to_string()),
            // Set-up errors (1) and bad arguments (2) are not retried; the start limit is
            // above the rate of QEMU's reconnects, so the socket survives a bad instance.
            ("RestartPreventExitStatus", "1 2".to_string()),
            ("RestartSec", "1s".to_string()),
            ("StartLimitIntervalSec", "10s".to_string()),
            ("StartLimitBurst", "30".to_string()),
            // ProtectSystem=strict leaves /run writable next to ProtectKernelTunables.
            ("ReadOnlyPaths", "/run".to_string()),
            ("User", "vhost-user".to_string()),
            ("UMask", "0077".to_string()),
            ("ProtectProc", "invisible".to_string()),
            ("ProcSubset", "pid".to_string()),
            ("IPAddressDeny", "any".to_string()),
            ("PrivateIPC", "yes".to_string()),
            ("SystemCallErrorNumber", "EPERM".to_string()),
        ];
        for (key, value) in expected {
            assert_eq!(one(&service, key), value, "{name}@.service: {key}");
        }
        let filters = service.get("SystemCallFilter").cloned().unwrap_or_default();
        assert!(
            filters
                .first()
                .is_some_and(|f| f.starts_with("@system-service"))
                && filters.iter().any(|f| f == "~@privileged @resources"),
            "{name}@.service: SystemCallFilter {filters:?}"
        );
        let (capabilities, families, ambient, group) = match daemon {
            "net" => (
                "CAP_NET_ADMIN",
                "AF_UNIX AF_INET",
                "CAP_NET_ADMIN",
                "vhost-user",
            ),
            "console" => ("", "AF_UNIX AF_INET AF_INET6", "", "kvm"),
            _ => ("", "AF_UNIX", "", "vhost-user"),
        };
        assert_eq!(one(&service, "AmbientCapabilities"), ambient, "{name}");
        assert_eq!(one(&service, "Group"), group, "{name}");
        if daemon != "console" {
            // blk's I/O engine and net's transmit batches.
            for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
                assert!(filters[0].contains(call), "{daemon}: {call} not allowed");
            }
        }
        match daemon {
            "blk" => {
                assert_eq!(one(&service, "PrivateNetwork"), "yes");
                assert_eq!(one(&service, "ReadWritePaths"), "-/var/lib/vhost-user");
            }
            "console" => {
                assert_eq!(one(&service, "RuntimeDirectory"), "vhost-user/console/%i");
                assert_eq!(one(&service, "LogsDirectory"), "vhost-user");
                assert_eq!(one(&service, "IPAddressAllow"), "localhost");
            }
            _ => assert_eq!(one(&service, "DeviceAllow"), "/dev/net/tun rw"),
        }
        assert_eq!(
            one(&service, "CapabilityBoundingSet"),
            capabilities,
            "{name}@.service: CapabilityBoundingSet"
        );
        assert_eq!(
            one(&service, "RestrictAddressFamilies"),
            families,
            "{name}@.service: RestrictAddressFamilies"
        );
        // Room for the largest configuration (the unit's comment counts it), which systemd's
        // default of 1024 does not give blk or console.
        let need = match daemon {
            "net" => 620,
            "console" => 1300,
            _ => 1560,
        };
        let nofile: u64 = one(&service, "LimitNOFILE").parse()?;
        assert!(
            (need..=65536).contains(&nofile),
            "{name}@.service: LimitNOFILE={nofile}, needs at least {need}"
        );

        // The example instance configuration sets ARGS and leaves the socket to the .socket unit.
        let example = dist().join(format!("systemd/examples/{daemon}.conf"));
        let conf = unit_settings(&example)?;
        let args = one(&conf, "ARGS");
        assert!(
            !args.contains("--socket-path") && !args.contains("--fd"),
            "{}: ARGS must not name the socket: {args}",
            example.display()
        );
        // clap rejects an unknown flag before answering --print-capabilities.
        let mut argv: Vec<&str> = args.split_whitespace().collect();
        argv.push("--print-capabilities");
        let (code, _, err) = run_to_exit(&name, &argv)?;
        assert_eq!(code, 0, "{}: {name} rejects ARGS: {err}", example.display());
    }
    Ok(())
}

#[test]
fn qemu_descriptors_match_the_binaries() -> Result<()> {
    for (daemon, device_type) in [("blk", "block"), ("net", "net"), ("console", "console")] {
        let name = format!("vhost-user-{daemon}");
        let path = dist().join(format!("qemu/50-{name}.json"));
        let text = std::fs::read_to_string(&path)?;
        let descriptor: serde_json::Value = serde_json::from_str(&text)?;
        let object = descriptor
            .as_object()
            .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
        for key in object.keys() {
            assert!(
                ["description", "type", "binary", "tags"].contains(&key.as_str()),
                "{}: {key} is not a VhostUserBackend member",
                path.display()
            );
        }
        let description = descriptor["description"].as_str().unwrap_or_default();
        assert!(
            !description.is_empty(),
            "{}: no description",
            path.display()
        );
        assert_eq!(descriptor["type"], device_type, "{}", path.display());
        assert_eq!(
            descriptor["binary"],
            format!("/usr/bin/{name}"),
            "{}",
            path.display()
        );

        let (code, out, err) = run_to_exit(&name, &["--print-capabilities"])?;
        assert_eq!(code, 0, "{name} --print-capabilities: {err}");
        let capabilities: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(
            capabilities["type"],
            descriptor["type"],
            "{name}: --print-capabilities type differs from {}",
            path.display()
        );
    }
    Ok(())
}

/// A child killed (and reaped) when dropped, so a failed assertion leaves no daemon behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn blk_serves_a_socket_activated_listener_and_notifies_readiness() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    File::create(&image)?.set_len(1 << 20)?;
    let socket_path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket_path)?;
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(100)))?;
    let log = dir.path().join("daemon.log");

    // As systemd does: the listener as fd 3, LISTEN_FDS=1, and LISTEN_PID naming the daemon
    // itself (the shell's pid, kept by exec). No --socket-path and no --fd.
    let listen_fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(binary("vhost-user-blk"))
        .arg("--file")
        .arg(&image)
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(File::create(&log)?)
        .stderr(File::create(&log)?);
    // SAFETY: the hook runs in the forked child before exec and calls only dup2 and fcntl, which
    // are async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            if listen_fd == 3 {
                // dup2 onto itself keeps FD_CLOEXEC: clear it by hand.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listen_fd, 3) < 0 {
                // The copy dup2 makes does not have FD_CLOEXEC.
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(command.spawn()?);
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut message = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(20);
    let len = loop {
        match notify.recv(&mut message) {
            Ok(len) => break len,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                if let Some(status) = child.0.try_wait()? {
                    return Err(format!("daemon exited with {status}\n{}", daemon_log()).into());
                }
                if Instant::now() > deadline {
                    return Err(format!("no sd_notify message in 20 s\n{}", daemon_log()).into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let message = String::from_utf8_lossy(&message[..len]);
    assert!(
        message.lines().any(|line| line == "READY=1"),
        "notify message {message:?}\n{}",
        daemon_log()
    );

    let vmm =
        TestVmm::connect(&socket_path, 16 << 20, 1, 64, Negotiate::default()).map_err(|e| {
            format!(
                "connect through the activated socket: {e}\n{}",
                daemon_log()
            )
        })?;
    drop(vmm);
    assert!(
        child.0.try_wait()?.is_none(),
        "daemon exited\n{}",
        daemon_log()
    );
    Ok(())
}

/// `program` in `PATH`, or a failure naming the Debian package that has it: no silent skip.
fn required_tool(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{program} not found in PATH: install Debian's `{package}` package (.ci/run does)")
    })
}

/// `program` in `PATH`, when it is there.
fn optional_tool(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// The long flags the daemon's `--help` lists (`--socket-path`, ...), in order.
fn long_flags(name: &str) -> Result<Vec<String>> {
    let (code, help, err) = run_to_exit(name, &["--help"])?;
    assert_eq!(code, 0, "{name} --help: {err}");
    let mut flags = Vec::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        // "-s, --socket-path <PATH>  text": the flags come before the first value or text.
        for word in line
            .split([' ', ','])
            .take_while(|w| w.is_empty() || w.starts_with('-'))
        {
            if let Some(flag) = word.strip_prefix("--") {
                if !flag.is_empty() {
                    flags.push(format!("--{flag}"));
                }
            }
        }
    }
    assert!(
        flags.iter().any(|f| f == "--socket-path") && flags.iter().any(|f| f == "--help"),
        "{name} --help: flags not found in\n{help}"
    );
    Ok(flags)
}

/// Runs groff on a man page; returns (stdout, stderr).
fn groff(page: &Path, args: &[&str]) -> Result<(String, String)> {
    let out = Command::new(required_tool("groff", "groff-base"))
        .args(["-man", "-ww"])
        .args(args)
        .arg(page)
        .output()?;
    assert!(
        out.status.success(),
        "groff {args:?} {}: {}",
        page.display(),
        out.status
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn man_pages_document_every_flag_and_render_without_warnings() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pages = xtask::write_man_pages(dir.path(), "2025-01-01")?;
    assert_eq!(pages.len(), xtask::DAEMONS.len());
    for (daemon, page) in xtask::DAEMONS.iter().zip(&pages) {
        let name = daemon.name;
        let source = std::fs::read_to_string(page)?;
        assert!(source.is_ascii(), "{name}.1: not plain ASCII roff");

        // As man(1) shows it on an 80-column terminal: no warning, no line overflowing.
        let (text, warnings) = groff(page, &["-Tutf8", "-P-cbou", "-rLL=80n", "-rCHECKSTYLE=3"])?;
        assert!(warnings.is_empty(), "{name}.1: groff warns:\n{warnings}");
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "{name}.1: line wider than 80 columns:\n{line}"
            );
        }
        if let Some(man) = optional_tool("man") {
            let out = Command::new(man)
                .args(["--warnings", "-E", "UTF-8", "-l"])
                .arg(page)
                .env("MANWIDTH", "80")
                .output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "man -l {name}.1: {}\n{stderr}",
                out.status
            );
        }

        // Plain text, long lines: every flag `--help` lists, every section, in order.
        let (plain, _) = groff(page, &["-Tascii", "-P-cbou", "-rLL=1000n"])?;
        for flag in long_flags(name)? {
            assert!(
                plain.contains(&flag),
                "{name}.1 does not mention {flag}, which `{name} --help` lists"
            );
        }
        let mut at = 0;
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "EXIT STATUS",
            "SIGNALS",
            "ENVIRONMENT",
            "FILES",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            let heading = format!("\n{section}\n");
            let found = plain[at..]
                .find(&heading)
                .unwrap_or_else(|| panic!("{name}.1: no {section} section after byte {at}"));
            at += found + heading.len() - 1;
        }
        let expected = [
            format!("{name} - "),
            "RUST_LOG".to_string(),
            "LISTEN_FDS".to_string(),
            "NOTIFY_SOCKET".to_string(),
            "SIGTERM".to_string(),
            format!("/etc/vhost-user/{}/", daemon.short),
            format!("/lib/systemd/system/{name}@.service"),
            format!("/usr/share/qemu/vhost-user/50-{name}.json"),
            format!("{name} --socket-path"),
            "qemu-system-x86_64".to_string(),
        ];
        for text in expected {
            assert!(plain.contains(&text), "{name}.1 does not mention {text:?}");
        }
    }
    Ok(())
}

/// Completes `words` (the last one being completed) with `daemon`'s bash completion script.
fn bash_complete(script: &Path, name: &str, words: &[&str]) -> Result<Vec<String>> {
    let program = r#"
        source "$1"; shift
        spec=$(complete -p "$1") || exit 3
        function=${spec#*-F }; function=${function%% *}
        COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        previous=""; [ $# -gt 1 ] && previous=${COMP_WORDS[COMP_CWORD - 1]}
        "$function" "$1" "${COMP_WORDS[COMP_CWORD]}" "$previous"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let out = Command::new(required_tool("bash", "bash"))
        .arg("-c")
        .arg(program)
        .arg("bash")
        .arg(script)
        .arg(name)
        .args(words)
        .output()?;
    assert!(
        out.status.success(),
        "bash completion of {name} {words:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn completions_are_generated_for_every_shell_and_bash_completes_the_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let written = xtask::write_completions(dir.path())?;
    for daemon in &xtask::DAEMONS {
        let name = daemon.name;
        for file in [
            format!("bash/{name}"),
            format!("zsh/_{name}"),
            format!("fish/{name}.fish"),
        ] {
            let path = dir.path().join(&file);
            assert!(written.contains(&path), "{file} not written");
            let text = std::fs::read_to_string(&path)?;
            assert!(
                text.contains(name) && text.contains("socket-path"),
                "{file}: no completion for {name}"
            );
        }

        let bash = dir.path().join(format!("bash/{name}"));
        let out = Command::new(required_tool("bash", "bash"))
            .arg("-n")
            .arg(&bash)
            .output()?;
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            bash.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // zsh and fish are not on a default Debian system: checked where they are.
        for (shell, flag, file) in [
            ("zsh", "-n", format!("zsh/_{name}")),
            ("fish", "--no-execute", format!("fish/{name}.fish")),
        ] {
            if let Some(program) = optional_tool(shell) {
                let out = Command::new(program)
                    .arg(flag)
                    .arg(dir.path().join(&file))
                    .output()?;
                assert!(
                    out.status.success(),
                    "{shell} {flag} {file}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }

        // Every flag --help lists is offered after "--".
        let offered = bash_complete(&bash, name, &[name, "--"])?;
        for flag in long_flags(name)? {
            assert!(
                offered.contains(&flag),
                "bash completion of `{name} --` lacks {flag}: {offered:?}"
            );
        }
    }
    let blk = dir.path().join("bash/vhost-user-blk");
    assert_eq!(
        bash_complete(&blk, "vhost-user-blk", &["vhost-user-blk", "--num-q"])?,
        ["--num-queues"]
    );
    let mut engines = bash_complete(
        &blk,
        "vhost-user-blk",
        &["vhost-user-blk", "--io-engine", ""],
    )?;
    engines.sort();
    assert_eq!(engines, ["io_uring", "sync"]);
    Ok(())
}
