//! `GET /tags?image=<name>&registry=<docker|ghcr|host>`: the tag list of one image.
//!
//! The query is validated into an [`ImageRef`] here, at the edge; a cached answer is sent as the
//! bytes it was stored with.

use std::time::Instant;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::metrics::RequestStatus;
use crate::model::{ImageRef, Registry, normalize_docker_hub, validate_repository};
use crate::refresh::CacheStatus;

/// The query parameters `/tags` knows.
const PARAMS: &[&str] = &["image", "registry"];

/// Names that mean Docker Hub.
const DOCKER_HUB_NAMES: &[&str] = &[
    "docker",
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
    "hub.docker.com",
];

pub async fn get_tags(State(app): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let image = match parse_query(&app, query.as_deref().unwrap_or("")) {
        Ok(image) => image,
        Err(e) => {
            app.metrics.count_request("none", RequestStatus::error);
            tracing::info!(status = 400, error = %e, "bad request");
            return e.into_response();
        }
    };
    let label = image.registry.label().to_owned();
    let result = app.refresher.tags(&image).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok((entry, cache)) => {
            let status = match cache {
                CacheStatus::Hit => RequestStatus::cache_hit,
                CacheStatus::Stale => RequestStatus::cache_stale,
                CacheStatus::Miss => RequestStatus::success,
            };
            app.metrics.count_request(&label, status);
            tracing::info!(image = %image.repository, registry = %label,
                tags = entry.list.tags.len(), cache = cache.as_str(), latency_ms, "tags");
            let mut resp = (StatusCode::OK, entry.body.clone()).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
            if entry.list.truncated {
                h.insert("x-tags-truncated", HeaderValue::from_static("true"));
            }
            resp
        }
        Err(e) => {
            app.metrics.count_request(&label, RequestStatus::error);
            let err = ApiError::Upstream(e);
            tracing::info!(image = %image.repository, registry = %label,
                status = err.status().as_u16(), error = %err, latency_ms, "tags failed");
            err.into_response()
        }
    }
}

/// Validates the query string into the image it names.
fn parse_query(app: &AppState, query: &str) -> Result<ImageRef, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let mut image = None;
    let mut registry = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match k.as_ref() {
            "image" => &mut image,
            "registry" => &mut registry,
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?}; supported: {}",
                    PARAMS.join(", ")
                )));
            }
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(bad(format!("query parameter {k:?} given more than once")));
        }
    }
    let image = image.filter(|i| !i.is_empty()).ok_or_else(|| {
        bad("missing required query parameter \"image\" (e.g. image=library/nginx)".into())
    })?;
    let registry = parse_registry(app, registry.as_deref())?;
    let repository = match registry {
        Registry::DockerHub => normalize_docker_hub(&image),
        Registry::Oci(_) => validate_repository(&image).map(|_| image.clone()),
    }
    .map_err(|e| bad(format!("invalid image {:?}: {e}", truncate(&image))))?;
    Ok(ImageRef {
        registry,
        repository,
    })
}

fn parse_registry(app: &AppState, raw: Option<&str>) -> Result<Registry, ApiError> {
    let raw = match raw {
        None => return Ok(Registry::DockerHub),
        Some("") => {
            return Err(ApiError::BadRequest(
                "query parameter \"registry\" is empty; use docker, ghcr or a registry host".into(),
            ));
        }
        Some(r) => r.to_ascii_lowercase(),
    };
    if DOCKER_HUB_NAMES.contains(&raw.as_str()) {
        return Ok(Registry::DockerHub);
    }
    let host = if raw == "ghcr" {
        "ghcr.io".to_owned()
    } else {
        raw
    };
    if !is_host(&host) {
        return Err(ApiError::BadRequest(format!(
            "invalid registry {:?}: expected docker, ghcr or a host such as quay.io or localhost:5000",
            truncate(&host)
        )));
    }
    if host != "ghcr.io" && !app.settings.allowed_registries.contains(&host) {
        return Err(ApiError::BadRequest(format!(
            "registry {host:?} is not allowed here; allowed: docker, ghcr, {}",
            app.settings.allowed_registries.join(", ")
        )));
    }
    Ok(Registry::Oci(host))
}

/// `host` or `host:port`, where host is a DNS name or an IP literal (`[::1]` for IPv6).
fn is_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => {
            (h, Some(p))
        }
        _ => (s, None),
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && url::Host::parse(host).is_ok()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
}

/// Keeps echoed input short.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for h in [
            "quay.io",
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "a-b.example",
        ] {
            assert!(is_host(h), "{h}");
        }
        for h in [
            "",
            "a/b",
            "quay.io:",
            "quay.io:99999",
            "a b",
            "http://x",
            "a:b:c",
            "a_b",
        ] {
            assert!(!is_host(h), "{h}");
        }
    }
}
