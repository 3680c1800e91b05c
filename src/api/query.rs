//! The query string of `/tags` and `/tags/latest`, validated into an [`ImageRef`] and a
//! [`Selection`]. Every problem is a `400` that says what is wrong.

use utoipa::IntoParams;

use super::AppState;
use super::error::ApiError;
use crate::model::{ImageRef, Registry, normalize_docker_hub, validate_repository};
use crate::selection::{ArchFilter, Order, Selection, Sort, compile_pattern};

/// Names that mean Docker Hub.
const DOCKER_HUB_NAMES: &[&str] = &[
    "docker",
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
    "hub.docker.com",
];

/// The largest `limit`.
const MAX_LIMIT: usize = 100_000;

/// The query parameters of `/tags` and `/tags/latest`, as the OpenAPI document describes them.
/// The parser below reads raw pairs instead of deserializing this struct (it must see unknown
/// and repeated names to refuse them); a test checks that the names documented here are
/// exactly the names it accepts ([`TagsParams::NAMES`]), so the two cannot drift apart.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // read by the OpenAPI derive only
pub struct TagsParams {
    /// Repository name, e.g. `library/nginx` or `nginx` (Docker Hub official images).
    pub image: String,
    /// `docker` (default), `ghcr`, or an allowed registry host such as `quay.io`.
    pub registry: Option<String>,
    /// `date` (default, newest first), `semver` (highest first; non-versions last) or `name`.
    pub sort: Option<String>,
    /// `asc` or `desc`; the default depends on `sort` (`desc` for date and semver, `asc` for name).
    pub order: Option<String>,
    /// `true`: only tags that are versions (`1.25`, `v1.25.3`, `1.25.3-alpine`, `2.0.0-rc1`).
    pub semver: Option<bool>,
    /// Regular expression a tag name must match (at most 256 characters).
    pub filter: Option<String>,
    /// Regular expression a tag name must not match (at most 256 characters).
    pub exclude: Option<String>,
    /// Only tags available for this platform: `arm64`, `arm/v7`, `linux/amd64`, ...
    pub arch: Option<String>,
    /// At most this many tags, after filtering and sorting (1 to 100000).
    pub limit: Option<usize>,
}

impl TagsParams {
    pub const NAMES: &[&str] = &[
        "image", "registry", "sort", "order", "semver", "filter", "exclude", "arch", "limit",
    ];
}

/// The one parameter that only `/tags/latest` takes (documented on that path alone).
pub const FORMAT: &str = "format";

/// `/tags/latest?format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// A validated request.
#[derive(Debug)]
pub struct TagsQuery {
    pub image: ImageRef,
    pub selection: Selection,
    /// Whether `sort` was given (changes what "best" means for `/tags/latest`).
    pub explicit_sort: bool,
    pub format: Format,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// Parses and validates a raw query string.
pub fn parse(app: &AppState, query: &str, allow_format: bool) -> Result<TagsQuery, ApiError> {
    let raw = collect(query)?;
    let get = |name: &str| raw.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if !allow_format && get(FORMAT).is_some() {
        return Err(bad(
            "query parameter \"format\" is only for /tags/latest".into()
        ));
    }
    let image = get("image").filter(|i| !i.is_empty()).ok_or_else(|| {
        bad("missing required query parameter \"image\" (e.g. image=library/nginx)".into())
    })?;
    let registry = parse_registry(app, get("registry"))?;
    let repository = match registry {
        Registry::DockerHub => normalize_docker_hub(image),
        Registry::Oci(_) => validate_repository(image).map(|_| image.to_owned()),
    }
    .map_err(|e| bad(format!("invalid image {:?}: {e}", truncate(image))))?;
    Ok(TagsQuery {
        image: ImageRef {
            registry,
            repository,
        },
        selection: parse_selection(&get)?,
        explicit_sort: get("sort").is_some(),
        format: match get(FORMAT) {
            None | Some("json") => Format::Json,
            Some("text") => Format::Text,
            Some(other) => return Err(invalid("format", other, "json or text")),
        },
    })
}

/// Decodes the pairs, refusing unknown and repeated names and text that is not UTF-8.
fn collect(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    // `form_urlencoded` decodes invalid UTF-8 lossily (to U+FFFD), which would quietly turn
    // `filter=%ff` into a pattern nobody sent. The separators are ASCII and no multi-byte
    // character contains an ASCII byte, so the whole string decodes to UTF-8 exactly when
    // every name and value does.
    if std::str::from_utf8(&percent_encoding::percent_decode_str(query).collect::<Vec<u8>>())
        .is_err()
    {
        return Err(bad(
            "the query string is not UTF-8 once percent-decoded".into()
        ));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k != FORMAT && !TagsParams::NAMES.contains(&k.as_ref()) {
            return Err(bad(format!(
                "unknown query parameter {:?}; supported: {}, and {FORMAT} for /tags/latest",
                truncate(&k),
                TagsParams::NAMES.join(", ")
            )));
        }
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(bad(format!("query parameter {k:?} given more than once")));
        }
        pairs.push((k.into_owned(), v.into_owned()));
    }
    Ok(pairs)
}

fn invalid(name: &str, value: &str, expected: &str) -> ApiError {
    bad(format!(
        "invalid value {:?} for query parameter {name:?}: expected {expected}",
        truncate(value)
    ))
}

fn parse_selection<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<Selection, ApiError> {
    let pattern = |name: &str| -> Result<_, ApiError> {
        get(name)
            .map(|p| {
                if p.is_empty() {
                    // An empty pattern matches every name: `exclude=` would drop every tag.
                    return Err(invalid(name, p, "a non-empty regular expression"));
                }
                compile_pattern(p).map_err(|e| bad(format!("invalid {name} pattern: {e}")))
            })
            .transpose()
    };
    Ok(Selection {
        filter: pattern("filter")?,
        exclude: pattern("exclude")?,
        semver_only: match get("semver") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(invalid("semver", other, "true or false")),
        },
        arch: get("arch")
            .map(|a| ArchFilter::parse(a).map_err(|e| invalid("arch", a, &e)))
            .transpose()?,
        sort: match get("sort") {
            None | Some("date") => Sort::Date,
            Some("semver") => Sort::Semver,
            Some("name") => Sort::Name,
            Some(other) => return Err(invalid("sort", other, "date, semver or name")),
        },
        order: match get("order") {
            None => None,
            Some("asc") => Some(Order::Asc),
            Some("desc") => Some(Order::Desc),
            Some(other) => return Err(invalid("order", other, "asc or desc")),
        },
        limit: get("limit")
            .map(|l| match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(invalid("limit", l, "a whole number from 1 to 100000")),
            })
            .transpose()?,
    })
}

fn parse_registry(app: &AppState, raw: Option<&str>) -> Result<Registry, ApiError> {
    let raw = match raw {
        None => return Ok(Registry::DockerHub),
        Some("") => {
            return Err(bad(
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
        return Err(bad(format!(
            "invalid registry {:?}: expected docker, ghcr or a host such as quay.io or localhost:5000",
            truncate(&host)
        )));
    }
    if host != "ghcr.io" && !app.settings.allowed_registries.contains(&host) {
        // The allow-list itself is not echoed: it may name the operator's internal registries.
        return Err(bad(format!(
            "registry {:?} is not allowed here (docker and ghcr are; ask the operator for others)",
            truncate(&host)
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

    #[test]
    fn documented_names_are_the_accepted_names() {
        use utoipa::IntoParams;
        let documented: Vec<String> = TagsParams::into_params(|| None)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(documented, TagsParams::NAMES);
    }
}
