//! The host side of a console port: a pseudo-terminal, or a UNIX / TCP socket that one client
//! at a time connects to; the history of guest output replayed to each new client; the log file.
//!
//! Everything is non-blocking and bounded: output waiting for a slow client is capped at
//! [`OUTPUT_LIMIT`] bytes (the backend stops taking guest buffers beyond that), input read from
//! the client waits in one [`INPUT_CHUNK`]-sized buffer until the guest has receive buffers.
//! No vhost types here.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::pty::PtyMaster;

/// Most guest output kept for a connected client that has not read it yet.
pub const OUTPUT_LIMIT: usize = 64 * 1024;
/// Most host input read ahead of the guest's receive buffers.
pub const INPUT_CHUNK: usize = 64 * 1024;

/// Where a port's host side is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    /// A new pseudo-terminal, with an optional symlink to its slave.
    Pty { link: Option<PathBuf> },
    /// A UNIX socket we listen on, created with `access`.
    Unix { path: PathBuf, access: FileAccess },
    /// A TCP socket we listen on.
    Tcp(SocketAddr),
}

/// Permissions and group of a file the daemon creates (a UNIX endpoint, a log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAccess {
    pub mode: u32,
    /// `None`: the process's group.
    pub gid: Option<u32>,
}

impl FileAccess {
    /// UNIX endpoints: owner and group connect, nobody else.
    pub const ENDPOINT_DEFAULT: FileAccess = FileAccess {
        mode: 0o660,
        gid: None,
    };
    /// Logs: the group reads what the guest wrote, nobody else does.
    pub const LOG_DEFAULT: FileAccess = FileAccess {
        mode: 0o640,
        gid: None,
    };
}

/// Creates (or opens) the log file at `path` with `access`, applied to an existing file too:
/// the guest's console output must not stay readable to whoever could read an older file.
pub fn prepare_log(path: &Path, access: FileAccess) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(access.mode)
        .open(path)
        .map_err(&context)?;
    file.set_permissions(std::fs::Permissions::from_mode(access.mode))
        .map_err(&context)?;
    if let Some(gid) = access.gid {
        nix::unistd::fchown(
            file.as_raw_fd(),
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| context(e.into()))?;
    }
    Ok(())
}

/// The last `capacity` bytes of guest output.
#[derive(Debug, Default)]
pub struct History {
    buf: VecDeque<u8>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            buf: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.capacity);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        let (a, b) = self.buf.as_slices();
        [a, b].concat()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

enum Client {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Client {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Client::Unix(s) => (&mut &*s).read(buf),
            Client::Tcp(s) => (&mut &*s).read(buf),
        }
    }

    fn write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Client::Unix(s) => (&mut &*s).write(data),
            Client::Tcp(s) => (&mut &*s).write(data),
        }
    }
}

enum Kind {
    Pty {
        master: PtyMaster,
        path: PathBuf,
        link: Option<PathBuf>,
        attached: bool,
    },
    Unix {
        listener: UnixListener,
        path: PathBuf,
        client: Option<Client>,
    },
    Tcp {
        listener: TcpListener,
        client: Option<Client>,
    },
}

/// What changed on the host side during [`HostPort::poll_host`].
#[derive(Debug, Default)]
pub struct HostEvents {
    /// Descriptors of newly accepted clients, to add to the worker's epoll.
    pub new_fds: Vec<RawFd>,
}

/// One port's host side.
pub struct HostPort {
    kind: Kind,
    history: History,
    log: Option<File>,
    pending_out: VecDeque<u8>,
    /// Input read from the endpoint: bytes `in_offset..in_len` are not yet in the guest.
    pending_in: Vec<u8>,
    in_offset: usize,
    in_len: usize,
    /// The endpoint may have input we have not read: it signalled readiness (or a client just
    /// came) and no read has hit EAGAIN since.
    input_ready: bool,
    label: String,
    reported: bool,
}

