//! The listening socket and the accept / serve / re-accept loop.
//!
//! The socket is bound once. A `VhostUserDaemon` cannot be reused after its frontend leaves, so
//! each connection gets a fresh daemon and a fresh backend on the same listener: a VMM that
//! reconnects (guest reboot, QEMU restart with `reconnect=1`) finds the path it knows, and the
//! path is never unlinked and re-bound under it.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{umask, Mode};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};

use crate::cli::{ListenConfig, ListenSource};
use crate::sandbox::Needs;
use crate::{GuestMemory, GuestMemoryAtomic};

/// Errors setting up or running the listener, each worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: another process is already serving this socket; stop it or choose another --socket-path")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; remove it or choose another --socket-path")]
    NotASocket { path: PathBuf },
    #[error(
        "{path}: cannot bind the socket: {source} (does the directory exist and is it writable?)"
    )]
    Bind { path: PathBuf, source: io::Error },
    #[error("{path}: cannot set the socket's mode or group: {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error("--fd {fd}: not a listening UNIX socket ({reason}); pass the descriptor of a socket in listen state")]
    BadFd { fd: RawFd, reason: String },
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot create the device backend: {0}")]
    Backend(io::Error),
    #[error("accepting a frontend connection failed: {0}")]
    Accept(String),
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The device's own start-up inside the sandbox failed (the message is the device's).
    #[error("{0}")]
    Setup(String),
}

/// A listening socket, and the path to remove at exit if we created it.
pub struct BoundListener {
    listener: Listener,
    created_path: Option<PathBuf>,
}

