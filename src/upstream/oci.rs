//! Tags from any OCI distribution registry (GHCR, Quay, ECR, GitLab, distribution, ...).
//!
//! The registry protocol has no "tags with dates" call, so one tag list costs:
//! the tag pages (`/v2/<name>/tags/list`, following `Link` exactly as given), one manifest `HEAD`
//! per tag for its digest, and — only for a digest never seen before — the manifest `GET` and
//! config blob(s) that tell its platforms and creation time. What a digest describes never
//! changes, so a refresh of an unchanged repository costs the pages and the `HEAD`s only.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt, stream};
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use url::Url;

use super::auth::Authenticator;
use super::http::{HttpClient, Request, Response, origin};
use super::manifest::{
    Child, ConfigSummary, DigestInfo, Document, MANIFEST_ACCEPT, children, index_created,
    parse_manifest, sha256_digest, verify_digest,
};
use super::{UpstreamError, display_url, link};
use crate::cache::DigestCache;
use crate::config::Settings;
use crate::metrics::UpstreamKind;
use crate::model::{Registry, Tag, TagList, summarize_platforms};

/// How deep nested indexes are followed.
const MAX_INDEX_DEPTH: u8 = 2;
/// The page size tried after a registry refused a larger `n` (Quay's maximum).
const SMALL_PAGE: usize = 100;

/// Reads tag lists from OCI registries.
pub struct OciRegistry {
    http: Arc<HttpClient>,
    auth: Arc<Authenticator>,
    digests: DigestCache,
    endpoints: std::collections::HashMap<String, Url>,
    max_tags: usize,
    max_pages: usize,
    page_size: usize,
    max_scan_tags: usize,
    include_artifact_tags: bool,
}

/// Everything a request about one repository needs.
struct Repo {
    base: Url,
    /// The registry host as configured (credentials are keyed by it).
    host: String,
    /// The metrics label.
    label: String,
    name: String,
}

#[derive(Deserialize)]
struct TagPage {
    #[serde(default)]
    tags: Option<Vec<Option<String>>>,
}

impl OciRegistry {
    pub fn new(
        http: Arc<HttpClient>,
        auth: Arc<Authenticator>,
        digests: DigestCache,
        settings: &Settings,
    ) -> OciRegistry {
        OciRegistry {
            http,
            auth,
            digests,
            endpoints: settings.registry_endpoints.clone(),
            max_tags: settings.max_tags,
            max_pages: settings.max_pages,
            page_size: settings.page_size,
            max_scan_tags: settings.max_scan_tags,
            include_artifact_tags: settings.include_artifact_tags,
        }
    }

    fn base_url(&self, host: &str) -> Url {
        self.endpoints.get(host).cloned().unwrap_or_else(|| {
            Url::parse(&format!("https://{host}/")).expect("validated registry host")
        })
    }

    /// The full tag list of `name` on `host`.
    pub async fn fetch_tags(&self, host: &str, name: &str) -> Result<TagList, UpstreamError> {
        let repo = Repo {
            base: self.base_url(host),
            host: host.to_owned(),
            label: Registry::Oci(host.to_owned()).label().to_owned(),
            name: name.to_owned(),
        };
        let (mut names, mut truncated) = self.list_names(&repo).await?;
        names.retain(|n| {
            let ok = is_valid_tag(n);
            if !ok {
                tracing::warn!(registry = %repo.label, image = %repo.name,
                    tag = %n.escape_debug().to_string().chars().take(80).collect::<String>(),
                    "skipping a listed tag that is not a valid tag name");
            }
            ok
        });
        if !self.include_artifact_tags {
            names.retain(|n| !is_artifact_tag(n));
        }
        if names.len() > self.max_scan_tags {
            // Registries list oldest first (GHCR) or lexically; either way the end is the most
            // likely place for recent tags.
            names.drain(..names.len() - self.max_scan_tags);
            truncated = true;
        }
        let concurrency = self.http.concurrency();
        let tags: Vec<Option<Tag>> = stream::iter(names)
            .map(|tag| self.describe_tag(&repo, tag))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        let tags = tags.into_iter().flatten().collect();
        Ok(TagList::new(tags, truncated, self.max_tags))
    }

