//! Test support: act as the VMM (a `vhost::vhost_user::Frontend` over the daemon's real socket)
//! and as the guest driver (a split virtqueue in memfd-backed "guest RAM" shared with the daemon).
//!
//! Nothing here knows a device type: the blk, net and console tests build their requests on top.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub mod blkio_client;
pub mod ceph;
pub mod debroot;
pub mod guest;
pub mod hostile;
pub mod inflight;
pub mod migration;
pub mod netns;
pub mod qemu;
pub mod qemu_img;
pub mod systemd_guest;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Path of a workspace binary built next to the running test (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let path = binary_path(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Where [`binary`] looks for `name`, whether it is there or not (for programs that report a
/// missing binary themselves).
pub fn binary_path(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop(); // the running executable
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A daemon process under test. Killed (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The program and arguments it was started with, for a run's `commands.txt`.
    pub command_line: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `bin` with `--socket-path <tmp>/vhost.sock` plus `args`, and waits for the socket.
    pub fn start(bin: &str, args: &[&str]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("vhost.sock");
        Self::start_at(bin, args, socket, dir)
    }

    /// As [`Daemon::start`], on a socket path chosen by the caller (inside `dir`).
    pub fn start_at(
        bin: &str,
        args: &[&str],
        socket: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Daemon> {
        Self::spawn(&[], bin, args, socket, dir)
    }

    /// As [`Daemon::start`], with the binary run under a wrapper command `prefix` (for example
    /// `["ip", "netns", "exec", "ns1"]`, which execs the daemon itself: signals reach it).
    pub fn start_with_prefix(prefix: &[&str], bin: &str, args: &[&str]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("vhost.sock");
        Self::spawn(prefix, bin, args, socket, dir)
    }

    fn spawn(
        prefix: &[&str],
        bin: &str,
        args: &[&str],
        socket: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Daemon> {
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary(bin));
                c
            }
            None => Command::new(binary(bin)),
        };
        command
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "debug");
        Self::start_command(command, socket, dir)
    }

    /// Starts a command the caller prepared in full (any program: a peer's daemon, a wrapper
    /// that pins CPUs, its own way of passing the socket) with its output going to the log in
    /// `dir`, and waits until `socket` exists. Nothing is added to its arguments or environment.
    pub fn start_command(
        mut command: Command,
        socket: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Daemon> {
        let log = dir.path().join("daemon.log");
        let command_line = std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|word| word.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        // One open file description for both streams, so their writes append, not overwrite.
        let log_file = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e}",
                    command.get_program().to_string_lossy()
                )
            })?;
        let mut daemon = Daemon {
            child,
            socket,
            log,
            command_line,
            _dir: dir,
        };
        daemon.wait_for_socket()?;
        Ok(daemon)
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("daemon exited with {status}: {}", self.log_text()).into());
            }
            if Instant::now() > deadline {
                return Err(format!("socket never appeared: {}", self.log_text()).into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon has logged `needle` (fails if it exits or `timeout` passes).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            if !self.is_running() || Instant::now() > deadline {
                return Err(
                    format!("the daemon never logged {needle:?}: {}", self.log_tail(10)).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last `lines` lines the daemon logged.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_text(), lines)
    }

    /// The process's ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err("daemon did not exit within 10 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_running() && self.terminate().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("VHOST_TEST_LOG").is_some() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

/// Runs a binary to completion and returns (exit code, stdout, stderr).
pub fn run_to_exit(bin: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(binary(bin))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Guest RAM: one memfd mapped here and shared with the daemon through SET_MEM_TABLE.
pub struct GuestRam {
    pub mem: GuestMemoryMmap<()>,
    pub file: File,
    pub size: u64,
    next_free: u64,
}

/// Where data buffers start; rings live below.
pub const DATA_START: u64 = 16 << 20;
/// Space reserved for each queue's rings.
const RING_STRIDE: u64 = 0x1_0000;

impl GuestRam {
    pub fn new(size: u64) -> Result<GuestRam> {
        let name = c"vhost-user-test-ram";
        let fd =
            nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
        let file = File::from(fd);
        file.set_len(size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])?;
        Ok(GuestRam {
            mem,
            file,
            size,
            next_free: DATA_START,
        })
    }

    /// Allocates `len` bytes of guest memory aligned to `align`, wrapping back to the start of
    /// the data area when the end is reached (tests bound their in-flight data).
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let mut addr = self.next_free.div_ceil(align) * align;
        if addr + len > self.size {
            addr = DATA_START;
        }
        self.next_free = addr + len;
        addr
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem.write_slice(data, GuestAddress(gpa))?;
        Ok(())
    }

    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa))?;
        Ok(buf)
    }

    /// The host-virtual address of `gpa` in this process (what vring addresses are given as).
    pub fn host_addr(&self, gpa: u64) -> Result<u64> {
        Ok(self.mem.get_host_address(GuestAddress(gpa))? as u64)
    }

    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr(0)?,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        })
    }
}

