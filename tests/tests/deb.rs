//! The Debian package `cargo xtask deb` builds (scripts/test.sh builds it before `cargo test`):
//! its file list and modes, its control fields and maintainer scripts, lintian where it is
//! installed, and a real `dpkg -i` / `dpkg --purge` with the installed daemons, man pages, units
//! and QEMU descriptors checked in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vhost_user_tests::Result;

const PACKAGE: &str = "vhost-user-daemons";

/// `program` in `PATH`.
fn tool(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// `program` in `PATH`, or a failure naming the Debian package that has it.
fn required_tool(program: &str, package: &str) -> PathBuf {
    tool(program).unwrap_or_else(|| {
        panic!("{program} not found in PATH: install Debian's `{package}` package (.ci/run does)")
    })
}

/// Runs a command that must succeed; returns its stdout.
fn run(command: &mut Command) -> Result<String> {
    let out: Output = command.output()?;
    if !out.status.success() {
        return Err(format!(
            "{command:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn arch() -> Result<String> {
    Ok(
        run(Command::new(required_tool("dpkg", "dpkg")).arg("--print-architecture"))?
            .trim()
            .to_string(),
    )
}

fn version() -> String {
    // `cargo xtask deb` appends Debian revision 1 to the workspace version.
    format!("{}-1", env!("CARGO_PKG_VERSION"))
}

/// `<target>/debian/vhost-user-daemons_<version>_<arch>.deb`, the target directory found from
/// this test's executable (`<target>/<profile>/deps/deb-*`), as `binary()` finds the daemons.
fn deb() -> Result<PathBuf> {
    let mut target = std::env::current_exe()?;
    target.pop(); // the test executable
    if target.ends_with("deps") {
        target.pop();
    }
    target.pop(); // the profile
    let path = target
        .join("debian")
        .join(format!("{PACKAGE}_{}_{}.deb", version(), arch()?));
    assert!(
        path.is_file(),
        "{} not built: run `cargo xtask deb` before the tests (scripts/test.sh does)",
        path.display()
    );
    Ok(path)
}

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// What the package must hold: path (as `dpkg-deb -c` shows it, without the leading `.`) and
/// mode. Directories end with `/`.
fn expected_entries() -> BTreeMap<String, &'static str> {
    let mut entries = BTreeMap::new();
    let doc = format!("/usr/share/doc/{PACKAGE}");
    for daemon in &xtask::DAEMONS {
        let (name, short) = (daemon.name, daemon.short);
        entries.insert(format!("/usr/bin/{name}"), "-rwxr-xr-x");
        for file in [
            format!("/lib/systemd/system/{name}@.service"),
            format!("/lib/systemd/system/{name}@.socket"),
            format!("/usr/share/qemu/vhost-user/50-{name}.json"),
            format!("/usr/share/man/man1/{name}.1.gz"),
            format!("/usr/share/bash-completion/completions/{name}"),
            format!("/usr/share/zsh/vendor-completions/_{name}"),
            format!("/usr/share/fish/vendor_completions.d/{name}.fish"),
            format!("{doc}/examples/{short}.conf"),
        ] {
            entries.insert(file, "-rw-r--r--");
        }
        entries.insert(format!("/etc/vhost-user/{short}/"), "drwxr-xr-x");
    }
    entries.insert(
        "/usr/lib/sysusers.d/vhost-user-daemons.conf".to_string(),
        "-rw-r--r--",
    );
    for file in ["copyright", "changelog.Debian.gz"] {
        entries.insert(format!("{doc}/{file}"), "-rw-r--r--");
    }
    entries
}

#[test]
fn deb_holds_every_file_with_its_mode_and_owner() -> Result<()> {
    let deb = deb()?;
    let listing = run(Command::new(required_tool("dpkg-deb", "dpkg"))
        .arg("--contents")
        .arg(&deb))?;
    // "-rwxr-xr-x root/root   2403360 2025-01-01 00:00 ./usr/bin/vhost-user-blk"
    let mut listed = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [mode, owner, _size, _date, _time, path] = fields[..] else {
            panic!("{}: unexpected `dpkg-deb -c` line: {line}", deb.display());
        };
        assert_eq!(owner, "root/root", "{path}: owner");
        let path = path.trim_start_matches('.').to_string();
        // Nothing but plain files and directories, and no mode but 0755 and 0644.
        let allowed = if path.ends_with('/') {
            "drwxr-xr-x"
        } else if path.starts_with("/usr/bin/") {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, allowed, "{path}: mode");
        listed.insert(path, mode.to_string());
    }
    for (path, mode) in expected_entries() {
        assert_eq!(
            listed.get(&path).map(String::as_str),
            Some(mode),
            "{}: {path} missing or with another mode\n{listing}",
            deb.display()
        );
    }
    let binaries: Vec<&String> = listed
        .keys()
        .filter(|p| p.starts_with("/usr/bin/") && !p.ends_with('/'))
        .collect();
    assert_eq!(binaries.len(), xtask::DAEMONS.len(), "{binaries:?}");

    // The files as shipped: units and descriptors as in dist/ (else the .deb is stale), the
    // descriptors pointing at the packaged binaries, the md5sums right.
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    let control = dir.path().join("DEBIAN");
    let dpkg_deb = required_tool("dpkg-deb", "dpkg");
    run(Command::new(&dpkg_deb).arg("-x").arg(&deb).arg(&root))?;
    run(Command::new(&dpkg_deb).arg("-e").arg(&deb).arg(&control))?;
    let stale = "the .deb differs from the tree: rebuild it with `cargo xtask deb`";
    for daemon in &xtask::DAEMONS {
        let name = daemon.name;
        for unit in [format!("{name}@.service"), format!("{name}@.socket")] {
            let shipped = std::fs::read(root.join("lib/systemd/system").join(&unit))?;
            let source = std::fs::read(dist().join("systemd").join(&unit))?;
            assert!(shipped == source, "{unit}: {stale}");
        }
        let json = std::fs::read_to_string(
            root.join(format!("usr/share/qemu/vhost-user/50-{name}.json")),
        )?;
        let descriptor: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(descriptor["binary"], format!("/usr/bin/{name}"));
        let source = std::fs::read_to_string(dist().join(format!("qemu/50-{name}.json")))?;
        assert!(json == source, "50-{name}.json: {stale}");
        let example = std::fs::read(root.join(format!(
            "usr/share/doc/{PACKAGE}/examples/{}.conf",
            daemon.short
        )))?;
        assert!(
            example
                == std::fs::read(dist().join(format!("systemd/examples/{}.conf", daemon.short)))?,
            "{}.conf: {stale}",
            daemon.short
        );
        let page = run(Command::new("gzip")
            .arg("-dc")
            .arg(root.join(format!("usr/share/man/man1/{name}.1.gz"))))?;
        assert!(
            page.contains(".TH ") && page.contains(".SH \"EXIT STATUS\""),
            "{name}.1.gz"
        );
    }
    run(Command::new(required_tool("md5sum", "coreutils"))
        .args(["--check", "--quiet"])
        .arg(control.join("md5sums"))
        .current_dir(&root))?;
    Ok(())
}

/// `Field: value` of the control file (continuation lines appended).
fn control_fields(deb: &Path) -> Result<BTreeMap<String, String>> {
    let text = run(Command::new(required_tool("dpkg-deb", "dpkg"))
        .arg("--field")
        .arg(deb))?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last = String::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            if let Some(value) = fields.get_mut(&last) {
                value.push('\n');
                value.push_str(line);
            }
        } else if let Some((key, value)) = line.split_once(':') {
            last = key.to_string();
            fields.insert(last.clone(), value.trim().to_string());
        }
    }
    Ok(fields)
}

