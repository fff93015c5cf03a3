//! `--rbd POOL[/NAMESPACE]/IMAGE[@SNAP]` and its companion flags, validated: no librbd needed,
//! so the command line is the same whether or not the daemon was built with the `rbd` feature.

use std::path::PathBuf;
use std::time::Duration;

/// Where the image is and how to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    pub pool: String,
    /// RADOS namespace inside the pool (empty: the default one).
    pub namespace: String,
    pub image: String,
    /// A snapshot: opened read-only.
    pub snap: Option<String>,
    /// ceph.conf; `None`: librados's search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).
    pub conf: Option<PathBuf>,
    /// The client's id: `admin` for `client.admin`.
    pub id: String,
    /// Keyring file; `None`: the `keyring` setting of the configuration.
    pub keyring: Option<PathBuf>,
    pub readonly: bool,
    /// How long connecting (monitors, authentication) may take before the daemon gives up.
    pub connect_timeout: Duration,
    /// How long one request may wait for the cluster before it fails (zero: forever).
    pub io_timeout: Duration,
}

impl RbdOptions {
    /// `pool/image`, `pool/namespace/image`, optionally with `@snap`, as rbd(8) spells it.
    pub fn name(&self) -> String {
        let mut name = self.pool.clone();
        if !self.namespace.is_empty() {
            name = format!("{name}/{}", self.namespace);
        }
        name = format!("{name}/{}", self.image);
        if let Some(snap) = &self.snap {
            name = format!("{name}@{snap}");
        }
        name
    }

    /// Whether the image is opened read-only (`--readonly`, or a snapshot).
    pub fn read_only(&self) -> bool {
        self.readonly || self.snap.is_some()
    }
}

/// Splits `POOL[/NAMESPACE]/IMAGE[@SNAP]`; the error says what is wrong with it.
pub fn parse_spec(spec: &str) -> Result<(String, String, String, Option<String>), String> {
    if spec.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let (path, snap) = match spec.split_once('@') {
        Some((path, snap)) if !snap.is_empty() && !snap.contains('@') => {
            (path, Some(snap.to_string()))
        }
        Some(_) => return Err("the snapshot after '@' is empty or has another '@'".into()),
        None => (spec, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, "", *image),
        [pool, namespace, image] => (*pool, *namespace, *image),
        _ => return Err("expected POOL/IMAGE, POOL/NAMESPACE/IMAGE, then optionally @SNAP".into()),
    };
    if pool.is_empty() || image.is_empty() {
        return Err("the pool and the image name must not be empty".into());
    }
    Ok((
        pool.to_string(),
        namespace.to_string(),
        image.to_string(),
        snap,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_as_rbd_spells_them() {
        assert_eq!(
            parse_spec("rbd/disk"),
            Ok(("rbd".into(), String::new(), "disk".into(), None))
        );
        assert_eq!(
            parse_spec("p/ns/disk@s1"),
            Ok(("p".into(), "ns".into(), "disk".into(), Some("s1".into())))
        );
        for bad in ["disk", "/disk", "p/", "p/d@", "p/d@a@b", "a/b/c/d", "p/d\0"] {
            assert!(parse_spec(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
