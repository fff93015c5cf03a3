//! A Debian 13 (trixie) root holding the newest QEMU Debian ships (trixie-backports), so the
//! end-to-end suite runs on it as well as on the host's own QEMU 7.2.
//!
//! Built once and cached next to the guest (`<cache>/trixie-root-<key>/`, see
//! [`crate::guest::cache_dir`]): `debootstrap --variant=minbase trixie` from the mirror the
//! host's own apt sources use, then `apt-get install -t trixie-backports --no-install-recommends
//! qemu-system-x86` inside (about a minute here, ~500 MB). The key covers this builder's version,
//! the mirror, the suite and the package list; the root is built in a temporary directory next
//! to its final name and renamed into place, under a lock file, like the guest. Every step runs
//! in its own mount namespace (`unshare -m`), so whatever debootstrap or a package script mounts
//! goes away with it and a half-built root can be deleted safely.
//!
//! The root also serves the newest Debian kernel (its apt index knows trixie-backports).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::guest::{cache_dir, Fnv, Lock};
use crate::Result;

/// Bump when the recipe changes in a way the key would not see.
const ROOT_VERSION: &str = "vhost-user-e2e-trixie-root 1";
const SUITE: &str = "trixie";
const BACKPORTS: &str = "trixie-backports";
/// Installed from trixie-backports.
const PACKAGES: [&str; 1] = ["qemu-system-x86"];

/// A built root.
#[derive(Debug, Clone)]
pub struct DebRoot {
    pub dir: PathBuf,
}

impl DebRoot {
    /// The root for this process: built (or found in the cache) on first use.
    pub fn get() -> Result<DebRoot> {
        static ROOT: OnceLock<std::result::Result<DebRoot, String>> = OnceLock::new();
        ROOT.get_or_init(|| build(&cache_dir()).map_err(|e| e.to_string()))
            .clone()
            .map_err(Into::into)
    }

    /// A command run inside the root (chroot in a private mount namespace), with `binds`
    /// mounted at the same paths inside: `/dev`, `/proc`, `/sys`, `/tmp` and `/var/tmp` always.
    /// `unshare` and `chroot` exec, so the child's PID is the program's own.
    pub fn command(&self, program: &str, args: &[String], binds: &[PathBuf]) -> Command {
        // $1 = root, then bind paths up to "--", then the program and its arguments.
        const SCRIPT: &str = r#"root=$1; shift
while [ "$1" != "--" ]; do
    mkdir -p "$root$1" && mount --rbind "$1" "$root$1" || exit 125
    shift
done
shift
exec chroot "$root" "$@""#;
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                SCRIPT,
                "sh",
            ])
            .arg(&self.dir);
        for bind in ["/dev", "/proc", "/sys", "/tmp", "/var/tmp"]
            .iter()
            .map(PathBuf::from)
            .chain(binds.iter().cloned())
        {
            command.arg(bind);
        }
        command.arg("--").arg(program).args(args);
        command
    }

    /// Runs `program args` inside the root and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut command = self.command(program, &args, &[]);
        command.env("DEBIAN_FRONTEND", "noninteractive");
        crate::netns::output_ok(&mut command)
    }
}

/// The mirror the host's apt sources use for its own release (`$VHOST_E2E_MIRROR` overrides),
/// else deb.debian.org.
pub fn host_mirror() -> String {
    if let Ok(mirror) = std::env::var("VHOST_E2E_MIRROR") {
        return mirror;
    }
    let codename = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .unwrap_or_else(|| "bookworm".to_string());
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let text = fs::read_to_string(&file).unwrap_or_default();
        if let Some(mirror) = mirror_in(&text, &codename) {
            return mirror;
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The URI serving `codename` itself (not -security) in a one-line or deb822 sources file.
fn mirror_in(text: &str, codename: &str) -> Option<String> {
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == codename) {
                return uris.split_whitespace().next().map(str::to_string);
            }
        }
    }
    for line in text.lines() {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        if words.next() != Some("deb") {
            continue;
        }
        // Skip an options block `[arch=amd64 signed-by=...]` spread over several words.
        let rest: Vec<&str> = line
            .split_once(']')
            .map(|(_, r)| r)
            .unwrap_or(line.trim_start().trim_start_matches("deb"))
            .split_whitespace()
            .collect();
        if let [uri, suite, ..] = rest.as_slice() {
            if *suite == codename {
                return Some(uri.to_string());
            }
        }
    }
    None
}

