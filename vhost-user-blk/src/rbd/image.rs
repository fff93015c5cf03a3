//! An RBD image opened through librados/librbd, in two steps around the sandbox:
//! [`Prepared::new`] reads ceph.conf and the keyring while the files are visible and the
//! process still has one thread (librados starts its threads only when it connects);
//! [`Prepared::connect`] then reaches the cluster from inside the sandbox (which keeps the
//! host's network) and opens the image.

use std::ffi::{CStr, CString};
use std::io;
use std::path::Path;

use super::ffi;
use super::options::RbdOptions;

/// Errors reaching the cluster or opening the image, one line each, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("--rbd-conf {path}: cannot read it: {source}")]
    Conf { path: String, source: io::Error },
    #[error("no ceph.conf found ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf); pass --rbd-conf")]
    NoConf,
    #[error("--rbd-keyring {path}: cannot read it: {source}")]
    Keyring { path: String, source: io::Error },
    #[error("{path}: no key for client.{id} in this keyring")]
    NoKey { path: String, id: String },
    #[error("no keyring with a key for client.{id} (looked in {searched}); pass --rbd-keyring")]
    NoKeyring { id: String, searched: String },
    #[error("mon host {name:?}: cannot resolve it: {source}")]
    Resolve { name: String, source: io::Error },
    #[error("librados: cannot set {option}: {source}")]
    Setting { option: String, source: io::Error },
    #[error("cannot reach the Ceph cluster (mon host {mon_host}) within {seconds} s; is it up? (--rbd-connect-timeout)")]
    Unreachable { mon_host: String, seconds: u64 },
    #[error("the Ceph cluster refused client.{id}: {source} (wrong key or missing caps?)")]
    Denied { id: String, source: io::Error },
    #[error("cannot connect to the Ceph cluster as client.{id}: {source}")]
    Connect { id: String, source: io::Error },
    #[error("RBD pool {pool:?} does not exist")]
    NoPool { pool: String },
    #[error("RBD image {name}: no such image or snapshot")]
    NoImage { name: String },
    #[error("RBD image {name}: cannot open: {source}")]
    Open { name: String, source: io::Error },
    #[error(
        "RBD image {name}: is {size} bytes; a disk needs at least one 512-byte sector (rbd resize)"
    )]
    Empty { name: String, size: u64 },
}

fn errno(ret: i32) -> io::Error {
    io::Error::from_raw_os_error(ret.saturating_neg())
}

fn cstring(s: &str) -> CString {
    // Options are validated to hold no NUL byte (see `parse_spec`); a path with one cannot
    // exist, so an empty string makes the lookup fail with a clear error instead.
    CString::new(s).unwrap_or_default()
}

/// A librados handle, configured and maybe connected; shut down on drop.
struct Cluster(ffi::RadosT);

// SAFETY: a rados_t may be used from any thread (librados serialises internally); we only
// move it between threads, never share it unsynchronised before connect.
unsafe impl Send for Cluster {}
// SAFETY: after connect, librados's client calls are thread-safe.
unsafe impl Sync for Cluster {}

impl Cluster {
    fn set(&self, option: &str, value: &str) -> Result<(), RbdError> {
        let (o, v) = (cstring(option), cstring(value));
        // SAFETY: the handle is live and both strings are NUL-terminated for the call.
        let ret = unsafe { ffi::rados_conf_set(self.0, o.as_ptr(), v.as_ptr()) };
        if ret < 0 {
            return Err(RbdError::Setting {
                option: option.into(),
                source: errno(ret),
            });
        }
        Ok(())
    }