    /// Walks every page of `/v2/<name>/tags/list`. GHCR lists oldest first, so the newest tags
    /// are on the last page: stopping early would lose exactly the tags callers want.
    async fn list_names(&self, repo: &Repo) -> Result<(Vec<String>, bool), UpstreamError> {
        let mut url = self.first_page_url(repo, Some(self.page_size));
        let mut page_size = Some(self.page_size);
        let mut seen_urls = HashSet::new();
        let mut seen_names = HashSet::new();
        let mut names = Vec::new();
        let mut pages = 0;
        loop {
            if pages == self.max_pages {
                return Ok((names, true));
            }
            let resp = self
                .send(repo, Method::GET, url.clone(), UpstreamKind::tag_page)
                .await?;
            if pages == 0 && is_rejected_page_size(&resp) {
                page_size = smaller_page(page_size).ok_or_else(|| resp.error())?;
                url = self.first_page_url(repo, page_size);
                continue;
            }
            pages += 1;
            seen_urls.insert(url.to_string());
            if !resp.status.is_success() {
                return Err(resp.error());
            }
            resp.expect_json()?;
            let page: TagPage = resp.json()?;
            for tag in page.tags.unwrap_or_default().into_iter().flatten() {
                if !tag.is_empty() && seen_names.insert(tag.clone()) {
                    names.push(tag);
                }
            }
            match self.next_page(&resp, &seen_urls).await {
                NextPage::Url(next) => url = next,
                NextPage::End => return Ok((names, false)),
                NextPage::Stop => return Ok((names, true)),
            }
        }
    }

    fn first_page_url(&self, repo: &Repo, n: Option<usize>) -> Url {
        let mut url = repo
            .base
            .join(&format!("/v2/{}/tags/list", repo.name))
            .expect("valid repository path");
        if let Some(n) = n {
            url.query_pairs_mut().append_pair("n", &n.to_string());
        }
        url
    }

    /// Follows `Link: <...>; rel="next"` as given, but only on the same origin, never from
    /// https to http, and never back to a page already read (a cursor that does not advance).
    async fn next_page(&self, resp: &Response, seen: &HashSet<String>) -> NextPage {
        let Some(raw) = resp.header_str("link").and_then(link::next_link) else {
            return NextPage::End;
        };
        let Ok(next) = resp.url.join(raw) else {
            tracing::warn!(url = %display_url(&resp.url), "ignoring an invalid next link");
            return NextPage::Stop;
        };
        if origin(&next) != origin(&resp.url) {
            tracing::warn!(from = %display_url(&resp.url), to = %display_url(&next),
                "refusing a next link to another host or scheme; the list is truncated");
            return NextPage::Stop;
        }
        if seen.contains(next.as_str()) {
            tracing::warn!(url = %display_url(&next), "next link does not advance; stopping");
            return NextPage::Stop;
        }
        NextPage::Url(next)
    }

    /// The tag's digest (one `HEAD`), then what that digest describes (cached forever).
    /// `None` when the tag vanished between the listing and the `HEAD`.
    async fn describe_tag(&self, repo: &Repo, tag: String) -> Result<Option<Tag>, UpstreamError> {
        let url = self.manifest_url(repo, &tag);
        let head = self
            .send(repo, Method::HEAD, url.clone(), UpstreamKind::manifest_head)
            .await?;
        if head.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !head.status.is_success() {
            return Err(head.error());
        }
        let digest = match head.header_str("docker-content-digest") {
            Some(d) if d.contains(':') => d.to_owned(),
            _ => {
                // No digest header: the digest is the hash of the exact manifest bytes.
                let get = self
                    .send(repo, Method::GET, url, UpstreamKind::manifest_get)
                    .await?;
                if !get.status.is_success() {
                    return Err(get.error());
                }
                sha256_digest(&get.body)
            }
        };
        let info = match self.describe_digest(repo, &digest, 0).await {
            Ok(info) => Some(info),
            Err(e @ UpstreamError::Malformed { .. }) => {
                tracing::warn!(tag = %tag, error = %e, "tag kept without platforms or date");
                None
            }
            // The tag exists (its HEAD answered) but a manifest or config it names is missing:
            // keep the tag with its digest, like a malformed one.
            Err(e @ UpstreamError::NotFound { .. }) => {
                tracing::warn!(tag = %tag, error = %e, "tag kept without platforms or date");
                None
            }
            Err(e) => return Err(e),
        };
        let (architectures, platforms) = info
            .as_ref()
            .map(|i| summarize_platforms(&i.platforms))
            .unwrap_or_default();
        Ok(Some(Tag {
            name: tag,
            last_updated: info.as_ref().and_then(|i| i.created),
            architectures,
            digest: Some(digest),
            platforms,
        }))
    }

