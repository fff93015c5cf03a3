//! Rate-limited logging for messages a guest or frontend can trigger at will: a hostile guest
//! must not be able to flood the host's logs (or fill its disk) by sending bad chains.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets `burst` messages through per interval and counts the ones it held back; the next
/// message let through says how many were suppressed. Shareable between threads.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: u32,
    /// Start of the current window and messages let through in it.
    window: Mutex<Option<(Instant, u32)>>,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    /// Ten messages a second.
    fn default() -> Self {
        RateLimit::new(Duration::from_secs(1), 10)
    }
}

impl RateLimit {
    pub const fn new(interval: Duration, burst: u32) -> RateLimit {
        RateLimit {
            interval,
            burst,
            window: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True if a message may be logged now.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut window = crate::lock(&self.window);
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

    /// Logs at warning level, if the rate allows.
    pub fn warn(&self, args: fmt::Arguments<'_>) {
        self.log(log::Level::Warn, args);
    }

    /// Logs at error level, if the rate allows.
    pub fn error(&self, args: fmt::Arguments<'_>) {
        self.log(log::Level::Error, args);
    }

    fn log(&self, level: log::Level, args: fmt::Arguments<'_>) {
        if !self.allow() {
            return;
        }
        match self.suppressed.swap(0, Ordering::Relaxed) {
            0 => log::log!(level, "{args}"),
            held => log::log!(level, "{args} ({held} similar messages suppressed)"),
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

    #[test]
    fn a_new_window_lets_messages_through_again() {
        let limit = RateLimit::new(Duration::from_millis(20), 1);
        assert!(limit.allow());
        assert!(!limit.allow());
        std::thread::sleep(Duration::from_millis(30));
        assert!(limit.allow());
    }
}