    /// A setting's value with metavariables ($cluster, $id) expanded, or empty.
    fn get(&self, option: &str) -> String {
        let o = cstring(option);
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its length; librados NUL-terminates within it.
        let ret =
            unsafe { ffi::rados_conf_get(self.0, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret < 0 {
            return String::new();
        }
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: created by rados_create2; every ioctx and image using it was closed before
        // (they hold an Arc of the image that owns this, see `RbdImage`'s field order).
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// A configured, not yet connected cluster handle: the part of opening that reads files.
pub struct Prepared {
    cluster: Cluster,
    options: RbdOptions,
}

/// The base64 key of `entity` (`client.admin`) in a keyring file's text.
fn key_in_keyring(text: &str, entity: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == entity;
        } else if in_section {
            if let Some((name, value)) = line.split_once('=') {
                if name.trim() == "key" {
                    return Some(value.trim().to_string());
                }
            }
        }
    }
    None
}

/// `mon host` with every host name replaced by its addresses (`None`: only addresses in it).
/// Entries are `[v2:]HOST[:PORT]` separated by commas, semicolons or spaces, or bracketed
/// address vectors `[v2:IP:PORT,v1:IP:PORT]`, which hold addresses only.
fn resolve_mon_host(value: &str) -> Result<Option<String>, RbdError> {
    use std::net::{IpAddr, ToSocketAddrs};
    let mut entries = Vec::new();
    let mut changed = false;
    let (mut depth, mut start) = (0usize, 0usize);
    let mut tokens = Vec::new();
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' | ';' | ' ' | '\t' if depth == 0 => {
                tokens.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    tokens.push(&value[start..]);
    for token in tokens.into_iter().filter(|t| !t.is_empty()) {
        let (prefix, addr) = match token.get(..3) {
            Some("v1:" | "v2:") => token.split_at(3),
            _ => ("", token),
        };
        // An address vector, an IPv6 address, or an IPv4 address with or without a port.
        let is_address = addr.starts_with('[')
            || addr.matches(':').count() > 1
            || addr
                .rsplit_once(':')
                .map_or(addr, |(host, _)| host)
                .parse::<IpAddr>()
                .is_ok();
        if is_address {
            entries.push(token.to_string());
            continue;
        }
        let (name, port) = match addr.rsplit_once(':') {
            Some((name, port)) => (name, port.parse::<u16>().ok()),
            None => (addr, None),
        };
        let resolved: Vec<IpAddr> = (name, 0)
            .to_socket_addrs()
            .map_err(|source| RbdError::Resolve {
                name: name.to_string(),
                source,
            })?
            .map(|a| a.ip())
            .collect();
        for ip in resolved {
            let ip = match ip {
                IpAddr::V6(v6) => format!("[{v6}]"),
                IpAddr::V4(v4) => v4.to_string(),
            };
            entries.push(match port {
                Some(port) => format!("{prefix}{ip}:{port}"),
                None => format!("{prefix}{ip}"),
            });
        }
        changed = true;
    }
    Ok(changed.then(|| entries.join(",")))
}

impl Prepared {
    /// Reads the configuration and the key. Starts no thread.
    pub fn new(options: &RbdOptions) -> Result<Prepared, RbdError> {
        let mut handle: ffi::RadosT = std::ptr::null_mut();
        let (cluster_name, entity) = (cstring("ceph"), cstring(&format!("client.{}", options.id)));
        // SAFETY: `handle` is a valid out-pointer; the names are NUL-terminated.
        let ret =
            unsafe { ffi::rados_create2(&mut handle, cluster_name.as_ptr(), entity.as_ptr(), 0) };
        if ret < 0 {
            return Err(RbdError::Connect {
                id: options.id.clone(),
                source: errno(ret),
            });
        }
        let cluster = Cluster(handle);
        let conf = options.conf.as_ref().map(|p| cstring(&p.to_string_lossy()));
        // SAFETY: the handle is live, not connected; the path is NUL-terminated or NULL (the
        // default search).
        let ret = unsafe {
            ffi::rados_conf_read_file(
                cluster.0,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if ret < 0 {
            return Err(match &options.conf {
                Some(path) => RbdError::Conf {
                    path: path.display().to_string(),
                    source: errno(ret),
                },
                None => RbdError::NoConf,
            });
        }
        let secs = options.connect_timeout.as_secs().max(1).to_string();
        // Bounded start-up: monitors that do not answer fail the connect, not hang it.
        cluster.set("client_mount_timeout", &secs)?;
        cluster.set("rados_mon_op_timeout", &secs)?;
        // Zero (the default) lets requests wait for the cluster as long as it takes.
        cluster.set(
            "rados_osd_op_timeout",
            &options.io_timeout.as_secs().to_string(),
        )?;
        // librbd's cache settings stay the cluster's (`rbd cache`, on by default, write-through
        // until the guest's first flush, as under QEMU): the engine flushes every write itself
        // when the guest turned its write cache off.
        // The daemon reports errors in one line of its own; librados's own stderr chatter
        // (also from its threads, later) would interleave with it.
        cluster.set("log_to_stderr", "false")?;
        cluster.set("err_to_stderr", "false")?;
        // Names in `mon host` are resolved when connecting, inside the sandbox, which hides
        // /etc/resolv.conf and /etc/hosts: resolve them now.
        if let Some(resolved) = resolve_mon_host(&cluster.get("mon_host"))? {
            cluster.set("mon_host", &resolved)?;
        }
        // The sandbox has no files: the key is read now and handed over as a value.
        if let Some(key) = Self::find_key(&cluster, options)? {
            cluster.set("key", &key)?;
        }
        Ok(Prepared {
            cluster,
            options: options.clone(),
        })
    }

    fn find_key(cluster: &Cluster, options: &RbdOptions) -> Result<Option<String>, RbdError> {
        let entity = format!("client.{}", options.id);
        if let Some(path) = &options.keyring {
            let text = std::fs::read_to_string(path).map_err(|source| RbdError::Keyring {
                path: path.display().to_string(),
                source,
            })?;
            return key_in_keyring(&text, &entity)
                .map(Some)
                .ok_or_else(|| RbdError::NoKey {
                    path: path.display().to_string(),
                    id: options.id.clone(),
                });
        }
        if !cluster.get("key").is_empty() || !cluster.get("keyfile").is_empty() {
            return Ok(None);
        }
        let searched = cluster.get("keyring");
        for path in searched.split([',', ';', ' ']).filter(|p| !p.is_empty()) {
            if let Ok(text) = std::fs::read_to_string(Path::new(path)) {
                if let Some(key) = key_in_keyring(&text, &entity) {
                    return Ok(Some(key));
                }
            }
        }
        if cluster.get("auth_client_required").contains("none") {
            return Ok(None);
        }
        Err(RbdError::NoKeyring {
            id: options.id.clone(),
            searched,
        })
    }

    /// Connects (starting librados's threads) and opens the image.
    pub fn connect(self) -> Result<RbdImage, RbdError> {
        let Prepared { cluster, options } = self;
        let id = options.id.clone();
        // SAFETY: the handle is configured and not yet connected.
        let ret = unsafe { ffi::rados_connect(cluster.0) };
        match ret {
            0 => {}
            _ if ret == -libc::ETIMEDOUT => {
                return Err(RbdError::Unreachable {
                    mon_host: cluster.get("mon_host"),
                    seconds: options.connect_timeout.as_secs().max(1),
                })
            }
            _ if ret == -libc::EACCES || ret == -libc::EPERM => {
                return Err(RbdError::Denied {
                    id,
                    source: errno(ret),
                })
            }
            _ => {
                return Err(RbdError::Connect {
                    id,
                    source: errno(ret),
                })
            }
        }
        let name = options.name();
        let mut ioctx: ffi::RadosIoctxT = std::ptr::null_mut();
        let pool = cstring(&options.pool);
        // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
        let ret = unsafe { ffi::rados_ioctx_create(cluster.0, pool.as_ptr(), &mut ioctx) };
        if ret == -libc::ENOENT {
            return Err(RbdError::NoPool { pool: options.pool });
        } else if ret < 0 {
            return Err(RbdError::Open {
                name,
                source: errno(ret),
            });
        }
        let ioctx = IoCtx(ioctx);
        let namespace = cstring(&options.namespace);
        // SAFETY: live ioctx, NUL-terminated namespace (empty: the default one).
        unsafe { ffi::rados_ioctx_set_namespace(ioctx.0, namespace.as_ptr()) };
        let (image_name, snap) = (
            cstring(&options.image),
            options.snap.as_deref().map(cstring),
        );
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: ffi::RbdImageT = std::ptr::null_mut();
        let readonly = options.read_only();
        // SAFETY: live ioctx, NUL-terminated names (or NULL for no snapshot), valid out-pointer.
        let ret = unsafe {
            if readonly {
                ffi::rbd_open_read_only(ioctx.0, image_name.as_ptr(), &mut image, snap_ptr)
            } else {
                ffi::rbd_open(ioctx.0, image_name.as_ptr(), &mut image, snap_ptr)
            }
        };
        if ret == -libc::ENOENT {
            return Err(RbdError::NoImage { name });
        } else if ret < 0 {
            return Err(RbdError::Open {
                name,
                source: errno(ret),
            });
        }
        let handle = ImageHandle(image);
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let ret = unsafe { ffi::rbd_get_size(handle.0, &mut size) };
        if ret < 0 {
            return Err(RbdError::Open {
                name,
                source: errno(ret),
            });
        }
        if size < 512 {
            return Err(RbdError::Empty { name, size });
        }
        let mut id_buf = [0u8; 64];
        // SAFETY: open image; the buffer is writable for its length and NUL-terminated by
        // librbd on success.
        let ret = unsafe { ffi::rbd_get_id(handle.0, id_buf.as_mut_ptr().cast(), id_buf.len()) };
        let image_id = if ret == 0 {
            CStr::from_bytes_until_nul(&id_buf)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(RbdImage {
            handle,
            _ioctx: ioctx,
            _cluster: cluster,
            name,
            size,
            readonly,
            image_id,
        })
    }
}

struct IoCtx(ffi::RadosIoctxT);

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; the image using it is closed first (field
        // order in RbdImage).
        unsafe { ffi::rados_ioctx_destroy(self.0) }
    }
}

pub(super) struct ImageHandle(pub(super) ffi::RbdImageT);

impl Drop for ImageHandle {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*; no request is in flight (every engine holding an Arc of
        // the image waits for its requests before it lets go), so closing is safe.
        let ret = unsafe { ffi::rbd_close(self.0) };
        if ret < 0 {
            log::warn!("rbd_close failed: {}", errno(ret));
        }
    }
}

/// An open RBD image: the backing store of `--rbd`.
pub struct RbdImage {
    // Dropped in this order: the image, its pool context, then the cluster connection.
    pub(super) handle: ImageHandle,
    _ioctx: IoCtx,
    _cluster: Cluster,
    name: String,
    size: u64,
    readonly: bool,
    image_id: String,
}

// SAFETY: librbd's image handle is safe to use from several threads at once for I/O
// submission, flush and queries (ImageCtx locks internally; QEMU and SPDK rely on it).
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl std::fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RbdImage({})", self.name)
    }
}

impl RbdImage {
    /// `pool/image[@snap]`, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's size when opened (a resize is seen after a restart).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The same serial for the same image wherever and whenever it is opened.
    pub fn default_serial(&self) -> String {
        let mut serial = format!("rbd-{}", self.image_id);
        serial.truncate(20);
        serial
    }

    /// Everything written so far is durable on the cluster when this returns (blocking: for
    /// the write-cache switch and exit, not the data path).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_flush(self.handle.0) };
        if ret < 0 {
            return Err(errno(ret));
        }
        Ok(())
    }

    pub(super) fn raw(&self) -> ffi::RbdImageT {
        self.handle.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mon_host_names_are_resolved_and_addresses_kept() {
        let unchanged = "v2:10.0.0.1:3300,[v2:10.0.0.2:3300,v1:10.0.0.2:6789] 10.0.0.3 [::1]:3300";
        assert!(matches!(resolve_mon_host(unchanged), Ok(None)));
        let resolved = resolve_mon_host("v2:localhost:3300 10.0.0.3")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("localhost was not resolved"));
        assert!(
            resolved.contains("v2:127.0.0.1:3300") || resolved.contains("v2:[::1]:3300"),
            "{resolved}"
        );
        assert!(resolved.ends_with(",10.0.0.3"), "{resolved}");
        assert!(resolve_mon_host("no-such-host.invalid").is_err());
    }

    #[test]
    fn keys_are_found_in_their_section() {
        let text =
            "[client.a]\n\tkey = AAA==\n[client.admin]\n key=BQB+x/y==\n caps mon = \"allow *\"\n";
        assert_eq!(
            key_in_keyring(text, "client.admin").as_deref(),
            Some("BQB+x/y==")
        );
        assert_eq!(key_in_keyring(text, "client.a").as_deref(), Some("AAA=="));
        assert_eq!(key_in_keyring(text, "client.b"), None);
    }
}
