//! Reading manifests, indexes and image configs: which platforms a digest runs on, and when
//! it was created.
//!
//! Indexes and image manifests are parsed with `oci-spec` (Docker manifest lists and v2
//! manifests share their shape). Image configs are read with the small lenient struct below
//! instead of `oci_spec::image::ImageConfiguration`: we need four fields, and the full type
//! rejects configs that real registries serve (a missing `rootfs`, odd `config` members), which
//! would turn a harmless quirk into a failed tag.

use chrono::{DateTime, Utc};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::{Platform, parse_date};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` header for manifest requests. Without the OCI index type GHCR and the
/// distribution registry answer 404 for multi-platform images.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The annotation buildkit puts on attestation entries of an index.
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// The annotation that may carry the creation time of an index.
const CREATED: &str = "org.opencontainers.image.created";

/// What we keep forever about a digest: what a digest describes never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestInfo {
    pub platforms: Vec<Platform>,
    pub created: Option<DateTime<Utc>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub enum Document {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

/// Parses a manifest body; the body's own `mediaType` wins over the `Content-Type` header.
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Document, String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let header_type = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
    let media_type = probe.media_type.as_deref().or(header_type).unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ if probe.manifests.is_some() => true,
        other if other.contains("prettyjws") || other.contains("manifest.v1+json") => {
            return Err(format!("unsupported legacy manifest type {other:?}"));
        }
        _ => false,
    };
    if is_index {
        serde_json::from_slice(body)
            .map(|i| Document::Index(Box::new(i)))
            .map_err(|e| format!("invalid image index: {e}"))
    } else {
        serde_json::from_slice(body)
            .map(|m| Document::Image(Box::new(m)))
            .map_err(|e| format!("invalid image manifest: {e}"))
    }
}

/// One entry of an index, as far as we care.
#[derive(Debug, PartialEq, Eq)]
pub enum Child {
    /// A runnable image whose platform the index states.
    Image { digest: String, platform: Platform },
    /// An image without a platform in the index: its config tells.
    Unlabelled { digest: String },
    /// A nested index.
    Index { digest: String },
}

/// The runnable entries of an index: attestations and `unknown/unknown` entries are dropped,
/// and so are entries of media types we do not know (the spec says to skip, not reject, them).
pub fn children(index: &ImageIndex) -> Vec<Child> {
    index
        .manifests()
        .iter()
        .filter(|d| !is_attestation(d))
        .filter_map(|d| {
            let digest = d.digest().to_string();
            match d.media_type() {
                MediaType::ImageIndex => Some(Child::Index { digest }),
                MediaType::Other(t) if t == DOCKER_LIST => Some(Child::Index { digest }),
                MediaType::ImageManifest => Some(image_child(d, digest)),
                MediaType::Other(t) if t == DOCKER_MANIFEST => Some(image_child(d, digest)),
                _ => None,
            }
        })
        .filter(|c| !matches!(c, Child::Image { platform, .. } if !platform.is_runnable()))
        .collect()
}

fn image_child(d: &Descriptor, digest: String) -> Child {
    match d.platform() {
        Some(p) => Child::Image {
            digest,
            platform: Platform {
                os: p.os().to_string(),
                architecture: p.architecture().to_string(),
                variant: p.variant().clone().filter(|v| !v.is_empty()),
            },
        },
        None => Child::Unlabelled { digest },
    }
}

fn is_attestation(d: &Descriptor) -> bool {
    let annotated = d
        .annotations()
        .as_ref()
        .is_some_and(|a| a.contains_key(REFERENCE_TYPE));
    let unknown = d.platform().as_ref().is_some_and(|p| {
        p.os().to_string() == "unknown" && p.architecture().to_string() == "unknown"
    });
    annotated || unknown
}

/// The creation time an index states in its annotations, if any.
pub fn index_created(index: &ImageIndex) -> Option<DateTime<Utc>> {
    index
        .annotations()
        .as_ref()
        .and_then(|a| a.get(CREATED))
        .and_then(|s| parse_date(s))
}

/// The fields of an image config we need. Everything is optional: a config without them still
/// describes an image, just one we know less about.
#[derive(Debug, Default, Deserialize)]
pub struct ConfigSummary {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
}

impl ConfigSummary {
    pub fn parse(body: &[u8]) -> Result<ConfigSummary, String> {
        serde_json::from_slice(body).map_err(|e| format!("invalid image config: {e}"))
    }

    /// The platform and creation time this config describes.
    pub fn info(&self) -> DigestInfo {
        let platform = Platform {
            os: self.os.clone().unwrap_or_default(),
            architecture: self.architecture.clone().unwrap_or_default(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        };
        DigestInfo {
            platforms: if platform.is_runnable() {
                vec![platform]
            } else {
                vec![]
            },
            created: self.created.as_deref().and_then(parse_date),
        }
    }
}

/// Checks that `body` is what `digest` names. Only sha256 is checked; other algorithms are
/// accepted as given (none are in use by the registries we know).
pub fn verify_digest(digest: &str, body: &[u8]) -> Result<(), String> {
    match digest.split_once(':') {
        Some(("sha256", hex_part)) => {
            let actual = sha256_digest(body);
            if actual[7..] == *hex_part {
                Ok(())
            } else {
                Err(format!(
                    "content does not match digest {digest} (got {actual})"
                ))
            }
        }
        Some((_, _)) => Ok(()),
        None => Err(format!("{digest:?} is not a digest")),
    }
}

/// `sha256:<hex>` of exactly these bytes.
pub fn sha256_digest(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = include_str!("../../tests/fixtures/oci-image-index-with-attestation.json");
    const LIST: &str = include_str!("../../tests/fixtures/docker-manifest-list.json");
    const MANIFEST: &str = include_str!("../../tests/fixtures/oci-manifest.json");
    const CONFIG: &str = include_str!("../../tests/fixtures/image-config.json");

    #[test]
    fn oci_index_drops_attestations() {
        let Document::Index(index) = parse_manifest(None, INDEX.as_bytes()).unwrap() else {
            panic!("not an index");
        };
        let kids = children(&index);
        assert_eq!(kids.len(), 2, "{kids:?}");
        let arches: Vec<_> = kids
            .iter()
            .map(|c| match c {
                Child::Image { platform, .. } => platform.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(arches, ["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn docker_list_has_all_platforms() {
        let doc = parse_manifest(Some(DOCKER_LIST), LIST.as_bytes()).unwrap();
        let Document::Index(index) = doc else {
            panic!("not an index")
        };
        let kids = children(&index);
        assert_eq!(kids.len(), 8);
        assert!(kids.iter().any(|c| matches!(c,
            Child::Image { platform, .. } if platform.to_string() == "linux/arm/v7")));
    }

    #[test]
    fn manifest_and_config() {
        let doc = parse_manifest(Some(OCI_MANIFEST), MANIFEST.as_bytes()).unwrap();
        assert!(matches!(doc, Document::Image(_)));
        let info = ConfigSummary::parse(CONFIG.as_bytes()).unwrap().info();
        assert_eq!(info.platforms[0].architecture, "arm64");
        assert!(info.created.is_some());
    }

    #[test]
    fn fixture_digests_verify() {
        let digest = sha256_digest(LIST.as_bytes());
        assert!(digest.starts_with("sha256:2a9865e5"), "{digest}");
        assert_eq!(verify_digest(&digest, LIST.as_bytes()), Ok(()));
        assert!(verify_digest(&digest, b"other").is_err());
        assert!(verify_digest("nocolon", b"").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            "",
            "null",
            "[]",
            "{\"manifests\": 3}",
            "{\"mediaType\": 1}",
            "\u{0}",
        ] {
            let _ = parse_manifest(None, body.as_bytes());
        }
        assert!(parse_manifest(None, b"{\"manifests\": 3}").is_err());
        assert!(ConfigSummary::parse(b"[1,2]").is_err());
        assert!(
            ConfigSummary::parse(b"{}")
                .unwrap()
                .info()
                .platforms
                .is_empty()
        );
    }
}
