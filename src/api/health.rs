//! Liveness, readiness and the Prometheus endpoint.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::cache::disk::Table;

/// Alive as long as the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the cache database answers.
pub async fn readyz(State(app): State<AppState>) -> Response {
    match app.refresher.cache().disk().len(Table::Tags).await {
        Ok(n) => (
            StatusCode::OK,
            format!("ready: disk cache ok ({n} images)\n"),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

/// The Prometheus text exposition (OpenMetrics), with cache sizes read at scrape time.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let cache = app.refresher.cache();
    app.metrics
        .set_cache_entries("memory", cache.memory_entries());
    if let Ok(n) = cache.disk().len(Table::Tags).await {
        app.metrics.set_cache_entries("disk", n);
    }
    if let Ok(n) = cache.disk().len(Table::Digests).await {
        app.metrics
            .digests_cached
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &app.registry) {
        tracing::error!(error = %e, "metrics encoding failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
