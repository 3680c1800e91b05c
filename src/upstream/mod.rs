//! Talking to registries: the Docker Hub API and the OCI distribution protocol.
//!
//! [`Upstream::fetch_tags`] turns an [`ImageRef`] into a fresh [`TagList`], or an
//! [`UpstreamError`] whose variant decides what the caller sees (404, 429, 502, 504) and whether
//! a cached answer is served instead. Bodies are treated as hostile: every read is capped in size
//! and time (`http`), and a malformed document is an error, never a panic.

pub mod auth;
pub mod dockerhub;
pub mod http;
pub mod link;
pub mod manifest;
pub mod oci;
pub mod politeness;

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::cache::DigestCache;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{ImageRef, Registry, TagList};

/// Why an upstream could not give us a tag list. Each variant leads to a different answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The registry says the repository (or a manifest it listed) does not exist.
    #[error("{url} answered {status}: repository not found")]
    NotFound { status: u16, url: String },
    /// The registry refused access: the repository is private, or credentials are wrong.
    #[error("{url} answered {status}: access denied (private repository or bad credentials)")]
    Denied { status: u16, url: String },
    /// The registry rate-limits us.
    #[error("{url} answered {status}: rate limited")]
    RateLimited {
        status: u16,
        url: String,
        retry_after: Option<Duration>,
    },
    /// No complete answer within the time allowed.
    #[error("{url} did not answer within {}s", timeout.as_secs_f32())]
    Timeout { url: String, timeout: Duration },
    /// Any other unexpected status.
    #[error("{url} answered {status}")]
    Status { status: u16, url: String },
    /// The host rate-limited us earlier; we are not asking it until the back-off ends.
    #[error("not asking {url}: the registry rate-limited us; backing off for {}s", retry_after.as_secs().max(1))]
    BackingOff { url: String, retry_after: Duration },
    /// The host kept failing; its circuit breaker is open.
    #[error("{url}: the registry kept failing; not asking it again for {}s", retry_after.as_secs().max(1))]
    Unavailable { url: String, retry_after: Duration },
    /// The connection failed.
    #[error("could not reach {url}: {reason}")]
    Network { url: String, reason: String },
    /// The body is not what the protocol says (bad JSON, wrong type, too large, bad digest).
    #[error("{url} sent an invalid response: {reason}")]
    Malformed { url: String, reason: String },
    /// A redirect, link or auth realm pointed somewhere we will not go.
    #[error("refused to follow {url}: {reason}")]
    Refused { url: String, reason: String },
}

/// A URL as it may appear in messages and logs: no credentials, no query (signed blob URLs
/// carry their signature there).
pub fn display_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// Fetches tag lists from whichever registry an image lives in.
pub struct Upstream {
    http: Arc<http::HttpClient>,
    credentials: std::collections::HashMap<String, crate::config::Credentials>,
    hub: dockerhub::DockerHub,
    oci: oci::OciRegistry,
}

impl Upstream {
    pub fn new(settings: &Settings, metrics: Metrics, digests: DigestCache) -> Upstream {
        let http = Arc::new(http::HttpClient::new(settings, metrics));
        let auth = Arc::new(auth::Authenticator::new(
            http.clone(),
            settings.credentials.clone(),
        ));
        Upstream {
            hub: dockerhub::DockerHub::new(http.clone(), settings),
            oci: oci::OciRegistry::new(http.clone(), auth, digests, settings),
            credentials: settings.credentials.clone(),
            http,
        }
    }

    /// Fetches the current tag list of `image` from its registry. `previous`, the answer being
    /// refreshed, lets Docker Hub stop at the first unchanged page.
    #[tracing::instrument(skip_all, fields(registry = %image.registry, image = %image.repository))]
    pub async fn fetch_tags(
        &self,
        image: &ImageRef,
        previous: Option<&TagList>,
    ) -> Result<TagList, UpstreamError> {
        match &image.registry {
            Registry::DockerHub => self.hub.fetch_tags(&image.repository, previous).await,
            Registry::Oci(host) => self.oci.fetch_tags(host, &image.repository).await,
        }
    }

    /// A fingerprint of the credentials used for `registry`, if any: part of the cache key, so
    /// an answer fetched with credentials is never served under another configuration's key.
    pub fn credential_fingerprint(&self, registry: &Registry) -> Option<String> {
        match registry {
            Registry::DockerHub => self.hub.credential_fingerprint(),
            Registry::Oci(host) => self.credentials.get(host).map(|c| c.fingerprint()),
        }
    }

    /// The shared HTTP client (for readiness details and tests).
    pub fn http(&self) -> &http::HttpClient {
        &self.http
    }
}
