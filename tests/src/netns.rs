//! Network namespaces and background processes for the QEMU end-to-end tests and the demo.
//! Everything is torn down on drop, also when a test fails; processes are ended by their PID.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::Result;

/// Fails unless running as root (namespaces, taps).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!("{what} needs root (network namespaces, taps, QEMU's memfd)").into());
    }
    Ok(())
}

/// Runs a command to completion; the error names it and quotes its stderr.
pub fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    output_ok(Command::new(program).args(args))
}

/// Runs a prepared command (stdin from /dev/null) and returns its stdout; the error names the
/// command and quotes its stderr.
pub fn output_ok(command: &mut Command) -> Result<String> {
    let described = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {described}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{described}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An AF_PACKET raw socket bound to `ifname` inside the network namespace `netns`: what the
/// namespace's network sees of that interface. `protocol` is an `ETH_P_*` value in host order
/// (0: the socket sends but receives nothing); `flags` are or-ed into `SOCK_RAW | SOCK_CLOEXEC`.
pub fn packet_socket(
    netns: &str,
    ifname: &str,
    protocol: u16,
    flags: libc::c_int,
) -> Result<OwnedFd> {
    let ns_path = format!("/var/run/netns/{netns}");
    let ifname = ifname.to_string();
    let protocol = protocol.to_be();
    // setns changes only the calling thread: do it in a thread of its own. The socket stays in
    // the namespace it was created in.
    std::thread::spawn(move || -> Result<OwnedFd> {
        let ns_file = File::open(&ns_path)?;
        // SAFETY: setns on a valid namespace fd; it affects only this short-lived thread.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let index = nix::net::if_::if_nametoindex(ifname.as_str())?;
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length says so.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| "namespace thread panicked")?
}

/// An AF_PACKET socket bound to an interface (a tap) inside a namespace: what the
/// namespace's network sees of it.
pub struct PacketSocket {
    pub fd: OwnedFd,
}

impl PacketSocket {
    pub fn open(ns: &Netns, ifname: &str) -> Result<PacketSocket> {
        let fd = packet_socket(
            &ns.name,
            ifname,
            libc::ETH_P_ALL as u16,
            libc::SOCK_NONBLOCK,
        )?;
        Ok(PacketSocket { fd })
    }

    /// Sends `frame` out of the tap, i.e. towards the guest.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes during the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n != frame.len() as isize {
            return Err(format!("send: {}", std::io::Error::last_os_error()).into());
        }
        Ok(())
    }

    /// Frames the tap received (from the guest), up to `count`, within `timeout`.
    pub fn receive(&self, count: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while frames.len() < count {
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `from` are valid for writes of the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n >= 0 {
                if from.sll_pkttype != libc::PACKET_OUTGOING {
                    frames.push(buf[..n as usize].to_vec());
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let mut fds = [libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let wait = (deadline - now).as_millis().min(100) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, wait) };
        }
        Ok(frames)
    }
}

/// The Internet checksum (RFC 1071) of `data`, as IPv4 and ICMP headers carry it.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A network namespace of our own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` with its loopback up.
    pub fn new(prefix: &str) -> Result<Netns> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ok("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// As [`Netns::new`], with IPv6 off: no router solicitations or MLD reports go out of
    /// its interfaces uninvited, among the frames a test counts.
    pub fn without_ipv6(prefix: &str) -> Result<Netns> {
        let ns = Netns::new(prefix)?;
        ns.exec(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
             echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        ])?;
        Ok(ns)
    }

    /// `ip netns exec NAME`: a prefix that runs a command inside (it execs the command, so
    /// the PID we get is the command's).
    pub fn prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Runs a command inside and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full: Vec<&str> = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Starts a command inside, in the background, its output going to `log`.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<Background> {
        let out = File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start {args:?} in {}: {e}", self.name))?;
        Ok(Background { child })
    }

    /// Waits until something listens on TCP `port` inside the namespace.
    pub fn wait_for_listener(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let filter = format!("sport = :{port}");
        loop {
            let out = self.exec(&["ss", "-Hltn", &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("nothing listens on port {port} in {}", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Deletes namespaces named `<prefix>-<pid>-<n>` whose process is gone (left behind by a
    /// run that was killed with SIGKILL).
    pub fn remove_stale(prefix: &str) {
        let Ok(list) = run_ok("ip", &["netns", "list"]) else {
            return;
        };
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = run_ok("ip", &["netns", "del", name]);
                }
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A background process: SIGTERM, then SIGKILL after 5 s, on drop (by PID).
pub struct Background {
    pub child: Child,
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
