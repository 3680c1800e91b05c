//! Tags from Docker Hub, through the Hub API's tag pages.
//!
//! Each page entry already carries the digest, the dates and the platforms, so Docker Hub costs
//! one request per 100 tags and no manifest request at all (manifest GETs count against the
//! pull quota). Pages come newest first (`ordering=last_updated`), so `max-tags` stops early.
//! Anonymous callers may not page past offset 1,000 (a `403` since 2026-08): the answer then
//! stops there and is marked truncated instead of failing; with a login or a JWT the walk goes on.
//! Refreshes are incremental: the walk stops at the first page identical to the previous answer,
//! and the whole list is walked again (to notice deletions) once the last whole walk is older
//! than `--full-refresh-interval`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::http::{HttpClient, Request, Response, origin};
use super::{UpstreamError, display_url};
use crate::config::{Credentials, Settings};
use crate::metrics::UpstreamKind;
use crate::model::{Platform, Tag, TagList, parse_date, summarize_platforms};

/// The Hub API's largest page.
const PAGE_SIZE: usize = 100;

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    results: Vec<HubTag>,
}

/// One `results[]` entry. Every field may be missing or null in real answers.
#[derive(Deserialize, Default)]
#[serde(default)]
struct HubTag {
    name: Option<String>,
    digest: Option<String>,
    last_updated: Option<String>,
    tag_last_pushed: Option<String>,
    images: Option<Vec<HubImage>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HubImage {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
}

impl HubTag {
    fn into_tag(self) -> Option<Tag> {
        let name = self.name.filter(|n| !n.is_empty())?;
        let platforms: Vec<Platform> = self
            .images
            .unwrap_or_default()
            .into_iter()
            .map(|i| Platform {
                os: i.os.unwrap_or_else(|| "linux".into()),
                architecture: i.architecture.unwrap_or_default(),
                variant: i.variant.filter(|v| !v.is_empty()),
            })
            .collect();
        let (architectures, platforms) = summarize_platforms(&platforms);
        let date = self.last_updated.or(self.tag_last_pushed);
        Some(Tag {
            name,
            last_updated: date.as_deref().and_then(parse_date),
            architectures,
            digest: self.digest.filter(|d| !d.is_empty()),
            platforms,
        })
    }
}

/// How the Hub API is authenticated.
enum HubAuth {
    Anonymous,
    /// A JWT given by the operator (`--jwt`).
    Jwt(HeaderValue),
    /// Username and access token: logged in on demand, renewed before the token expires.
    Login {
        credentials: Credentials,
        /// An async mutex: concurrent fetches wait for one login instead of each logging in.
        token: tokio::sync::Mutex<Option<(HeaderValue, Instant)>>,
    },
}

/// Lifetime of a Hub API login token when its JWT does not say ("expires in 10 minutes").
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Renew the login this long before it expires.
const LOGIN_MARGIN: Duration = Duration::from_secs(60);

/// The Docker Hub API client.
pub struct DockerHub {
    http: Arc<HttpClient>,
    api: Url,
    auth: HubAuth,
    max_tags: usize,
    max_pages: usize,
    /// Refreshes may stop at the first unchanged page until the last whole walk is this old.
    full_refresh_interval: Duration,
}

/// One walk over the pages, and what it found.
struct Walk {
    tags: Vec<Tag>,
    names: HashSet<String>,
    truncated: bool,
    /// Stopped at a page identical to the previous answer (an incremental refresh).
    stopped_unchanged: bool,
}

impl DockerHub {
    pub fn new(http: Arc<HttpClient>, settings: &Settings) -> DockerHub {
        let auth = match (&settings.docker_hub_jwt, &settings.docker_hub_login) {
            (Some(j), _) => bearer(j).map_or(HubAuth::Anonymous, HubAuth::Jwt),
            (None, Some(c)) => HubAuth::Login {
                credentials: c.clone(),
                token: tokio::sync::Mutex::new(None),
            },
            (None, None) => HubAuth::Anonymous,
        };
        DockerHub {
            http,
            api: settings.docker_hub_api.clone(),
            auth,
            max_tags: settings.max_tags,
            max_pages: settings.max_pages,
            full_refresh_interval: settings.full_refresh_interval,
        }
    }

    /// A fingerprint of the configured Hub credentials (cache entries are kept apart by it).
    pub fn credential_fingerprint(&self) -> Option<String> {
        match &self.auth {
            HubAuth::Anonymous => None,
            HubAuth::Jwt(v) => {
                Some(Credentials::new("jwt", v.to_str().unwrap_or("")).fingerprint())
            }
            HubAuth::Login { credentials, .. } => Some(credentials.fingerprint()),
        }
    }

