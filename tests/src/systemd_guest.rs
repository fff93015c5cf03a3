//! A Debian 12 guest with systemd as PID 1, to test the .deb as an operator would use it.
//!
//! Cached under `<target>/systemd-guest/` (every piece built next to its final name and renamed
//! into place; a lock file keeps concurrent builders from doing the work twice):
//!
//! - `kernel-<package>_<version>/`: `vmlinuz` of the kernel `linux-image-amd64` points to,
//!   and the modules an ext4 root on virtio-blk and a tap need (all `=m` in Debian), with
//!   `order` (load order).
//! - `root-<hash>.img`: a raw ext4 image (`mkfs.ext4 -d`, no loop mount) of
//!   `debootstrap --variant=minbase bookworm` plus systemd, systemd-sysv and udev, with a
//!   `vhost-test.service` that mounts the second disk and runs its `run.sh` once the system
//!   is up, its output on the serial console. The hash covers the builder's version, the
//!   package list, the mirror and the files written into the image.
//!
//! Per run: an initramfs of busybox and those modules whose `/init` mounts `/dev/vda` and
//! `switch_root`s to systemd, and a second ext4 disk (the payload: the script, the .deb, the
//! programs it needs). The root disk is attached with `snapshot=on`: the cached image never
//! changes. The script reports `E2E key=value` lines ([`crate::qemu::GuestOutput`]).

use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{
    decompress_module, extract_deb, find_program, rename_into_place, resolve_kernel_package, run,
    sanitize, target_dir, Apt, Cpio, Lock,
};
use crate::qemu::{command_line, qemu_binary, qemu_path, Logs};
use crate::Result;

/// Bump when the image's layout changes in a way the hash would not see.
const BUILDER_VERSION: &str = "vhost-user-systemd-guest 1";
const SUITE: &str = "bookworm";
/// Besides minbase: what the test needs (systemd as PID 1, udev for /dev/vdb and the tap), and
/// what the package depends on beyond minbase (librbd1 and librados2: RBD support), since the
/// guest has no network to fetch them when the .deb is installed.
const PACKAGES: &str = "systemd,systemd-sysv,udev,librbd1";

/// Modules to insmod in the initramfs, in dependency order (modinfo's `depends=`).
const MODULES: [&str; 12] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    // ext4's metadata checksums ask the crypto API for crc32c when mounting.
    "crc32c_generic",
    "ext4",
    // vhost-user-net creates a tap; there is no modprobe in the initramfs to load it later.
    "tun",
];

/// The initramfs' `/init`: modules, the root file system, then systemd.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "E2E insmod_failed=$m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "E2E error=cannot mount /dev/vda"
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot /sbin/init
"#;

/// The unit that runs the test once the system is up.
const TEST_UNIT: &str = "[Unit]
Description=vhost-user package test (run.sh from the second disk)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /test && mount -o ro /dev/vdb /test && exec /bin/bash /test/run.sh'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// Units that would only slow the boot down (or write on the serial console).
const MASKED: [&str; 8] = [
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "getty.target",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dpkg-db-backup.timer",
];

/// A built guest.
#[derive(Debug, Clone)]
pub struct SystemdGuest {
    pub kernel: PathBuf,
    /// The kernel's module directory (`order` and the `.ko` files).
    pub modules: PathBuf,
    pub root: PathBuf,
}

/// `<target>/systemd-guest`, or `$VHOST_SYSTEMD_GUEST_CACHE`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VHOST_SYSTEMD_GUEST_CACHE") {
        return PathBuf::from(dir);
    }
    target_dir().join("systemd-guest")
}

