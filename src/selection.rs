//! Narrowing and ordering a tag list for one request: `filter`, `exclude`, `semver`, `arch`,
//! `sort`, `order`, `limit`, and the "best" tag for `/tags/latest`.
//!
//! Everything here works on the cached list in memory: its cost is proportional to the number
//! of tags, with no upstream request and no disk read.

use std::cmp::Ordering;

use regex::Regex;

use crate::model::Tag;
use crate::version::TagVersion;

/// The longest `filter`/`exclude` pattern accepted.
pub const MAX_PATTERN_LEN: usize = 256;
/// The compiled-size limit for those patterns (keeps a hostile pattern cheap).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// By `last_updated` (unknown dates count as oldest); default order: newest first.
    #[default]
    Date,
    /// By version (see [`crate::version`]); tags that are not versions come after all versions;
    /// default order: highest first.
    Semver,
    /// By name, bytewise; default order: A to Z.
    Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// What the caller asked for. `Selection::default()` is the unmodified list.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub filter: Option<Regex>,
    pub exclude: Option<Regex>,
    pub semver_only: bool,
    pub arch: Option<ArchFilter>,
    pub sort: Sort,
    /// `None`: the sort's natural order.
    pub order: Option<Order>,
    pub limit: Option<usize>,
}

impl Selection {
    /// True when the answer is the cached list unchanged (so its stored body can be sent).
    pub fn is_identity(&self) -> bool {
        self.filter.is_none()
            && self.exclude.is_none()
            && !self.semver_only
            && self.arch.is_none()
            && self.sort == Sort::Date
            && self.order.is_none_or(|o| o == Order::Desc)
            && self.limit.is_none()
    }

    /// The tags that pass every filter, in the requested order, at most `limit`.
    pub fn apply<'a>(&self, tags: &'a [Tag]) -> Vec<&'a Tag> {
        self.apply_indexed(tags, &VersionIndex::new(tags))
    }

    /// [`Selection::apply`] with the tags' versions parsed beforehand (`versions` is
    /// [`VersionIndex::new`] of `tags`, kept with the cached entry).
    pub fn apply_indexed<'a>(&self, tags: &'a [Tag], versions: &VersionIndex) -> Vec<&'a Tag> {
        debug_assert_eq!(tags.len(), versions.0.len(), "an index of these tags");
        let mut keyed: Vec<(&Tag, Option<&TagVersion>)> = tags
            .iter()
            .zip(&versions.0)
            .filter(|(t, v)| self.keeps(t) && (!self.semver_only || v.is_some()))
            .map(|(t, v)| (t, v.as_ref()))
            .collect();
        let natural_desc = !matches!(self.sort, Sort::Name);
        let desc = self.order.map_or(natural_desc, |o| o == Order::Desc);
        let order = |a: &(&Tag, Option<&TagVersion>), b: &(&Tag, Option<&TagVersion>)| {
            let ord = match self.sort {
                Sort::Date => by_date(a.0, b.0),
                Sort::Name => a.0.name.cmp(&b.0.name),
                Sort::Semver => by_version(a.1, b.1, desc),
            };
            let ord = if desc { ord.reverse() } else { ord };
            ord.then_with(|| a.0.name.cmp(&b.0.name))
        };
        // With a limit, only the first `limit` need sorting: partition around the limit first
        // (linear), so `limit=10` on 1,000 tags sorts 10.
        if let Some(limit) = self.limit
            && limit < keyed.len()
        {
            keyed.select_nth_unstable_by(limit, order);
            keyed.truncate(limit);
        }
        keyed.sort_by(order);
        keyed.into_iter().map(|(t, _)| t).collect()
    }

    /// The single best tag: with an explicit `sort`, the first of the sorted answer; by
    /// default the highest version that is not a pre-release, or — when no tag is such a
    /// version — the newest by date.
    pub fn best<'a>(&self, tags: &'a [Tag], explicit_sort: bool) -> Option<&'a Tag> {
        self.best_indexed(tags, &VersionIndex::new(tags), explicit_sort)
    }

    /// [`Selection::best`] with the tags' versions parsed beforehand.
    pub fn best_indexed<'a>(
        &self,
        tags: &'a [Tag],
        versions: &VersionIndex,
        explicit_sort: bool,
    ) -> Option<&'a Tag> {
        if explicit_sort {
            return self.apply_indexed(tags, versions).into_iter().next();
        }
        let candidates: Vec<(&Tag, Option<&TagVersion>)> = tags
            .iter()
            .zip(&versions.0)
            .filter(|(t, v)| self.keeps(t) && (!self.semver_only || v.is_some()))
            .map(|(t, v)| (t, v.as_ref()))
            .collect();
        let released = candidates
            .iter()
            .filter_map(|(t, v)| v.map(|v| (*t, v)))
            .filter(|(_, v)| !v.is_prerelease())
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.name.cmp(&a.0.name)));
        if let Some((t, _)) = released {
            return Some(t);
        }
        candidates
            .into_iter()
            .map(|(t, _)| t)
            .min_by(|a, b| by_date(b, a).then_with(|| a.name.cmp(&b.name)))
    }

    fn keeps(&self, tag: &Tag) -> bool {
        self.filter.as_ref().is_none_or(|r| r.is_match(&tag.name))
            && self.exclude.as_ref().is_none_or(|r| !r.is_match(&tag.name))
            && self.arch.as_ref().is_none_or(|a| a.matches(tag))
    }
}

