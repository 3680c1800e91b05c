//! Domain types: which image is asked for, and what we answer about its tags.
//!
//! Query strings are parsed into these types once, at the edge (`api::tags`); everything below
//! the HTTP layer only ever sees validated values.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// The longest repository name accepted (the OCI distribution spec's practical limit).
pub const MAX_NAME_LEN: usize = 255;

/// Where an image lives. Docker Hub is special: its tags come from the Hub API, not the
/// registry protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Registry {
    /// Docker Hub (`docker`, `docker.io`, `index.docker.io`, `registry-1.docker.io`).
    DockerHub,
    /// Any OCI distribution registry, by host (with an optional port), e.g. `ghcr.io`.
    Oci(String),
}

impl Registry {
    /// The low-cardinality name used in metrics labels, logs and cache keys.
    pub fn label(&self) -> &str {
        match self {
            Registry::DockerHub => "docker",
            Registry::Oci(host) if host == "ghcr.io" => "ghcr",
            Registry::Oci(host) => host,
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A validated, normalised image reference: `nginx` on Docker Hub is `library/nginx`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: Registry,
    pub repository: String,
}

impl ImageRef {
    /// The key under which this image's tag list is cached (stable across restarts).
    pub fn cache_key(&self) -> String {
        match &self.registry {
            Registry::DockerHub => format!("docker.io/{}", self.repository),
            Registry::Oci(host) => format!("{host}/{}", self.repository),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry.label(), self.repository)
    }
}

/// Why an image name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("image name is empty")]
    Empty,
    #[error("image name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("image name must not start or end with '/' or contain '//'")]
    EmptyComponent,
    #[error("image name must be lowercase (found {0:?})")]
    Uppercase(char),
    #[error("image name contains an invalid character {0:?}")]
    InvalidChar(char),
    #[error(
        "image name component {0:?} is invalid: components are lowercase letters and digits, \
         separated by '.', '_', '__' or dashes"
    )]
    InvalidComponent(String),
    #[error("Docker Hub image names have at most two components (namespace/repository)")]
    TooManyDockerHubComponents,
}

/// Checks a repository name against the OCI distribution grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_repository(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(c) = name.chars().find(|c| c.is_uppercase()) {
        return Err(NameError::Uppercase(c));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-' | '/'))
    {
        return Err(NameError::InvalidChar(c));
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err(NameError::EmptyComponent);
        }
        if !valid_component(component) {
            return Err(NameError::InvalidComponent(component.to_owned()));
        }
    }
    Ok(())
}

/// One path component: alphanumeric runs joined by exactly one of `.`, `_`, `__` or `-+`.
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        if expect_alnum {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
                i += 1;
            }
            if i == start {
                return false;
            }
            expect_alnum = false;
        } else {
            let sep_len = separator_len(&bytes[i..]);
            if sep_len == 0 {
                return false;
            }
            i += sep_len;
            expect_alnum = true;
        }
    }
    !expect_alnum
}

/// The length of the separator at the start of `rest`, or 0 when there is none.
fn separator_len(rest: &[u8]) -> usize {
    match rest {
        [b'.', ..] => 1,
        [b'_', b'_', ..] => 2,
        [b'_', ..] => 1,
        [b'-', ..] => rest.iter().take_while(|b| **b == b'-').count(),
        _ => 0,
    }
}

/// Normalises a Docker Hub name: `nginx` means the official image `library/nginx`.
pub fn normalize_docker_hub(name: &str) -> Result<String, NameError> {
    validate_repository(name)?;
    match name.matches('/').count() {
        0 => Ok(format!("library/{name}")),
        1 => Ok(name.to_owned()),
        _ => Err(NameError::TooManyDockerHubComponents),
    }
}

/// One tag as the API returns it. The first four fields are the public contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tag {
    /// The tag.
    pub name: String,
    /// When the image was created (OCI) or last pushed (Docker Hub), RFC 3339 UTC; `null` when
    /// the registry gives no date.
    #[serde(with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-02-07T08:15:30Z", required = true)]
    pub last_updated: Option<DateTime<Utc>>,
    /// Deduplicated, sorted architecture names (`amd64`, `arm64`, `arm`, ...).
    pub architectures: Vec<String>,
    /// The digest the tag points to (of the index when multi-platform); `null` when unknown.
    #[schema(
        example = "sha256:2ae17aff4c3c8cdb2d3d9c885d7c59ad518bffc89e8351598ff1f3f918183b7c",
        required = true
    )]
    pub digest: Option<String>,
    /// Full platforms (`linux/arm/v7`), deduplicated and sorted.
    pub platforms: Vec<String>,
}

/// A whole answer for one image: the tags newest first, and whether the list is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagList {
    pub tags: Vec<Tag>,
    /// True when the upstream stopped us before the end (page cap, anonymous offset cap).
    pub truncated: bool,
    #[serde(with = "rfc3339")]
    pub fetched_at: DateTime<Utc>,
    /// When the upstream's whole list was last walked (Docker Hub refreshes may stop early at
    /// the first unchanged page; deletions are only seen on a whole walk).
    #[serde(default, with = "rfc3339_opt")]
    pub walked_at: Option<DateTime<Utc>>,
}