/// The Debian mirror: `$VHOST_DEBIAN_MIRROR`, else the one the host's apt sources use.
pub fn mirror() -> String {
    if let Ok(mirror) = std::env::var("VHOST_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut texts = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.filter_map(|e| e.ok()) {
            texts.push(fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uri = if let Some(uris) = line.strip_prefix("URIs:") {
                uris.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| u.ends_with("/debian") || u.ends_with("/debian/")) {
                return uri.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

impl SystemdGuest {
    /// Builds the guest in `cache` (or finds it there).
    pub fn build(cache: &Path) -> Result<SystemdGuest> {
        fs::create_dir_all(cache)?;
        let _lock = Lock::take(&cache.join(".lock"))?;
        let kernel = kernel(cache)?;
        let root = root_image(cache)?;
        Ok(SystemdGuest {
            kernel: kernel.join("vmlinuz"),
            modules: kernel.join("modules"),
            root,
        })
    }

    /// Writes the initramfs (busybox, the modules, [`INIT`]) to `out`.
    pub fn write_initrd(&self, out: &Path) -> Result<()> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or("busybox is not installed (apt-get install busybox-static, or run .ci/run)")?;
        let file = fs::File::create(out)?;
        let mut cpio = Cpio::new(BufWriter::new(&file));
        for dir in ["bin", "dev", "modules", "newroot", "proc", "sys"] {
            cpio.dir(dir)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("init", 0o755, INIT.as_bytes())?;
        cpio.file("bin/busybox", 0o755, &fs::read(busybox)?)?;
        let order = fs::read_to_string(self.modules.join("order"))?;
        cpio.file("modules/order", 0o644, order.as_bytes())?;
        for module in order.lines().filter(|l| !l.is_empty()) {
            let data = fs::read(self.modules.join(format!("{module}.ko")))?;
            cpio.file(&format!("modules/{module}.ko"), 0o644, &data)?;
        }
        cpio.finish()?.flush()?;
        Ok(())
    }

    /// Boots the guest with `payload` (an ext4 image, see [`make_payload`]) as `/dev/vdb`
    /// until it powers off or `timeout` passes; returns the serial log (also kept in `logs`).
    pub fn run(&self, payload: &Path, logs: &Logs, timeout: Duration) -> Result<String> {
        let initrd = logs.path("initrd.cpio");
        self.write_initrd(&initrd)?;
        let serial = logs.path("serial.log");
        let qemu = qemu_binary()?;
        let args: Vec<String> = [
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-kernel".into(),
            qemu_path(&self.kernel),
            "-initrd".into(),
            qemu_path(&initrd),
            "-append".into(),
            "console=ttyS0 quiet loglevel=3 panic=-1 systemd.show_status=0 \
             systemd.log_level=warning"
                .into(),
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
                qemu_path(&self.root)
            ),
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,readonly=on",
                qemu_path(payload)
            ),
            "-serial".into(),
            format!("file:{}", qemu_path(&serial)),
        ])
        .collect();
        let program = qemu.to_string_lossy().into_owned();
        logs.note_command(&command_line(&program, &args));
        let output = fs::File::create(logs.path("qemu.log"))?;
        let mut child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
        match status {
            None => Err(format!("the guest did not power off within {timeout:?}").into()),
            Some(s) if !s.success() => Err(format!("QEMU exited with {s}").into()),
            Some(_) => Ok(text),
        }
    }
}

/// An ext4 image of `dir` at `out` (the guest mounts it read-only at /test).
pub fn make_payload(dir: &Path, out: &Path) -> Result<()> {
    let _ = fs::remove_file(out);
    let mkfs =
        find_program("mkfs.ext4").ok_or("mkfs.ext4 is missing (apt-get install e2fsprogs)")?;
    run(
        &mkfs.to_string_lossy(),
        &[
            "-q",
            "-F",
            "-L",
            "payload",
            "-d",
            &dir.to_string_lossy(),
            &out.to_string_lossy(),
            "512M",
        ],
        None,
    )?;
    Ok(())
}

/// Finds or builds `kernel-<package>_<version>/`.
fn kernel(cache: &Path) -> Result<PathBuf> {
    let (package, version, _) = resolve_kernel_package(&Apt::Host)?;
    let dir = cache.join(format!(
        "kernel-{}_{}",
        sanitize(&package),
        sanitize(&version)
    ));
    if dir.join("vmlinuz").exists() {
        return Ok(dir);
    }
    eprintln!(
        "systemd guest: downloading {package} {version} (once; cached in {})",
        cache.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".kernel-")
        .tempdir_in(cache)?;
    let spec = format!("{package}={version}");
    run(
        "apt-get",
        &["-q", "-o", "APT::Sandbox::User=root", "download", &spec],
        Some(tmp.path()),
    )
    .map_err(|e| format!("{e} (run `apt-get update`, or .ci/run)"))?;
    let deb = fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download left no .deb")?;
    let unpacked = tmp.path().join("root");
    fs::create_dir(&unpacked)?;
    let mut patterns = vec!["./boot/vmlinuz-*".to_string()];
    patterns.extend(MODULES.iter().map(|m| format!("*/{m}.ko*")));
    extract_deb(&deb, &unpacked, &patterns)?;
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("modules"))?;
    let mut found = std::collections::BTreeMap::new();
    let mut stack = vec![unpacked.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if name.starts_with("vmlinuz-") {
                fs::rename(&path, out.join("vmlinuz"))?;
            } else if let Some((module, _)) = name.split_once(".ko") {
                found.insert(module.to_string(), path);
            }
        }
    }
    let mut order = Vec::new();
    for module in MODULES {
        // virtio_pci_*_dev are separate modules only in newer kernels.
        match found.get(module) {
            Some(path) => {
                decompress_module(path, &out.join("modules").join(format!("{module}.ko")))?;
                order.push(module);
            }
            None if module.starts_with("virtio_pci_") => {}
            None => return Err(format!("{package}: no module {module}").into()),
        }
    }
    if !out.join("vmlinuz").exists() {
        return Err(format!("{package}: no /boot/vmlinuz-*").into());
    }
    fs::write(out.join("modules/order"), order.join("\n") + "\n")?;
    rename_into_place(&out, &dir)?;
    Ok(dir)
}