    /// What `digest` describes, from the digest cache or — once — from the registry.
    /// Concurrent callers for the same digest share one lookup.
    fn describe_digest<'a>(
        &'a self,
        repo: &'a Repo,
        digest: &'a str,
        depth: u8,
    ) -> BoxFuture<'a, Result<Arc<DigestInfo>, UpstreamError>> {
        async move {
            self.digests
                .get_or_fetch(digest, self.fetch_digest(repo, digest, depth))
                .await
        }
        .boxed()
    }

    async fn fetch_digest(
        &self,
        repo: &Repo,
        digest: &str,
        depth: u8,
    ) -> Result<DigestInfo, UpstreamError> {
        let url = self.manifest_url(repo, digest);
        let resp = self
            .send(repo, Method::GET, url, UpstreamKind::manifest_get)
            .await?;
        if !resp.status.is_success() {
            return Err(resp.error());
        }
        let malformed = |reason: String| UpstreamError::Malformed {
            url: display_url(&resp.url),
            reason,
        };
        verify_digest(digest, &resp.body).map_err(malformed)?;
        match parse_manifest(resp.header_str("content-type"), &resp.body).map_err(malformed)? {
            Document::Image(m) => self.config_info(repo, m.config().digest().as_ref()).await,
            Document::Index(index) => self.index_info(repo, &index, depth).await,
        }
    }

    /// Platforms from the index entries; the creation time from the index annotation or else
    /// the newest `created` among its images.
    async fn index_info(
        &self,
        repo: &Repo,
        index: &oci_spec::image::ImageIndex,
        depth: u8,
    ) -> Result<DigestInfo, UpstreamError> {
        let annotated = index_created(index);
        let mut platforms = Vec::new();
        let mut lookups = Vec::new();
        for child in children(index) {
            match child {
                Child::Image { digest, platform } => {
                    platforms.push(platform);
                    if annotated.is_none() {
                        lookups.push(digest);
                    }
                }
                Child::Unlabelled { digest } => lookups.push(digest),
                Child::Index { digest } if depth < MAX_INDEX_DEPTH => lookups.push(digest),
                Child::Index { .. } => {}
            }
        }
        let infos: Vec<Arc<DigestInfo>> = stream::iter(lookups)
            .map(|d: String| async move { self.describe_digest(repo, &d, depth + 1).await })
            .buffer_unordered(self.http.concurrency())
            .try_collect()
            .await?;
        let mut created = annotated;
        for info in &infos {
            created = created.max(info.created);
            for p in &info.platforms {
                if !platforms.contains(p) {
                    platforms.push(p.clone());
                }
            }
        }
        Ok(DigestInfo { platforms, created })
    }

    async fn config_info(&self, repo: &Repo, digest: &str) -> Result<DigestInfo, UpstreamError> {
        let url = repo
            .base
            .join(&format!("/v2/{}/blobs/{digest}", repo.name))
            .map_err(|_| UpstreamError::Malformed {
                url: display_url(&repo.base),
                reason: format!("bad config digest {digest:?}"),
            })?;
        let resp = self
            .send(repo, Method::GET, url, UpstreamKind::blob)
            .await?;
        if !resp.status.is_success() {
            return Err(resp.error());
        }
        let malformed = |reason: String| UpstreamError::Malformed {
            url: display_url(&resp.url),
            reason,
        };
        verify_digest(digest, &resp.body).map_err(malformed)?;
        Ok(ConfigSummary::parse(&resp.body).map_err(malformed)?.info())
    }

    fn manifest_url(&self, repo: &Repo, reference: &str) -> Url {
        let mut url = repo.base.clone();
        url.set_path(&format!("/v2/{}/manifests/{reference}", repo.name));
        url
    }

    /// Sends a request with whatever authorization the registry wants, answering one `401`
    /// challenge (a first contact, or an expired token) and retrying once.
    async fn send(
        &self,
        repo: &Repo,
        method: Method,
        url: Url,
        kind: UpstreamKind,
    ) -> Result<Response, UpstreamError> {
        let auth = self
            .auth
            .authorization(&repo.base, &repo.host, &repo.name)
            .await?;
        let build = |auth: Option<HeaderValue>| {
            let mut req = Request::get(url.clone(), kind, &repo.label);
            req.method = method.clone();
            if matches!(
                kind,
                UpstreamKind::manifest_head | UpstreamKind::manifest_get
            ) {
                req.headers
                    .insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
            }
            if let Some(a) = auth {
                req.headers.insert(header::AUTHORIZATION, a);
            }
            req
        };
        let resp = self.http.send(build(auth.clone())).await?;
        if resp.status != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let fresh = self
            .auth
            .on_unauthorized(&repo.base, &repo.host, &repo.name, &resp, auth.as_ref())
            .await?;
        let retried = self.http.send(build(Some(fresh))).await?;
        if retried.status == StatusCode::UNAUTHORIZED {
            return Err(retried.error());
        }
        Ok(retried)
    }
}

