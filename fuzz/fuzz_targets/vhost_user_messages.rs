//! A hostile frontend: the input is a sequence of vhost-user messages (request, flags, body;
//! the ones that carry descriptors get a memfd or an eventfd) sent raw over the socket to a
//! vhost-user-blk device served in this process, one connection per input. The daemon must
//! answer or refuse every one, and end the connection cleanly when the frontend leaves: no
//! panic, no hang, no SIGBUS.
#![no_main]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_user_blk::backend::{BlkBackend, DeviceSettings};
use vhost_user_blk::disk::{Disk, DiskOptions};
use vhost_user_blk::executor::EngineKind;
use vhost_user_common::cli::{ListenConfig, ListenSource};
use vhost_user_common::serve::{bind, serve_one, BoundListener};

/// Requests whose message carries one file descriptor.
const WITH_FD: [u32; 8] = [5, 6, 7, 12, 13, 14, 32, 37];
const MEMFD_SIZE: i64 = 1 << 20;

struct State {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    listener: BoundListener,
    disk: Arc<Disk>,
    _file: tempfile::NamedTempFile,
}

fn state() -> State {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("blk.sock");
    // `bind` only binds: the sandbox and the seccomp filter are `run`'s, which this process
    // (the fuzzer itself) does not call.
    let listener = bind(&ListenConfig::new(ListenSource::Path {
        path: socket.clone(),
        mode: 0o600,
        gid: None,
    }))
    .expect("bind");
    let file = tempfile::NamedTempFile::new_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .expect("temporary disk");
    file.as_file().set_len(1 << 20).expect("disk size");
    let disk = Arc::new(
        Disk::open(&DiskOptions::raw(file.path()))
        .expect("open disk"),
    );
    State {
        _dir: dir,
        socket,
        listener,
        disk,
        _file: file,
    }
}

/// A descriptor to attach: a memfd for memory-like requests, an eventfd for the rings'.
fn attachment(request: u32) -> Option<OwnedFd> {
    if !WITH_FD.contains(&request) {
        return None;
    }
    // SAFETY: plain syscalls with a static name and integer arguments; results are checked.
    let fd = unsafe {
        if (12..=14).contains(&request) {
            libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
        } else {
            let fd = libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC);
            if fd >= 0 && libc::ftruncate(fd, MEMFD_SIZE) < 0 {
                libc::close(fd);
                return None;
            }
            fd
        }
    };
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(stream: &UnixStream, bytes: &[u8], fd: Option<&OwnedFd>) -> bool {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .is_ok()
}

/// At most this many messages per input: all are queued on the socket before the daemon runs,
/// and the daemon's replies must fit in the socket buffer, since nobody reads them until the
/// end.
const MAX_MESSAGES: usize = 128;

/// Queues the input's messages on `stream`; returns when all are sent or one cannot be.
fn send_messages(stream: &UnixStream, data: &[u8]) {
    let mut input = data;
    let mut sent = 0;
    while input.len() >= 4 && sent < MAX_MESSAGES {
        let request = u32::from(input[0] % 48);
        // Mostly well-formed version bits (so that the body is looked at), sometimes anything;
        // bit 3 asks for a reply.
        let flags = if input[1] & 0x80 == 0 {
            1 | (u32::from(input[1]) & 0x8)
        } else {
            u32::from(input[1])
        };
        let size = usize::from(u16::from_le_bytes([input[2], input[3]]) % 300);
        let body_len = size.min(input.len() - 4);
        let mut message = Vec::with_capacity(12 + body_len);
        message.extend_from_slice(&request.to_le_bytes());
        message.extend_from_slice(&flags.to_le_bytes());
        message.extend_from_slice(&(size as u32).to_le_bytes());
        message.extend_from_slice(&input[4..4 + body_len]);
        let fd = attachment(request);
        if !send(stream, &message, fd.as_ref()) {
            return;
        }
        input = &input[4 + body_len..];
        sent += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static STATE: std::cell::RefCell<Option<State>> = const { std::cell::RefCell::new(None) };
    }
    STATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let st = cell.get_or_insert_with(state);
        let settings = DeviceSettings {
            num_queues: 1,
            queue_size: 64,
            serial: b"fuzz".to_vec(),
            engine: EngineKind::Sync,
            logical_block_size: 512,
            poll: Duration::ZERO,
        };
        let backend = BlkBackend::new(st.disk.clone(), settings);
        // The frontend runs in this thread, before the daemon: it connects (the listener's
        // backlog holds the connection), queues every message and hangs up its sending side;
        // the daemon then reads them all, answers into the socket buffer and sees the end.
        // No thread per input: thread creation was most of the cost of each execution.
        let Ok(stream) = UnixStream::connect(&st.socket) else {
            return;
        };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        send_messages(&stream, data);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = serve_one("fuzz", &mut st.listener, backend);
    });
});
