//! `--sandbox namespace|chroot|none` and `--user` / `--group`: once the backing file, tap or
//! endpoints and the listening socket are open, the daemon gives up what it no longer needs.
//!
//! `namespace` (the default, virtiofsd's model): new mount, IPC and UTS namespaces (and a new,
//! empty network namespace unless the device needs the host's, as net does for its tap), with
//! an empty read-only tmpfs as root holding only bind mounts of the directories whose files the
//! daemon removes at exit (its socket, console pty links). `chroot`: for hosts without
//! namespaces, `chroot` into an empty directory (files are then left behind at exit; the next
//! start replaces a stale socket). Both then switch to `--user` / `--group` if given, drop every
//! capability (bounding, ambient, effective, permitted, inheritable) and set `PR_SET_NO_NEW_PRIVS`.
//!
//! No PID namespace: it needs a fork, which would make the PID that systemd, the tests and the
//! benchmarks see a monitor rather than the daemon. seccomp takes its place (no `ptrace`, and
//! signals only to the daemon itself).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root, Gid, Uid};

/// How the daemon confines itself (`--sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New mount/IPC/UTS (and network) namespaces with an empty root.
    Namespace,
    /// chroot into an empty directory; for hosts where namespaces are unavailable.
    Chroot,
    /// No sandbox (capabilities are still dropped).
    None,
}

/// The user and group to run as after the privileged set-up (`--user`, `--group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Validated sandbox settings (from the shared command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    /// `None`: the default, namespaces, falling back to no sandbox with one warning when the
    /// process may not create namespaces. `Some`: what the operator asked for, no fallback.
    pub mode: Option<SandboxMode>,
    pub run_as: Option<RunAs>,
}

/// What one daemon still needs once it serves: given by each daemon to [`crate::run`].
#[derive(Debug, Clone)]
pub struct Needs {
    /// The system calls it makes while serving.
    pub syscalls: crate::seccomp::Profile,
    /// Keep the host's network namespace (net: its tap's queues are re-attached with ioctls
    /// on the tap fds, which do not depend on the namespace, but TCP endpoints and future
    /// features may). blk and console get an empty one.
    pub host_network: bool,
    /// Files the daemon removes at exit (besides its socket): their directories stay visible.
    pub remove_at_exit: Vec<PathBuf>,
}

impl Needs {
    /// A daemon that needs nothing but its open descriptors.
    pub fn new(syscalls: crate::seccomp::Profile) -> Needs {
        Needs {
            syscalls,
            host_network: false,
            remove_at_exit: Vec::new(),
        }
    }
}

/// Errors entering the sandbox, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("--sandbox namespace: cannot create namespaces: {0} (needs CAP_SYS_ADMIN or unprivileged user namespaces; use --sandbox chroot or none, or run as root)")]
    Unshare(nix::Error),
    #[error("--sandbox namespace: the process already runs several threads, so it cannot enter a mount namespace (a program embedding the daemon must pick --sandbox none or start it first)")]
    Threads,
    #[error("--sandbox chroot: {0} (needs CAP_SYS_CHROOT; use --sandbox none)")]
    Chroot(String),
    #[error("sandbox: {what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("--user/--group: cannot switch to uid {uid} gid {gid}: {source}")]
    User {
        uid: u32,
        gid: u32,
        source: nix::Error,
    },
    #[error("cannot drop capabilities: {0}")]
    Capabilities(io::Error),
}

fn setup<T>(what: impl Into<String>, result: nix::Result<T>) -> Result<T, SandboxError> {
    result.map_err(|e| SandboxError::Setup {
        what: what.into(),
        source: e.into(),
    })
}

/// Confines the process as `config` says. Must run while the process has one thread (a mount
/// namespace cannot be entered by a thread that shares its file-system state).
///
/// `socket` is the socket file this process created, if any: its directory stays visible so
/// that it can be removed at exit.
pub fn enter(
    config: &SandboxConfig,
    needs: &Needs,
    socket: Option<&Path>,
) -> Result<(), SandboxError> {
    let mut dirs: Vec<PathBuf> = socket
        .into_iter()
        .chain(needs.remove_at_exit.iter().map(PathBuf::as_path))
        .filter_map(absolute_parent)
        .collect();
    dirs.sort();
    dirs.dedup();
    match config.mode {
        Some(SandboxMode::None) => {}
        Some(SandboxMode::Chroot) => enter_chroot()?,
        Some(SandboxMode::Namespace) => enter_namespaces(needs, &dirs)?,
        None => match enter_namespaces(needs, &dirs) {
            Err(SandboxError::Unshare(nix::Error::EPERM)) => {
                log::warn!("sandbox off: this process may not create namespaces (needs CAP_SYS_ADMIN or unprivileged user namespaces); pass --sandbox chroot or --sandbox none to choose explicitly");
            }
            other => other?,
        },
    }
    // The bounding set first: shrinking it needs CAP_SETPCAP, which --user takes away.
    drop_bounding_set()?;
    if let Some(run_as) = config.run_as {
        switch_user(run_as)?;
    }
    clear_capabilities()?;
    set_no_new_privs()
}