#[test]
fn deb_control_fields_and_maintainer_scripts() -> Result<()> {
    let deb = deb()?;
    let fields = control_fields(&deb)?;
    let field = |key: &str| {
        fields
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{}: no {key} field: {fields:?}", deb.display()))
    };
    assert_eq!(field("Package"), PACKAGE);
    assert_eq!(field("Version"), version());
    assert_eq!(field("Architecture"), arch()?);
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    assert!(
        field("Maintainer").contains('<'),
        "Maintainer: name <address>"
    );
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>= 2."), "Depends: {depends}");
    let installed_kib: u64 = field("Installed-Size").parse()?;
    let description = field("Description");
    assert!(
        description.lines().count() > 3 && description.contains("vhost-user-blk"),
        "Description: {description}"
    );

    // Installed-Size covers at least the three binaries.
    let dir = tempfile::tempdir()?;
    let dpkg_deb = required_tool("dpkg-deb", "dpkg");
    run(Command::new(&dpkg_deb)
        .arg("-x")
        .arg(&deb)
        .arg(dir.path().join("root")))?;
    let mut binaries_kib = 0;
    for daemon in &xtask::DAEMONS {
        binaries_kib += std::fs::metadata(dir.path().join("root/usr/bin").join(daemon.name))?
            .len()
            .div_ceil(1024);
    }
    assert!(
        installed_kib >= binaries_kib,
        "Installed-Size {installed_kib} < {binaries_kib} KiB of binaries"
    );

    // postinst and postrm: executable, valid sh, a daemon-reload only under a running systemd,
    // and no unit enabled or started (an instance needs its configuration first).
    let control = dir.path().join("DEBIAN");
    run(Command::new(&dpkg_deb).arg("-e").arg(&deb).arg(&control))?;
    for script in ["postinst", "postrm"] {
        let path = control.join(script);
        let text = std::fs::read_to_string(&path)?;
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
        assert_eq!(mode & 0o777, 0o755, "{script}: mode {mode:o}");
        run(Command::new("sh").arg("-n").arg(&path))?;
        assert!(
            text.starts_with("#!/bin/sh\n") && text.contains("set -e"),
            "{script}"
        );
        assert!(
            text.contains("if [ -d /run/systemd/system ]; then\n")
                && text.contains("systemctl --system daemon-reload"),
            "{script}: no guarded daemon-reload:\n{text}"
        );
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains("systemctl") || line.contains("daemon-reload"),
                "{script} must not enable, start or stop units: {line}"
            );
            assert!(!line.contains("deb-systemd-"), "{script}: {line}");
        }
    }
    // The user and group the units name are the package's to create; the enabled instances'
    // links are its to remove on purge.
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    assert!(
        postinst.contains("systemd-sysusers vhost-user-daemons.conf")
            && postinst.contains("groupadd --system kvm")
            && postinst.contains("useradd --system"),
        "postinst does not create the kvm group and the vhost-user user:\n{postinst}"
    );
    let postrm = std::fs::read_to_string(control.join("postrm"))?;
    let purge = postrm
        .split("if [ \"$1\" = purge ]; then")
        .nth(1)
        .unwrap_or_default();
    assert!(
        purge.contains("/etc/systemd/system/*.wants/vhost-user-blk@*")
            && purge.contains("rm -f \"$link\""),
        "postrm does not remove the enablement links on purge:\n{postrm}"
    );
    Ok(())
}

