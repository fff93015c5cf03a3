//! `--rbd`: a Ceph RBD image as the backing store, through librbd's asynchronous C API.
//!
//! - [`options`]: the command line's `POOL[/NAMESPACE]/IMAGE[@SNAP]` and companions (always
//!   built, so the flags exist even without librbd);
//! - [`ffi`]: the librados/librbd functions used (feature `rbd`);
//! - [`image`]: connecting and opening, in two steps around the sandbox (feature `rbd`);
//! - [`engine`]: one queue's requests in flight on librbd (feature `rbd`).
//!
//! Exclusive lock: images created with the `exclusive-lock` feature (rbd's default) are
//! written by one client at a time. librbd hands the lock over cooperatively, on request, so
//! a second daemon writing the same image never interleaves half-written requests with the
//! first; both keep working, slowly, as the lock goes back and forth. That handover is what
//! live migration uses: the destination's daemon opens the image while the source still
//! serves, and its first write after the switch takes the lock.

pub mod options;

#[cfg(feature = "rbd")]
pub mod engine;
#[cfg(feature = "rbd")]
mod ffi;
#[cfg(feature = "rbd")]
pub mod image;

#[cfg(feature = "rbd")]
pub use engine::RbdEngine;
#[cfg(feature = "rbd")]
pub use image::{Prepared, RbdError, RbdImage};
pub use options::RbdOptions;
