//! Per-host manners: back-off after a rate limit, a circuit breaker for a host that keeps
//! failing, an optional request-rate cap, and the concurrency cap.
//!
//! The state lives in [`HostState`], one per upstream origin, owned by the HTTP client. Every
//! attempt asks [`HostState::admit`] first: during a back-off or while the breaker is open no
//! request leaves, and the caller gets an error that says when to come back.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

/// Back-off after a 429 without `Retry-After`: 1 s, doubling per repeat, at most 5 minutes,
/// each with up to 50 % jitter.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The longest `Retry-After` honoured, whatever the registry says (a 6-hour pull window would
/// otherwise silence a host for 6 hours).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failed requests (after their retries) that open the breaker.
    pub threshold: u32,
    /// How long it stays open before one trial request is let through.
    pub cooldown: Duration,
}

/// Why a request may not go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The host rate-limited us; wait this long.
    BackingOff(Duration),
    /// The host kept failing; the breaker opens again to a trial after this long.
    BreakerOpen(Duration),
}

#[derive(Debug, Default)]
struct Flow {
    backoff_until: Option<Instant>,
    /// 429s in a row without `Retry-After` (for the exponential back-off).
    rate_limited_streak: u32,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// A trial request is in flight while half-open.
    trial_in_flight: bool,
}

/// Everything we track about one upstream host.
pub struct HostState {
    pub semaphore: Arc<Semaphore>,
    limiter: Option<DefaultDirectRateLimiter>,
    breaker: BreakerConfig,
    /// A std mutex: held for a few field updates, never across an await.
    flow: Mutex<Flow>,
}

impl HostState {
    pub fn new(concurrency: usize, rate_per_sec: Option<u32>, breaker: BreakerConfig) -> HostState {
        HostState {
            semaphore: Arc::new(Semaphore::new(concurrency)),
            limiter: rate_per_sec
                .and_then(NonZeroU32::new)
                .map(|r| RateLimiter::direct(Quota::per_second(r))),
            breaker,
            flow: Mutex::new(Flow::default()),
        }
    }

    /// May a request go now? Also claims the half-open trial slot when the breaker's cooldown
    /// has passed.
    pub fn admit(&self) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut f = self.flow.lock().expect("flow lock");
        if let Some(until) = f.backoff_until {
            if until > now {
                return Err(Refusal::BackingOff(until - now));
            }
            f.backoff_until = None;
        }
        if let Some(until) = f.open_until {
            if until > now {
                return Err(Refusal::BreakerOpen(until - now));
            }
            if f.trial_in_flight {
                return Err(Refusal::BreakerOpen(self.breaker.cooldown));
            }
            f.trial_in_flight = true;
        }
        Ok(())
    }

    /// Waits for the request-rate cap, if one is set.
    pub async fn pace(&self) {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }

    /// The host said "too many requests" (or "0 remaining"): no request before `retry_after`,
    /// or an exponential back-off with jitter when it did not say.
    pub fn rate_limited(&self, retry_after: Option<Duration>) -> Duration {
        let mut f = self.flow.lock().expect("flow lock");
        let wait = match retry_after {
            Some(d) => {
                f.rate_limited_streak = 0;
                d.min(RETRY_AFTER_MAX)
            }
            None => {
                let exp = BACKOFF_BASE.saturating_mul(1 << f.rate_limited_streak.min(16));
                f.rate_limited_streak += 1;
                with_jitter(exp.min(BACKOFF_MAX))
            }
        };
        let until = Instant::now() + wait;
        f.backoff_until = Some(f.backoff_until.map_or(until, |u| u.max(until)));
        wait
    }

    /// A request ended (after its retries): counts towards opening or closing the breaker.
    pub fn record(&self, failed: bool) {
        let mut f = self.flow.lock().expect("flow lock");
        let was_trial = std::mem::take(&mut f.trial_in_flight);
        if !failed {
            f.consecutive_failures = 0;
            f.open_until = None;
            f.rate_limited_streak = 0;
            return;
        }
        f.consecutive_failures += 1;
        if was_trial || f.consecutive_failures >= self.breaker.threshold {
            f.open_until = Some(Instant::now() + self.breaker.cooldown);
            if !was_trial {
                tracing::warn!(failures = f.consecutive_failures, "circuit breaker opened");
            }
        }
    }

    /// Whether the breaker is open now (for readiness details).
    pub fn is_open(&self) -> bool {
        let f = self.flow.lock().expect("flow lock");
        f.open_until.is_some_and(|u| u > Instant::now())
    }
}

/// `d` plus up to 50 % of it, so that many clients do not retry in step.
pub fn with_jitter(d: Duration) -> Duration {
    d + d.mul_f64(fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostState {
        HostState::new(
            4,
            None,
            BreakerConfig {
                threshold: 3,
                cooldown: Duration::from_millis(50),
            },
        )
    }

    #[test]
    fn backoff_honours_retry_after_and_grows_without_it() {
        let h = host();
        assert_eq!(h.admit(), Ok(()));
        assert_eq!(
            h.rate_limited(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert!(matches!(h.admit(), Err(Refusal::BackingOff(d)) if d > Duration::from_secs(29)));
        let h = host();
        let first = h.rate_limited(None);
        let second = h.rate_limited(None);
        assert!(first >= Duration::from_secs(1) && first <= Duration::from_millis(1500));
        assert!(second >= Duration::from_secs(2) && second <= Duration::from_secs(3));
        assert_eq!(
            host().rate_limited(Some(Duration::from_secs(21_600))),
            RETRY_AFTER_MAX
        );
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let h = host();
        for _ in 0..3 {
            assert_eq!(h.admit(), Ok(()));
            h.record(true);
        }
        assert!(matches!(h.admit(), Err(Refusal::BreakerOpen(_))));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(h.admit(), Ok(()), "one trial after the cooldown");
        assert!(
            matches!(h.admit(), Err(Refusal::BreakerOpen(_))),
            "only one"
        );
        h.record(true);
        assert!(h.is_open(), "a failed trial opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(h.admit(), Ok(()));
        h.record(false);
        assert!(!h.is_open());
        assert_eq!(h.admit(), Ok(()));
        assert_eq!(h.admit(), Ok(()), "closed: no trial limit");
    }
}
