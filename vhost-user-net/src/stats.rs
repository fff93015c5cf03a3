//! Counters of what the daemon moved and dropped, shared by every queue pair, and the rate
//! limit of the warnings guest input can trigger (a hostile guest must not be able to flood
//! the log): all pairs share one, so the bound holds for the whole daemon.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost_user_common::ratelimit::RateLimit;

/// Frame and drop counters, shared by every queue pair.
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub bad_chains: AtomicU64,
    limiter: RateLimit,
}

impl Stats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs a drop caused by the guest or the host, at most ten times a second.
    pub fn warn(&self, args: fmt::Arguments<'_>) {
        self.limiter.warn(args);
    }

    /// Logs a failure the guest or the host can repeat at will, at the same rate.
    pub fn error(&self, args: fmt::Arguments<'_>) {
        self.limiter.error(args);
    }

    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tx {} frames ({} dropped), rx {} frames ({} dropped), {} bad chains",
            get(&self.tx_frames),
            get(&self.tx_dropped),
            get(&self.rx_frames),
            get(&self.rx_dropped),
            get(&self.bad_chains)
        )
    }
}
