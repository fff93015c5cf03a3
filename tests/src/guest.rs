//! A bootable test guest for QEMU: Debian's kernel plus an initramfs of busybox, the virtio
//! modules, and the host's `fio`, `iperf3` and `ethtool` with every library they load.
//!
//! Built once and cached under `<target>/e2e-guest/`:
//!
//! - `kernel-<package>_<version>/`: `vmlinuz` and the virtio modules (decompressed), from the
//!   `linux-image-*-amd64` package that `linux-image-amd64` depends on (`apt-get download`):
//!   the host's release ([`GuestKernel::Host`], Debian 12's 6.1), or the newest Debian kernel
//!   ([`GuestKernel::Newest`], trixie-backports, through the Debian 13 root's apt, see
//!   [`crate::debroot`]). Newer kernels come split (`linux-binary-*`, `linux-modules-*`) and
//!   build more in; each module's dependencies are read from its `.modinfo`.
//! - `initrd-<host|newest>-<kernel release>-<hash>.cpio`: an uncompressed newc archive. The hash covers the
//!   builder's version, the init script, the kernel, and the path, size and mtime of every host
//!   file copied in, so upgrading fio (or the kernel) builds a new one.
//!
//! Every piece is built in a temporary file or directory next to its final name and renamed
//! into place, so concurrent builders never see a half-built guest; a lock file keeps them from
//! doing the work twice. A cache hit costs an `apt-cache` query and a few `ldd` runs.
//!
//! The archive is not gzipped: the kernel unpacks an uncompressed one about 2 s faster under
//! TCG, and the file only lives in the cache.
//!
//! Each run appends a second, tiny archive holding `/e2e/test.sh` (see
//! [`Guest::initrd_with_script`]). `/init` mounts proc, sys and dev, loads the modules, runs the
//! script, syncs and powers off. The script reports results as lines `E2E key=value` on the
//! serial console.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::Result;

/// Bump when the layout or the init script changes in a way the hash would not see.
const BUILDER_VERSION: &str = "vhost-user-e2e-guest 1";

/// The modules to load, in dependency order. Missing ones are fine when built in.
pub const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
];

/// Host programs copied into the guest (with their libraries), and where they go.
const TOOLS: [(&str, &str); 3] = [
    ("fio", "/usr/bin/fio"),
    ("iperf3", "/usr/bin/iperf3"),
    ("ethtool", "/usr/sbin/ethtool"),
];

/// The guest's `/init`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/e2e/order); do
    insmod /lib/modules/e2e/$m.ko || echo "E2E insmod_failed=$m"
done
ip link set lo up
echo "E2E booted=1"
if [ -f /e2e/test.sh ]; then
    sh /e2e/test.sh
    echo "E2E script_rc=$?"
else
    echo "E2E error=no /e2e/test.sh in the initramfs"
fi
sync
echo "E2E done=1"
poweroff -f
"#;

/// Which Debian kernel a guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestKernel {
    /// The host's own release (Debian 12: 6.1), from the host's apt.
    Host,
    /// The newest kernel Debian ships (trixie-backports), from the Debian 13 root's apt
    /// ([`crate::debroot`]).
    Newest,
}

impl GuestKernel {
    fn tag(self) -> &'static str {
        match self {
            GuestKernel::Host => "host",
            GuestKernel::Newest => "newest",
        }
    }
}

/// A built guest: what `-kernel` and `-initrd` need.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    /// The base initramfs (no test script).
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
}

impl Guest {
    /// The guest on the host's kernel for this process: built (or found in the cache) on
    /// first use.
    pub fn get() -> Result<Guest> {
        Guest::with_kernel(GuestKernel::Host)
    }

    /// The guest on `which` kernel, built (or found in the cache) on first use.
    pub fn with_kernel(which: GuestKernel) -> Result<Guest> {
        type Built = std::sync::Mutex<BTreeMap<&'static str, std::result::Result<Guest, String>>>;
        static GUESTS: OnceLock<Built> = OnceLock::new();
        let guests = GUESTS.get_or_init(Default::default);
        let mut guests = guests.lock().unwrap_or_else(|e| e.into_inner());
        guests
            .entry(which.tag())
            .or_insert_with(|| build_with(&cache_dir(), which).map_err(|e| e.to_string()))
            .clone()
            .map_err(Into::into)
    }

