//! Tags from Docker Hub, through the Hub API's tag pages.
//!
//! Each page entry already carries the digest, the dates and the platforms, so Docker Hub costs
//! one request per 100 tags and no manifest request at all (manifest GETs count against the
//! pull quota). Pages come newest first (`ordering=last_updated`), so `max-tags` stops early.
//! Anonymous callers may not page past offset 1,000 (a `403` since 2026-08): the answer then
//! stops there and is marked truncated instead of failing.

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::http::{HttpClient, Request, Response, origin};
use super::{UpstreamError, display_url};
use crate::config::Settings;
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

/// The Docker Hub API client.
pub struct DockerHub {
    http: Arc<HttpClient>,
    api: Url,
    jwt: Option<HeaderValue>,
    max_tags: usize,
    max_pages: usize,
}

impl DockerHub {
    pub fn new(http: Arc<HttpClient>, settings: &Settings) -> DockerHub {
        let jwt = settings.docker_hub_jwt.as_ref().and_then(|j| {
            let mut v = HeaderValue::from_str(&format!("Bearer {j}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        DockerHub {
            http,
            api: settings.docker_hub_api.clone(),
            jwt,
            max_tags: settings.max_tags,
            max_pages: settings.max_pages,
        }
    }

    /// All tags of `repo` (`namespace/name`), newest first, up to `max-tags`.
    pub async fn fetch_tags(&self, repo: &str) -> Result<TagList, UpstreamError> {
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
        let mut tags: Vec<Tag> = Vec::new();
        let mut seen = HashSet::new();
        // Pages are offsets into a newest-first list: a push during the walk shifts them, so
        // the same tag can appear twice. The first (newest) sighting wins.
        let mut names = HashSet::new();
        for page_no in 0..self.max_pages {
            let resp = self.get(url.clone()).await?;
            if let Some(end) = self.page_end(&resp, page_no)? {
                return Ok(TagList::new(tags, end, self.max_tags));
            }
            let page: Page = resp.json()?;
            tags.extend(
                page.results
                    .into_iter()
                    .filter_map(HubTag::into_tag)
                    .filter(|t| names.insert(t.name.clone())),
            );
            seen.insert(url.to_string());
            let Some(next) = page.next.filter(|_| tags.len() < self.max_tags) else {
                let cut_short = tags.len() >= self.max_tags;
                return Ok(TagList::new(tags, cut_short, self.max_tags));
            };
            match self.next_url(&resp.url, &next, &seen) {
                Some(u) => url = u,
                None => return Ok(TagList::new(tags, true, self.max_tags)),
            }
        }
        Ok(TagList::new(tags, true, self.max_tags))
    }

    async fn get(&self, url: Url) -> Result<Response, UpstreamError> {
        let mut req = Request::get(url, UpstreamKind::tag_page, "docker")
            .header(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(jwt) = &self.jwt {
            req = req.header(header::AUTHORIZATION, jwt.clone());
        }
        self.http.send(req).await
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
                     (set --jwt to page further)"
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