impl BoundListener {
    /// The socket file this process created (and removes when it exits).
    pub fn created_path(&self) -> Option<&Path> {
        self.created_path.as_deref()
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        if let Some(path) = &self.created_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates the listening socket described by `config`.
pub fn bind(config: &ListenConfig) -> Result<BoundListener, ServeError> {
    match &config.source {
        ListenSource::Path { path, mode, gid } => bind_path(path, *mode, *gid),
        ListenSource::Fd(fd) => adopt_fd(*fd),
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ServeError::InUse {
            path: path.to_owned(),
        });
    }
    // Nobody listens: a previous instance died without cleaning up.
    log::warn!("{}: removing stale socket", path.display());
    std::fs::remove_file(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn bind_path(path: &Path, mode: u32, gid: Option<u32>) -> Result<BoundListener, ServeError> {
    remove_stale_socket(path)?;
    let listener = bind_with_mode(path, mode, gid)?;
    Ok(BoundListener {
        listener: Listener::from(listener),
        // Absolute: the sandbox changes the working directory before the file is removed.
        created_path: Some(std::path::absolute(path).unwrap_or_else(|_| path.to_owned())),
    })
}

/// Binds a UNIX socket at `path` (which must not exist) with permissions `mode` and, when
/// given, group `gid`. Also used for the other sockets a daemon offers (console endpoints).
pub fn bind_with_mode(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, ServeError> {
    // The socket is bound and listening under a temporary name, then renamed into place: a
    // client that sees the path (a VMM, a test waiting for it) never finds a socket that is
    // not listening yet (bind(2) creates the file before listen(2)).
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    // The umask makes the socket appear with at most `mode`: there is no moment in which a
    // wider mode would let someone else connect.
    let previous = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = UnixListener::bind(&staging);
    umask(previous);
    let listener = bound.map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let permissions_error = |source| ServeError::Permissions {
        path: path.to_owned(),
        source,
    };
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .map_err(permissions_error)
        .and_then(|()| match gid {
            Some(gid) => nix::unistd::chown(&staging, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| permissions_error(e.into())),
            None => Ok(()),
        })
        .and_then(|()| {
            std::fs::rename(&staging, path).map_err(|source| ServeError::Bind {
                path: path.to_owned(),
                source,
            })
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

fn adopt_fd(fd: RawFd) -> Result<BoundListener, ServeError> {
    let bad = |reason: String| ServeError::BadFd { fd, reason };
    let stat = nix::sys::stat::fstat(fd).map_err(|e| bad(e.to_string()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    // SAFETY: fstat just confirmed `fd` is an open socket; this process takes sole ownership of
    // it here, as the flag's contract says (nothing else in the program uses that number).
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    match getsockopt(&listener, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => {
            // Ownership goes back to the caller's number; we must not close it on error.
            std::mem::forget(listener);
            return Err(bad("socket is not listening".into()));
        }
        Err(e) => {
            std::mem::forget(listener);
            return Err(bad(e.to_string()));
        }
    }
    // The library's accept loop spins on EWOULDBLOCK: the socket must block.
    listener
        .set_nonblocking(false)
        .map_err(|e| bad(e.to_string()))?;
    Ok(BoundListener {
        listener: Listener::from(listener),
        created_path: None,
    })
}

/// systemd's notification socket, connected before the sandbox hides its path.
static NOTIFY: OnceLock<UnixDatagram> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` (when systemd started us with Type=notify) so that readiness
/// can be sent from inside the sandbox, where the socket's path no longer exists.
fn connect_notify_socket() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let connect = || -> io::Result<UnixDatagram> {
        let socket = UnixDatagram::unbound()?;
        match path.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?
            }
            None => socket.connect(&path)?,
        }
        Ok(socket)
    };
    match connect() {
        Ok(socket) => {
            let _ = NOTIFY.set(socket);
        }
        Err(e) => log::warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy()),
    }
}

/// Tells systemd (when it started us with Type=notify) that the socket is ready.
pub fn notify_ready() {
    let result = match NOTIFY.get() {
        Some(socket) => socket.send(b"READY=1").map(drop),
        None => sd_notify::notify(false, &[sd_notify::NotifyState::Ready]),
    };
    if let Err(e) = result {
        log::debug!("sd_notify READY=1 failed: {e}");
    }
}

/// A device the serve loop can run. The loop shares it with the worker threads as `Arc<Self>`
/// and creates a fresh one per frontend connection.
pub trait DaemonBackend: VhostUserBackend<Bitmap = crate::DirtyBitmap> + Sized + 'static
where
    Self::Vring: Clone + Send + Sync,
{
    /// Registers the device's own descriptors (tap fds, io_uring eventfds, endpoint sockets)
    /// with the worker threads once the daemon exists: `handlers[i]` is worker thread `i`; use
    /// `data` values above `num_queues()`.
    fn register_listeners(
        self: &Arc<Self>,
        _handlers: &[Arc<VringEpollHandler<Arc<Self>>>],
    ) -> io::Result<()> {
        Ok(())
    }
}

/// A daemon's whole life after its device is ready: binds the socket, confines the process
/// (sandbox, then seccomp, as `config` says and `needs` describes), arranges for SIGTERM and
/// SIGINT to run `on_exit` and remove the socket we created, then serves frontends forever.
///
/// `on_exit` is the device's last words (flush a disk, remove pty links); it also runs when
/// start-up fails after this point, so nothing the device created outlives a failed start.
pub fn run<B, F, X>(
    name: &str,
    config: &ListenConfig,
    needs: Needs,
    on_exit: X,
    new_backend: F,
) -> Result<(), ServeError>
where
    B: DaemonBackend,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> io::Result<B>,
    X: FnOnce() + Send + 'static,
{
    run_with_setup(name, config, needs, on_exit, || Ok(()), new_backend)
}

/// [`run`], with `setup` run inside the sandbox, before seccomp and before serving: for a
/// device that must start threads (which the sandbox forbids before it) yet report its
/// errors at start-up (vhost-user-blk connecting to a Ceph cluster).
pub fn run_with_setup<B, F, X, S>(
    name: &str,
    config: &ListenConfig,
    needs: Needs,
    on_exit: X,
    setup: S,
    new_backend: F,
) -> Result<(), ServeError>
where
    B: DaemonBackend,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> io::Result<B>,
    X: FnOnce() + Send + 'static,
    S: FnOnce() -> Result<(), String>,
{
    // A mount namespace can only be entered by a process with one thread, so the signal
    // thread starts after the sandbox. Until then SIGTERM and SIGINT are held pending (not
    // lost, not fatal): one sent as soon as the socket appears still runs `on_exit`.
    let held = hold_termination_signals().map_err(ServeError::Signals)?;
    let on_exit = Arc::new(Mutex::new(Some(on_exit)));
    let last_words = || {
        if let Some(on_exit) = crate::lock(&on_exit).take() {
            on_exit();
        }
    };
    let mut listener = match bind(config) {
        Ok(listener) => listener,
        Err(e) => {
            last_words();
            return Err(e);
        }
    };
    if let Some(path) = listener.created_path() {
        log::info!("listening on {}", path.display());
    }
    connect_notify_socket();
    if let Err(e) = crate::sandbox::enter(&config.sandbox, &needs, listener.created_path()) {
        last_words();
        return Err(ServeError::Sandbox(e));
    }
    let (exit_hook, to_remove) = (on_exit.clone(), listener.created_path.clone());
    crate::signals::exit_on_termination(move || {
        if let Some(on_exit) = crate::lock(&exit_hook).take() {
            on_exit();
        }
        if let Some(path) = to_remove {
            let _ = std::fs::remove_file(path);
        }
    })
    .map_err(ServeError::Signals)?;
    release_termination_signals(&held).map_err(ServeError::Signals)?;
    // The SIGBUS guard's pipe and watcher thread: after the sandbox (which wants a single
    // thread), before the filter (which has no pipe2).
    crate::sigbus::arm();
    if let Err(e) = setup() {
        last_words();
        return Err(ServeError::Setup(e));
    }
    // Before the first worker thread; TSYNC covers the signal thread (and anything a library
    // started earlier).
    if let Err(e) = needs.syscalls.install(config.seccomp) {
        last_words();
        return Err(ServeError::Seccomp(e));
    }
    serve(name, &mut listener, new_backend)
}

fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Blocks SIGTERM and SIGINT in this thread; returns the signals to unblock later (those that
/// were not already blocked).
fn hold_termination_signals() -> io::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut previous = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_BLOCK,
        Some(&termination_signals()),
        Some(&mut previous),
    )?;
    let mut held = SigSet::empty();
    for signal in termination_signals().iter() {
        if !previous.contains(signal) {
            held.add(signal);
        }
    }
    Ok(held)
}

fn release_termination_signals(held: &nix::sys::signal::SigSet) -> io::Result<()> {
    use nix::sys::signal::{pthread_sigmask, SigmaskHow};
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(held), None)?;
    Ok(())
}

/// Serves frontends one after another on `listener`, forever (until a signal ends the process).
///
/// `new_backend` is called for each connection, so no device state leaks from one VMM session
/// into the next.
pub fn serve<B, F>(
    name: &str,
    listener: &mut BoundListener,
    mut new_backend: F,
) -> Result<(), ServeError>
where
    B: DaemonBackend,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> io::Result<B>,
{
    crate::sigbus::arm();
    notify_ready();
    loop {
        let backend = new_backend().map_err(ServeError::Backend)?;
        serve_one(name, listener, backend)?;
    }
}

/// Serves one frontend connection on `listener` with `backend`, until the frontend leaves.
pub fn serve_one<B>(name: &str, listener: &mut BoundListener, backend: B) -> Result<(), ServeError>
where
    B: DaemonBackend,
    B::Vring: Clone + Send + Sync,
{
    let backend = Arc::new(backend);
    let memory = GuestMemoryAtomic::new(GuestMemory::new());
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), memory)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    backend
        .register_listeners(&handlers)
        .map_err(ServeError::Backend)?;
    log::info!("waiting for a frontend");
    daemon
        .start(&mut listener.listener)
        .map_err(|e| ServeError::Accept(e.to_string()))?;
    log::info!("frontend connected");
    // A frontend that truncates guest memory under us loses this connection.
    crate::sigbus::set_connection(daemon.shutdown_handle());
    match daemon.wait() {
        Ok(()) => log::info!("frontend disconnected"),
        Err(e) => log::warn!("frontend connection ended: {e}"),
    }
    crate::sigbus::set_connection(None);
    for handler in &handlers {
        handler.send_exit_event();
    }
    drop(handlers);
    // Joins the worker threads; the device (and its in-flight I/O) goes with the last Arc.
    drop(daemon);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn path_config(path: &Path, mode: u32) -> ListenConfig {
        ListenConfig::new(ListenSource::Path {
            path: path.to_owned(),
            mode,
            gid: None,
        })
    }

    #[test]
    fn socket_gets_requested_mode_and_is_removed_on_drop() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sock");
        let bound = bind(&path_config(&path, 0o600))?;
        assert_eq!(std::fs::metadata(&path)?.mode() & 0o777, 0o600);
        assert_eq!(bound.created_path(), Some(path.as_path()));
        drop(bound);
        assert!(!path.exists());
        let bound = bind(&path_config(&path, 0o660))?;
        assert_eq!(std::fs::metadata(&path)?.mode() & 0o777, 0o660);
        drop(bound);
        Ok(())
    }

    #[test]
    fn live_socket_is_refused_stale_one_replaced() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sock");
        let live = UnixListener::bind(&path)?;
        assert!(matches!(
            bind(&path_config(&path, 0o600)),
            Err(ServeError::InUse { .. })
        ));
        drop(live); // leaves a stale socket file behind
        assert!(path.exists());
        let bound = bind(&path_config(&path, 0o600))?;
        drop(bound);
        std::fs::write(&path, b"not a socket")?;
        assert!(matches!(
            bind(&path_config(&path, 0o600)),
            Err(ServeError::NotASocket { .. })
        ));
        Ok(())
    }

    #[test]
    fn inherited_fd_must_be_a_listening_socket() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir()?;
        let file = std::fs::File::create(dir.path().join("f"))?;
        let fd = file.into_raw_fd();
        let config = ListenConfig::new(ListenSource::Fd(fd));
        assert!(matches!(bind(&config), Err(ServeError::BadFd { .. })));
        let listener = UnixListener::bind(dir.path().join("l.sock"))?;
        let config = ListenConfig::new(ListenSource::Fd(listener.into_raw_fd()));
        let bound = bind(&config)?;
        assert_eq!(bound.created_path(), None);
        Ok(())
    }
}