impl HostPort {
    /// Opens the endpoint (allocates the pty, binds the socket) and the log file.
    pub fn open(
        label: &str,
        spec: &EndpointSpec,
        history: usize,
        log: Option<&Path>,
    ) -> io::Result<HostPort> {
        let kind = match spec {
            EndpointSpec::Pty { link } => open_pty(link.as_deref())?,
            EndpointSpec::Unix { path, access } => {
                remove_stale_socket(path)?;
                let listener =
                    vhost_user_common::serve::bind_with_mode(path, access.mode, access.gid)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                listener.set_nonblocking(true)?;
                log::info!("{label}: listening on {}", path.display());
                Kind::Unix {
                    listener,
                    path: path.clone(),
                    client: None,
                }
            }
            EndpointSpec::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .map_err(|e| io::Error::new(e.kind(), format!("{addr}: cannot bind: {e}")))?;
                listener.set_nonblocking(true)?;
                log::info!("{label}: listening on tcp {}", listener.local_addr()?);
                Kind::Tcp {
                    listener,
                    client: None,
                }
            }
        };
        if let Kind::Pty { path, .. } = &kind {
            log::info!("{label}: pseudo-terminal {}", path.display());
        }
        let log = match log {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    // Without prepare_log (embedders), still not world-readable.
                    .mode(FileAccess::LOG_DEFAULT.mode)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: cannot open: {e}", path.display()))
                    })?,
            ),
            None => None,
        };
        Ok(HostPort {
            kind,
            history: History::new(history),
            log,
            pending_out: VecDeque::new(),
            pending_in: Vec::new(),
            in_offset: 0,
            in_len: 0,
            input_ready: true,
            label: label.to_string(),
            reported: false,
        })
    }

    /// The pty's slave path, for pty endpoints.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Pty { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The bound TCP address, for TCP endpoints.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            Kind::Tcp { listener, .. } => listener.local_addr().ok(),
            _ => None,
        }
    }

    /// Files this port created and that should go when the daemon exits.
    pub fn cleanup_paths(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::Pty { link, .. } => link.iter().cloned().collect(),
            Kind::Unix { path, .. } => vec![path.clone()],
            Kind::Tcp { .. } => Vec::new(),
        }
    }

    pub fn is_pty(&self) -> bool {
        matches!(self.kind, Kind::Pty { .. })
    }

    /// The listening socket, for UNIX and TCP endpoints: readiness means a client is waiting.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match &self.kind {
            Kind::Pty { .. } => None,
            Kind::Unix { listener, .. } => Some(listener.as_raw_fd()),
            Kind::Tcp { listener, .. } => Some(listener.as_raw_fd()),
        }
    }

    /// Descriptors data moves through: the pty master, or the connected client if any.
    pub fn io_fds(&self) -> Vec<RawFd> {
        match &self.kind {
            Kind::Pty { master, .. } => vec![master.as_raw_fd()],
            Kind::Unix { client, .. } | Kind::Tcp { client, .. } => {
                client.as_ref().map(client_fd).into_iter().collect()
            }
        }
    }

    /// The endpoint signalled readiness: its input is read again (until it would block).
    pub fn mark_readable(&mut self) {
        self.input_ready = true;
    }

    /// True while a client (or a pty reader) is attached.
    pub fn connected(&self) -> bool {
        match &self.kind {
            Kind::Pty { attached, .. } => *attached,
            Kind::Unix { client, .. } | Kind::Tcp { client, .. } => client.is_some(),
        }
    }

    /// The pty's window size as (cols, rows).
    pub fn window_size(&self) -> Option<(u16, u16)> {
        match &self.kind {
            Kind::Pty { master, .. } => get_winsize(master.as_raw_fd()).ok(),
            _ => None,
        }
    }

    /// Accepts clients (when `accept`: the listener signalled) and notices a pty reader coming
    /// or going.
    pub fn poll_host(&mut self, accept: bool) -> HostEvents {
        let mut events = HostEvents::default();
        let was = self.connected();
        match &mut self.kind {
            Kind::Pty {
                master, attached, ..
            } => {
                let now = pty_attached(master);
                if *attached && !now {
                    // Drop what the departed reader left unread, so the next one starts clean.
                    let _ = nix::sys::termios::tcflush(
                        master.as_fd(),
                        nix::sys::termios::FlushArg::TCIOFLUSH,
                    );
                }
                *attached = now;
            }
            Kind::Unix { .. } | Kind::Tcp { .. } if !accept => {}
            Kind::Unix {
                listener, client, ..
            } => loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if client.is_some() {
                            log::warn!(
                                "{}: a client is already connected; refusing another",
                                self.label
                            );
                            continue;
                        }
                        if stream.set_nonblocking(true).is_ok() {
                            events.new_fds.push(stream.as_raw_fd());
                            *client = Some(Client::Unix(stream));
                            self.input_ready = true;
                        }
                    }
                    Err(e) => {
                        log_accept_error(&self.label, &e);
                        break;
                    }
                }
            },
            Kind::Tcp { listener, client } => loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        if client.is_some() {
                            log::warn!(
                                "{}: refusing {peer}: a client is already connected",
                                self.label
                            );
                            continue;
                        }
                        if stream.set_nonblocking(true).is_ok() {
                            let _ = stream.set_nodelay(true);
                            log::info!("{}: client {peer} connected", self.label);
                            events.new_fds.push(stream.as_raw_fd());
                            *client = Some(Client::Tcp(stream));
                            self.input_ready = true;
                        }
                    }
                    Err(e) => {
                        log_accept_error(&self.label, &e);
                        break;
                    }
                }
            },
        }
        let now = self.connected();
        if now != was {
            self.on_connection_change(now);
        }
        events
    }

    /// The connection state if it changed since the last call (a client came or went, here or
    /// while reading and writing).
    pub fn connection_change(&mut self) -> Option<bool> {
        let now = self.connected();
        if now == self.reported {
            return None;
        }
        self.reported = now;
        Some(now)
    }

    fn on_connection_change(&mut self, connected: bool) {
        self.pending_out.clear();
        if connected {
            log::info!(
                "{}: client attached; replaying {} bytes of history",
                self.label,
                self.history.len()
            );
            self.pending_out.extend(self.history.contents());
        } else {
            log::info!("{}: client detached", self.label);
        }
    }

    fn disconnect(&mut self) {
        match &mut self.kind {
            Kind::Unix { client, .. } | Kind::Tcp { client, .. } => {
                if client.take().is_some() {
                    self.on_connection_change(false);
                }
            }
            Kind::Pty { .. } => {}
        }
    }

    /// Room for more guest output before back-pressure applies.
    pub fn output_room(&self) -> usize {
        OUTPUT_LIMIT.saturating_sub(self.pending_out.len())
    }

    /// Takes bytes the guest wrote: into the history and the log always, towards the client
    /// when one is attached (dropped otherwise, as on a serial line with nothing plugged in).
    pub fn guest_output(&mut self, data: &[u8]) {
        self.history.push(data);
        if let Some(log) = &mut self.log {
            if let Err(e) = log.write_all(data) {
                log::error!(
                    "{}: writing the log file failed, no longer logging: {e}",
                    self.label
                );
                self.log = None;
            }
        }
        if self.connected() {
            // Nothing queued before it: straight to the client, and only what it does not take
            // now is queued (one copy less for a client that keeps up).
            let sent = if self.pending_out.is_empty() {
                self.write_out(data)
            } else {
                0
            };
            if self.connected() {
                self.pending_out.extend(&data[sent..]);
            }
        }
    }

    /// Like [`HostPort::guest_output`] for the emergency-write register: never refused, but
    /// dropped towards the client once far beyond the output limit.
    pub fn emergency_output(&mut self, data: &[u8]) {
        if self.pending_out.len() >= 2 * OUTPUT_LIMIT {
            self.history.push(data);
            return;
        }
        self.guest_output(data);
    }

    /// Writes pending output until the endpoint would block.
    pub fn flush(&mut self) {
        while !self.pending_out.is_empty() {
            let (chunk, _) = self.pending_out.as_slices();
            match write_endpoint(&mut self.kind, chunk) {
                None => {
                    // Nobody to write to (any more).
                    self.pending_out.clear();
                    return;
                }
                Some(Ok(0)) => return,
                Some(Ok(n)) => {
                    self.pending_out.drain(..n);
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Some(Err(e)) => {
                    self.write_failed(&e);
                    return;
                }
            }
        }
    }

    /// Writes `data` to the endpoint until it would block; returns how much it took.
    fn write_out(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            match write_endpoint(&mut self.kind, &data[done..]) {
                None | Some(Ok(0)) => break,
                Some(Ok(n)) => done += n,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Some(Err(e)) => {
                    self.write_failed(&e);
                    break;
                }
            }
        }
        done
    }

    fn write_failed(&mut self, e: &io::Error) {
        log::debug!("{}: write failed: {e}", self.label);
        if self.is_pty() {
            // EIO: the reader went away; poll_host will notice.
            return;
        }
        self.disconnect();
    }

    /// Input read from the endpoint and not yet given to the guest; reads more (one chunk)
    /// when empty.
    pub fn pending_input(&mut self) -> &[u8] {
        if self.in_offset >= self.in_len {
            self.in_offset = 0;
            self.in_len = 0;
            if self.input_ready {
                self.read_input();
            }
        }
        &self.pending_in[self.in_offset..self.in_len]
    }

    /// Marks `n` bytes of pending input as delivered.
    pub fn consume_input(&mut self, n: usize) {
        self.in_offset = self.in_offset.saturating_add(n).min(self.in_len);
    }

    fn read_input(&mut self) {
        // Allocated (and zeroed) once; each read overwrites the front of it.
        if self.pending_in.len() < INPUT_CHUNK {
            self.pending_in.resize(INPUT_CHUNK, 0);
        }
        let result = match &mut self.kind {
            Kind::Pty { master, .. } => master.read(&mut self.pending_in),
            Kind::Unix { client, .. } | Kind::Tcp { client, .. } => match client {
                Some(c) => c.read(&mut self.pending_in),
                None => return,
            },
        };
        match result {
            Ok(0) => {
                self.input_ready = false;
                if !self.is_pty() {
                    self.disconnect();
                }
            }
            Ok(n) => self.in_len = n.min(self.pending_in.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => match e.kind() {
                // Drained: the next readiness event (edge-triggered) says when to read again.
                io::ErrorKind::WouldBlock => self.input_ready = false,
                // EIO on the pty master: nobody has the slave open.
                _ if self.is_pty() => self.input_ready = false,
                _ => {
                    log::debug!("{}: read failed: {e}", self.label);
                    self.disconnect();
                }
            },
        }
    }
}

