//! oci-tag-proxy: answers "which tags does this image have, what does each point to, and when
//! was it updated?" from a cache, so that callers can ask as often as they like without getting
//! rate-limited by the registry.
//!
//! # Layout
//! - [`config`]: flags and environment variables, validated into [`config::Settings`].
//! - [`model`]: image references, tags and tag lists; name validation.
//! - [`selection`], [`version`]: filtering and ordering a tag list per request; what counts as
//!   a version.
//! - [`api`]: the HTTP routes (`/tags`, `/tags/latest`, `/metrics`, `/healthz`, `/readyz`,
//!   `/openapi.json`), error answers, ETags and compression.
//! - [`refresh`]: cache or registry? Stale-while-revalidate, stale-if-error, single flight.
//! - [`cache`]: the memory tier (`moka`) over the shared tier (Redis, optional) and the
//!   embedded disk tier (`redb`).
//! - [`upstream`]: the Docker Hub API and the OCI distribution protocol, auth, and the
//!   careful HTTP client they share.
//! - [`metrics`]: every Prometheus metric.
//! - [`shutdown`], [`telemetry`]: signals and logging.
//!
//! [`serve`] wires them together on an already-bound listener, so tests run the real service
//! on `127.0.0.1:0`.

pub mod api;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod metrics;
pub mod model;
pub mod refresh;
pub mod selection;
pub mod sendfile;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
pub mod version;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::disk::DiskStore;
use crate::cache::redis::SharedTier;
use crate::cache::{DigestCache, TagCache};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::refresh::Refresher;
use crate::upstream::Upstream;

/// How long shutdown waits for background refreshes to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the cache in {dir}: {source}")]
    Cache {
        dir: String,
        source: cache::disk::DiskError,
    },
    #[error("invalid Redis URL: {0}")]
    Redis(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the service on `listener` until `shutdown` resolves, then drains in-flight requests and
/// background refreshes.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let disk = DiskStore::open(&settings.dir).map_err(|source| StartError::Cache {
        dir: settings.dir.display().to_string(),
        source,
    })?;
    let shared = match &settings.redis_url {
        Some(url) => Some(
            SharedTier::new(url, settings.redis_lock_ttl)
                .map_err(|e| StartError::Redis(e.to_string()))?,
        ),
        None => None,
    };
    let (metrics, registry) = Metrics::new(shared.is_some());
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let digests = DigestCache::new(
        disk.clone(),
        shared.clone(),
        settings.memory_entries.saturating_mul(10),
    );
    let upstream = Upstream::new(&settings, metrics.clone(), digests);
    let tags = TagCache::new(disk, shared.clone(), settings.memory_entries);
    if let Some(shared) = &shared {
        shared.spawn_watchdog(&tracker, stop.clone());
        let (on_update, on_resync) = (tags.clone(), tags.clone());
        shared.spawn_listener(
            &tracker,
            stop.clone(),
            move |key| {
                let tags = on_update.clone();
                let key = key.to_owned();
                tokio::spawn(async move { tags.forget(&key).await });
            },
            move || on_resync.forget_all(),
        );
    }
    let refresher = Refresher::new(
        tags,
        upstream,
        settings.refresh_interval,
        settings.redis_lock_ttl,
        metrics.clone(),
        tracker.clone(),
    );
    let state = api::AppState {
        settings: Arc::new(settings),
        refresher,
        metrics,
        registry: Arc::new(registry),
    };
    tracing::info!(addr = %listener.local_addr()?, "listening");
    axum::serve(sendfile::listen(listener), api::router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background refreshes still running at shutdown; abandoning them");
    }
    tracing::info!("stopped");
    Ok(())
}
