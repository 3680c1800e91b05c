//! The one HTTP client every upstream request goes through.
//!
//! It owns the rules that keep the proxy a careful client: a cap on concurrent requests per
//! host, one time budget covering headers and body, capped body reads, redirects followed by
//! hand (so `Authorization` never travels to another host and private addresses can be refused),
//! and a count of every request in `/metrics`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use url::{Host, Url};

use super::politeness::{BreakerConfig, HostState, Refusal, with_jitter};
use super::{UpstreamError, display_url};
use crate::config::Settings;
use crate::metrics::{Metrics, UpstreamKind};

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// Error bodies are only read for their error code; this much is plenty.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// One request to send.
#[derive(Clone)]
pub struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub kind: UpstreamKind,
    /// The registry label for metrics (`docker`, `ghcr`, host).
    pub registry: String,
    /// A request body (token POSTs only); never followed across a redirect.
    pub body: Option<Bytes>,
}

impl Request {
    pub fn get(url: Url, kind: UpstreamKind, registry: &str) -> Request {
        Request {
            method: Method::GET,
            url,
            headers: HeaderMap::new(),
            kind,
            registry: registry.to_owned(),
            body: None,
        }
    }

    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Request {
        self.headers.insert(name, value);
        self
    }
}

/// A complete response: status, headers, the (capped) body, and the URL it finally came from.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub url: Url,
}