/// Each tag's version ([`TagVersion::parse`] of its name), in the order of the tag list.
#[derive(Debug, Default)]
pub struct VersionIndex(Vec<Option<TagVersion>>);

impl VersionIndex {
    pub fn new(tags: &[Tag]) -> VersionIndex {
        VersionIndex(tags.iter().map(|t| TagVersion::parse(&t.name)).collect())
    }
}

/// Oldest first; unknown dates before every known one.
fn by_date(a: &Tag, b: &Tag) -> Ordering {
    a.last_updated.cmp(&b.last_updated)
}

/// Lowest version first; tags that are not versions always go last, whatever the order.
fn by_version(a: Option<&TagVersion>, b: Option<&TagVersion>, desc: bool) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) if desc => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) if desc => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Compiles a `filter`/`exclude` pattern, refusing long or expensive ones.
pub fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!("pattern longer than {MAX_PATTERN_LEN} characters"));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => "pattern too complex".to_owned(),
            other => other.to_string(),
        })
}

/// An `arch` parameter: `arm64`, `arm/v7`, `linux/arm64` or `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchFilter {
    os: Option<String>,
    architecture: String,
    variant: Option<String>,
}

/// Operating systems, to tell `linux/arm64` (os/arch) from `arm/v7` (arch/variant).
const OSES: &[&str] = &[
    "linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos", "aix",
    "plan9", "wasip1", "js",
];

impl ArchFilter {
    pub fn parse(raw: &str) -> Result<ArchFilter, String> {
        let parts: Vec<&str> = raw.split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if parts.is_empty() || parts.len() > 3 || !parts.iter().all(valid) {
            return Err("an architecture such as amd64, arm64, arm/v7 or linux/arm64".into());
        }
        let owned = |s: &str| s.to_owned();
        Ok(match parts.as_slice() {
            [arch] => ArchFilter {
                os: None,
                architecture: owned(arch),
                variant: None,
            },
            [os, arch] if OSES.contains(os) => ArchFilter {
                os: Some(owned(os)),
                architecture: owned(arch),
                variant: None,
            },
            [arch, variant] => ArchFilter {
                os: None,
                architecture: owned(arch),
                variant: Some(owned(variant)),
            },
            [os, arch, variant] => ArchFilter {
                os: Some(owned(os)),
                architecture: owned(arch),
                variant: Some(owned(variant)),
            },
            _ => unreachable!("1 to 3 parts"),
        })
    }

    /// Whether the tag runs on this platform. Docker Hub tags without platform details are
    /// matched on `architectures` alone.
    pub fn matches(&self, tag: &Tag) -> bool {
        if self.os.is_none() && self.variant.is_none() {
            return tag.architectures.contains(&self.architecture);
        }
        tag.platforms.iter().any(|p| {
            let mut parts = p.split('/');
            let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
            arch == Some(self.architecture.as_str())
                && self.os.as_deref().is_none_or(|o| os == Some(o))
                && self
                    .variant
                    .as_deref()
                    .is_none_or(|v| variant == Some(v) || (variant.is_none() && implied(arch, v)))
        })
    }
}