/// One descriptor as the guest driver lays it out.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub gpa: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub fn readable(gpa: u64, len: u32) -> Buf {
        Buf {
            gpa,
            len,
            writable: false,
        }
    }
    pub fn writable(gpa: u64, len: u32) -> Buf {
        Buf {
            gpa,
            len,
            writable: true,
        }
    }
}

/// The guest side of one split virtqueue.
pub struct GuestQueue {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u16,
    pub len: u32,
}

impl GuestQueue {
    fn new(index: usize, size: u16) -> Result<GuestQueue> {
        let desc = 0x1000 + index as u64 * RING_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).div_ceil(4) * 4;
        Ok(GuestQueue {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Writes one raw descriptor at table index `i` of the table at `table`.
    pub fn write_desc(
        ram: &GuestRam,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let at = table + 16 * u64::from(i);
        ram.write(at, &addr.to_le_bytes())?;
        ram.write(at + 8, &len.to_le_bytes())?;
        ram.write(at + 12, &flags.to_le_bytes())?;
        ram.write(at + 14, &next.to_le_bytes())?;
        Ok(())
    }

    /// Places a chain of `bufs` in the descriptor table and returns its head index; the chain is
    /// not yet visible to the device (see [`GuestQueue::publish`]).
    pub fn add_chain(&mut self, ram: &GuestRam, bufs: &[Buf]) -> Result<u16> {
        let head = self.next_desc;
        for (n, buf) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if buf.writable { DESC_F_WRITE } else { 0 };
            let next = if n + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
                self.next_desc
            } else {
                0
            };
            Self::write_desc(ram, self.desc, i, buf.gpa, buf.len, flags, next)?;
        }
        Ok(head)
    }

    /// Places `bufs` in an indirect table at `table_gpa`, referenced by one descriptor.
    pub fn add_indirect_chain(
        &mut self,
        ram: &GuestRam,
        table_gpa: u64,
        bufs: &[Buf],
    ) -> Result<u16> {
        for (n, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.writable { DESC_F_WRITE } else { 0 };
            let next = if n + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
                n as u16 + 1
            } else {
                0
            };
            Self::write_desc(ram, table_gpa, n as u16, buf.gpa, buf.len, flags, next)?;
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        Self::write_desc(
            ram,
            self.desc,
            head,
            table_gpa,
            16 * bufs.len() as u32,
            DESC_F_INDIRECT,
            0,
        )?;
        Ok(head)
    }