    /// Writes to `out` the base initramfs followed by an archive holding `script` as
    /// `/e2e/test.sh` (the kernel unpacks concatenated archives in order).
    pub fn initrd_with_script(&self, script: &str, out: &Path) -> Result<()> {
        fs::copy(&self.initrd, out)?;
        let mut file = fs::OpenOptions::new().append(true).open(out)?;
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("e2e")?;
        cpio.file("e2e/test.sh", 0o755, script.as_bytes())?;
        file.write_all(&cpio.finish()?)?;
        Ok(())
    }
}

/// `<target>/e2e-guest`, from where the running executable lives (`<target>/<profile>/...`),
/// or `$VHOST_E2E_CACHE` when set and not empty (an empty value would put the cache in the
/// current directory, inside the source tree).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VHOST_E2E_CACHE").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    target_dir().join("e2e-guest")
}

/// The cargo target directory the running executable was built in.
pub fn target_dir() -> PathBuf {
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop(); // the executable
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.pop(); // the profile (debug, release)
    dir
}

/// Builds the guest on the host's kernel in `cache` (or finds it there).
pub fn build(cache: &Path) -> Result<Guest> {
    build_with(cache, GuestKernel::Host)
}

fn build_with(cache: &Path, which: GuestKernel) -> Result<Guest> {
    fs::create_dir_all(cache)?;
    let apt = match which {
        GuestKernel::Host => Apt::Host,
        // Built before taking the guest lock (it has its own).
        GuestKernel::Newest => Apt::Root(crate::debroot::DebRoot::get()?),
    };
    let _lock = Lock::take(&cache.join(".lock"))?;
    let kernel = kernel(cache, &apt)?;
    let initrd = initrd(cache, &kernel, which)?;
    Ok(Guest {
        kernel: kernel.dir.join("vmlinuz"),
        initrd,
        release: kernel.release,
    })
}

/// An exclusive `flock` on a file, released on drop.
pub(crate) struct Lock(File);