/// `arm64` without a variant is `v8`.
fn implied(arch: Option<&str>, variant: &str) -> bool {
    arch == Some("arm64") && variant == "v8"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_date;

    fn tag(name: &str, date: Option<&str>, platforms: &[&str]) -> Tag {
        let platforms: Vec<String> = platforms.iter().map(|p| p.to_string()).collect();
        let mut architectures: Vec<String> = platforms
            .iter()
            .map(|p| p.split('/').nth(1).unwrap().to_owned())
            .collect();
        architectures.dedup();
        Tag {
            name: name.into(),
            last_updated: date.and_then(parse_date),
            architectures,
            digest: None,
            platforms,
        }
    }

    fn names(tags: Vec<&Tag>) -> Vec<&str> {
        tags.into_iter().map(|t| t.name.as_str()).collect()
    }

    fn sample() -> Vec<Tag> {
        vec![
            tag(
                "latest",
                Some("2026-01-05T00:00:00Z"),
                &["linux/amd64", "linux/arm64/v8"],
            ),
            tag("2.0.0-rc1", Some("2026-01-04T00:00:00Z"), &["linux/amd64"]),
            tag(
                "v1.25",
                Some("2026-01-01T00:00:00Z"),
                &["linux/amd64", "linux/arm/v7"],
            ),
            tag("1.25.3", Some("2026-01-03T00:00:00Z"), &["linux/arm64"]),
            tag(
                "1.25.3-alpine",
                Some("2026-01-03T00:00:00Z"),
                &["linux/amd64"],
            ),
            tag("nightly", None, &[]),
        ]
    }

    #[test]
    fn identity_keeps_everything_in_order() {
        let s = Selection::default();
        assert!(s.is_identity());
        assert_eq!(names(s.apply(&sample())).len(), 6);
    }

    #[test]
    fn semver_sort_puts_non_versions_last_both_ways() {
        let tags = sample();
        let s = Selection {
            sort: Sort::Semver,
            ..Default::default()
        };
        assert_eq!(
            names(s.apply(&tags)),
            [
                "2.0.0-rc1",
                "1.25.3",
                "1.25.3-alpine",
                "v1.25",
                "latest",
                "nightly"
            ]
        );
        let s = Selection {
            sort: Sort::Semver,
            order: Some(Order::Asc),
            ..Default::default()
        };
        assert_eq!(
            names(s.apply(&tags)),
            [
                "v1.25",
                "1.25.3-alpine",
                "1.25.3",
                "2.0.0-rc1",
                "latest",
                "nightly"
            ]
        );
    }

    #[test]
    fn filters_limit_and_equal_dates() {
        let tags = sample();
        let s = Selection {
            semver_only: true,
            exclude: Some(compile_pattern("-alpine$").unwrap()),
            limit: Some(2),
            ..Default::default()
        };
        assert_eq!(names(s.apply(&tags)), ["2.0.0-rc1", "1.25.3"]);
        let s = Selection {
            filter: Some(compile_pattern("^1\\.25").unwrap()),
            ..Default::default()
        };
        assert_eq!(
            names(s.apply(&tags)),
            ["1.25.3", "1.25.3-alpine"],
            "equal dates by name"
        );
        let s = Selection {
            limit: Some(100),
            ..Default::default()
        };
        assert_eq!(s.apply(&tags).len(), 6);
        let s = Selection {
            filter: Some(compile_pattern("^zzz").unwrap()),
            ..Default::default()
        };
        assert!(s.apply(&tags).is_empty());
    }

    #[test]
    fn arch_forms() {
        let tags = sample();
        let by = |a: &str| {
            let s = Selection {
                arch: Some(ArchFilter::parse(a).unwrap()),
                ..Default::default()
            };
            names(s.apply(&tags))
        };
        assert_eq!(by("arm64"), ["latest", "1.25.3"]);
        assert_eq!(by("arm64/v8"), ["latest", "1.25.3"], "arm64 means v8");
        assert_eq!(by("arm/v7"), ["v1.25"]);
        assert_eq!(by("linux/arm/v7"), ["v1.25"]);
        assert_eq!(by("linux/amd64").len(), 4);
        assert!(by("windows/amd64").is_empty());
        for bad in ["", "ARM64", "a/b/c/d", "arm64/", "x y"] {
            assert!(ArchFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn best_tag() {
        let tags = sample();
        let s = Selection::default();
        assert_eq!(
            s.best(&tags, false).unwrap().name,
            "1.25.3",
            "highest non-pre-release"
        );
        let s = Selection {
            filter: Some(compile_pattern("^(latest|nightly)$").unwrap()),
            ..Default::default()
        };
        assert_eq!(
            s.best(&tags, false).unwrap().name,
            "latest",
            "newest by date without versions"
        );
        let s = Selection {
            sort: Sort::Name,
            ..Default::default()
        };
        assert_eq!(s.best(&tags, true).unwrap().name, "1.25.3");
        let s = Selection {
            filter: Some(compile_pattern("^none$").unwrap()),
            ..Default::default()
        };
        assert!(s.best(&tags, false).is_none());
    }

    #[test]
    fn hostile_patterns_are_refused() {
        assert!(compile_pattern("(").is_err());
        assert!(compile_pattern(&"a".repeat(300)).is_err());
        assert!(compile_pattern("(?:a{1000}){1000}").is_err());
    }
}