impl Response {
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Checks that a document that must be JSON is not, say, an HTML error page.
    pub fn expect_json(&self) -> Result<(), UpstreamError> {
        match self.header_str("content-type") {
            Some(ct) if !ct.to_ascii_lowercase().contains("json") => {
                Err(UpstreamError::Malformed {
                    url: display_url(&self.url),
                    reason: format!("expected JSON, got content type {ct:?}"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Parses the body as JSON of type `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, UpstreamError> {
        serde_json::from_slice(&self.body).map_err(|e| UpstreamError::Malformed {
            url: display_url(&self.url),
            reason: format!("invalid JSON: {e}"),
        })
    }

    /// Maps a non-success status to the error it means. Callers handle the statuses that mean
    /// something special to them (a 404 past the last page, a 401 challenge) first.
    pub fn error(&self) -> UpstreamError {
        let url = display_url(&self.url);
        let status = self.status.as_u16();
        match self.status {
            StatusCode::NOT_FOUND | StatusCode::GONE => UpstreamError::NotFound { status, url },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                UpstreamError::Denied { status, url }
            }
            StatusCode::TOO_MANY_REQUESTS => UpstreamError::RateLimited {
                status,
                url,
                retry_after: retry_after(&self.headers),
            },
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => UpstreamError::Timeout {
                url,
                timeout: Duration::ZERO,
            },
            _ => UpstreamError::Status { status, url },
        }
    }
}

/// Reads `Retry-After` (seconds or an HTTP date) or Docker Hub's `X-Retry-After` (a unix time).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let now = std::time::SystemTime::now();
    if let Some(v) = headers.get("retry-after").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate_parse(v) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let unix: u64 = headers
        .get("x-retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn httpdate_parse(s: &str) -> Result<std::time::SystemTime, ()> {
    let d = chrono::DateTime::parse_from_rfc2822(s).map_err(|_| ())?;
    let secs = u64::try_from(d.timestamp()).map_err(|_| ())?;
    Ok(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The shared client. Cheap to share behind an `Arc`.
pub struct HttpClient {
    client: reqwest::Client,
    /// Per upstream origin: concurrency cap, rate cap, back-off and breaker.
    hosts: Mutex<HashMap<String, Arc<HostState>>>,
    concurrency: usize,
    rate_per_sec: Option<u32>,
    breaker: BreakerConfig,
    retries: u32,
    timeout: Duration,
    max_body: usize,
    allow_private: bool,
    metrics: Metrics,
}

impl HttpClient {
    pub fn new(settings: &Settings, metrics: Metrics) -> HttpClient {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Bodies are read raw and capped; never let a feature enabled elsewhere (the tests
            // enable decompression) turn on transparent decompression here.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .user_agent(concat!("oci-tag-proxy/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(settings.upstream_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the TLS backend initialises");
        HttpClient {
            client,
            hosts: Mutex::new(HashMap::new()),
            concurrency: settings.upstream_concurrency,
            rate_per_sec: settings.upstream_rate_limit,
            breaker: BreakerConfig {
                threshold: settings.breaker_threshold,
                cooldown: settings.breaker_cooldown,
            },
            retries: settings.upstream_retries,
            timeout: settings.upstream_timeout,
            max_body: settings.max_body_bytes,
            allow_private: settings.allow_private_networks,
            metrics,
        }
    }

    /// The per-host concurrency cap (also used to size per-tag fan-out).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Sends `req` politely: not during the host's back-off or while its breaker is open,
    /// within its rate cap, retrying transient failures (connection errors, time-outs, 5xx) a
    /// bounded number of times with jittered back-off. Redirects are followed and the body read
    /// within one time budget per attempt.
    pub async fn send(&self, req: Request) -> Result<Response, UpstreamError> {
        let host = self.host(&req.url);
        if let Err(refusal) = host.admit() {
            self.metrics.count_refusal(&req.registry, refusal);
            return Err(refusal_error(refusal, &req.url));
        }
        let mut attempt = 0;
        loop {
            host.pace().await;
            let result = self.attempt(req.clone()).await;
            if let Ok(resp) = &result {
                self.observe_limits(&host, &req.registry, resp);
            }
            let transient = is_transient(&result);
            if transient && attempt < self.retries {
                attempt += 1;
                let wait = with_jitter(RETRY_BASE.saturating_mul(1 << attempt.min(10)));
                tracing::debug!(url = %display_url(&req.url), attempt, ?wait, "retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            host.record(transient);
            return result;
        }
    }

    async fn attempt(&self, req: Request) -> Result<Response, UpstreamError> {
        let shown = display_url(&req.url);
        let (registry, kind) = (req.registry.clone(), req.kind);
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.send_following(req)).await {
            Ok(result) => result,
            Err(_) => {
                // The request was cut off before it could be counted with a status.
                self.metrics
                    .count_upstream(&registry, kind, "timeout".to_owned());
                Err(UpstreamError::Timeout {
                    url: shown,
                    timeout,
                })
            }
        }
    }

    /// Rate-limit signals: a 429, or a "0 remaining" header, backs the host off; the limit
    /// headers are exported as gauges.
    fn observe_limits(&self, host: &HostState, registry: &str, resp: &Response) {
        let limit = rate_header(&resp.headers, &["ratelimit-limit", "x-ratelimit-limit"]);
        let remaining = rate_header(
            &resp.headers,
            &["ratelimit-remaining", "x-ratelimit-remaining"],
        );
        if let Some(limit) = limit {
            self.metrics.set_rate_limit(registry, "limit", limit);
        }
        if let Some(remaining) = remaining {
            self.metrics
                .set_rate_limit(registry, "remaining", remaining);
        }
        if resp.status == StatusCode::TOO_MANY_REQUESTS || remaining == Some(0) {
            let wait = host.rate_limited(retry_after(&resp.headers).or_else(|| reset_in(resp)));
            tracing::warn!(url = %display_url(&resp.url), status = resp.status.as_u16(),
                wait_s = wait.as_secs(), "registry rate limit: backing off this host");
        }
    }

    async fn send_following(&self, mut req: Request) -> Result<Response, UpstreamError> {
        for _ in 0..=MAX_REDIRECTS {
            // The host's permit is held until the body is read: the cap counts whole requests.
            let permit = self.host(&req.url).semaphore.clone().acquire_owned().await;
            let resp = self.send_once(&req).await?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                let done = self.finish(resp, &req).await;
                drop(permit);
                return done;
            }
            drop(permit);
            let next = redirect_target(&req.url, resp.headers())?;
            self.check_redirect(&req.url, &next).await?;
            if origin(&next) != origin(&req.url) {
                req.headers.remove(header::AUTHORIZATION);
                // A body (a token request) carries a secret too: it never crosses origins.
                req.body = None;
            }
            if resp.status() == StatusCode::SEE_OTHER && req.method != Method::HEAD {
                req.method = Method::GET;
                req.body = None;
            }
            req.url = next;
        }
        Err(UpstreamError::Refused {
            url: display_url(&req.url),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    async fn send_once(&self, req: &Request) -> Result<reqwest::Response, UpstreamError> {
        let mut builder = self
            .client
            .request(req.method.clone(), req.url.clone())
            .headers(req.headers.clone());
        if let Some(body) = &req.body {
            builder = builder.body(body.clone());
        }
        let result = builder.send().await;
        let status = match &result {
            Ok(r) => r.status().as_u16().to_string(),
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.metrics.count_upstream(&req.registry, req.kind, status);
        result.map_err(|e| network_error(&req.url, &e))
    }

    /// Reads the body of a final response, capped (smaller for error statuses).
    async fn finish(
        &self,
        mut resp: reqwest::Response,
        req: &Request,
    ) -> Result<Response, UpstreamError> {
        let url = req.url.clone();
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let body = if req.method == Method::HEAD {
            Bytes::new()
        } else if status.is_success() {
            read_capped(resp, &url, self.max_body, true).await?
        } else {
            read_capped(resp, &url, MAX_ERROR_BODY, false).await?
        };
        Ok(Response {
            status,
            headers,
            body,
            url,
        })
    }

    fn host(&self, url: &Url) -> Arc<HostState> {
        let key = origin(url);
        let mut hosts = self.hosts.lock().expect("host map lock");
        hosts
            .entry(key)
            .or_insert_with(|| {
                Arc::new(HostState::new(
                    self.concurrency,
                    self.rate_per_sec,
                    self.breaker,
                ))
            })
            .clone()
    }

    /// Origins whose circuit breaker is open now.
    pub fn open_breakers(&self) -> Vec<String> {
        let hosts = self.hosts.lock().expect("host map lock");
        hosts
            .iter()
            .filter(|(_, h)| h.is_open())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A redirect may not downgrade to plain HTTP nor, unless allowed, reach a private address.
    async fn check_redirect(&self, from: &Url, to: &Url) -> Result<(), UpstreamError> {
        if from.scheme() == "https" && to.scheme() != "https" {
            return Err(UpstreamError::Refused {
                url: display_url(to),
                reason: "redirect from https to http".into(),
            });
        }
        self.check_destination(to).await
    }

    /// Refuses URLs that resolve to loopback, link-local or private addresses, unless the
    /// operator allows private networks. Used for everything a registry points us to.
    pub async fn check_destination(&self, url: &Url) -> Result<(), UpstreamError> {
        if self.allow_private {
            return Ok(());
        }
        let refused = || UpstreamError::Refused {
            url: display_url(url),
            reason: "destination is a loopback, link-local or private address".into(),
        };
        let addrs: Vec<IpAddr> = match url.host() {
            Some(Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            Some(Host::Domain(d)) if d == "localhost" || d.ends_with(".localhost") => {
                return Err(refused());
            }
            Some(Host::Domain(d)) => {
                let port = url.port_or_known_default().unwrap_or(443);
                tokio::net::lookup_host((d, port))
                    .await
                    .map_err(|e| UpstreamError::Network {
                        url: display_url(url),
                        reason: format!("DNS lookup failed: {e}"),
                    })?
                    .map(|sa| sa.ip())
                    .collect()
            }
            None => return Err(refused()),
        };
        if addrs.iter().any(is_private) {
            return Err(refused());
        }
        Ok(())
    }
}

/// The first retry waits about this long; each further one twice as long (plus jitter).
const RETRY_BASE: Duration = Duration::from_millis(100);

/// Connection failures, time-outs and 5xx are worth another try; nothing else is.
fn is_transient(result: &Result<Response, UpstreamError>) -> bool {
    match result {
        Ok(r) => matches!(r.status.as_u16(), 500 | 502 | 503 | 504),
        Err(UpstreamError::Network { .. } | UpstreamError::Timeout { .. }) => true,
        Err(_) => false,
    }
}

fn refusal_error(refusal: Refusal, url: &Url) -> UpstreamError {
    match refusal {
        Refusal::BackingOff(wait) => UpstreamError::BackingOff {
            url: display_url(url),
            retry_after: wait,
        },
        Refusal::BreakerOpen(wait) => UpstreamError::Unavailable {
            url: display_url(url),
            retry_after: wait,
        },
    }
}

/// The leading number of a rate-limit header: `100;w=21600` (registry) or `180` (Hub API).
/// Malformed values (`;w=21600`) are ignored.
fn rate_header(headers: &HeaderMap, names: &[&str]) -> Option<u64> {
    names.iter().find_map(|n| {
        let v = headers.get(*n)?.to_str().ok()?;
        v.split([';', ',']).next()?.trim().parse().ok()
    })
}

/// Docker Hub's API says when its window resets (`X-RateLimit-Reset`, unix seconds).
fn reset_in(resp: &Response) -> Option<Duration> {
    let reset: u64 = resp.header_str("x-ratelimit-reset")?.trim().parse().ok()?;
    let at = std::time::UNIX_EPOCH + Duration::from_secs(reset);
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::from_secs(1)),
    )
}

/// `scheme://host:port`, the unit of "same origin".
pub fn origin(url: &Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

fn redirect_target(from: &Url, headers: &HeaderMap) -> Result<Url, UpstreamError> {
    let location = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| UpstreamError::Malformed {
            url: display_url(from),
            reason: "redirect without a Location".into(),
        })?;
    let next = from.join(location).map_err(|_| UpstreamError::Malformed {
        url: display_url(from),
        reason: "redirect to an invalid URL".into(),
    })?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(UpstreamError::Refused {
            url: display_url(from),
            reason: format!("redirect to a {} URL", next.scheme()),
        });
    }
    Ok(next)
}

/// Reads a body in chunks, refusing (or, for error bodies, cutting) past `limit` bytes.
async fn read_capped(
    mut resp: reqwest::Response,
    url: &Url,
    limit: usize,
    strict: bool,
) -> Result<Bytes, UpstreamError> {
    let too_large = || UpstreamError::Malformed {
        url: display_url(url),
        reason: format!("body larger than {limit} bytes"),
    };
    if strict && resp.content_length().is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let mut buf = BytesMut::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) if strict => return Err(network_error(url, &e)),
            Err(_) => break,
        };
        if buf.len() + chunk.len() > limit {
            if strict {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk[..limit - buf.len()]);
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Describes a transport failure without reqwest's URL (which may carry a query string).
fn network_error(url: &Url, err: &reqwest::Error) -> UpstreamError {
    let mut source: &dyn std::error::Error = err;
    while let Some(next) = source.source() {
        source = next;
    }
    let reason = if err.is_body() || err.is_decode() {
        format!("body cut short: {source}")
    } else {
        source.to_string()
    };
    UpstreamError::Network {
        url: display_url(url),
        reason,
    }
}

/// Loopback, private, link-local, unspecified and other non-public ranges.
pub fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(&IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "140.82.112.33", "2606:4700::1111"] {
            assert!(!is_private(&ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a past date means now"
        );
        let mut h = HeaderMap::new();
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 30;
        h.insert("x-retry-after", HeaderValue::from(soon));
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
    }

    #[test]
    fn rate_limit_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from_static("76;w=21600"),
        );
        h.insert("x-ratelimit-limit", HeaderValue::from_static("180"));
        assert_eq!(rate_header(&h, &["ratelimit-remaining"]), Some(76));
        assert_eq!(
            rate_header(&h, &["ratelimit-limit", "x-ratelimit-limit"]),
            Some(180)
        );
        h.insert("ratelimit-limit", HeaderValue::from_static(";w=21600"));
        assert_eq!(
            rate_header(&h, &["ratelimit-limit"]),
            None,
            "malformed is ignored"
        );
    }

    #[test]
    fn origins_compare_default_ports() {
        let a = Url::parse("https://ghcr.io/v2/").unwrap();
        let b = Url::parse("https://ghcr.io:443/token").unwrap();
        let c = Url::parse("https://pkg-containers.githubusercontent.com/x").unwrap();
        assert_eq!(origin(&a), origin(&b));
        assert_ne!(origin(&a), origin(&c));
    }
}