#[test]
fn deb_passes_lintian_where_installed() -> Result<()> {
    let deb = deb()?;
    let Some(lintian) = tool("lintian") else {
        eprintln!(
            "lintian not installed: skipping its check of {}",
            deb.display()
        );
        return Ok(());
    };
    let fields = control_fields(&deb)?;
    let mut command = Command::new(lintian);
    command.args(["--fail-on", "error", "--no-tag-display-limit"]);
    // A package built without DEBFULLNAME/DEBEMAIL has a placeholder maintainer.
    if fields
        .get("Maintainer")
        .is_some_and(|m| m.contains("@localhost>"))
    {
        command.args(["--suppress-tags", "maintainer-address-is-on-localhost"]);
    }
    let out = command.arg(&deb).output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian {}:\n{report}", deb.display());
    assert!(
        out.status.success(),
        "lintian finds errors in {}: {}\n{report}{}",
        deb.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Purges the package when dropped, so that a failed check leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

/// Why installing the package here could harm this machine, if it could.
fn reason_not_to_install() -> Result<Option<String>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Some("not root".into()));
    }
    let status = Command::new(required_tool("dpkg-query", "dpkg"))
        .args(["--show", "--showformat=${db:Status-Status}", PACKAGE])
        .output()?;
    let state = String::from_utf8_lossy(&status.stdout);
    if status.status.success() && state.trim() != "not-installed" {
        return Ok(Some(format!(
            "{PACKAGE} is already known to dpkg ({state})"
        )));
    }
    // Files of the package put there by hand (the README's manual set-up): a purge would
    // delete them.
    for path in expected_entries().keys().filter(|p| !p.ends_with('/')) {
        if Path::new(path).exists() {
            return Ok(Some(format!("{path} exists, installed by other means")));
        }
    }
    Ok(None)
}

