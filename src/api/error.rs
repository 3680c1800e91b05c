//! Every error answer of the API, mapped to a status and a plain-text body in one place.
//!
//! Messages name what went wrong and, for upstream failures, the upstream status and URL —
//! never a credential or token (URLs are shown without their query, see `display_url`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// 404/429/502/504/...: the registry could not give an answer and nothing was cached.
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
    /// 404: `/tags/latest` found no tag that matches the parameters.
    #[error("no tag of {0} matches the given parameters")]
    NoMatch(String),
    /// 504: the answer took longer than the request's time budget (the fetch goes on in the
    /// background and fills the cache).
    #[error("timed out after {0}s waiting for the registry; the fetch goes on, try again shortly")]
    Budget(u64),
    /// 404 for paths the API does not have.
    #[error(
        "not found: see GET /tags?image=<name>&registry=<docker|ghcr|host>, or GET /openapi.json"
    )]
    NoRoute,
    /// 405.
    #[error("method not allowed")]
    Method,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NoRoute | ApiError::NoMatch(_) => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Budget(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream(e) => match e.as_ref() {
                UpstreamError::NotFound { .. } => StatusCode::NOT_FOUND,
                UpstreamError::Denied { .. } => StatusCode::FORBIDDEN,
                UpstreamError::RateLimited { .. } | UpstreamError::BackingOff { .. } => {
                    StatusCode::TOO_MANY_REQUESTS
                }
                UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                UpstreamError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamError::Status { .. }
                | UpstreamError::Network { .. }
                | UpstreamError::Malformed { .. }
                | UpstreamError::Refused { .. } => StatusCode::BAD_GATEWAY,
            },
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Upstream(e) => match e.as_ref() {
                UpstreamError::NotFound { .. } => format!("repository not found upstream: {e}"),
                UpstreamError::Denied { .. } => format!(
                    "the registry refused access (private repository, or no or wrong credentials \
                     configured): {e}"
                ),
                UpstreamError::RateLimited { .. } | UpstreamError::BackingOff { .. } => {
                    format!("the registry is rate-limiting us and nothing is cached: {e}")
                }
                _ => format!("upstream error: {e}"),
            },
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), format!("{}\n", self.message())).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let retry_after = match &self {
            ApiError::Upstream(e) => match e.as_ref() {
                UpstreamError::RateLimited { retry_after, .. } => {
                    Some(retry_after.unwrap_or(Duration::from_secs(60)))
                }
                UpstreamError::Unavailable { retry_after, .. }
                | UpstreamError::BackingOff { retry_after, .. } => Some(*retry_after),
                _ => None,
            },
            _ => None,
        };
        if let Some(wait) = retry_after {
            // Round up: `Retry-After: 0` would invite an immediate retry.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(e: UpstreamError) -> ApiError {
        ApiError::Upstream(Arc::new(e))
    }

    #[test]
    fn statuses() {
        let url = "https://r.example/v2/a/tags/list".to_string();
        assert_eq!(
            up(UpstreamError::NotFound {
                status: 404,
                url: url.clone()
            })
            .status(),
            404
        );
        assert_eq!(
            up(UpstreamError::Timeout {
                url: url.clone(),
                timeout: Duration::from_secs(1)
            })
            .status(),
            504
        );
        assert_eq!(
            up(UpstreamError::Status {
                status: 503,
                url: url.clone()
            })
            .status(),
            502
        );
        let limited = up(UpstreamError::RateLimited {
            status: 429,
            url,
            retry_after: Some(Duration::from_secs(42)),
        })
        .into_response();
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "42");
        assert!(
            limited.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
    }
}
