//! The host side: a Linux tap interface opened through `/dev/net/tun`, one file descriptor per
//! queue pair (IFF_MULTI_QUEUE), frames prefixed by a virtio-net header (IFF_VNET_HDR).
//!
//! Everything here is plain ioctls on the tun driver and on an `AF_INET` socket for the link
//! settings; nothing shells out to `ip`.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use crate::queue_pair::{write_frames_one_by_one, TapIo, TX_BATCH};
use crate::tx_uring::TxUring;

/// `struct ifreq`: the interface name and a 24-byte union we fill per request.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq::default();
        // Callers validated the name: shorter than IFNAMSIZ, so a NUL always follows.
        let len = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    fn set_short(&mut self, value: i16) {
        self.data[..2].copy_from_slice(&value.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        // struct sockaddr_in: family, port (big endian), address (big endian).
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[2..4].copy_from_slice(&[0, 0]);
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFMTU: libc::c_ulong = 0x8922;

/// Offloads the host may hand us in frames read from the tap (TUNSETOFFLOAD), derived from what
/// the guest accepts on its receive side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
    pub ufo: bool,
}

impl Offloads {
    /// The offloads matching the guest's receive features (VIRTIO_NET_F_GUEST_*).
    pub fn for_guest(features: u64) -> Offloads {
        let has = |b: u32| features & (1 << b) != 0;
        Offloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
            ufo: has(VIRTIO_NET_F_GUEST_UFO),
        }
    }

    /// The TUN_F_* flags. TSO/UFO without checksum offload mean nothing to the kernel.
    pub fn tun_flags(&self) -> libc::c_uint {
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        if self.ecn && (self.tso4 || self.tso6) {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if self.ufo {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }
}

/// One queue of the tap: a non-blocking file descriptor attached to the interface.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    /// Transmit batches in one system call; `None` where io_uring is unavailable (then one
    /// `writev` per frame).
    tx_uring: Option<TxUring>,
    /// The ring failed once: every frame goes through `writev` from then on.
    tx_uring_failed: AtomicBool,
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `ioctl(fd, request, arg)` with a pointer argument.
///
/// # Safety
///
/// `request` must read or write at most `size_of::<T>()` bytes through its argument (an
/// `ifreq` request with [`IfReq`], an int request with `c_int`), and must not keep the pointer
/// after it returns.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a valid, exclusively borrowed object of `size_of::<T>()` bytes, and the
    // caller guarantees the request touches no more than that.
    let ret = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ioctl(fd, request, arg)` with an argument passed by value.
///
/// # Safety
///
/// `request` must take its argument as a value (TUNSETOFFLOAD): one that reads it as a pointer
/// would dereference `arg` as an address.
unsafe fn ioctl_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the caller guarantees the request reads no memory through `arg`.
    let ret = unsafe { libc::ioctl(fd, request as _, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl TapQueue {
    /// Opens one more queue of tap `name` (creating the interface if it does not exist).
    fn open(name: &str, multi_queue: bool) -> io::Result<TapQueue> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut req = IfReq::new(name);
        req.set_short(flags as i16);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
        unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF as libc::c_ulong, &mut req)? };
        let tx_uring = match TxUring::new(file.as_raw_fd(), TX_BATCH as u32) {
            Ok(ring) => Some(ring),
            Err(e) => {
                log::warn!("tap {name}: io_uring unavailable ({e}); one writev per frame");
                None
            }
        };
        Ok(TapQueue {
            file,
            tx_uring,
            tx_uring_failed: AtomicBool::new(false),
        })
    }

    /// Attaches (true) or detaches (false) this queue: a detached queue gets no frames, so the
    /// kernel does not steer flows to a queue pair the guest has not enabled.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        let mut req = IfReq::default();
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.set_short(flag as i16);
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`, which `req` is.
        unsafe {
            ioctl_ptr(
                self.file.as_raw_fd(),
                libc::TUNSETQUEUE as libc::c_ulong,
                &mut req,
            )
        }
    }

    /// Reads one frame (virtio-net header first) into `buf`.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // The raw system call rather than libc's read(), which is a thread cancellation point:
        // glibc's cancellation bookkeeping around it was ~5% of the per-frame CPU in a profile.
        // The arguments go as longs, as the kernel reads them.
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_read,
                libc::c_long::from(self.file.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (virtio-net header first) gathered from `iovecs`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable for the whole call
    /// (guest memory the caller holds alive, bounds-checked when the iovecs were made).
    pub unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let count = iovecs.len().min(libc::c_int::MAX as usize);
        // SAFETY: the kernel only reads `count` iovecs from the slice, and each one describes
        // readable memory (the caller's contract). The raw system call, as in `read_frame`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_writev,
                libc::c_long::from(self.file.as_raw_fd()),
                iovecs.as_ptr(),
                count,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl TapIo for TapQueue {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        TapQueue::read_frame(self, buf)
    }

    unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the same contract, passed on.
        unsafe { TapQueue::write_frame(self, iovecs) }
    }

    unsafe fn write_frames(
        &self,
        iovecs: &[libc::iovec],
        frames: &[(usize, usize)],
        results: &mut Vec<io::Result<usize>>,
    ) {
        let start = results.len();
        if let Some(ring) = &self.tx_uring {
            if !self.tx_uring_failed.load(Ordering::Relaxed) {
                // SAFETY: the same contract, passed on.
                match unsafe { ring.write_frames(iovecs, frames, results) } {
                    Ok(()) => return,
                    Err(e) => {
                        // Frames of the failed submission may go out twice below; a ring that
                        // fails at all is a kernel fault, not load.
                        log::warn!(
                            "tap transmit ring failed ({e}): one writev per frame from now on"
                        );
                        self.tx_uring_failed.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        let rest = frames.get(results.len() - start..).unwrap_or_default();
        // SAFETY: the same contract, passed on.
        unsafe { write_frames_one_by_one(self, iovecs, rest, results) }
    }
}

/// How to get the interface up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkSetup {
    /// Bring the link up.
    pub up: bool,
    /// Give it this IPv4 address and prefix length (implies `up`).
    pub address: Option<(Ipv4Addr, u8)>,
    /// Set this MTU.
    pub mtu: Option<u16>,
}

/// The tap interface: its name and one queue per queue pair.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub queues: Vec<TapQueue>,
    pub multi_queue: bool,
    /// The virtio-net header length last set with TUNSETVNETHDRSZ (it outlives a session).
    vnet_hdr_len: AtomicUsize,
}

impl Tap {
    /// Attaches to tap `name` (or creates it) with `queue_pairs` queues.
    pub fn open(name: &str, queue_pairs: usize) -> io::Result<Tap> {
        let mut queues = Vec::with_capacity(queue_pairs);
        let multi_queue = match TapQueue::open(name, true) {
            Ok(queue) => {
                queues.push(queue);
                true
            }
            // An existing single-queue tap refuses IFF_MULTI_QUEUE; fine for one pair.
            Err(e) if queue_pairs == 1 && e.raw_os_error() == Some(libc::EINVAL) => {
                queues.push(TapQueue::open(name, false)?);
                false
            }
            Err(e) => return Err(e),
        };
        while queues.len() < queue_pairs {
            queues.push(TapQueue::open(name, true)?);
        }
        let tap = Tap {
            name: name.to_string(),
            queues,
            multi_queue,
            vnet_hdr_len: AtomicUsize::new(0),
        };
        tap.set_vnet_hdr_len(crate::VNET_HDR_LEN)?;
        Ok(tap)
    }

    fn first_fd(&self) -> io::Result<RawFd> {
        self.queues
            .first()
            .map(|q| q.as_raw_fd())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    /// TUNSETVNETHDRSZ: the length of the virtio-net header before each frame.
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let mut len = len as libc::c_int;
        let fd = self.first_fd()?;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `len` is.
        unsafe { ioctl_ptr(fd, libc::TUNSETVNETHDRSZ as libc::c_ulong, &mut len)? };
        self.vnet_hdr_len.store(len as usize, Ordering::Relaxed);
        Ok(())
    }

    /// The length of the virtio-net header the tap expects before each frame.
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len.load(Ordering::Relaxed)
    }

    /// TUNSETOFFLOAD. Kernels that dropped UFO refuse the flag: retry without it.
    pub fn set_offloads(&self, offloads: Offloads) -> io::Result<libc::c_uint> {
        let fd = self.first_fd()?;
        let flags = offloads.tun_flags();
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            unsafe {
                ioctl_val(
                    fd,
                    libc::TUNSETOFFLOAD as libc::c_ulong,
                    libc::c_ulong::from(flags),
                )
            }
        };
        match set(flags) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & libc::TUN_F_UFO != 0 => {
                let flags = flags & !libc::TUN_F_UFO;
                set(flags)?;
                Ok(flags)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(flags),
        }
    }

    /// Applies MTU, address and link state.
    pub fn configure_link(&self, setup: &LinkSetup) -> io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked and then owned by `sock`.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let fd = sock.as_raw_fd();
        if let Some(mtu) = setup.mtu {
            let mut req = IfReq::new(&self.name);
            req.set_int(i32::from(mtu));
            // SAFETY: SIOCSIFMTU reads one `struct ifreq`, which `req` is.
            unsafe { ioctl_ptr(fd, SIOCSIFMTU, &mut req)? };
        }
        if let Some((addr, prefix)) = setup.address {
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(addr);
            // SAFETY: SIOCSIFADDR reads one `struct ifreq`, which `req` is.
            unsafe { ioctl_ptr(fd, SIOCSIFADDR, &mut req)? };
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(Ipv4Addr::from(mask));
            // SAFETY: SIOCSIFNETMASK reads one `struct ifreq`, which `req` is.
            unsafe { ioctl_ptr(fd, SIOCSIFNETMASK, &mut req)? };
        }
        if setup.up || setup.address.is_some() {
            let mut req = IfReq::new(&self.name);
            // SAFETY: SIOCGIFFLAGS writes into one `struct ifreq`, which `req` is.
            unsafe { ioctl_ptr(fd, SIOCGIFFLAGS, &mut req)? };
            let flags = req.short() | libc::IFF_UP as i16;
            req.set_short(flags);
            // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `req` is.
            unsafe { ioctl_ptr(fd, SIOCSIFFLAGS, &mut req)? };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_guest() {
        assert_eq!(Offloads::default().tun_flags(), 0);
        let tso_without_csum = Offloads {
            tso4: true,
            ..Offloads::default()
        };
        assert_eq!(tso_without_csum.tun_flags(), 0);
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        assert_eq!(
            all.tun_flags(),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
    }

    #[test]
    fn offloads_follow_guest_receive_features() {
        use virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4;
        let bit = |b: u32| 1u64 << b;
        let o = Offloads::for_guest(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        assert!(o.csum && o.tso4 && !o.tso6 && !o.ufo);
        assert_eq!(
            Offloads::for_guest(bit(VIRTIO_NET_F_HOST_TSO4)),
            Offloads::default()
        );
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let req = IfReq::new("tap0");
        assert_eq!(&req.name[..5], b"tap0\0");
    }
}
