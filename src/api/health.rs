//! Liveness, readiness and the Prometheus endpoint.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::cache::disk::Table;

/// Alive as long as the process answers.
#[utoipa::path(get, path = "/healthz",
    responses((status = 200, description = "ok", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the cache database answers. The body details degradations that do not stop
/// the service from answering: Redis down, registries whose circuit breaker is open.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "ready, with details", body = String, content_type = "text/plain"),
    (status = 503, description = "not ready, with the reason", body = String, content_type = "text/plain")))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    let redis = match app.refresher.cache().shared() {
        None => "",
        Some(s) if s.is_up() => "; redis: up",
        Some(_) => "; redis: DOWN (degraded: serving from memory and disk, reconnecting)",
    };
    let breakers = app.refresher.upstream().http().open_breakers();
    let breakers = if breakers.is_empty() {
        String::new()
    } else {
        format!("; circuit open for: {}", breakers.join(", "))
    };
    match app.refresher.cache().disk().len(Table::Tags).await {
        Ok(n) => (
            StatusCode::OK,
            format!("ready: disk cache ok ({n} images){redis}{breakers}\n"),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200,
    description = "Prometheus text format, or OpenMetrics when asked for with `Accept`",
    body = String, content_type = "text/plain")))]
/// The metrics, with cache sizes read at scrape time: OpenMetrics when the scraper asks for it
/// (`Accept: application/openmetrics-text`), else the classic Prometheus text format.
pub async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let cache = app.refresher.cache();
    app.metrics
        .set_cache_entries("memory", cache.memory_entries());
    if let Ok(n) = cache.disk().len(Table::Tags).await {
        app.metrics.set_cache_entries("disk", n);
    }
    if let Some(shared) = cache.shared() {
        app.metrics.redis_up.set(i64::from(shared.is_up()));
    }
    if let Ok(n) = cache.disk().len(Table::Digests).await {
        app.metrics
            .digests_cached
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let body = match crate::metrics::encode(&app.registry, openmetrics) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "metrics encoding failed");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::PROMETHEUS_CONTENT_TYPE
    };
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