/// One write to the endpoint's reader; None when there is none (no client, pty not attached).
fn write_endpoint(kind: &mut Kind, data: &[u8]) -> Option<io::Result<usize>> {
    match kind {
        Kind::Pty {
            master, attached, ..
        } => attached.then(|| master.write(data)),
        Kind::Unix { client, .. } | Kind::Tcp { client, .. } => {
            client.as_ref().map(|c| c.write(data))
        }
    }
}

fn client_fd(client: &Client) -> RawFd {
    match client {
        Client::Unix(s) => s.as_raw_fd(),
        Client::Tcp(s) => s.as_raw_fd(),
    }
}

fn log_accept_error(label: &str, e: &io::Error) {
    if e.kind() != io::ErrorKind::WouldBlock {
        log::warn!("{label}: accept failed: {e}");
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another process is serving this socket", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

fn open_pty(link: Option<&Path>) -> io::Result<Kind> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let path = PathBuf::from(nix::pty::ptsname_r(&master)?);
    // Raw mode: bytes pass unchanged both ways (the attaching program sets its own mode).
    let mut termios = nix::sys::termios::tcgetattr(master.as_fd())?;
    nix::sys::termios::cfmakeraw(&mut termios);
    nix::sys::termios::tcsetattr(master.as_fd(), nix::sys::termios::SetArg::TCSANOW, &termios)?;
    set_winsize(master.as_raw_fd(), 80, 24)?;
    let flags = nix::fcntl::fcntl(master.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    if let Some(link) = link {
        if std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(link)?;
        }
        std::os::unix::fs::symlink(&path, link).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot create the link: {e}", link.display()),
            )
        })?;
        log::info!("{} -> {}", link.display(), path.display());
    }
    Ok(Kind::Pty {
        master,
        path,
        link: link.map(Path::to_path_buf),
        attached: false,
    })
}