    /// Makes `head` available to the device (does not kick).
    pub fn publish(&mut self, ram: &GuestRam, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        ram.write(self.avail + 2, &self.avail_idx.to_le_bytes())?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Adds, publishes and kicks one chain.
    pub fn submit(&mut self, ram: &GuestRam, bufs: &[Buf]) -> Result<u16> {
        let head = self.add_chain(ram, bufs)?;
        self.publish(ram, head)?;
        self.notify()?;
        Ok(head)
    }

    pub fn notify(&self) -> Result<()> {
        self.kick.write(1)?;
        Ok(())
    }

    fn used_idx(&self, ram: &GuestRam) -> Result<u16> {
        let raw = ram.read(self.used + 2, 2)?;
        Ok(u16::from_le_bytes([raw[0], raw[1]]))
    }

    /// Entries the device has added to the used ring since the last call.
    pub fn take_used(&mut self, ram: &GuestRam) -> Result<Vec<Used>> {
        let idx = self.used_idx(ram)?;
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let raw = ram.read(self.used + 4 + 8 * slot, 8)?;
            out.push(Used {
                id: u16::from_le_bytes([raw[0], raw[1]]),
                len: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
            });
            self.last_used = self.last_used.wrapping_add(1);
        }
        // EVENT_IDX: ask to be notified for the next entry.
        self.set_used_event(ram, self.last_used)?;
        Ok(out)
    }