/// Files written into the image after debootstrap: (path, mode, contents).
fn image_files() -> Vec<(String, u32, String)> {
    vec![
        ("etc/hostname".into(), 0o644, "sdguest\n".into()),
        (
            "etc/fstab".into(),
            0o644,
            "/dev/vda / ext4 rw,errors=remount-ro 0 0\n".into(),
        ),
        (
            "etc/systemd/system/vhost-test.service".into(),
            0o644,
            TEST_UNIT.into(),
        ),
    ]
}

/// Finds or builds `root-<hash>.img`.
fn root_image(cache: &Path) -> Result<PathBuf> {
    let mirror = mirror();
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    for part in [BUILDER_VERSION, SUITE, PACKAGES, mirror.as_str()] {
        hash.add(part.as_bytes());
    }
    for (path, mode, text) in image_files() {
        hash.add(path.as_bytes());
        hash.add(&mode.to_le_bytes());
        hash.add(text.as_bytes());
    }
    for unit in MASKED {
        hash.add(unit.as_bytes());
    }
    let image = cache.join(format!("root-{SUITE}-{:016x}.img", hash.0));
    if image.exists() {
        return Ok(image);
    }
    let debootstrap = find_program("debootstrap")
        .ok_or("debootstrap is not installed (apt-get install debootstrap, or run .ci/run)")?;
    let mkfs =
        find_program("mkfs.ext4").ok_or("mkfs.ext4 is missing (apt-get install e2fsprogs)")?;
    eprintln!(
        "systemd guest: debootstrap {SUITE} from {mirror} (about a minute, once; cached in {})",
        cache.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".root-")
        .tempdir_in(cache)?;
    let root = tmp.path().join("root");
    let include = format!("--include={PACKAGES}");
    run(
        &debootstrap.to_string_lossy(),
        &[
            "--variant=minbase",
            &include,
            SUITE,
            &root.to_string_lossy(),
            &mirror,
        ],
        None,
    )
    .map_err(|e| format!("{e} (is the Debian mirror reachable? set VHOST_DEBIAN_MIRROR)"))?;
    for (path, mode, text) in image_files() {
        let full = root.join(&path);
        fs::write(&full, text)?;
        fs::set_permissions(&full, fs::Permissions::from_mode(mode))?;
    }
    let system = root.join("etc/systemd/system");
    let wants = system.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/vhost-test.service",
        wants.join("vhost-test.service"),
    )?;
    for unit in MASKED {
        let link = system.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", link)?;
    }
    // Nothing in the guest uses apt: its lists and caches only make the image bigger.
    for dir in ["var/lib/apt/lists", "var/cache/apt"] {
        let _ = fs::remove_dir_all(root.join(dir));
        fs::create_dir_all(root.join(dir))?;
    }
    let out = tmp.path().join("root.img");
    run(
        &mkfs.to_string_lossy(),
        &[
            "-q",
            "-F",
            "-L",
            "root",
            "-d",
            &root.to_string_lossy(),
            &out.to_string_lossy(),
            "1536M",
        ],
        None,
    )?;
    rename_into_place(&out, &image)?;
    // Older images (another mirror, an older builder) are about 300 MB each.
    for old in fs::read_dir(cache)?.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = old.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("root-") && n.ends_with(".img")) && old != image {
            let _ = fs::remove_file(&old);
        }
    }
    Ok(image)
}

/// FNV-1a, for cache keys.
struct Fnv(u64);

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}