/// True when someone has the slave side open (the master reports no hang-up).
fn pty_attached(master: &PtyMaster) -> bool {
    let mut fds = [libc::pollfd {
        fd: master.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call; timeout 0.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n >= 0 && fds[0].revents & libc::POLLHUP == 0
}

fn get_winsize(fd: RawFd) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which is valid and ours.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_col, ws.ws_row))
}

fn set_winsize(fd: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn history_keeps_the_newest_bytes() {
        let mut h = History::new(8);
        h.push(b"abc");
        h.push(b"defgh");
        assert_eq!(h.contents(), b"abcdefgh");
        h.push(b"ij");
        assert_eq!(h.contents(), b"cdefghij");
        h.push(b"0123456789");
        assert_eq!(h.contents(), b"23456789");
        let mut none = History::new(0);
        none.push(b"x");
        assert!(none.is_empty());
    }

    #[test]
    fn unix_client_gets_history_and_back_pressure_applies() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.sock");
        let spec = EndpointSpec::Unix {
            path: path.clone(),
            access: FileAccess::ENDPOINT_DEFAULT,
        };
        let mut port = HostPort::open("test", &spec, 4, None)?;
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o660
        );
        port.guest_output(b"boot log");
        assert!(!port.connected());
        let mut client = UnixStream::connect(&path)?;
        let events = port.poll_host(true);
        assert_eq!(port.connection_change(), Some(true));
        assert_eq!(port.connection_change(), None);
        assert_eq!(events.new_fds.len(), 1);
        port.flush();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf)?;
        assert_eq!(&buf, b" log");
        client.write_all(b"hi")?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(port.pending_input(), b"hi");
        port.consume_input(2);
        // Nobody reads: output piles up to the limit, then the room is gone.
        let chunk = vec![7u8; 4096];
        for _ in 0..1000 {
            if port.output_room() == 0 {
                break;
            }
            port.guest_output(&chunk[..port.output_room().min(chunk.len())]);
            port.flush();
        }
        assert_eq!(port.output_room(), 0);
        drop(client);
        let _ = port.pending_input();
        assert!(!port.connected());
        assert_eq!(port.connection_change(), Some(false));
        assert_eq!(port.output_room(), OUTPUT_LIMIT);
        Ok(())
    }

    #[test]
    fn log_gets_its_mode_even_when_it_exists() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.log");
        std::fs::write(&path, b"old\n")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let gid = nix::unistd::getegid().as_raw();
        prepare_log(
            &path,
            FileAccess {
                mode: 0o640,
                gid: Some(gid),
            },
        )?;
        let meta = std::fs::metadata(&path)?;
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        assert_eq!(std::fs::read(&path)?, b"old\n");
        let fresh = dir.path().join("new.log");
        prepare_log(&fresh, FileAccess::LOG_DEFAULT)?;
        assert_eq!(
            std::fs::metadata(&fresh)?.permissions().mode() & 0o777,
            0o640
        );
        Ok(())
    }
}
