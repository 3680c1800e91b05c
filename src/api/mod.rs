//! The HTTP API: every route in one function, and the state the handlers share.

pub mod encoding;
mod error;
mod health;
mod openapi;
mod query;
mod tags;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use openapi::ApiDoc;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::refresh::Refresher;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub refresher: Refresher,
    pub metrics: Metrics,
    pub registry: Arc<prometheus_client::registry::Registry>,
}

/// How long one `/tags` request may wait for the registry: every attempt of one upstream
/// request, plus slack. A request that waits longer gets a plain-text `504` (the fetch goes on
/// in the background). This also bounds how long shutdown waits for in-flight requests.
pub fn request_budget(settings: &Settings) -> Duration {
    settings.upstream_timeout * (settings.upstream_retries + 1) + Duration::from_secs(5)
}

/// The whole API. The outer time-out is a last resort (handlers answer within
/// [`request_budget`] themselves), so a hung connection cannot hold shutdown forever.
pub fn router(state: AppState) -> Router {
    let request_timeout = request_budget(&state.settings) + Duration::from_secs(5);
    Router::new()
        .route("/tags", get(tags::get_tags))
        .route("/tags/latest", get(tags::get_latest))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::Method })
        .layer(TraceLayer::new_for_http())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            request_timeout,
        ))
        .with_state(state)
}

impl From<ApiError> for axum::response::Response {
    fn from(e: ApiError) -> Self {
        e.into_response()
    }
}