impl Lock {
    pub(crate) fn take(path: &Path) -> Result<Lock> {
        let file = File::create(path)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock {}: {}", path.display(), io::Error::last_os_error()).into());
        }
        Ok(Lock(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Runs a command and returns its stdout; the error names the command and quotes stderr.
pub(crate) fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String> {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    crate::netns::output_ok(&mut command)
}

/// Where kernel packages come from: the host's apt (Debian 12), or the Debian 13 root's with
/// trixie-backports preferred.
pub(crate) enum Apt {
    Host,
    Root(crate::debroot::DebRoot),
}

impl Apt {
    fn query(&self, args: &[&str]) -> Result<String> {
        match self {
            Apt::Host => run("apt-cache", args, None),
            Apt::Root(root) => {
                let mut all = vec!["-t", "trixie-backports"];
                all.extend(args);
                root.run("apt-cache", &all)
            }
        }
    }

    /// `apt-get download SPECS` into `dir` (a directory on the host).
    fn download(&self, specs: &[String], dir: &Path) -> Result<()> {
        let mut args = vec!["-q", "-o", "APT::Sandbox::User=root", "download"];
        args.extend(specs.iter().map(String::as_str));
        match self {
            Apt::Host => run("apt-get", &args, Some(dir)).map(|_| ()),
            Apt::Root(root) => {
                // Downloaded inside the root's /var/tmp (the host's, bound), then moved.
                let inside = tempfile::Builder::new()
                    .prefix(".kernel-")
                    .tempdir_in("/var/tmp")?;
                let mut script = format!("cd '{}' && apt-get", inside.path().display());
                for a in &args {
                    script += &format!(" '{a}'");
                }
                root.run("sh", &["-c", &script])?;
                for deb in fs::read_dir(inside.path())?.filter_map(|e| e.ok().map(|e| e.path())) {
                    if let Some(name) = deb.file_name() {
                        fs::copy(&deb, dir.join(name))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The kernel and modules, unpacked.
struct Kernel {
    dir: PathBuf,
    release: String,
    /// Modules present as files, in load order.
    modules: Vec<String>,
}

/// The versioned kernel package `linux-image-amd64` currently points to, its version, and the
/// packages holding its files (itself; Debian's newest kernels split the image into
/// `linux-binary-*` and `linux-modules-*`).
pub(crate) fn resolve_kernel_package(apt: &Apt) -> Result<(String, String, Vec<String>)> {
    let hint = "is the apt index there? run `apt-get update` (or .ci/run)";
    let depends = |package: &str| -> Result<Vec<String>> {
        let deps = apt
            .query(&["depends", package])
            .map_err(|e| format!("{e} ({hint})"))?;
        Ok(deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.starts_with('<'))
            .collect())
    };
    let package = depends("linux-image-amd64")?
        .into_iter()
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            format!("apt-cache depends linux-image-amd64: no kernel package ({hint})")
        })?;
    let show = apt.query(&["show", "--no-all-versions", package.as_str()])?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("apt-cache show {package}: no Version"))?;
    let mut files = vec![package.clone()];
    files.extend(
        depends(&package)?
            .into_iter()
            .filter(|p| p.starts_with("linux-binary-") || p.starts_with("linux-modules-")),
    );
    Ok((package, version, files))
}

pub(crate) fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The modules `MODULE.ko(.xz|.zst|.gz)` needs loaded first: its `.modinfo` section's
/// `depends=a,b` string (what `modinfo -F depends` prints; read here so the host needs no kmod).
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let plain = tempfile::NamedTempFile::new()?;
    decompress_module(path, plain.path())?;
    let bytes = fs::read(plain.path())?;
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let value = &bytes[at + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    Ok(String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect())
}

/// Finds or builds `kernel-<package>_<version>/`. Without an apt index, falls back to a kernel
/// already in the cache.
fn kernel(cache: &Path, apt: &Apt) -> Result<Kernel> {
    let (package, version, debs) = match resolve_kernel_package(apt) {
        Ok(found) => found,
        Err(e) => {
            // Offline: the host kernel used last time (the cache also holds the newest one).
            let cached = match apt {
                Apt::Host => fs::read_to_string(cache.join("kernel-host"))
                    .ok()
                    .map(|name| cache.join(name.trim()))
                    .filter(|dir| dir.join("vmlinuz").exists())
                    .or_else(|| newest_cached_kernel(cache)),
                Apt::Root(_) => None,
            };
            match cached {
                Some(dir) => return load_kernel(&dir),
                None => return Err(e),
            }
        }
    };
    let dir = cache.join(format!(
        "kernel-{}_{}",
        sanitize(&package),
        sanitize(&version)
    ));
    if let Apt::Host = apt {
        if let Some(name) = dir.file_name() {
            fs::write(cache.join("kernel-host"), name.as_encoded_bytes())?;
        }
    }
    if dir.join("vmlinuz").exists() {
        return load_kernel(&dir);
    }
    eprintln!(
        "e2e guest: downloading {package} {version} (once; cached in {})",
        cache.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".kernel-")
        .tempdir_in(cache)?;
    let specs: Vec<String> = debs.iter().map(|p| format!("{p}={version}")).collect();
    apt.download(&specs, tmp.path())
        .map_err(|e| format!("{e} (run `apt-get update`, or .ci/run)"))?;
    let debs: Vec<PathBuf> = fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    if debs.is_empty() {
        return Err("apt-get download left no .deb".into());
    }
    let root = tmp.path().join("root");
    fs::create_dir(&root)?;
    // Modules come in dependency order: MODULES, each preceded by what `modinfo` says it needs
    // (newer kernels add dependencies). A module not shipped as a file is built in.
    let mut wanted: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let mut patterns = vec![
        "./boot/vmlinuz-*".to_string(),
        "*/vmlinuz".to_string(),
        "*/modules.builtin".to_string(),
    ];
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut builtin = String::new();
    let mut order: Vec<String> = Vec::new();
    for _round in 0..4 {
        patterns.extend(wanted.iter().map(|m| format!("*/{m}.ko*")));
        for deb in &debs {
            extract_deb(deb, &root, &patterns)?;
        }
        walk(&root, &mut |path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(name) = name {
                if name == "modules.builtin" {
                    builtin = fs::read_to_string(path).unwrap_or_default();
                } else if let Some((module, _)) = name.split_once(".ko") {
                    files.insert(module.replace('-', "_"), path.to_path_buf());
                }
            }
        })?;
        // Depth-first: dependencies before dependents.
        fn visit(
            m: &str,
            files: &BTreeMap<String, PathBuf>,
            order: &mut Vec<String>,
            missing: &mut Vec<String>,
            depth: usize,
        ) -> Result<()> {
            if order.iter().any(|o| o == m) || depth > 16 {
                return Ok(());
            }
            if let Some(path) = files.get(m) {
                for dep in module_depends(path)? {
                    let dep = dep.replace('-', "_");
                    if files.contains_key(&dep) {
                        visit(&dep, files, order, missing, depth + 1)?;
                    } else {
                        missing.push(dep);
                    }
                }
                order.push(m.to_string());
            }
            Ok(())
        }
        order.clear();
        let mut missing = Vec::new();
        for module in MODULES {
            visit(module, &files, &mut order, &mut missing, 0)?;
        }
        missing.retain(|m| !wanted.contains(m));
        if missing.is_empty() {
            break;
        }
        wanted = missing;
    }
    for deb in &debs {
        fs::remove_file(deb)?;
    }

    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("modules"))?;
    let mut vmlinuz = None;
    walk(&root, &mut |path| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n == "vmlinuz" || n.starts_with("vmlinuz-")) {
            vmlinuz = Some(path.to_path_buf());
        }
    })?;
    let vmlinuz = vmlinuz.ok_or_else(|| format!("{package}: no vmlinuz"))?;
    // /boot/vmlinuz-RELEASE, or /usr/lib/modules/RELEASE/vmlinuz.
    let release = match vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    {
        Some(n) if n.starts_with("vmlinuz-") => n.trim_start_matches("vmlinuz-").to_string(),
        _ => vmlinuz
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    fs::rename(&vmlinuz, out.join("vmlinuz"))?;

    for module in &order {
        if let Some(path) = files.get(module) {
            decompress_module(path, &out.join("modules").join(format!("{module}.ko")))?;
        }
    }
    for module in MODULES {
        let known_builtin = builtin
            .lines()
            .any(|l| l.ends_with(&format!("/{module}.ko")));
        // Newer packages ship no modules.builtin: a module that is no file is built in there
        // (the guest's init reports a missing driver, and the tests fail on the missing device).
        if !files.contains_key(module)
            && !known_builtin
            && !builtin.is_empty()
            && module != "virtio_pci_legacy_dev"
            && module != "virtio_pci_modern_dev"
        {
            return Err(format!("{package}: module {module} neither a file nor built in").into());
        }
    }
    fs::write(out.join("modules/order"), order.join("\n") + "\n")?;
    fs::write(out.join("release"), &release)?;
    rename_into_place(&out, &dir)?;
    load_kernel(&dir)
}

fn newest_cached_kernel(cache: &Path) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kernel-"))
                && p.join("vmlinuz").exists()
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn load_kernel(dir: &Path) -> Result<Kernel> {
    let release = fs::read_to_string(dir.join("release"))?.trim().to_string();
    let modules = fs::read_to_string(dir.join("modules/order"))?
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    Ok(Kernel {
        dir: dir.to_path_buf(),
        release,
        modules,
    })
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x -C DIR --wildcards PATTERNS...`
pub(crate) fn extract_deb(deb: &Path, dir: &Path, patterns: &[String]) -> Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run dpkg-deb: {e}"))?;
    let stdout = dpkg.stdout.take().ok_or("dpkg-deb: no stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .arg("--wildcards")
        .args(patterns)
        .stdin(stdout)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let dpkg_status = dpkg.wait()?;
    // A pattern no file matches is fine: the kernel's files are spread over several packages
    // (and the caller checks for what it needs).
    let stderr = String::from_utf8_lossy(&tar.stderr);
    let only_unmatched = stderr
        .lines()
        .all(|l| l.contains("Not found in archive") || l.contains("Exiting with failure status"));
    if !dpkg_status.success() || !(tar.status.success() || only_unmatched) {
        return Err(format!(
            "extracting {}: dpkg-deb {dpkg_status}, tar {}: {}",
            deb.display(),
            tar.status,
            String::from_utf8_lossy(&tar.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Copies a module, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` (busybox's insmod may not).
pub(crate) fn decompress_module(from: &Path, to: &Path) -> Result<()> {
    let name = from.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            fs::copy(from, to)?;
        }
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(from)
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| format!("cannot run {tool} (needed for {name}): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} -dc {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
                .into());
            }
            fs::write(to, out.stdout)?;
        }
    }
    Ok(())
}

