//! `cargo xtask deb`: one Debian package, `vhost-user-daemons`, with the three daemons.
//!
//! One package rather than three: the daemons are built from one tree at one version, share
//! their conventions, the `/etc/vhost-user/` and `/run/vhost-user/` layout and the documentation,
//! and together weigh a few MiB; per-daemon packages would add three control files and a common
//! package for no choice an administrator needs (a unit that is not enabled does nothing).
//!
//! Only dpkg's own tools are used: `dpkg-deb --root-owner-group --build` on a staged tree,
//! `dpkg-shlibdeps` for Depends (from dpkg-dev; without it, the glibc symbol versions `objdump`
//! reports), `strip`, `gzip -9n` and `md5sum`.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use xtask::{civil_date, Daemon, DAEMONS};

/// The binary package's name.
pub const PACKAGE: &str = "vhost-user-daemons";
/// The Debian revision appended to the workspace version.
const REVISION: &str = "1";

const MAINTAINER: &str = "vhost-user daemons maintainers <vhost-user-daemons@localhost>";

const POSTINST: &str = r#"#!/bin/sh
# Creates the kvm group and the vhost-user system user the units run as, and makes systemd
# see the new or changed template units. Nothing is enabled or started: an instance needs its
# /etc/vhost-user/<daemon>/<instance>.conf first.
set -e
case "$1" in
    configure)
        if command -v systemd-sysusers >/dev/null 2>&1; then
            systemd-sysusers vhost-user-daemons.conf
        else
            getent group kvm >/dev/null || groupadd --system kvm
            getent passwd vhost-user >/dev/null || useradd --system --user-group \
                --home-dir /var/lib/vhost-user --no-create-home \
                --shell /usr/sbin/nologin --comment "vhost-user device backends" vhost-user
        fi
        # Disk images: the daemons' group reads the directory (set-group-ID: new images get
        # the group); an administrator's dpkg-statoverride wins.
        if ! dpkg-statoverride --list /var/lib/vhost-user/blk >/dev/null 2>&1; then
            chown root:vhost-user /var/lib/vhost-user/blk
            chmod 2750 /var/lib/vhost-user/blk
        fi
        ;;
esac
case "$1" in
    configure|abort-upgrade|abort-deconfigure|abort-remove)
        if [ -d /run/systemd/system ]; then
            systemctl --system daemon-reload >/dev/null || true
        fi
        ;;