enum NextPage {
    Url(Url),
    End,
    /// Stop here and mark the list truncated.
    Stop,
}

/// A registry that refuses our page size says so with 400 (`PAGINATION_NUMBER_INVALID`) or,
/// like Quay, 413.
fn is_rejected_page_size(resp: &Response) -> bool {
    match resp.status {
        StatusCode::PAYLOAD_TOO_LARGE => true,
        // Any 400 on the first page except a refused name is taken as a refused `n`.
        StatusCode::BAD_REQUEST => !String::from_utf8_lossy(&resp.body).contains("NAME_INVALID"),
        _ => false,
    }
}

/// The next page size to try after a refusal: 100, then none at all (the registry's default).
fn smaller_page(current: Option<usize>) -> Option<Option<usize>> {
    match current {
        Some(n) if n > SMALL_PAGE => Some(Some(SMALL_PAGE)),
        Some(_) => Some(None),
        None => None,
    }
}

/// The OCI tag grammar, `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. Names outside it (`..`, `/`,
/// control characters) are never put into a request path.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Cosign signatures, attestations and SBOMs stored as tags (`sha256-<hex>.sig`), and the
/// referrers-API fallback tags (`sha256-<hex>`): artifacts, not images.
pub fn is_artifact_tag(tag: &str) -> bool {
    let Some(rest) = tag.strip_prefix("sha256-") else {
        return false;
    };
    let (hex_part, suffix) = rest.split_at(rest.len().min(64));
    hex_part.len() == 64
        && hex_part.bytes().all(|b| b.is_ascii_hexdigit())
        && matches!(suffix, "" | ".sig" | ".att" | ".sbom")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_tags() {
        let hex = "a".repeat(64);
        for t in [
            format!("sha256-{hex}.sig"),
            format!("sha256-{hex}.att"),
            format!("sha256-{hex}.sbom"),
            format!("sha256-{hex}"),
        ] {
            assert!(is_artifact_tag(&t), "{t}");
        }
        for t in [
            "latest",
            "sha256-abc.sig",
            &format!("sha256-{hex}.tar"),
            "v1.0",
        ] {
            assert!(!is_artifact_tag(t), "{t}");
        }
    }

    #[test]
    fn tag_grammar() {
        for t in ["latest", "v1.2.3", "_x", "1.0-rc.1", &"a".repeat(128)] {
            assert!(is_valid_tag(t), "{t}");
        }
        for t in [
            "",
            "../../etc",
            ".x",
            "-x",
            "a/b",
            "x\u{0}y",
            "été",
            &"a".repeat(129),
        ] {
            assert!(!is_valid_tag(t), "{t}");
        }
    }

    #[test]
    fn page_size_steps_down() {
        assert_eq!(smaller_page(Some(1000)), Some(Some(100)));
        assert_eq!(smaller_page(Some(100)), Some(None));
        assert_eq!(smaller_page(None), None);
    }
}
