//! `GET /tags` and `GET /tags/latest`.
//!
//! Without parameters, `/tags` sends the cached entry's stored body (and its stored compressed
//! form): nothing is parsed or serialized per request. With parameters, the cached list is
//! narrowed and sorted in memory ([`crate::selection`]), work proportional to the tag count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;

use super::AppState;
use super::encoding::{Encoding, etag_of, not_modified};
use super::error::ApiError;
use super::query::{self, Format, TagsParams, TagsQuery};
use crate::cache::CachedTags;
use crate::metrics::RequestStatus;
use crate::model::Tag;
use crate::refresh::CacheStatus;

/// The tags of one image, newest first unless asked otherwise.
#[utoipa::path(
    get,
    path = "/tags",
    params(TagsParams),
    responses(
        (status = 200, description = "The image's tags. Headers: `ETag`, `Cache-Control`, `Age`, \
            `X-Cache: hit|stale|miss`, `X-Tags-Truncated: true` when incomplete.",
            body = Vec<Tag>, content_type = "application/json"),
        (status = 304, description = "`If-None-Match` matched: the answer has not changed"),
        (status = 400, description = "Invalid parameter", body = String, content_type = "text/plain"),
        (status = 403, description = "The registry refused access", body = String, content_type = "text/plain"),
        (status = 404, description = "The registry has no such repository", body = String, content_type = "text/plain"),
        (status = 429, description = "The registry rate-limits us and nothing is cached (`Retry-After`)", body = String, content_type = "text/plain"),
        (status = 502, description = "Other upstream failure", body = String, content_type = "text/plain"),
        (status = 504, description = "The registry did not answer in time", body = String, content_type = "text/plain"),
    )
)]
pub async fn get_tags(
    State(app): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let (query, entry, cache) = match lookup(&app, q.as_deref(), false).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let payload = if query.selection.is_identity() {
        Payload::Cached(entry.clone())
    } else {
        let tags = query
            .selection
            .apply_indexed(&entry.list.tags, entry.versions());
        Payload::json(&tags)
    };
    log_ok(&query, &entry, cache, started, "tags");
    respond(&app, &headers, payload, &entry, cache)
}

/// The one best tag: the highest release version, else the newest (or the first by `sort`).
#[utoipa::path(
    get,
    path = "/tags/latest",
    params(
        TagsParams,
        ("format" = Option<String>, Query,
            description = "`json` (default, one tag object) or `text` (the tag name alone)."),
    ),
    responses(
        (status = 200, description = "The best tag (JSON object, or its name with `format=text`)",
            body = Tag, content_type = "application/json"),
        (status = 304, description = "`If-None-Match` matched"),
        (status = 400, description = "Invalid parameter", body = String, content_type = "text/plain"),
        (status = 404, description = "No tag matches, or no such repository", body = String, content_type = "text/plain"),
        (status = 429, description = "Rate-limited upstream and nothing cached", body = String, content_type = "text/plain"),
        (status = 502, description = "Other upstream failure", body = String, content_type = "text/plain"),
        (status = 504, description = "Upstream time-out", body = String, content_type = "text/plain"),
    )
)]
pub async fn get_latest(
    State(app): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let (query, entry, cache) = match lookup(&app, q.as_deref(), true).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let Some(best) =
        query
            .selection
            .best_indexed(&entry.list.tags, entry.versions(), query.explicit_sort)
    else {
        return ApiError::NoMatch(query.image.to_string()).into_response();
    };
    let payload = match query.format {
        Format::Json => Payload::json(best),
        Format::Text => Payload::text(format!("{}\n", best.name)),
    };
    log_ok(&query, &entry, cache, started, "latest");
    respond(&app, &headers, payload, &entry, cache)
}

