//! When the agent tries the node API again after a failure.

use std::time::Duration;

/// When to try the node API again after a failure.
///
/// The first failure moves on to the next server almost at once (a jitter
/// of up to [`FAILOVER_JITTER`] spreads agents leaving a dead server); once
/// every known server has failed in a round, the wait grows exponentially
/// from 200 ms up to `max`, with jitter (each wait is drawn from the upper
/// half of its step). No wait is longer than a quarter of the time left on
/// the soonest-expiring credential the agent holds (never shorter than
/// [`MIN_RETRY`]), so attempts come ever more often as it nears expiry: a
/// credential does not expire while some server is reachable again in time.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    failures: u32,
    max: Duration,
}

/// Most jitter before moving to the next server after a failure.
pub const FAILOVER_JITTER: Duration = Duration::from_millis(250);

/// Shortest wait between attempts, however close an expiry is.
pub const MIN_RETRY: Duration = Duration::from_millis(50);

impl RetrySchedule {
    /// A schedule whose waits never exceed `max`.
    pub fn new(max: Duration) -> Self {
        Self { failures: 0, max }
    }

    /// A call succeeded: the next failure starts a fresh round.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    #[cfg(test)]
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns how long to wait before the next
    /// attempt, given `servers` known servers and the time `left` on the
    /// soonest-expiring credential still valid (`None`: nothing valid).
    pub fn next_delay(&mut self, servers: usize, left: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let servers = u32::try_from(servers.max(1)).unwrap_or(u32::MAX);
        let wait = if !self.failures.is_multiple_of(servers) {
            FAILOVER_JITTER.mul_f64(rand::random::<f64>())
        } else {
            let round = (self.failures / servers).saturating_sub(1).min(16);
            Duration::from_millis(200)
                .saturating_mul(1u32 << round)
                .min(self.max)
                .mul_f64(0.5 + rand::random::<f64>() / 2.0)
        };
        bound_by_expiry(wait.min(self.max), left)
    }
}

/// `wait`, shortened to a quarter of `left` (at least [`MIN_RETRY`]).
pub fn bound_by_expiry(wait: Duration, left: Option<Duration>) -> Duration {
    match left {
        Some(l) if !l.is_zero() => wait.min((l / 4).max(MIN_RETRY)),
        _ => wait,
    }
}

/// Whether a failed call says more about the server (or the way to it) than
/// about the request: worth trying another server.
pub fn is_server_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted
    )
}

/// Exponential backoff with full jitter: 200 ms doubling per `attempt` up
/// to `max`, each wait drawn from the upper half of its step.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(16));
    base.min(max).mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// Drives `schedule` through an outage of `outage` (every attempt fails),
    /// sleeping in (paused) tokio time; `expires` is when the soonest
    /// credential expires, as an offset from the start. Returns the offsets
    /// of the attempts.
    async fn outage(
        schedule: &mut RetrySchedule,
        servers: usize,
        outage: Duration,
        expires: Option<Duration>,
    ) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut attempts = vec![Duration::ZERO];
        while t0.elapsed() < outage {
            let left = expires.and_then(|e| e.checked_sub(t0.elapsed()));
            let wait = schedule.next_delay(servers, left);
            tokio::time::sleep(wait).await;
            attempts.push(t0.elapsed());
        }
        attempts
    }

    #[tokio::test(start_paused = true)]
    async fn fails_over_at_once_then_backs_off_with_jitter() {
        let max = Duration::from_secs(4);
        let mut s = RetrySchedule::new(max);
        let at = outage(&mut s, 2, Duration::from_secs(120), None).await;
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, g) in gaps.iter().enumerate() {
            let failure = u32::try_from(i).expect("small") + 1;
            if failure % 2 == 1 {
                // The other server is tried at once (jitter only).
                assert!(
                    *g <= FAILOVER_JITTER + Duration::from_millis(1),
                    "hop {failure} waited {g:?}"
                );
            } else {
                // Both failed: back off, 200 ms doubling up to `max`, upper half jittered.
                let round = failure / 2 - 1;
                let step = Duration::from_millis(200)
                    .saturating_mul(1 << round.min(16))
                    .min(max);
                assert!(
                    *g >= step / 2 && *g <= step + Duration::from_millis(1),
                    "round {round}: waited {g:?}, step {step:?}"
                );
            }
        }
        // The wait reached `max` and stayed there: about 2 attempts per 4 s.
        assert!(gaps.iter().any(|g| *g > max / 2), "{gaps:?}");
        assert!(at.len() < 120, "too many attempts: {}", at.len());
        // Jitter: the long waits are not all the same.
        let long: std::collections::BTreeSet<_> = gaps.iter().filter(|g| **g > max / 2).collect();
        assert!(long.len() > 1, "no jitter in {gaps:?}");
        assert_eq!(s.failures(), u32::try_from(gaps.len()).expect("small"));
        s.succeeded();
        assert_eq!(s.failures(), 0);
        assert!(
            s.next_delay(2, None) <= FAILOVER_JITTER,
            "a success starts a new round"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_come_faster_as_a_credential_nears_expiry() {
        // A 30 s maximum backoff would let an 8 s SVID expire between two
        // attempts; bounded by the time left, the attempts come ever more
        // often until the very end.
        let mut s = RetrySchedule::new(Duration::from_secs(30));
        let expires = Duration::from_secs(8);
        let at = outage(&mut s, 2, Duration::from_secs(40), Some(expires)).await;
        for w in at.windows(2) {
            if w[0] < expires {
                let left = expires - w[0];
                // (+1 ms: tokio's timer rounds up to whole milliseconds)
                assert!(
                    w[1] - w[0] <= (left / 4).max(MIN_RETRY) + Duration::from_millis(1),
                    "at {:?} ({left:?} left) waited {:?}",
                    w[0],
                    w[1] - w[0]
                );
            }
        }
        let before: Vec<&Duration> = at.iter().filter(|t| **t < expires).collect();
        let last = **before.last().expect("attempts before expiry");
        assert!(
            expires - last <= MIN_RETRY + Duration::from_millis(1),
            "last attempt {last:?}, expiry {expires:?}"
        );
        assert!(
            before.len() < 200,
            "bounded, not spinning: {} attempts",
            before.len()
        );
        // Once nothing is left to save, the wait grows back to the maximum.
        let after: Vec<Duration> = at
            .windows(2)
            .filter(|w| w[0] >= expires)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(
            after.iter().any(|g| *g > Duration::from_secs(5)),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_server_backs_off_from_the_first_failure() {
        let mut s = RetrySchedule::new(Duration::from_secs(30));
        let at = outage(&mut s, 1, Duration::from_secs(10), None).await;
        let first = at[1] - at[0];
        assert!(
            first >= Duration::from_millis(100) && first <= Duration::from_millis(201),
            "{first:?}"
        );
        assert!(at[2] - at[1] >= Duration::from_millis(200), "{at:?}");
    }

    #[test]
    fn server_failures_are_told_from_refusals() {
        assert!(is_server_failure(&tonic::Status::unavailable("down")));
        assert!(is_server_failure(&tonic::Status::unknown("reset")));
        assert!(!is_server_failure(&tonic::Status::permission_denied("no")));
        assert!(!is_server_failure(&tonic::Status::invalid_argument("csr")));
    }
}