    /// All tags of `repo` (`namespace/name`), newest first, up to `max-tags`. With a `previous`
    /// answer whose whole walk is recent enough, the walk stops at the first page that is
    /// entirely unchanged and the rest is taken from `previous`: an unchanged repository costs
    /// one request.
    pub async fn fetch_tags(
        &self,
        repo: &str,
        previous: Option<&TagList>,
    ) -> Result<TagList, UpstreamError> {
        let incremental = previous.filter(|p| {
            p.walked_at.is_some_and(|w| {
                (Utc::now() - w).to_std().unwrap_or(Duration::MAX) < self.full_refresh_interval
            })
        });
        let walk = self.walk(repo, incremental).await?;
        let Some(prev) = incremental.filter(|_| walk.stopped_unchanged) else {
            return Ok(TagList::new(walk.tags, walk.truncated, self.max_tags));
        };
        let mut tags = walk.tags;
        tags.extend(
            prev.tags
                .iter()
                .filter(|t| !walk.names.contains(&t.name))
                .cloned(),
        );
        let mut list = TagList::new(tags, prev.truncated, self.max_tags);
        list.walked_at = prev.walked_at;
        Ok(list)
    }

    async fn walk(&self, repo: &str, previous: Option<&TagList>) -> Result<Walk, UpstreamError> {
        let (namespace, name) = repo.split_once('/').unwrap_or(("library", repo));
        let mut url = self
            .api
            .join(&format!(
                "/v2/namespaces/{namespace}/repositories/{name}/tags"
            ))
            .expect("valid repository path");
        url.query_pairs_mut()
            .append_pair("page_size", &PAGE_SIZE.to_string())
            .append_pair("ordering", "last_updated");
        let mut walk = Walk {
            tags: Vec::new(),
            names: HashSet::new(),
            truncated: true,
            stopped_unchanged: false,
        };
        let mut seen_urls = HashSet::new();
        for page_no in 0..self.max_pages {
            let resp = self.get(url.clone()).await?;
            if let Some(truncated) = self.page_end(&resp, page_no)? {
                walk.truncated = truncated;
                return Ok(walk);
            }
            let page: Page = resp.json()?;
            // Pages are offsets into a newest-first list: a push during the walk shifts them,
            // so the same tag can appear twice. The first (newest) sighting wins.
            let fresh: Vec<Tag> = page
                .results
                .into_iter()
                .filter_map(HubTag::into_tag)
                .filter(|t| walk.names.insert(t.name.clone()))
                .collect();
            let unchanged = previous.is_some_and(|p| !fresh.is_empty() && all_known(&fresh, p));
            walk.tags.extend(fresh);
            seen_urls.insert(url.to_string());
            if unchanged {
                walk.stopped_unchanged = true;
                return Ok(walk);
            }
            let more = page.next.is_some();
            let Some(next) = page.next.filter(|_| walk.tags.len() < self.max_tags) else {
                // Stopped by max-tags with pages left: truncated. The list simply ended: whole.
                walk.truncated = more && walk.tags.len() >= self.max_tags;
                return Ok(walk);
            };
            match self.next_url(&resp.url, &next, &seen_urls) {
                Some(u) => url = u,
                None => return Ok(walk),
            }
        }
        Ok(walk)
    }

    /// GETs a page; with a login, a `401` renews the login once and retries.
    async fn get(&self, url: Url) -> Result<Response, UpstreamError> {
        let auth = self.authorization(false).await?;
        let resp = self.http.send(self.page_request(&url, auth)).await?;
        if resp.status == StatusCode::UNAUTHORIZED && matches!(self.auth, HubAuth::Login { .. }) {
            let renewed = self.authorization(true).await?;
            return self.http.send(self.page_request(&url, renewed)).await;
        }
        Ok(resp)
    }

