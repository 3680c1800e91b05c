//! Deciding, per request, between the cache and the registry.
//!
//! - fresh entry (younger than the refresh interval): answer from it;
//! - stale entry: answer from it at once and refresh in the background (stale-while-revalidate);
//!   when that refresh fails, the old answer keeps being served (stale-if-error), and the
//!   failure is logged, counted, and not retried for a while;
//! - no entry: fetch while the caller waits.
//!
//! Every fetch goes through the [`Coalescer`], so concurrent requests for one image cost one
//! upstream fetch.

pub mod coalesce;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::task::TaskTracker;

use crate::cache::redis::{Lock, SharedTier};
use crate::cache::{CachedTags, TagCache};
use crate::metrics::Metrics;
use crate::model::ImageRef;
use crate::upstream::{Upstream, UpstreamError};
pub use coalesce::{Coalescer, FetchResult};

/// After a failed background refresh, the next one waits at least this long.
const REFRESH_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a 404 or 403 for an image is answered without asking the registry again.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How often a replica waiting on another's refresh looks for its answer.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// The longest a `Retry-After` is honoured for, whatever the registry says.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How an answer relates to the cache; sent as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Stale,
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Stale => "stale",
            CacheStatus::Miss => "miss",
        }
    }
}

/// Serves tag lists from the cache and keeps them fresh.
#[derive(Clone)]
pub struct Refresher {
    inner: Arc<Inner>,
}

struct Inner {
    cache: TagCache,
    upstream: Upstream,
    flights: Coalescer,
    refresh_interval: Duration,
    /// How long a replica waits on another's refresh lock before taking over.
    lock_ttl: Duration,
    metrics: Metrics,
    /// Per image: no upstream request before this instant (after a failure or a 429).
    /// A std mutex: never held across an await.
    quiet_until: Mutex<HashMap<String, Quiet>>,
}

/// Until when an image is left alone, and the 429 to answer misses with meanwhile.
type Quiet = (Instant, Option<Arc<UpstreamError>>);

