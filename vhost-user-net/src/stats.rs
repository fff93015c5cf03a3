//! Counters of what the daemon moved and dropped, and a rate limit for the warnings that guest
//! input can trigger (a hostile guest must not be able to flood the log).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// Logs a drop caused by the guest or the host, at most once per second.
    pub fn warn(&self, args: fmt::Arguments<'_>) {
        self.limiter.warn(args);
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

/// Lets `burst` messages through per interval and counts the ones it held back.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: u32,
    /// Start of the current window and messages let through in it.
    window: Mutex<Option<(Instant, u32)>>,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            interval: Duration::from_secs(1),
            burst: 10,
            window: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl RateLimit {
    /// True if a message may be logged now.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        match &mut *window {
            Some((start, count)) if now.duration_since(*start) < self.interval => {
                if *count < self.burst {
                    *count += 1;
                    true
                } else {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    false
                }
            }
            _ => {
                *window = Some((now, 1));
                true
            }
        }
    }

    pub fn warn(&self, args: fmt::Arguments<'_>) {
        if self.allow() {
            let held = self.suppressed.swap(0, Ordering::Relaxed);
            if held > 0 {
                log::warn!("{args} ({held} similar messages suppressed)");
            } else {
                log::warn!("{args}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_beyond_the_burst_are_held_back() {
        let limit = RateLimit::default();
        for _ in 0..10 {
            assert!(limit.allow());
        }
        assert!(!limit.allow());
        assert_eq!(limit.suppressed.load(Ordering::Relaxed), 1);
    }
}