/// Validates the query and finds the cached (or freshly fetched) answer, counting the request.
async fn lookup(
    app: &AppState,
    raw: Option<&str>,
    latest: bool,
) -> Result<(TagsQuery, Arc<CachedTags>, CacheStatus), ApiError> {
    let query = query::parse(app, raw.unwrap_or(""), latest).inspect_err(|e| {
        app.metrics.count_request("none", RequestStatus::error);
        // Debug-formatted: the message quotes what the client sent, which may hold newlines.
        tracing::info!(status = 400, error = ?e.to_string(), "bad request");
    })?;
    let label = query.image.registry.label().to_owned();
    let budget = super::request_budget(&app.settings);
    let answer = tokio::time::timeout(budget, app.refresher.tags(&query.image)).await;
    let Ok(answer) = answer else {
        app.metrics.count_request(&label, RequestStatus::error);
        let err = ApiError::Budget(budget.as_secs());
        tracing::info!(image = %query.image.repository, registry = %label, status = 504,
            error = %err, "tags failed");
        return Err(err);
    };
    match answer {
        Ok((entry, cache)) => {
            let status = match cache {
                CacheStatus::Hit => RequestStatus::cache_hit,
                CacheStatus::Stale => RequestStatus::cache_stale,
                CacheStatus::Miss => RequestStatus::success,
            };
            app.metrics.count_request(&label, status);
            Ok((query, entry, cache))
        }
        Err(e) => {
            app.metrics.count_request(&label, RequestStatus::error);
            let err = ApiError::Upstream(e);
            tracing::info!(image = %query.image.repository, registry = %label,
                status = err.status().as_u16(), error = %err, "tags failed");
            Err(err)
        }
    }
}

fn log_ok(q: &TagsQuery, entry: &CachedTags, cache: CacheStatus, started: Instant, route: &str) {
    tracing::info!(route, image = %q.image.repository, registry = %q.image.registry,
        tags = entry.list.tags.len(), cache = cache.as_str(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0, "answered");
}

/// A body to send: the cached entry's own, or one made for this request.
enum Payload {
    Cached(Arc<CachedTags>),
    Made {
        body: Bytes,
        etag: String,
        content_type: &'static str,
    },
}

impl Payload {
    fn json<T: serde::Serialize + ?Sized>(value: &T) -> Payload {
        let body = Bytes::from(serde_json::to_vec(value).expect("tags serialize"));
        Payload::Made {
            etag: etag_of(&body),
            body,
            content_type: "application/json",
        }
    }

    fn text(text: String) -> Payload {
        let body = Bytes::from(text);
        Payload::Made {
            etag: etag_of(&body),
            body,
            content_type: "text/plain; charset=utf-8",
        }
    }

    fn etag(&self) -> &str {
        match self {
            Payload::Cached(e) => &e.etag,
            Payload::Made { etag, .. } => etag,
        }
    }

    fn len(&self) -> usize {
        match self {
            Payload::Cached(e) => e.body.len(),
            Payload::Made { body, .. } => body.len(),
        }
    }

    fn encoded(&self, encoding: Encoding) -> Bytes {
        match self {
            Payload::Cached(e) => e.encoded(encoding),
            Payload::Made { body, .. } if encoding == Encoding::Identity => body.clone(),
            Payload::Made { body, .. } => encoding.compress(body),
        }
    }

    fn content_type(&self) -> &'static str {
        match self {
            Payload::Cached(_) => "application/json",
            Payload::Made { content_type, .. } => content_type,
        }
    }
}

/// A `200` (or `304`) with the caching headers every tag answer carries.
fn respond(
    app: &AppState,
    req: &HeaderMap,
    payload: Payload,
    entry: &CachedTags,
    cache: CacheStatus,
) -> Response {
    let encoding = Encoding::negotiate(req, payload.len());
    let etag = encoding.etag(payload.etag());
    let mut resp = if not_modified(req, payload.etag()) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = (StatusCode::OK, payload.encoded(encoding)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(payload.content_type()),
        );
        if let Some(enc) = encoding.header() {
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc));
        }
        r
    };
    let age = (Utc::now() - entry.list.fetched_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    let max_age = app.settings.refresh_interval.saturating_sub(age).as_secs();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("max-age={max_age}")).expect("ascii"),
    );
    h.insert(header::AGE, HeaderValue::from(age.as_secs()));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    if entry.list.truncated {
        h.insert("x-tags-truncated", HeaderValue::from_static("true"));
    }
    resp
}