/// Calls `f` for every regular file under `dir`.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), f)?;
        } else if kind.is_file() {
            f(&entry.path());
        }
    }
    Ok(())
}

/// Renames a freshly built `from` to `to`; if another builder got there first, keeps theirs.
pub(crate) fn rename_into_place(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(_) if to.exists() => Ok(()),
        Err(e) => Err(format!("rename {} -> {}: {e}", from.display(), to.display()).into()),
    }
}

/// Looks `name` up in PATH and the sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The host binary of a tool; `ethtool` is fetched with `apt-get download` when the host lacks
/// it (its only library, libmnl, comes with iproute2).
fn tool_binary(cache: &Path, name: &str) -> Result<PathBuf> {
    if let Some(path) = find_program(name) {
        return Ok(path);
    }
    if name != "ethtool" {
        return Err(format!(
            "{name} is not installed: the guest needs the host's {name} (apt-get install {name}, or run .ci/run)"
        )
        .into());
    }
    let dir = cache.join("tool-ethtool");
    let binary = dir.join("usr/sbin/ethtool");
    if binary.exists() {
        return Ok(binary);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".tool-")
        .tempdir_in(cache)?;
    run(
        "apt-get",
        &["-q", "-o", "APT::Sandbox::User=root", "download", "ethtool"],
        Some(tmp.path()),
    )
    .map_err(|e| format!("ethtool is not installed and {e}"))?;
    let deb = fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download ethtool left no .deb")?;
    let root = tmp.path().join("root");
    fs::create_dir(&root)?;
    extract_deb(&deb, &root, &["*/sbin/ethtool".to_string()])?;
    let found = [root.join("usr/sbin/ethtool"), root.join("sbin/ethtool")]
        .into_iter()
        .find(|p| p.exists())
        .ok_or("the ethtool package has no sbin/ethtool")?;
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("usr/sbin"))?;
    fs::rename(found, out.join("usr/sbin/ethtool"))?;
    rename_into_place(&out, &dir)?;
    Ok(binary)
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`, as the paths the
/// loader will look them up at. Empty for a static binary.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("cannot run ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!("ldd {}: {line}", binary.display()).into());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// 64-bit FNV-1a: a stable hash for cache keys.
pub(crate) struct Fnv(pub(crate) u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn add_file(&mut self, path: &Path) -> Result<()> {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.add(path.to_string_lossy().as_bytes());
        self.add(&meta.len().to_le_bytes());
        self.add(&meta.mtime().to_le_bytes());
        Ok(())
    }
}

/// What goes into the initramfs: guest path → (host source, mode).
type Contents = BTreeMap<String, (PathBuf, u32)>;

fn initrd_contents(cache: &Path, kernel: &Kernel) -> Result<Contents> {
    let mut files = Contents::new();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("busybox is not installed (apt-get install busybox-static, or run .ci/run)")?;
    let mut binaries = vec![(busybox, "/bin/busybox".to_string())];
    for (name, guest_path) in TOOLS {
        binaries.push((tool_binary(cache, name)?, guest_path.to_string()));
    }
    for (host, guest) in &binaries {
        files.insert(
            guest.trim_start_matches('/').to_string(),
            (host.clone(), 0o755),
        );
        for lib in libraries(host)? {
            let guest_lib = lib.to_string_lossy().trim_start_matches('/').to_string();
            files.insert(guest_lib, (lib, 0o755));
        }
    }
    for module in &kernel.modules {
        files.insert(
            format!("lib/modules/e2e/{module}.ko"),
            (
                kernel.dir.join("modules").join(format!("{module}.ko")),
                0o644,
            ),
        );
    }
    files.insert(
        "lib/modules/e2e/order".to_string(),
        (kernel.dir.join("modules/order"), 0o644),
    );
    Ok(files)
}

/// Finds or builds the base initramfs for `kernel`.
fn initrd(cache: &Path, kernel: &Kernel, which: GuestKernel) -> Result<PathBuf> {
    let files = initrd_contents(cache, kernel)?;
    let mut hash = Fnv::new();
    hash.add(BUILDER_VERSION.as_bytes());
    hash.add(INIT.as_bytes());
    hash.add(kernel.dir.to_string_lossy().as_bytes());
    for (guest, (host, mode)) in &files {
        hash.add(guest.as_bytes());
        hash.add(&mode.to_le_bytes());
        hash.add_file(host)?;
    }
    let flavour = format!("initrd-{}-", which.tag());
    let path = cache.join(format!("{flavour}{}-{:016x}.cpio", kernel.release, hash.0));
    if path.exists() {
        return Ok(path);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".initrd-")
        .tempfile_in(cache)?;
    let mut cpio = Cpio::new(BufWriter::new(tmp.as_file()));
    for dir in [
        "bin", "dev", "e2e", "etc", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin",
        "usr/sbin",
    ] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, INIT.as_bytes())?;
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
    for (guest, (host, mode)) in &files {
        // Parent directories first (the kernel does not create them).
        for (at, _) in guest.match_indices('/') {
            cpio.dir(&guest[..at])?;
        }
        let data = fs::read(host).map_err(|e| format!("{}: {e}", host.display()))?;
        cpio.file(guest, *mode, &data)?;
    }
    cpio.finish()?.flush()?;
    tmp.as_file().sync_all()?;
    let mut perms = tmp.as_file().metadata()?.permissions();
    perms.set_mode(0o644);
    tmp.as_file().set_permissions(perms)?;
    match tmp.persist(&path) {
        Ok(_) => {}
        Err(_) if path.exists() => {}
        Err(e) => return Err(format!("{}: {e}", path.display()).into()),
    }
    // Older builds of this flavour (another kernel, an upgraded fio) are 90 MB each: drop them.
    for old in fs::read_dir(cache)?.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = old.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(&flavour) && n.ends_with(".cpio")) && old != path {
            let _ = fs::remove_file(&old);
        }
    }
    Ok(path)
}

/// A writer of "newc" cpio archives (what the kernel's initramfs unpacker reads). Entries get
/// mtime 0, owner root and sequential inode numbers, so the same input gives the same bytes.
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            written: 0,
            ino: 1,
            dirs: Default::default(),
        }
    }

    /// A directory (once; repeats are ignored).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        if self.dirs.insert(path.to_string()) {
            self.entry(path, S_IFDIR | 0o755, 0, 0, &[])?;
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 0, 0, data)
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, major, minor, &[])
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, to: u64) -> io::Result<()> {
        let rem = self.written % to;
        if rem != 0 {
            self.write(&vec![0u8; (to - rem) as usize])?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        rmajor: u32,
        rminor: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let name_len = path.len() + 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            rmajor,
            rminor,
            name_len,
            0, // check
        );
        self.ino += 1;
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad(4)?;
        self.write(data)?;
        self.pad(4)
    }

    /// Writes the trailer, pads to 512 bytes, and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 0, 0, &[])?;
        self.pad(512)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_deterministic() -> Result<()> {
        let build = || -> Result<Vec<u8>> {
            let mut c = Cpio::new(Vec::new());
            c.dir("e2e")?;
            c.file("e2e/test.sh", 0o755, b"echo hi\n")?;
            Ok(c.finish()?)
        };
        let a = build()?;
        assert_eq!(a, build()?);
        assert_eq!(a.len() % 512, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("e2e/test.sh"));
        assert!(text.contains("TRAILER!!!"));
        Ok(())
    }

    #[test]
    fn fnv_separates_fields() {
        let mut a = Fnv::new();
        a.add(b"ab");
        a.add(b"c");
        let mut b = Fnv::new();
        b.add(b"a");
        b.add(b"bc");
        assert_ne!(a.0, b.0);
    }
}