#[test]
fn deb_installs_runs_and_purges() -> Result<()> {
    let deb = deb()?;
    if let Some(reason) = reason_not_to_install()? {
        eprintln!("not installing {}: {reason}", deb.display());
        return Ok(());
    }
    let man = required_tool("man", "man-db");
    let analyze = required_tool("systemd-analyze", "systemd");
    let guard = Installed;
    // Container images often exclude /usr/share/man from dpkg (path-exclude): the man pages
    // are part of what is checked, so they are included here whatever dpkg's configuration.
    run(Command::new(required_tool("dpkg", "dpkg"))
        .arg("--path-include=/usr/share/man/man1/vhost-user-*")
        .arg("--install")
        .arg(&deb))?;

    for daemon in &xtask::DAEMONS {
        let name = daemon.name;
        let binary = format!("/usr/bin/{name}");
        let version = run(Command::new(&binary).arg("--version"))?;
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );

        let page = run(Command::new(&man).args(["-w", name]))?;
        assert_eq!(page.trim(), format!("/usr/share/man/man1/{name}.1.gz"));

        // The installed template units, their Documentation=man: pages included (--man=yes):
        // any output is a failure, as verify only warns about most problems.
        let units = [
            format!("/lib/systemd/system/{name}@.service"),
            format!("/lib/systemd/system/{name}@.socket"),
        ];
        let out = Command::new(&analyze)
            .args(["verify", "--man=yes"])
            .args(&units)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty() && out.stdout.is_empty(),
            "systemd-analyze verify {units:?}: {}\n{stderr}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );

        // The installed descriptor's binary is the installed daemon, of the descriptor's type.
        let descriptor_path = format!("/usr/share/qemu/vhost-user/50-{name}.json");
        let descriptor: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&descriptor_path)?)?;
        let described = descriptor["binary"].as_str().unwrap_or_default();
        assert_eq!(described, binary, "{descriptor_path}");
        let capabilities: serde_json::Value =
            serde_json::from_str(&run(Command::new(described).arg("--print-capabilities"))?)?;
        assert_eq!(
            capabilities["type"], descriptor["type"],
            "{descriptor_path}"
        );

        run(Command::new("bash")
            .arg("-n")
            .arg(format!("/usr/share/bash-completion/completions/{name}")))?;
        assert!(
            Path::new(&format!("/etc/vhost-user/{}", daemon.short)).is_dir(),
            "/etc/vhost-user/{}/ not created",
            daemon.short
        );
    }

    // postinst made the group the sockets are given to and the user the daemons run as.
    for (database, key) in [("group", "kvm"), ("passwd", "vhost-user")] {
        run(Command::new("getent").args([database, key]))?;
    }
    // An instance the administrator enabled, as `systemctl enable` would link it.
    let wants = Path::new("/etc/systemd/system/sockets.target.wants");
    let link = wants.join("vhost-user-blk@deb-test.socket");
    std::fs::create_dir_all(wants)?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/lib/systemd/system/vhost-user-blk@.socket", &link)?;

    let listed = run(Command::new("dpkg").args(["--listfiles", PACKAGE]))?;
    for path in expected_entries().keys() {
        assert!(
            listed.lines().any(|l| l == path.trim_end_matches('/')),
            "dpkg -L {PACKAGE} lacks {path}"
        );
    }

    drop(guard);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "{} left dangling after dpkg --purge",
        link.display()
    );
    for daemon in &xtask::DAEMONS {
        for path in [
            format!("/usr/bin/{}", daemon.name),
            format!("/lib/systemd/system/{}@.service", daemon.name),
            format!("/usr/share/man/man1/{}.1.gz", daemon.name),
        ] {
            assert!(!Path::new(&path).exists(), "{path} left after dpkg --purge");
        }
    }
    let state = Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", PACKAGE])
        .output()?;
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(
        state.trim().is_empty() || state.trim() == "not-installed",
        "{PACKAGE} still known to dpkg after the purge: {state}"
    );
    Ok(())
}