impl Refresher {
    pub fn new(
        cache: TagCache,
        upstream: Upstream,
        refresh_interval: Duration,
        lock_ttl: Duration,
        metrics: Metrics,
        tracker: TaskTracker,
    ) -> Refresher {
        Refresher {
            inner: Arc::new(Inner {
                cache,
                upstream,
                flights: Coalescer::new(tracker),
                refresh_interval,
                lock_ttl,
                metrics,
                quiet_until: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn cache(&self) -> &TagCache {
        &self.inner.cache
    }

    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    /// The answer for `image`, and how it relates to the cache.
    pub async fn tags(
        &self,
        image: &ImageRef,
    ) -> Result<(Arc<CachedTags>, CacheStatus), Arc<UpstreamError>> {
        let key = self.cache_key(image);
        if let Some(entry) = self.inner.cache.get(&key).await {
            if self.is_fresh(&entry) {
                return Ok((entry, CacheStatus::Hit));
            }
            self.refresh_in_background(image, &key);
            return Ok((entry, CacheStatus::Stale));
        }
        if let Some(err) = self.quiet_error(&key) {
            return Err(err);
        }
        let entry = self.fetch(image, &key).await?;
        Ok((entry, CacheStatus::Miss))
    }

    /// The image's cache key, with the fingerprint of the credentials used for its registry.
    fn cache_key(&self, image: &ImageRef) -> String {
        match self.inner.upstream.credential_fingerprint(&image.registry) {
            Some(fp) => format!("{}@{fp}", image.cache_key()),
            None => image.cache_key(),
        }
    }

    fn is_fresh(&self, entry: &CachedTags) -> bool {
        let age = Utc::now() - entry.list.fetched_at;
        age.to_std().unwrap_or(Duration::ZERO) < self.inner.refresh_interval
    }

    fn refresh_in_background(&self, image: &ImageRef, key: &str) {
        if self.is_quiet(key) {
            return;
        }
        // Dropping the flight is fine: the fetch runs in its own task.
        drop(self.start_fetch(image, key));
    }

    async fn fetch(&self, image: &ImageRef, key: &str) -> FetchResult {
        self.start_fetch(image, key).await
    }

    fn start_fetch(&self, image: &ImageRef, key: &str) -> coalesce::FetchFuture {
        let this = self.clone();
        let image = image.clone();
        let owned_key = key.to_owned();
        self.inner.flights.join(
            key,
            async move { this.fetch_and_store(image, owned_key).await },
        )
    }

    /// The one fetch for an image (in this process): re-checks the cache (a fetch that just
    /// finished may have filled it), then — with a shared tier — takes the image's cluster-wide
    /// lock, so one replica at a time asks the registry while the others serve what they have
    /// or wait for its answer.
    async fn fetch_and_store(&self, image: ImageRef, key: String) -> FetchResult {
        let previous = self.inner.cache.get(&key).await;
        if let Some(entry) = &previous
            && self.is_fresh(entry)
        {
            return Ok(entry.clone());
        }
        let Some(shared) = self.inner.cache.shared().cloned() else {
            return self.fetch_upstream(&image, &key, previous).await;
        };
        let deadline = Instant::now() + self.inner.lock_ttl * 4;
        loop {
            match shared.try_lock(&key).await {
                Lock::Acquired(_guard) => {
                    // Another replica may have finished just before we took the lock.
                    if let Some(entry) = self.inner.cache.get_shared(&key).await
                        && self.is_fresh(&entry)
                    {
                        self.inner.cache.promote(&key, entry.clone()).await;
                        return Ok(entry);
                    }
                    return self.fetch_upstream(&image, &key, previous).await;
                }
                Lock::Unavailable => return self.fetch_upstream(&image, &key, previous).await,
                Lock::Held => {
                    if let Some(stale) = &previous {
                        // Another replica is refreshing it; keep serving what we have.
                        return Ok(stale.clone());
                    }
                    if let Some(entry) = self.wait_for_other(&shared, &key, deadline).await {
                        return Ok(entry);
                    }
                    if Instant::now() >= deadline {
                        return self.fetch_upstream(&image, &key, previous).await;
                    }
                    // The lock is gone without an answer (its holder failed or died): try again.
                }
            }
        }
    }

    /// Waits while another replica holds the lock, until its answer appears in the shared tier
    /// (`Some`) or the lock is gone (`None`).
    async fn wait_for_other(
        &self,
        shared: &SharedTier,
        key: &str,
        deadline: Instant,
    ) -> Option<Arc<CachedTags>> {
        while Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            if let Some(entry) = self.inner.cache.get_shared(key).await
                && self.is_fresh(&entry)
            {
                self.inner.cache.promote(key, entry.clone()).await;
                return Some(entry);
            }
            if shared.is_locked(key).await != Some(true) {
                return None;
            }
        }
        None
    }

    /// Asks the registry, stores the answer or remembers the failure.
    async fn fetch_upstream(
        &self,
        image: &ImageRef,
        key: &str,
        previous: Option<Arc<CachedTags>>,
    ) -> FetchResult {
        let label = image.registry.label().to_owned();
        let started = Instant::now();
        let previous_list = previous.as_ref().map(|p| &p.list);
        let result = self.inner.upstream.fetch_tags(image, previous_list).await;
        self.inner
            .metrics
            .observe_fetch(&label, started.elapsed().as_secs_f64());
        match result {
            Ok(list) => {
                self.inner
                    .quiet_until
                    .lock()
                    .expect("quiet lock")
                    .remove(key);
                tracing::info!(image = %image, tags = list.tags.len(), truncated = list.truncated,
                    elapsed_ms = started.elapsed().as_millis() as u64, "fetched from upstream");
                Ok(self.inner.cache.put(key, list).await)
            }
            Err(e) => {
                let e = Arc::new(e);
                self.remember_failure(key, &e);
                tracing::warn!(image = %image, error = %e, "upstream fetch failed");
                self.inner.metrics.count_refresh_error(&label);
                Err(e)
            }
        }
    }

    /// A 429 silences the image for its `Retry-After` (misses get the 429 at once, without a
    /// request); a 404 or 403 is remembered for a short while (so callers asking again and again
    /// for a missing or private repository cannot drive traffic upstream); any other failure
    /// only delays the next background refresh.
    fn remember_failure(&self, key: &str, e: &Arc<UpstreamError>) {
        let (wait, keep) = match e.as_ref() {
            UpstreamError::RateLimited { retry_after, .. } => (
                retry_after
                    .unwrap_or(Duration::from_secs(5))
                    .min(MAX_RETRY_AFTER),
                Some(e.clone()),
            ),
            UpstreamError::BackingOff { retry_after, .. } => (*retry_after, Some(e.clone())),
            UpstreamError::NotFound { .. } | UpstreamError::Denied { .. } => {
                (NEGATIVE_TTL, Some(e.clone()))
            }
            _ => (REFRESH_RETRY_AFTER, None),
        };
        self.inner
            .quiet_until
            .lock()
            .expect("quiet lock")
            .insert(key.to_owned(), (Instant::now() + wait, keep));
    }

    fn is_quiet(&self, key: &str) -> bool {
        let quiet = self.inner.quiet_until.lock().expect("quiet lock");
        quiet
            .get(key)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    /// The remembered error for an image still inside its quiet time (a 429 with the time
    /// left as its `Retry-After`).
    fn quiet_error(&self, key: &str) -> Option<Arc<UpstreamError>> {
        let quiet = self.inner.quiet_until.lock().expect("quiet lock");
        let (until, err) = quiet.get(key)?;
        let left = until.checked_duration_since(Instant::now())?;
        let err = err.as_ref()?;
        Some(match err.as_ref() {
            UpstreamError::RateLimited { url, .. } | UpstreamError::BackingOff { url, .. } => {
                Arc::new(UpstreamError::BackingOff {
                    url: url.clone(),
                    retry_after: left,
                })
            }
            _ => err.clone(),
        })
    }

    /// Fetches running now.
    pub fn in_flight(&self) -> usize {
        self.inner.flights.in_flight()
    }
}
