//! Which tags are versions, and how versions order.
//!
//! A tag is a version when it is, in this order:
//! 1. an optional `v` or `V`;
//! 2. two or three dot-separated numbers (`1.25`, `1.25.3`; `1.25` means `1.25.0`). A single
//!    number (`20`, `20240101`) is not a version: it cannot be told apart from a build number
//!    or a date. Four numbers (`1.2.3.4`) are not a version either;
//! 3. optionally `-` and a suffix of letters, digits, `.` and `-` (`1.25.3-alpine`, `2.0.0-rc1`);
//! 4. optionally `+` and build metadata, which is ignored for ordering.
//!
//! A suffix whose first word starts with `alpha`, `beta`, `rc`, `pre`, `preview`, `dev`,
//! `snapshot`, `nightly`, `canary` or `next` makes the tag a **pre-release**, which sorts before
//! its release (`2.0.0-rc1` < `2.0.0`), and pre-releases order among themselves as in SemVer
//! (`rc.2` < `rc.10`). Any other suffix (`-alpine`, `-slim`, `-bookworm`) is a **variant** of a
//! release: `1.25.3-alpine` is version 1.25.3, ordered next to `1.25.3` (the plain tag first,
//! then variants by name).

use std::cmp::Ordering;

use semver::{Prerelease, Version};

/// Words that mark a suffix as a pre-release.
const PRERELEASE_WORDS: &[&str] = &[
    "alpha", "beta", "rc", "pre", "preview", "dev", "snapshot", "nightly", "canary", "next",
];

/// A tag read as a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagVersion {
    /// The numeric core and, for pre-releases, the pre-release identifiers.
    pub version: Version,
    /// A non-pre-release suffix such as `alpine`.
    pub variant: Option<String>,
}

impl TagVersion {
    /// Reads `tag` as a version, or `None` when it is not one (see the module docs).
    pub fn parse(tag: &str) -> Option<TagVersion> {
        let rest = tag.strip_prefix(['v', 'V']).unwrap_or(tag);
        let (rest, _build) = match rest.split_once('+') {
            Some((r, b)) if is_ident(b) => (r, Some(b)),
            Some(_) => return None,
            None => (rest, None),
        };
        let (core, suffix) = match rest.split_once('-') {
            Some((c, s)) if is_ident(s) => (c, Some(s)),
            Some(_) => return None,
            None => (rest, None),
        };
        let nums: Vec<u64> = core
            .split('.')
            .map(|p| {
                (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse().ok())
                    .flatten()
            })
            .collect::<Option<_>>()?;
        if !(2..=3).contains(&nums.len()) {
            return None;
        }
        let mut version = Version::new(nums[0], nums[1], nums.get(2).copied().unwrap_or(0));
        let mut variant = None;
        if let Some(s) = suffix {
            if is_prerelease(s) {
                version.pre = Prerelease::new(&s.replace('-', ".").to_ascii_lowercase())
                    .or_else(|_| Prerelease::new(&sanitize(s)))
                    .ok()?;
            } else {
                variant = Some(s.to_owned());
            }
        }
        Some(TagVersion { version, variant })
    }

    pub fn is_prerelease(&self) -> bool {
        !self.version.pre.is_empty()
    }
}

impl Ord for TagVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.version
            .cmp(&other.version)
            // The plain tag ranks above its variants (`1.2.3` > `1.2.3-alpine`), then by name.
            .then_with(|| match (&self.variant, &other.variant) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => b.cmp(a),
            })
    }
}

impl PartialOrd for TagVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

fn is_prerelease(suffix: &str) -> bool {
    let first = suffix
        .split(['.', '-'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    PRERELEASE_WORDS.iter().any(|w| first.starts_with(w))
}

/// SemVer forbids empty identifiers and leading zeros in numeric ones; keep what we can.
fn sanitize(s: &str) -> String {
    s.split(['.', '-'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                p.trim_start_matches('0').to_owned()
            } else {
                p.to_ascii_lowercase()
            }
        })
        .map(|p| if p.is_empty() { "0".to_owned() } else { p })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(tag: &str) -> TagVersion {
        TagVersion::parse(tag).unwrap_or_else(|| panic!("{tag} should be a version"))
    }

    #[test]
    fn what_counts_as_a_version() {
        for tag in [
            "1.25",
            "1.25.3",
            "v1.25.3",
            "V2.0",
            "1.25.3-alpine",
            "2.0.0-rc1",
            "2.0.0-rc.1",
            "1.25-alpine3.19",
            "1.2.3+build.5",
            "0.1.0",
            "10.20.30-beta-2",
        ] {
            assert!(TagVersion::parse(tag).is_some(), "{tag}");
        }
        for tag in [
            "latest",
            "20",
            "20240101",
            "1.2.3.4",
            "1..2",
            "v",
            "1.2.",
            ".1.2",
            "1.2-",
            "1.2+",
            "alpine",
            "1.2.3-al pine",
            "sha256-abc",
            "1.x",
            "-1.2",
        ] {
            assert!(TagVersion::parse(tag).is_none(), "{tag}");
        }
    }

    #[test]
    fn prereleases_and_variants() {
        assert!(v("2.0.0-rc1").is_prerelease());
        assert!(v("2.0.0-Beta.2").is_prerelease());
        assert!(!v("1.25.3-alpine").is_prerelease());
        assert_eq!(v("1.25.3-alpine").variant.as_deref(), Some("alpine"));
        assert_eq!(v("1.25").version, Version::new(1, 25, 0));
    }

    #[test]
    fn ordering() {
        let mut tags = vec![
            "2.0.0",
            "2.0.0-rc1",
            "1.10.0",
            "1.9.9",
            "v1.25",
            "1.25.3-alpine",
            "1.25.3",
            "2.0.0-rc.10",
            "2.0.0-rc.2",
            "2.0.0-alpha",
        ];
        tags.sort_by_key(|t| v(t));
        assert_eq!(
            tags,
            [
                "1.9.9",
                "1.10.0",
                "v1.25",
                "1.25.3-alpine",
                "1.25.3",
                "2.0.0-alpha",
                "2.0.0-rc.2",
                "2.0.0-rc.10",
                "2.0.0-rc1",
                "2.0.0",
            ]
        );
    }
}