    /// Waits until at least `count` used entries arrived (or `timeout` passes).
    pub fn wait_used(
        &mut self,
        ram: &GuestRam,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.take_used(ram)?);
            if got.len() >= count {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "queue {}: {} of {} completions after {:?}",
                    self.index,
                    got.len(),
                    count,
                    timeout
                )
                .into());
            }
            self.wait_signalled((deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Waits up to `timeout` for the device to signal the call eventfd (consumes the signal).
    pub fn wait_signalled(&self, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        self.was_signalled()
    }

    /// Sets the driver's `used_event` (EVENT_IDX): interrupt me once entry `idx` is used.
    pub fn set_used_event(&self, ram: &GuestRam, idx: u16) -> Result<()> {
        ram.write(
            self.avail + 4 + 2 * u64::from(self.size),
            &idx.to_le_bytes(),
        )
    }

    /// True if the device signalled the call eventfd since the last read (consumes it).
    pub fn was_signalled(&self) -> bool {
        self.call.read().is_ok()
    }
}

/// What the test VMM negotiates.
#[derive(Debug, Clone, Copy)]
pub struct Negotiate {
    /// Virtio feature bits to accept if offered (PROTOCOL_FEATURES is handled separately).
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
}

impl Default for Negotiate {
    fn default() -> Self {
        Negotiate {
            features: u64::MAX,
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        }
    }
}

/// The VMM: a vhost-user frontend connected to a daemon, with guest RAM and queues.
pub struct TestVmm {
    pub frontend: Frontend,
    pub ram: GuestRam,
    pub queues: Vec<GuestQueue>,
    pub offered_features: u64,
    pub acked_features: u64,
    pub protocol: VhostUserProtocolFeatures,
}

impl TestVmm {
    /// Connects and negotiates, shares `ram_size` bytes of guest RAM, and sets up `num_queues`
    /// queues of `queue_size` entries (started and enabled).
    pub fn connect(
        socket: &Path,
        ram_size: u64,
        num_queues: usize,
        queue_size: u16,
        negotiate: Negotiate,
    ) -> Result<TestVmm> {
        let vmm = Self::connect_unstarted(socket, ram_size, num_queues, negotiate)?;
        let mut vmm = vmm;
        for i in 0..num_queues {
            vmm.start_queue(i, queue_size)?;
        }
        Ok(vmm)
    }

    /// Negotiates features and sends the memory table, but sets up no queue.
    pub fn connect_unstarted(
        socket: &Path,
        ram_size: u64,
        max_queues: usize,
        negotiate: Negotiate,
    ) -> Result<TestVmm> {
        let mut frontend = Frontend::connect(socket, max_queues as u64)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut acked = offered & negotiate.features;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
            let offered_protocol = frontend.get_protocol_features()?;
            protocol = offered_protocol & negotiate.protocol;
            frontend.set_protocol_features(protocol)?;
        }
        frontend.set_features(acked)?;
        let ram = GuestRam::new(ram_size)?;
        frontend.set_mem_table(&[ram.region_info()?])?;
        Ok(TestVmm {
            frontend,
            ram,
            queues: Vec::new(),
            offered_features: offered,
            acked_features: acked,
            protocol,
        })
    }

    /// Configures queue `index` (rings, eventfds) and enables it.
    pub fn start_queue(&mut self, index: usize, size: u16) -> Result<()> {
        self.start_queue_with(index, size, true)
    }

    /// Configures queue `index`; `enable` says whether to send SET_VRING_ENABLE 1 (a frontend
    /// leaves the queues of unused queue pairs disabled).
    pub fn start_queue_with(&mut self, index: usize, size: u16, enable: bool) -> Result<()> {
        let queue = GuestQueue::new(index, size)?;
        // Clean rings: a previous session may have used the same guest RAM.
        self.ram.write(
            queue.desc,
            &vec![0u8; (queue.used + 6 + 8 * u64::from(size) - queue.desc) as usize],
        )?;
        while self.queues.len() <= index {
            self.queues.push(GuestQueue::new(self.queues.len(), size)?);
        }
        self.queues[index] = queue;
        self.configure_queue(index, 0, enable)
    }

    /// SET_VRING_NUM, ADDR, BASE (`base`), CALL, KICK and (with `enable`) ENABLE for `queue`.
    fn configure_queue(&mut self, index: usize, base: u16, enable: bool) -> Result<()> {
        let queue = &self.queues[index];
        self.frontend.set_vring_num(index, queue.size)?;
        let config = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: self.ram.host_addr(queue.desc)?,
            used_ring_addr: self.ram.host_addr(queue.used)?,
            avail_ring_addr: self.ram.host_addr(queue.avail)?,
            log_addr: None,
        };
        self.frontend.set_vring_addr(index, &config)?;
        self.frontend.set_vring_base(index, base)?;
        self.frontend.set_vring_call(index, &queue.call)?;
        self.frontend.set_vring_kick(index, &queue.kick)?;
        if enable && self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// Stops queue `index` as QEMU does when the VM stops or a migration switches over
    /// (GET_VRING_BASE), and starts it again where it stopped, on the same rings and
    /// eventfds. Returns the base the device reported.
    pub fn restart_queue(&mut self, index: usize) -> Result<u16> {
        let base = self.frontend.get_vring_base(index)? as u16;
        self.configure_queue(index, base, true)?;
        Ok(base)
    }

    /// Reads `size` bytes of the device's config space at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) =
            self.frontend
                .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(payload)
    }

    /// Split borrow: the RAM and one queue.
    pub fn queue(&mut self, index: usize) -> (&GuestRam, &mut GuestQueue) {
        (&self.ram, &mut self.queues[index])
    }

    /// A virtio-blk request header (`kind`, `sector`) and a status byte (0xee: not written
    /// yet) in fresh guest RAM; returns their addresses.
    pub fn blk_header(&mut self, kind: u32, sector: u64) -> Result<(u64, u64)> {
        let header = self.ram.alloc(16, 16);
        let status = self.ram.alloc(1, 1);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(header, &bytes)?;
        self.ram.write(status, &[0xee])?;
        Ok((header, status))
    }

    /// One virtio-blk request of type `kind` (`VIRTIO_BLK_T_*`) at `sector` on queue 0, its
    /// data in `data` (device-readable for a write, device-writable for a read), its header
    /// and status byte in fresh guest RAM: submits it, waits up to `timeout` for it to be
    /// used, and returns the status byte.
    pub fn blk_request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Buf,
        timeout: Duration,
    ) -> Result<u8> {
        let (header, status) = self.blk_header(kind, sector)?;
        let (ram, q) = self.queue(0);
        q.submit(
            ram,
            &[Buf::readable(header, 16), data, Buf::writable(status, 1)],
        )?;
        q.wait_used(ram, 1, timeout)?;
        Ok(self.ram.read(status, 1)?[0])
    }
}

/// Reads all that is currently readable from a non-blocking reader, waiting up to `timeout` for
/// at least `want` bytes.
pub fn read_at_least<R: Read>(
    reader: &mut R,
    want: usize,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < want {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Duplicates a raw fd into an owned `File` (for handing descriptors around in tests).
pub fn dup_file(fd: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: dup returns a new descriptor we own, or -1 which we check.
    let new = unsafe { libc::dup(fd.as_raw_fd()) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly duplicated, open descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(new) })
}