fn build(cache: &Path) -> Result<DebRoot> {
    fs::create_dir_all(cache)?;
    let _lock = Lock::take(&cache.join(".lock-trixie-root"))?;
    let mirror = host_mirror();
    let mut key = Fnv::new();
    key.add(ROOT_VERSION.as_bytes());
    key.add(mirror.as_bytes());
    key.add(SUITE.as_bytes());
    for p in PACKAGES {
        key.add(p.as_bytes());
    }
    let name = format!("trixie-root-{:016x}", key.0);
    let dir = cache.join(&name);
    if dir.join("etc/vhost-user-e2e-root").exists() {
        return Ok(DebRoot { dir });
    }
    if crate::guest::find_program("debootstrap").is_none() {
        return Err(
            "debootstrap is not installed: the QEMU 11 end-to-end tests build a Debian 13 \
                    root with it (apt-get install debootstrap, or run .ci/run)"
                .into(),
        );
    }
    eprintln!(
        "e2e: building a Debian 13 root with QEMU from {BACKPORTS} (once; {mirror}; cached in {})",
        dir.display()
    );
    let started = std::time::Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(".trixie-root-")
        .tempdir_in(cache)?;
    let root = tmp.path().join("root");
    let root_arg = root.to_string_lossy().into_owned();
    crate::netns::output_ok(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "debootstrap",
        "--variant=minbase",
        SUITE,
        &root_arg,
        &mirror,
    ]))
    .map_err(|e| format!("debootstrap of Debian 13 failed: {e}"))?;
    fs::write(
        root.join("etc/apt/sources.list.d/backports.list"),
        format!("deb {mirror} {BACKPORTS} main\n"),
    )?;
    let staged = DebRoot { dir: root.clone() };
    staged.run("apt-get", &["-q", "update"])?;
    let mut install = vec![
        "install",
        "-y",
        "-q",
        "-t",
        BACKPORTS,
        "--no-install-recommends",
    ];
    install.extend(PACKAGES);
    staged.run("apt-get", &install)?;
    staged.run("apt-get", &["clean"])?;
    let version = staged.run("/usr/bin/qemu-system-x86_64", &["--version"])?;
    fs::write(root.join("etc/vhost-user-e2e-root"), version.as_bytes())?;
    crate::guest::rename_into_place(&root, &dir)?;
    eprintln!(
        "e2e: Debian 13 root ready in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        version.lines().next().unwrap_or("")
    );
    // Roots of older recipes are ~500 MB each: drop them (nothing is mounted in them outside
    // the private namespaces of running QEMUs, which hold their own references).
    for old in fs::read_dir(cache)?.filter_map(|e| e.ok().map(|e| e.path())) {
        let other = old.file_name().map(|n| n.to_string_lossy().into_owned());
        if other.is_some_and(|n| n.starts_with("trixie-root-") && n != name) {
            let _ = fs::remove_dir_all(&old);
        }
    }
    Ok(DebRoot { dir })
}

#[cfg(test)]
mod tests {
    use super::mirror_in;

    #[test]
    fn finds_the_mirror_of_the_host_release() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://security.debian.org/debian-security\n\
                      Suites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let list = "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(list, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in("deb http://x/debian bookworm-security main\n", "bookworm"),
            None
        );
        assert_eq!(
            mirror_in("deb http://x/debian bookworm main\n", "bookworm").as_deref(),
            Some("http://x/debian")
        );
    }
}
