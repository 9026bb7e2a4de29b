//! The agent's one source of wall-clock time.
//!
//! Certificates and tokens carry wall-clock times, so the agent compares
//! them with [`Clock::now`]; how long to wait is always a `tokio::time`
//! sleep of the difference. Production code reads [`SystemClock`]; tests
//! run the agent's loops in paused tokio time with a [`TokioClock`], whose
//! wall-clock time moves exactly as far as tokio's clock does.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Wall-clock time as the agent sees it.
pub trait Clock: Debug + Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// How long from now until `t` (zero when `t` has passed).
    fn until(&self, t: SystemTime) -> Duration {
        t.duration_since(self.now()).unwrap_or_default()
    }
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// Wall-clock time that follows tokio's clock from a starting point: paused
/// and advanced together with it in tests.
#[derive(Debug, Clone, Copy)]
#[cfg(test)]
pub struct TokioClock {
    start: SystemTime,
    at: tokio::time::Instant,
}

#[cfg(test)]
impl TokioClock {
    /// A clock reading `start` now (tokio time).
    pub fn starting_at(start: SystemTime) -> Self {
        Self {
            start,
            at: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = TokioClock::starting_at(start);
        assert_eq!(c.now(), start);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(c.now(), start + Duration::from_secs(90));
        assert_eq!(
            c.until(start + Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(c.until(start), Duration::ZERO);
    }
}