fn absolute_parent(path: &Path) -> Option<PathBuf> {
    let parent = path.parent()?;
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    // The same spelling as the path removed at exit (not canonicalized: symlinks in it are
    // followed when the bind is made, and the path itself then exists inside the sandbox).
    let dir = std::path::absolute(parent).ok()?;
    // Binding the whole root would undo the sandbox.
    (dir != Path::new("/")).then_some(dir)
}

/// The tmpfs that becomes the new root is first mounted here (in our own mount namespace,
/// so the host never sees it).
const NEW_ROOT: &str = "/tmp";

fn enter_namespaces(needs: &Needs, dirs: &[PathBuf]) -> Result<(), SandboxError> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if !needs.host_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // The host's mount namespace, to go back to if building the new root fails: the caller
    // then removes its socket file, which must be visible again.
    let host_mounts =
        std::fs::File::open("/proc/thread-self/ns/mnt").map_err(|source| SandboxError::Setup {
            what: "/proc/thread-self/ns/mnt".into(),
            source,
        })?;
    let in_user_namespace = match unshare(flags) {
        Ok(()) => false,
        // Not privileged: a user namespace of our own (where the kernel allows unprivileged
        // ones) gives the rights to build the rest, over nothing but our own mounts.
        Err(nix::Error::EPERM) if !Uid::effective().is_root() => {
            unshare(flags | CloneFlags::CLONE_NEWUSER).map_err(SandboxError::Unshare)?;
            map_own_ids()?;
            true
        }
        Err(nix::Error::EINVAL) => return Err(SandboxError::Threads),
        Err(e) => return Err(SandboxError::Unshare(e)),
    };
    let cwd = std::env::current_dir().ok();
    let result = build_root(dirs);
    if result.is_err() {
        let _ = nix::sched::setns(&host_mounts, CloneFlags::CLONE_NEWNS);
        if let Some(cwd) = cwd {
            let _ = std::env::set_current_dir(cwd);
        }
    }
    result?;
    log::info!(
        "sandbox: {}namespaces entered, empty root{}{}",
        if in_user_namespace { "user and " } else { "" },
        if needs.host_network {
            ""
        } else {
            ", no network"
        },
        if dirs.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            format!(", keeping {}", list.join(", "))
        }
    );
    Ok(())
}

/// In a new user namespace: our uid and gid map to themselves (files keep their owners), and
/// setgroups is denied, as the kernel requires before an unprivileged gid_map.
fn map_own_ids() -> Result<(), SandboxError> {
    let (uid, gid) = (Uid::current().as_raw(), Gid::current().as_raw());
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(file, text).map_err(|source| SandboxError::Setup {
            what: file.into(),
            source,
        })?;
    }
    Ok(())
}