    fn page_request(&self, url: &Url, auth: Option<HeaderValue>) -> Request {
        let mut req = Request::get(url.clone(), UpstreamKind::tag_page, "docker")
            .header(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req
    }

    async fn authorization(&self, renew: bool) -> Result<Option<HeaderValue>, UpstreamError> {
        match &self.auth {
            HubAuth::Anonymous => Ok(None),
            HubAuth::Jwt(v) => Ok(Some(v.clone())),
            HubAuth::Login { credentials, token } => {
                let mut guard = token.lock().await;
                if let Some((v, expires)) = guard.as_ref()
                    && !renew
                    && *expires > Instant::now()
                {
                    return Ok(Some(v.clone()));
                }
                let fresh = self.login(credentials).await?;
                let value = fresh.0.clone();
                *guard = Some(fresh);
                Ok(Some(value))
            }
        }
    }

    /// `POST /v2/auth/token {"identifier","secret"}` → `{"access_token"}` (a JWT).
    async fn login(&self, c: &Credentials) -> Result<(HeaderValue, Instant), UpstreamError> {
        let url = self.api.join("/v2/auth/token").expect("static path");
        let body = serde_json::json!({"identifier": c.username, "secret": c.password});
        let mut req = Request::get(url, UpstreamKind::token, "docker").header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        req.method = reqwest::Method::POST;
        req.body = Some(bytes::Bytes::from(body.to_string()));
        let resp = self.http.send(req).await?;
        if !resp.status.is_success() {
            return Err(resp.error());
        }
        #[derive(Deserialize)]
        struct Login {
            access_token: String,
        }
        let login: Login = resp.json()?;
        let value = bearer(&login.access_token).ok_or_else(|| UpstreamError::Malformed {
            url: display_url(&resp.url),
            reason: "login token is not a valid header value".into(),
        })?;
        let ttl = jwt_ttl(&login.access_token).unwrap_or(LOGIN_TTL);
        Ok((value, Instant::now() + ttl.saturating_sub(LOGIN_MARGIN)))
    }

    /// Decides what a page's status means. `Ok(Some(truncated))` ends the walk: a `404` past
    /// the first page is the end of the list, and the anonymous offset cap truncates it.
    fn page_end(&self, resp: &Response, page_no: usize) -> Result<Option<bool>, UpstreamError> {
        match resp.status {
            s if s.is_success() => {
                resp.expect_json()?;
                Ok(None)
            }
            StatusCode::NOT_FOUND if page_no > 0 => Ok(Some(false)),
            StatusCode::FORBIDDEN if page_no > 0 && is_offset_cap(resp) => {
                tracing::info!(
                    "Docker Hub refuses anonymous paging past offset 1000; answer truncated \
                     (configure a Docker Hub login or --jwt to page further)"
                );
                Ok(Some(true))
            }
            _ => Err(resp.error()),
        }
    }

    /// `next` must stay on the API's origin and must advance; anything else ends the walk.
    fn next_url(&self, current: &Url, next: &str, seen: &HashSet<String>) -> Option<Url> {
        let url = current.join(next).ok()?;
        if origin(&url) != origin(current) {
            tracing::warn!(to = %display_url(&url), "refusing a Docker Hub next link to another origin");
            return None;
        }
        if seen.contains(url.as_str()) {
            tracing::warn!(url = %display_url(&url), "Docker Hub next link does not advance");
            return None;
        }
        Some(url)
    }
}

/// Whether every tag of a page is in `previous` exactly as it was.
fn all_known(page: &[Tag], previous: &TagList) -> bool {
    page.iter().all(|t| previous.tags.iter().any(|p| p == t))
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The time left until a JWT's `exp`, read without verifying it (it is ours to send, not to
/// trust).
fn jwt_ttl(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["exp"].as_i64()?;
    let left = exp - Utc::now().timestamp();
    (left > 0).then(|| Duration::from_secs(left as u64))
}

fn is_offset_cap(resp: &Response) -> bool {
    String::from_utf8_lossy(&resp.body).contains("pagination offset")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = include_str!("../../tests/fixtures/dockerhub-tags-page.json");
    const EMPTY_IMAGES: &str =
        include_str!("../../tests/fixtures/dockerhub-tags-page-2025-images-empty.json");

    #[test]
    fn maps_the_real_page() {
        let page: Page = serde_json::from_str(PAGE).unwrap();
        assert_eq!(
            page.next.as_deref(),
            Some(
                "https://registry.hub.docker.com/v2/repositories/library/debian/tags?page=2&page_size=2"
            )
        );
        let tags: Vec<Tag> = page
            .results
            .into_iter()
            .filter_map(HubTag::into_tag)
            .collect();
        assert_eq!(tags[0].name, "unstable-slim");
        assert_eq!(tags[0].architectures, ["amd64", "s390x"]);
        assert_eq!(
            tags[0].digest.as_deref(),
            Some("sha256:2ae17aff4c3c8cdb2d3d9c885d7c59ad518bffc89e8351598ff1f3f918183b7c")
        );
        assert_eq!(
            crate::model::format_date(&tags[0].last_updated.unwrap()),
            "2023-06-13T04:58:31.821511Z"
        );
    }

    #[test]
    fn empty_images_still_make_a_tag() {
        let page: Page = serde_json::from_str(EMPTY_IMAGES).unwrap();
        let tag = page.results.into_iter().find_map(HubTag::into_tag).unwrap();
        assert_eq!(tag.name, "22.18.0-slim");
        assert!(tag.architectures.is_empty());
        assert!(tag.digest.is_some());
    }

    #[test]
    fn jwt_expiry_is_read_from_the_claims() {
        use base64::Engine;
        let exp = Utc::now().timestamp() + 600;
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        let ttl = jwt_ttl(&format!("e30.{claims}.sig")).unwrap();
        assert!(ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600));
        assert_eq!(jwt_ttl("opaque-token"), None);
        assert_eq!(jwt_ttl("a.!!!.c"), None);
    }

    #[test]
    fn nulls_and_unknown_architectures() {
        let entry: HubTag = serde_json::from_str(
            r#"{"name":"x","digest":null,"last_updated":null,"tag_last_pushed":null,
                "images":[{"architecture":"unknown","os":"unknown"},{"architecture":null},
                          {"architecture":"arm","variant":"v7","os":"linux"}]}"#,
        )
        .unwrap();
        let tag = entry.into_tag().unwrap();
        assert_eq!(tag.last_updated, None, "a null date stays null");
        assert_eq!(tag.digest, None);
        assert_eq!(tag.architectures, ["arm"]);
        assert_eq!(tag.platforms, ["linux/arm/v7"]);
        let nameless: HubTag = serde_json::from_str(r#"{"name":null}"#).unwrap();
        assert!(nameless.into_tag().is_none());
    }
}