esac
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# Makes systemd forget the removed template units. Running instances are left alone, and so
# are the instances' settings in /etc/vhost-user, the disk images in /var/lib/vhost-user and
# the vhost-user user (Debian does not remove system users).
set -e
if [ "$1" = purge ]; then
    # Debian policy: log files go when the package is purged.
    rm -rf /var/log/vhost-user
    # The enablement links of the instances the administrator enabled (`systemctl enable
    # vhost-user-blk@disk0.socket`): their template units went with the package, the links
    # would stay as not-found units. On a plain remove they stay, for a reinstall.
    for link in /etc/systemd/system/*.wants/vhost-user-blk@* \
        /etc/systemd/system/*.wants/vhost-user-net@* \
        /etc/systemd/system/*.wants/vhost-user-console@*; do
        if [ -L "$link" ]; then
            rm -f "$link"
        fi
    done
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
"#;

const DESCRIPTION: &str = "\
vhost-user device backends: virtio-blk, virtio-net, virtio-console
 Three daemons that serve virtio devices to virtual machines over QEMU's
 vhost-user protocol: the VMM (QEMU, Cloud Hypervisor) leaves the device's
 virtqueues to them.
  - vhost-user-blk: a disk on a file or a block device (io_uring, multiqueue);
  - vhost-user-net: a network interface on a tap device (multiqueue, offloads);
  - vhost-user-console: a console and named ports on a pty, a UNIX socket or
    TCP.
 .
 The package has systemd template units with socket activation (one instance
 per virtual machine, configured in /etc/vhost-user/<daemon>/<instance>.conf),
 the QEMU vhost-user backend descriptors, man pages and shell completions.";

const BSD_3_CLAUSE: &str = "\
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice,
    this list of conditions and the following disclaimer.
 .
 2. Redistributions in binary form must reproduce the above copyright notice,
    this list of conditions and the following disclaimer in the documentation
    and/or other materials provided with the distribution.
 .
 3. Neither the name of the copyright holder nor the names of its contributors
    may be used to endorse or promote products derived from this software
    without specific prior written permission.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS \"AS IS\"
 AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
 ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
 LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
 CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
 SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
 INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
 CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
 ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
 POSSIBILITY OF SUCH DAMAGE.";

const MIT: &str = "\
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 SOFTWARE.";

/// Runs `command`, failing with its name and stderr when it cannot start or fails; returns
/// its stdout.
fn output(command: &mut Command) -> Result<String, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{program} failed: {}", out.status));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{program}: output is not UTF-8: {e}"))
}

/// Whether `program` is in `PATH`.
fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn need(program: &str, package: &str) -> Result<(), String> {
    if have(program) {
        Ok(())
    } else {
        Err(format!(
            "{program} not found: install Debian's `{package}` package"
        ))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn workspace_root() -> PathBuf {
    // xtask/ is a member directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The target directory cargo builds into (`CARGO_TARGET_DIR`, config, or `<root>/target`).
fn target_dir(root: &Path) -> Result<PathBuf, String> {
    let metadata = output(
        cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root),
    )?;
    let value: serde_json::Value =
        serde_json::from_str(&metadata).map_err(|e| format!("cargo metadata: not JSON: {e}"))?;
    value["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| "cargo metadata: no target_directory".to_string())
}

/// The staged file tree: paths are relative to the package root.
struct Stage {
    root: PathBuf,
}

impl Stage {
    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Creates `path` and its parents, mode 0755.
    fn dir(&self, path: &str) -> Result<PathBuf, String> {
        let full = self.path(path);
        fs::create_dir_all(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        let mut dir = full.as_path();
        while dir.starts_with(&self.root) {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            match dir.parent() {
                Some(parent) => dir = parent,
                None => break,
            }
        }
        Ok(full)
    }

    /// Writes `contents` to `path` with `mode`, creating its directory.
    fn file(&self, path: &str, contents: &[u8], mode: u32) -> Result<PathBuf, String> {
        let full = self.path(path);
        if let Some(parent) = Path::new(path).parent().and_then(Path::to_str) {
            self.dir(parent)?;
        }
        fs::write(&full, contents).map_err(|e| format!("{}: {e}", full.display()))?;
        fs::set_permissions(&full, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", full.display()))?;
        Ok(full)
    }

    /// Copies the file `source` to `path` with `mode`.
    fn copy(&self, source: &Path, path: &str, mode: u32) -> Result<PathBuf, String> {
        let contents = fs::read(source).map_err(|e| format!("{}: {e}", source.display()))?;
        self.file(path, &contents, mode)
    }
}

/// `gzip -9n`: no name or time stamp in the header, so the result is reproducible.
fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("gzip: no stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().map_err(|e| format!("gzip: {e}"))?;
    writer
        .join()
        .map_err(|_| "gzip: writer panicked".to_string())?
        .map_err(|e| format!("gzip: {e}"))?;
    if !out.status.success() {
        return Err(format!("gzip failed: {}", out.status));
    }
    Ok(out.stdout)
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` (RFC 2822, as Debian changelogs want).
fn rfc2822(epoch: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = epoch / 86_400;
    let seconds = epoch % 86_400;
    let (year, month, day) = civil_date(days as i64);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `Name <address>` from Debian's `DEBFULLNAME` and `DEBEMAIL`, or a placeholder.
fn maintainer() -> String {
    let name = std::env::var("DEBFULLNAME").unwrap_or_default();
    match std::env::var("DEBEMAIL") {
        Ok(email) if email.contains('<') => email,
        Ok(email) if !name.is_empty() && !email.is_empty() => format!("{name} <{email}>"),
        _ => MAINTAINER.to_string(),
    }
}

/// `shlibs:Depends` of the staged binaries, from `dpkg-shlibdeps` run in `work` (which holds
/// `debian/control` and the staged tree as `debian/<package>/`).
fn shlib_depends(work: &Path, binaries: &[String]) -> Result<String, String> {
    if !have("dpkg-shlibdeps") {
        return glibc_depends(work, binaries);
    }
    let control = work.join("debian/control");
    fs::write(
        &control,
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )
    .map_err(|e| format!("{}: {e}", control.display()))?;
    let mut command = Command::new("dpkg-shlibdeps");
    command.arg("-O").current_dir(work);
    for binary in binaries {
        command.arg(format!("-edebian/{PACKAGE}/{binary}"));
    }
    let out = output(&mut command)?;
    let depends = out
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .ok_or_else(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out}"))?;
    fs::remove_file(&control).map_err(|e| format!("{}: {e}", control.display()))?;
    Ok(depends.trim().to_string())
}

/// Without dpkg-dev: `libc6 (>= X)` with X the newest `GLIBC_X` symbol version the binaries
/// use, and `libgcc-s1` when they link libgcc_s. Any other library is an error.
fn glibc_depends(work: &Path, binaries: &[String]) -> Result<String, String> {
    need("objdump", "binutils")?;
    let mut newest: Vec<u32> = Vec::new();
    let mut libgcc = false;
    for binary in binaries {
        let path = work.join("debian").join(PACKAGE).join(binary);
        let headers = output(Command::new("objdump").arg("-p").arg(&path))?;
        for line in headers.lines() {
            if let Some(library) = line.trim().strip_prefix("NEEDED") {
                match library.trim() {
                    "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" => {}
                    l if l.starts_with("ld-linux") => {}
                    "libgcc_s.so.1" => libgcc = true,
                    other => {
                        return Err(format!(
                            "{binary} needs {other}: install dpkg-dev (dpkg-shlibdeps) to \
                             compute the package's dependencies"
                        ))
                    }
                }
            }
        }
        let symbols = output(Command::new("objdump").arg("-T").arg(&path))?;
        for word in symbols.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            if let Some(version) = word.strip_prefix("GLIBC_") {
                let parsed: Result<Vec<u32>, _> = version.split('.').map(str::parse).collect();
                if let Ok(parsed) = parsed {
                    newest = newest.max(parsed);
                }
            }
        }
    }
    let version: Vec<String> = newest.iter().map(ToString::to_string).collect();
    let mut depends = format!("libc6 (>= {})", version.join("."));
    if libgcc {
        depends.push_str(", libgcc-s1 (>= 4.2)");
    }
    Ok(depends)
}

/// The statically linked crates, `name version: licence`, for the copyright file.
fn linked_crates(root: &Path) -> Result<Vec<String>, String> {
    let mut command = cargo();
    command.current_dir(root).args([
        "tree",
        "--edges",
        "normal,no-proc-macro",
        "--prefix",
        "none",
        "--format",
        "{p}|{l}",
    ]);
    for daemon in &DAEMONS {
        command.args(["--package", daemon.name]);
    }
    let tree = output(&mut command)?;
    let mut crates: Vec<String> = tree
        .lines()
        .filter_map(|line| {
            let line = line.trim_end().trim_end_matches(" (*)");
            let (package, licence) = line.split_once('|')?;
            // Workspace members show their path: they are this package's own source.
            (!package.contains(" (")).then(|| format!("{package}: {licence}"))
        })
        .collect();
    crates.sort();
    crates.dedup();
    Ok(crates)
}

fn copyright(crates: &[String]) -> String {
    let mut text = format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {PACKAGE}\n\
         Comment: The binaries are statically linked with these Rust crates from\n \
         crates.io, each under the licence named (SPDX expression):\n"
    );
    for line in crates {
        let _ = writeln!(text, "  {line}");
    }
    let _ = write!(
        text,
        "\nFiles: *\n\
         Copyright: the vhost-user daemons authors\n\
         License: Apache-2.0 or BSD-3-Clause\n\
         \n\
         License: Apache-2.0\n \
         On Debian systems, the full text of the Apache License, Version 2.0, is in\n \
         /usr/share/common-licenses/Apache-2.0.\n\
         \n\
         License: BSD-3-Clause\n{BSD_3_CLAUSE}\n\
         \n\
         License: MIT\n{MIT}\n"
    );
    text
}

fn changelog(version: &str, maintainer: &str, epoch: u64) -> String {
    format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Built with `cargo xtask deb` from the vhost-user daemons workspace.\n\n \
         -- {maintainer}  {}\n",
        rfc2822(epoch)
    )
}

/// Every staged file and directory under `dir`, relative to `root`, sorted.
fn walk(root: &Path, dir: &Path, entries: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    children.sort();
    for child in children {
        let relative = child.strip_prefix(root).unwrap_or(&child).to_path_buf();
        if relative == Path::new("DEBIAN") {
            continue;
        }
        let is_dir = child.is_dir();
        entries.push(relative);
        if is_dir {
            walk(root, &child, entries)?;
        }
    }
    Ok(())
}

/// Stages `daemon`'s binary, man page, completions, units, descriptor and example.
fn stage_daemon(
    stage: &Stage,
    root: &Path,
    release: &Path,
    daemon: &Daemon,
    date: &str,
) -> Result<(), String> {
    let name = daemon.name;
    let binary = stage.copy(&release.join(name), &format!("usr/bin/{name}"), 0o755)?;
    // As dh_strip does; the debug information would triple the package.
    output(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(&binary),
    )?;

    let page = xtask::man_page(daemon, date).map_err(|e| format!("{name} man page: {e}"))?;
    stage.file(
        &format!("usr/share/man/man1/{name}.1.gz"),
        &gzip(page.as_bytes())?,
        0o644,
    )?;

    for (shell, directory) in [
        (
            clap_complete::Shell::Bash,
            "usr/share/bash-completion/completions",
        ),
        (
            clap_complete::Shell::Zsh,
            "usr/share/zsh/vendor-completions",
        ),
        (
            clap_complete::Shell::Fish,
            "usr/share/fish/vendor_completions.d",
        ),
    ] {
        let file = xtask::completion_file_name(shell, name);
        stage.file(
            &format!("{directory}/{file}"),
            &xtask::completion(daemon, shell),
            0o644,
        )?;
    }

    let dist = root.join("dist");
    for unit in [format!("{name}@.service"), format!("{name}@.socket")] {
        stage.copy(
            &dist.join("systemd").join(&unit),
            &format!("lib/systemd/system/{unit}"),
            0o644,
        )?;
    }

    let descriptor_name = format!("50-{name}.json");
    let source = dist.join("qemu").join(&descriptor_name);
    let text = fs::read_to_string(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    let descriptor: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", source.display()))?;
    let installed = format!("/usr/bin/{name}");
    if descriptor["binary"] != installed.as_str() {
        return Err(format!(
            "{}: \"binary\" must be {installed}, where the package installs it",
            source.display()
        ));
    }
    stage.file(
        &format!("usr/share/qemu/vhost-user/{descriptor_name}"),
        text.as_bytes(),
        0o644,
    )?;

    let short = daemon.short;
    stage.copy(
        &dist.join("systemd/examples").join(format!("{short}.conf")),
        &format!("usr/share/doc/{PACKAGE}/examples/{short}.conf"),
        0o644,
    )?;
    // Where the instances' settings go; dpkg removes the directory with the package when empty.
    stage.dir(&format!("etc/vhost-user/{short}"))?;
    Ok(())
}

/// Builds the package; returns the path of the .deb.
pub fn build() -> Result<PathBuf, String> {
    for (program, package) in [
        ("dpkg-deb", "dpkg"),
        ("gzip", "gzip"),
        ("md5sum", "coreutils"),
        ("strip", "binutils"),
    ] {
        need(program, package)?;
    }
    let root = workspace_root();
    let target = target_dir(&root)?;

    let mut build = cargo();
    build.current_dir(&root).args(["build", "--release"]);
    for daemon in &DAEMONS {
        build.args(["--package", daemon.name]);
    }
    // vhost-user-blk serves Ceph RBD images too: the package depends on librbd1 (found by
    // dpkg-shlibdeps); building needs librbd-dev.
    build.args(["--features", "vhost-user-blk/rbd"]);
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release failed: {status}"));
    }

    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let version = format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"));
    let epoch = xtask::build_epoch();
    let date = xtask::iso_date(epoch);
    let maintainer = maintainer();

    // dpkg-shlibdeps wants ./debian/control and the binaries under ./debian/<package>/.
    let out_dir = target.join("debian");
    let work = out_dir.join("build");
    if work.exists() {
        fs::remove_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    }
    let stage = Stage {
        root: work.join("debian").join(PACKAGE),
    };
    // dpkg-shlibdeps finds the package's root by its DEBIAN directory.
    stage.dir("DEBIAN")?;

    let release = target.join("release");
    for daemon in &DAEMONS {
        stage_daemon(&stage, &root, &release, daemon, &date)?;
    }
    let doc = format!("usr/share/doc/{PACKAGE}");
    stage.file(
        &format!("{doc}/copyright"),
        copyright(&linked_crates(&root)?).as_bytes(),
        0o644,
    )?;
    stage.file(
        &format!("{doc}/changelog.Debian.gz"),
        &gzip(changelog(&version, &maintainer, epoch).as_bytes())?,
        0o644,
    )?;
    for (source, name) in [
        ("README.md", "README.md.gz"),
        ("vhost-user-net/README.md", "README.vhost-user-net.md.gz"),
        (
            "vhost-user-console/README.md",
            "README.vhost-user-console.md.gz",
        ),
    ] {
        let path = root.join(source);
        let text = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        stage.file(&format!("{doc}/{name}"), &gzip(&text)?, 0o644)?;
    }
    // What the units let the daemons write to: blk images, console logs (LogsDirectory=
    // gives it to the vhost-user user when a console starts).
    stage.dir("var/lib/vhost-user/blk")?;
    stage.dir("var/log/vhost-user")?;
    // The kvm group and the vhost-user user (postinst runs systemd-sysusers on it).
    stage.copy(
        &root.join("dist/sysusers/vhost-user-daemons.conf"),
        "usr/lib/sysusers.d/vhost-user-daemons.conf",
        0o644,
    )?;

    let mut entries = Vec::new();
    walk(&stage.root, &stage.root, &mut entries)?;
    let mut installed_kib = 0u64;
    let mut files = Vec::new();
    for entry in &entries {
        let full = stage.root.join(entry);
        let meta = fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        if meta.is_file() {
            installed_kib += meta.len().div_ceil(1024);
            files.push(entry.clone());
        } else {
            installed_kib += 1;
        }
    }
    let mut md5 = Command::new("md5sum");
    md5.current_dir(&stage.root).args(&files);
    let md5sums = output(&mut md5)?;

    let binaries: Vec<String> = DAEMONS
        .iter()
        .map(|d| format!("usr/bin/{}", d.name))
        .collect();
    let depends = shlib_depends(&work, &binaries)?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Suggests: qemu-system-x86 | qemu-system\n\
         Section: admin\n\
         Priority: optional\n\
         Description: {DESCRIPTION}\n"
    );
    stage.file("DEBIAN/control", control.as_bytes(), 0o644)?;
    stage.file("DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    stage.file("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    stage.file("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    // Every time stamp is the build date, so the same tree gives the same package.
    let stamp = UNIX_EPOCH + Duration::from_secs(epoch);
    let mut stamped = entries.clone();
    stamped.extend(
        [
            "DEBIAN/control",
            "DEBIAN/md5sums",
            "DEBIAN/postinst",
            "DEBIAN/postrm",
            "DEBIAN",
            "",
        ]
        .map(PathBuf::from),
    );
    for entry in stamped.iter().rev() {
        let full = stage.root.join(entry);
        fs::File::open(&full)
            .and_then(|f| f.set_modified(stamp))
            .map_err(|e| format!("{}: {e}", full.display()))?;
    }

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage.root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run dpkg-deb: {e}"))?;
    if !status.success() {
        return Err(format!("dpkg-deb --build failed: {status}"));
    }
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_dates() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(1_735_732_245), "Wed, 01 Jan 2025 11:50:45 +0000");
    }
}