/// In a fresh mount namespace: a tmpfs with `dirs` bound at their own paths becomes the root.
fn build_root(dirs: &[PathBuf]) -> Result<(), SandboxError> {
    // Nothing we mount from here on propagates back to the host.
    setup(
        "make mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    // Handles on the directories to keep, taken (in this namespace: a bind's source must be
    // one of its mounts) before the tmpfs may hide them.
    let mut keep: Vec<(OwnedFd, &PathBuf)> = Vec::new();
    for dir in dirs {
        let fd = setup(
            format!("{}: open", dir.display()),
            open(
                dir,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
        )?;
        // SAFETY: `open` just returned this descriptor; nothing else owns it.
        keep.push((unsafe { OwnedFd::from_raw_fd(fd) }, dir));
    }
    setup(
        "mount the tmpfs root",
        mount(
            Some("tmpfs"),
            NEW_ROOT,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        ),
    )?;
    for (fd, dir) in &keep {
        let target = Path::new(NEW_ROOT).join(dir.strip_prefix("/").unwrap_or(dir));
        std::fs::create_dir_all(&target).map_err(|source| SandboxError::Setup {
            what: format!("{}: create", target.display()),
            source,
        })?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        setup(
            format!("{}: bind", dir.display()),
            mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
    }
    drop(keep);
    setup("chdir to the new root", chdir(NEW_ROOT))?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only the
    // tmpfs (and the binds in it) reachable.
    setup("pivot_root", pivot_root(".", "."))?;
    setup("detach the old root", umount2(".", MntFlags::MNT_DETACH))?;
    setup("chdir /", chdir("/"))?;
    setup(
        "make the root read-only",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    Ok(())
}

fn enter_chroot() -> Result<(), SandboxError> {
    let chroot_error = |what: &str, e: io::Error| SandboxError::Chroot(format!("{what}: {e}"));
    let parent = std::env::temp_dir();
    let dir = tempfile_dir(&parent).map_err(|e| chroot_error("create an empty directory", e))?;
    let parent_fd = open(
        &parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| chroot_error("open its parent", e.into()))?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    let parent_fd = unsafe { OwnedFd::from_raw_fd(parent_fd) };
    let result = nix::unistd::chroot(&dir)
        .and_then(|()| chdir("/"))
        .map_err(|e| chroot_error("chroot", e.into()));
    // The directory is our root now; its name can go (the root stays usable), so nothing is
    // left behind in the temporary directory.
    if let Some(name) = dir.file_name() {
        let _ = nix::unistd::unlinkat(
            Some(parent_fd.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::RemoveDir,
        );
    }
    result?;
    log::info!("sandbox: chroot into an empty directory");
    Ok(())
}

fn tempfile_dir(parent: &Path) -> io::Result<PathBuf> {
    let template = parent.join("vhost-user-root.XXXXXX");
    let template = CString::new(template.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    nix::unistd::mkdtemp(template.as_c_str()).map_err(io::Error::from)
}

fn switch_user(run_as: RunAs) -> Result<(), SandboxError> {
    let (uid, gid) = (Uid::from_raw(run_as.uid), Gid::from_raw(run_as.gid));
    let error = |source| SandboxError::User {
        uid: run_as.uid,
        gid: run_as.gid,
        source,
    };
    // Groups first: after setresuid we would no longer be allowed to change them.
    nix::unistd::setgroups(&[gid]).map_err(error)?;
    nix::unistd::setresgid(gid, gid, gid).map_err(error)?;
    nix::unistd::setresuid(uid, uid, uid).map_err(error)?;
    log::info!("running as uid {} gid {}", run_as.uid, run_as.gid);
    Ok(())
}

/// Empties the ambient and bounding sets: no later execve or setuid can bring a capability
/// back. Nothing the daemons do after start needs one: net's tap ioctls after start
/// (TUNSETQUEUE, TUNSETOFFLOAD, TUNSETVNETHDRSZ) act on tap fds it already holds and check none.
fn drop_bounding_set() -> Result<(), SandboxError> {
    let last_error = || SandboxError::Capabilities(io::Error::last_os_error());
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        // Kernels before 4.3 have no ambient set: nothing to clear.
        log::debug!("PR_CAP_AMBIENT_CLEAR_ALL: {}", io::Error::last_os_error());
    }
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the last capability this kernel knows.
                Some(libc::EINVAL) => break,
                // Without CAP_SETPCAP the bounding set can't shrink; the sets below are what
                // matter for an unprivileged process, and they are emptied next.
                Some(libc::EPERM) => break,
                _ => return Err(last_error()),
            }
        }
    }
    Ok(())
}

/// Empties the effective, permitted and inheritable sets.
fn clear_capabilities() -> Result<(), SandboxError> {
    let mut header = libc_cap_header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut current = [libc_cap_data::default(); 2];
    // SAFETY: capget writes two data structs (version 3) into `current`, which has room for
    // them, and reads the header, which is ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut libc_cap_header,
            current.as_mut_ptr(),
        )
    };
    if rc == 0 && current == [libc_cap_data::default(); 2] {
        // Nothing to clear (an unprivileged service): no capset, which systemd's
        // `SystemCallFilter=~@privileged` answers with EPERM.
        return Ok(());
    }
    let data = [libc_cap_data::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3), both valid and ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut libc_cap_header,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(SandboxError::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct libc_cap_header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct libc_cap_data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `PR_SET_NO_NEW_PRIVS`: no execve can give this process privileges again (and seccomp
/// filters may be installed without CAP_SYS_ADMIN).
pub fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_to_keep_are_absolute_and_never_the_root() {
        assert_eq!(absolute_parent(Path::new("/x.sock")), None);
        assert_eq!(
            absolute_parent(Path::new("/tmp/x.sock")),
            Some(PathBuf::from("/tmp"))
        );
        let here = std::env::current_dir().ok();
        assert_eq!(absolute_parent(Path::new("x.sock")), here);
    }
}