impl TagList {
    /// Sorts newest first (unknown dates last, ties by name) and keeps at most `max_tags`.
    /// The list counts as a whole walk of the upstream.
    pub fn new(mut tags: Vec<Tag>, truncated: bool, max_tags: usize) -> TagList {
        sort_newest_first(&mut tags);
        let truncated = truncated || tags.len() > max_tags;
        tags.truncate(max_tags);
        let now = Utc::now();
        TagList {
            tags,
            truncated,
            fetched_at: now,
            walked_at: Some(now),
        }
    }
}

/// Newest `last_updated` first; tags without a date go last; equal dates order by name so the
/// output is stable.
pub fn sort_newest_first(tags: &mut [Tag]) {
    tags.sort_by(|a, b| {
        b.last_updated
            .cmp(&a.last_updated)
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// A platform that an image can run on, as found in an index or an image config.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Attestations and other non-runnable entries say `unknown`; they are not platforms.
    pub fn is_runnable(&self) -> bool {
        !self.architecture.is_empty()
            && self.architecture != "unknown"
            && !self.os.is_empty()
            && self.os != "unknown"
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

/// Builds the `architectures` and `platforms` fields from a set of platforms.
pub fn summarize_platforms(platforms: &[Platform]) -> (Vec<String>, Vec<String>) {
    let mut arches: Vec<String> = platforms
        .iter()
        .filter(|p| p.is_runnable())
        .map(|p| p.architecture.clone())
        .collect();
    arches.sort();
    arches.dedup();
    let mut full: Vec<String> = platforms
        .iter()
        .filter(|p| p.is_runnable())
        .map(|p| p.to_string())
        .collect();
    full.sort();
    full.dedup();
    (arches, full)
}

/// Parses an RFC 3339 date from an upstream; anything unparsable is treated as unknown.
pub fn parse_date(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Formats a date the way the API always does: RFC 3339, UTC, `Z`.
pub fn format_date(d: &DateTime<Utc>) -> String {
    d.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_date(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_date(&s).ok_or_else(|| serde::de::Error::custom("invalid RFC 3339 date"))
    }
}

mod rfc3339_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_date(d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.and_then(|s| super::parse_date(&s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "nginx",
            "library/nginx",
            "a/b/c/d",
            "foo.bar_baz__qux--quux---x",
            "0",
            "my-org/my-app",
        ] {
            assert_eq!(validate_repository(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_invalid_names() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            ("Nginx", NameError::Uppercase('N')),
            ("/nginx", NameError::EmptyComponent),
            ("nginx/", NameError::EmptyComponent),
            ("a//b", NameError::EmptyComponent),
            ("a/../b", NameError::InvalidComponent("..".into())),
            ("a..b", NameError::InvalidComponent("a..b".into())),
            ("a___b", NameError::InvalidComponent("a___b".into())),
            ("-a", NameError::InvalidComponent("-a".into())),
            ("a-", NameError::InvalidComponent("a-".into())),
            ("a b", NameError::InvalidChar(' ')),
            ("a\nb", NameError::InvalidChar('\n')),
            ("a:b", NameError::InvalidChar(':')),
        ];
        for (name, err) in cases {
            assert_eq!(validate_repository(name).as_ref(), Err(err), "{name:?}");
        }
        assert_eq!(
            validate_repository(&"a".repeat(256)),
            Err(NameError::TooLong)
        );
        assert_eq!(validate_repository(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn docker_hub_names_get_library_prefix() {
        assert_eq!(normalize_docker_hub("nginx").unwrap(), "library/nginx");
        assert_eq!(
            normalize_docker_hub("bitnami/redis").unwrap(),
            "bitnami/redis"
        );
        assert_eq!(
            normalize_docker_hub("a/b/c"),
            Err(NameError::TooManyDockerHubComponents)
        );
    }

    #[test]
    fn sorts_newest_first_with_null_dates_last() {
        let tag = |name: &str, date: Option<&str>| Tag {
            name: name.into(),
            last_updated: date.and_then(parse_date),
            architectures: vec![],
            digest: None,
            platforms: vec![],
        };
        let list = TagList::new(
            vec![
                tag("old", Some("2020-01-01T00:00:00Z")),
                tag("none", None),
                tag("new-b", Some("2024-01-01T00:00:00Z")),
                tag("new-a", Some("2024-01-01T00:00:00Z")),
            ],
            false,
            3,
        );
        let names: Vec<_> = list.tags.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["new-a", "new-b", "old"]);
        assert!(list.truncated, "a list cut to max_tags is truncated");
    }

    #[test]
    fn summarizes_platforms_without_unknown() {
        let p = |os: &str, arch: &str, v: Option<&str>| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: v.map(Into::into),
        };
        let (arches, full) = summarize_platforms(&[
            p("linux", "arm64", Some("v8")),
            p("linux", "amd64", None),
            p("unknown", "unknown", None),
            p("linux", "arm", Some("v7")),
            p("linux", "arm", Some("v6")),
            p("linux", "amd64", None),
        ]);
        assert_eq!(arches, ["amd64", "arm", "arm64"]);
        assert_eq!(
            full,
            [
                "linux/amd64",
                "linux/arm/v6",
                "linux/arm/v7",
                "linux/arm64/v8"
            ]
        );
    }

    #[test]
    fn dates_serialize_as_utc_z() {
        let d = parse_date("2026-02-07T09:15:30+01:00").unwrap();
        assert_eq!(format_date(&d), "2026-02-07T08:15:30Z");
        let d = parse_date("2023-06-13T04:58:31.821511Z").unwrap();
        assert_eq!(format_date(&d), "2023-06-13T04:58:31.821511Z");
    }
}
