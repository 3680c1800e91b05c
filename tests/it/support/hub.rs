//! A fake of Docker Hub's tag API (`hub.docker.com/v2/...`), the one the service uses for Docker
//! Hub because it carries dates and platforms that the registry protocol does not.
//!
//! Every behaviour here comes from `shared/reference/UPSTREAM.md` §1 and quirks 1–5 of §9: the
//! DRF-style page envelope, `next`/`previous` links that keep the caller's host, parameters
//! (sorted, as Django REST framework writes them) and trailing slash, `page_size` clamped to 100,
//! 404 past the last page, 403 for anonymous offsets of 1000 or more, the `X-RateLimit-*` trio,
//! Go-style `\u0026` escaping and Go-style timestamps (trailing fraction zeros trimmed).
//!
//! Tests shape the upstream with [`HubFake::add_repo`] and friends, script misbehaviour with
//! [`HubFake::fail_next`] / [`HubFake::fail_always`], and inspect what the service sent with
//! [`HubFake::requests`]. Dropping the fake closes the listener *and* cuts every open connection,
//! in-flight requests included, so that "the Hub went away" is immediate and total.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::{StreamExt, stream};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Media type of a multi-platform OCI image index (what `multi_arch` tags point at).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a Docker manifest list (the 2023 debian sample).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a single-platform Docker v2 manifest (what `HubTag::new` tags point at).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Exact body of a 404 for a page past the end (reference `dockerhub-tags-404.txt`, §1.4).
pub const PAST_END_BODY: &str = r#"{"message":"httperror 404: object not found","errinfo":{}}"#;
/// Exact body of the anonymous offset cap (reference `dockerhub-tags-403-offset.txt`).
pub const OFFSET_CAP_BODY: &str = r#"{"message":"pagination offset too large for anonymous requests; sign in to page further","errinfo":{}}"#;
/// Documented body of the per-minute Hub API limit (reference `dockerhub-hub-api-429.txt`).
pub const RATE_LIMIT_BODY: &str = r#"{"detail": "Rate limit exceeded", "error": false}"#;
/// Body of the plain-text abuse limit (reference `dockerhub-abuse-429.txt`), newline included.
pub const ABUSE_BODY: &str = "Too Many Requests (HAP429).\n";
/// Body of a 401 for a wrong token. CONSTRUCTED: no capture exists; shaped like the other errors.
pub const BAD_TOKEN_BODY: &str =
    r#"{"message":"authentication failed: invalid token","errinfo":{}}"#;

const NOT_FOUND_MESSAGE: &str = "httperror 404: object not found";
/// §1.4: anonymous callers may not page to offset 1000 or beyond (since 2026-08-11).
const ANONYMOUS_OFFSET_CAP: usize = 1000;
/// §1.2: default and maximum `page_size`.
const DEFAULT_PAGE_SIZE: usize = 10;
const MAX_PAGE_SIZE: usize = 100;
/// §1.6: the real per-minute limit observed in 2021 (`180 / 175 / …`).
const DEFAULT_RATE_LIMIT: u32 = 180;
const RATE_WINDOW_SECS: u64 = 60;
/// Docker's bot account as it appears in Official Images samples (username neutralised).
const BOT_ID: u64 = 1156886;
const BOT_NAME: &str = "example-bot";
/// Date given to tags built without one, so that a bare `HubTag::new` still looks real.
const DEFAULT_DATE: &str = "2024-01-01T00:00:00Z";

// ---------------------------------------------------------------------------------------------
// Tag model
// ---------------------------------------------------------------------------------------------

/// A field the Hub sometimes sends with a value, sometimes as `null` and sometimes not at all;
/// clients must tell none of those apart from a crash (quirk 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field<T> {
    Value(T),
    Null,
    Absent,
}

impl<T> Field<T> {
    fn is_absent(&self) -> bool {
        matches!(self, Field::Absent)
    }
}

impl<T> From<Option<T>> for Field<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Field::Null, Field::Value)
    }
}

impl<T: Serialize> Serialize for Field<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Value(v) => v.serialize(s),
            Field::Null | Field::Absent => s.serialize_none(),
        }
    }
}

/// One `images[]` entry: a platform manifest behind a tag.
#[derive(Clone, Debug)]
pub struct HubImage {
    pub architecture: Field<String>,
    pub variant: Option<String>,
    pub os: String,
    pub os_version: Option<String>,
    pub digest: Option<String>,
    pub size: u64,
    pub status: String,
    pub last_pulled: Option<DateTime<Utc>>,
    pub last_pushed: Option<DateTime<Utc>>,
}

impl HubImage {
    /// A platform written `arch[/variant]` (Linux) or `os/arch[/variant]`, e.g. `"arm64/v8"`.
    /// The digest and size derive from the platform so that equal inputs give equal images.
    pub fn platform(platform: &str) -> Self {
        Self::derived(platform, platform)
    }

    /// A buildx attestation entry (`unknown/unknown`); whether the Hub lists these is unverified.
    pub fn unknown() -> Self {
        Self::platform("unknown/unknown")
    }

    /// Builds a platform image whose digest and size derive from `seed`.
    fn derived(platform: &str, seed: &str) -> Self {
        let (os, arch, variant) = split_platform(platform);
        let date = Some(parse_date(DEFAULT_DATE));
        Self {
            architecture: Field::Value(arch.to_owned()),
            variant: variant.map(str::to_owned),
            os: os.to_owned(),
            os_version: None,
            digest: Some(fake_digest(seed)),
            size: fake_size(seed),
            status: "active".to_owned(),
            last_pulled: date,
            last_pushed: date,
        }
    }

    /// `Some` sets the architecture, `None` sends `"architecture": null`.
    pub fn architecture(mut self, arch: Option<&str>) -> Self {
        self.architecture = arch.map(str::to_owned).into();
        self
    }

    /// Leaves `architecture` out of the JSON entirely.
    pub fn without_architecture(mut self) -> Self {
        self.architecture = Field::Absent;
        self
    }

    pub fn variant(mut self, variant: Option<&str>) -> Self {
        self.variant = variant.map(str::to_owned);
        self
    }

    pub fn os(mut self, os: &str) -> Self {
        self.os = os.to_owned();
        self
    }

    pub fn os_version(mut self, version: Option<&str>) -> Self {
        self.os_version = version.map(str::to_owned);
        self
    }

    /// `None` sends `"digest": null` (Renovate treats the per-platform digest as nullable).
    pub fn digest(mut self, digest: Option<&str>) -> Self {
        self.digest = digest.map(str::to_owned);
        self
    }

    pub fn size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }

    pub fn status(mut self, status: &str) -> Self {
        self.status = status.to_owned();
        self
    }

    pub fn last_pulled(mut self, date: Option<&str>) -> Self {
        self.last_pulled = date.map(parse_date);
        self
    }

    pub fn last_pushed(mut self, date: Option<&str>) -> Self {
        self.last_pushed = date.map(parse_date);
        self
    }
}

/// One tag as the Hub stores it. Build with [`HubTag::new`] or [`HubTag::multi_arch`], then
/// override fields with the builder methods to produce the odd shapes real pages contain.
#[derive(Clone, Debug)]
pub struct HubTag {
    pub name: String,
    /// `None`: the fake assigns one, and keeps it for the same name across `set_tags`, as the
    /// Hub keeps tag ids stable (Renovate keys its cache on them).
    pub id: Option<u64>,
    pub creator: u64,
    pub digest: Field<String>,
    pub last_updated: Option<DateTime<Utc>>,
    pub tag_last_pushed: Option<DateTime<Utc>>,
    pub tag_last_pulled: Option<DateTime<Utc>>,
    pub images: Vec<HubImage>,
    pub media_type: String,
    /// `None`: the first image's size, as in every real multi-arch sample (not the sum).
    pub full_size: Option<u64>,
    pub tag_status: String,
    pub last_updater: u64,
    pub last_updater_username: String,
}

impl HubTag {
    /// A single-platform linux/amd64 tag pushed at 2024-01-01T00:00:00Z.
    pub fn new(name: &str) -> Self {
        let date = Some(parse_date(DEFAULT_DATE));
        Self {
            name: name.to_owned(),
            id: None,
            creator: BOT_ID,
            digest: Field::Value(fake_digest(name)),
            last_updated: date,
            tag_last_pushed: date,
            tag_last_pulled: date,
            images: vec![HubImage::derived("amd64", &format!("{name}/amd64"))],
            media_type: DOCKER_MANIFEST.to_owned(),
            full_size: None,
            tag_status: "active".to_owned(),
            last_updater: BOT_ID,
            last_updater_username: BOT_NAME.to_owned(),
        }
    }

    /// A tag pointing at an OCI index with one image per platform, everything pushed at `date`.
    pub fn multi_arch(name: &str, date: &str, platforms: &[&str]) -> Self {
        let images = platforms
            .iter()
            .map(|p| HubImage::derived(p, &format!("{name}/{p}")))
            .collect();
        Self::new(name)
            .images(images)
            .media_type(OCI_INDEX)
            .pushed_at(date)
    }

    /// Sets `last_updated`, `tag_last_pushed` and every image's `last_pushed` to `date`: what a
    /// push does. Use the single-field setters for inconsistent data.
    pub fn pushed_at(mut self, date: &str) -> Self {
        let date = Some(parse_date(date));
        self.last_updated = date;
        self.tag_last_pushed = date;
        for image in &mut self.images {
            image.last_pushed = date;
        }
        self
    }

    pub fn id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }

    pub fn creator(mut self, creator: u64) -> Self {
        self.creator = creator;
        self
    }

    /// `None` sends `"digest": null`.
    pub fn digest(mut self, digest: Option<&str>) -> Self {
        self.digest = digest.map(str::to_owned).into();
        self
    }

    /// Leaves `digest` out, as the 2022 single-arch capture did.
    pub fn without_digest(mut self) -> Self {
        self.digest = Field::Absent;
        self
    }

    pub fn last_updated(mut self, date: Option<&str>) -> Self {
        self.last_updated = date.map(parse_date);
        self
    }

    pub fn tag_last_pushed(mut self, date: Option<&str>) -> Self {
        self.tag_last_pushed = date.map(parse_date);
        self
    }

    pub fn tag_last_pulled(mut self, date: Option<&str>) -> Self {
        self.tag_last_pulled = date.map(parse_date);
        self
    }

    /// Replaces the platforms; `vec![]` reproduces the 2025 `images: []` regression.
    pub fn images(mut self, images: Vec<HubImage>) -> Self {
        self.images = images;
        self
    }

    pub fn media_type(mut self, media_type: &str) -> Self {
        self.media_type = media_type.to_owned();
        self
    }

    pub fn full_size(mut self, size: u64) -> Self {
        self.full_size = Some(size);
        self
    }

    pub fn tag_status(mut self, status: &str) -> Self {
        self.tag_status = status.to_owned();
        self
    }

    pub fn last_updater(mut self, id: u64, username: &str) -> Self {
        self.last_updater = id;
        self.last_updater_username = username.to_owned();
        self
    }
}

/// `count` multi-arch (amd64, arm64/v8) tags named `1.<i>.0`, tag `i` pushed `i` hours and a few
/// microseconds after `start`: dates are distinct, their fractions vary in length like real ones,
/// and name order differs from date order (`1.10.0` sorts before `1.2.0`).
pub fn generate_tags(count: usize, start: &str) -> Vec<HubTag> {
    let start = parse_date(start);
    (0..count)
        .map(|i| {
            let micros = (i as i64 * 7919) % 1_000_000;
            let date = start + TimeDelta::hours(i as i64) + TimeDelta::microseconds(micros);
            HubTag::multi_arch(&format!("1.{i}.0"), &go_time(&date), &["amd64", "arm64/v8"])
        })
        .collect()
}

/// Parses an RFC 3339 date; panics with the input, since only tests call it.
fn parse_date(date: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(date)
        .unwrap_or_else(|e| panic!("bad RFC 3339 date {date:?}: {e}"))
        .with_timezone(&Utc)
}

/// Formats like Go's `time.RFC3339Nano`, as the Hub does: `…23.89489Z` (trailing zeros
/// trimmed), `…54.103614048Z` (nanoseconds kept), `…00Z` (no fraction at all).
fn go_time(date: &DateTime<Utc>) -> String {
    let seconds = date.format("%Y-%m-%dT%H:%M:%S");
    match date.timestamp_subsec_nanos() {
        0 => format!("{seconds}Z"),
        nanos => format!("{seconds}.{}Z", format!("{nanos:09}").trim_end_matches('0')),
    }
}

/// Splits `os/arch/variant`, `os/arch`, `arch/variant` or `arch`; a bare arch means Linux.
fn split_platform(platform: &str) -> (&str, &str, Option<&str>) {
    const OSES: [&str; 5] = ["linux", "windows", "darwin", "freebsd", "unknown"];
    let parts: Vec<&str> = platform.split('/').collect();
    match parts.as_slice() {
        [os, arch, variant] => (os, arch, Some(variant)),
        [os, arch] if OSES.contains(os) => (os, arch, None),
        [arch, variant] => ("linux", arch, Some(variant)),
        _ => ("linux", platform, None),
    }
}

/// A well-formed, deterministic `sha256:` digest for made-up content.
fn fake_digest(seed: &str) -> String {
    let hash = Sha256::digest(seed.as_bytes());
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

/// A plausible compressed size (20–50 MB), deterministic per seed.
fn fake_size(seed: &str) -> u64 {
    let hash = Sha256::digest(seed.as_bytes());
    20_000_000 + u64::from(u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]])) % 30_000_000
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

/// A tags page; fields in the order the Hub sends them.
#[derive(Serialize)]
struct WirePage<'a> {
    count: usize,
    next: Option<String>,
    previous: Option<String>,
    results: Vec<WireTag<'a>>,
}

/// One `results[]` entry; field order and names from the 2023 and 2025 captures.
#[derive(Serialize)]
struct WireTag<'a> {
    creator: u64,
    id: u64,
    images: Vec<WireImage<'a>>,
    last_updated: Option<String>,
    last_updater: u64,
    last_updater_username: &'a str,
    name: &'a str,
    repository: u64,
    full_size: u64,
    v2: bool,
    tag_status: &'a str,
    tag_last_pulled: Option<String>,
    tag_last_pushed: Option<String>,
    media_type: &'a str,
    content_type: &'static str,
    #[serde(skip_serializing_if = "Field::is_absent")]
    digest: &'a Field<String>,
}

#[derive(Serialize)]
struct WireImage<'a> {
    #[serde(skip_serializing_if = "Field::is_absent")]
    architecture: &'a Field<String>,
    features: &'static str,
    variant: Option<&'a str>,
    digest: Option<&'a str>,
    os: &'a str,
    os_features: &'static str,
    os_version: Option<&'a str>,
    size: u64,
    status: &'a str,
    last_pulled: Option<String>,
    last_pushed: Option<String>,
}

/// Error envelope of the tags endpoint: `message` first, then `errinfo`.
#[derive(Serialize)]
struct WireError<'a> {
    message: &'a str,
    errinfo: WireErrInfo<'a>,
}

#[derive(Serialize)]
struct WireErrInfo<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repository: Option<&'a str>,
}

impl HubTag {
    fn wire(&self, repository: u64) -> WireTag<'_> {
        WireTag {
            creator: self.creator,
            id: self.id.unwrap_or_default(),
            images: self.images.iter().map(HubImage::wire).collect(),
            last_updated: self.last_updated.as_ref().map(go_time),
            last_updater: self.last_updater,
            last_updater_username: &self.last_updater_username,
            name: &self.name,
            repository,
            full_size: self.full_size.unwrap_or_else(|| self.first_image_size()),
            v2: true,
            tag_status: &self.tag_status,
            tag_last_pulled: self.tag_last_pulled.as_ref().map(go_time),
            tag_last_pushed: self.tag_last_pushed.as_ref().map(go_time),
            media_type: &self.media_type,
            content_type: "image",
            digest: &self.digest,
        }
    }

    fn first_image_size(&self) -> u64 {
        self.images
            .first()
            .map_or_else(|| fake_size(&self.name), |i| i.size)
    }
}

impl HubImage {
    fn wire(&self) -> WireImage<'_> {
        WireImage {
            architecture: &self.architecture,
            features: "",
            variant: self.variant.as_deref(),
            digest: self.digest.as_deref(),
            os: &self.os,
            os_features: "",
            os_version: self.os_version.as_deref(),
            size: self.size,
            status: &self.status,
            last_pulled: self.last_pulled.as_ref().map(go_time),
            last_pushed: self.last_pushed.as_ref().map(go_time),
        }
    }
}

/// Escapes like Go's `encoding/json` (`&` → `\u0026`, also `<`, `>`, U+2028/9), which is what
/// the 2023 capture shows. Safe on the whole document: these characters only occur in strings.
fn go_escape(json: String) -> String {
    if !json.contains(['&', '<', '>', '\u{2028}', '\u{2029}']) {
        return json;
    }
    json.replace('&', "\\u0026")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

fn error_body(message: &str, namespace: Option<&str>, repository: Option<&str>) -> String {
    let errinfo = WireErrInfo {
        namespace,
        repository,
    };
    serde_json::to_string(&WireError { message, errinfo }).expect("error body serializes")
}

// ---------------------------------------------------------------------------------------------
// Scripted failures and recorded requests
// ---------------------------------------------------------------------------------------------

/// A misbehaviour the fake can play instead of (or before) its normal answer.
#[derive(Clone, Debug)]
pub enum Failure {
    /// The per-minute Hub API limit: 429, documented JSON body, `X-Retry-After` = now +
    /// `retry_in_secs` as a **unix timestamp**, plus `Retry-After: <secs>` when asked (the real
    /// Hub API is only documented to send the former).
    RateLimited {
        retry_in_secs: u64,
        retry_after_header: bool,
    },
    /// The edge's abuse limit: 429 `text/plain` "Too Many Requests (HAP429).", `Retry-After: 60`,
    /// `Connection: close`.
    Abuse429,
    /// Any status with this body; `content-type` is JSON when the body starts with `{` or `[`,
    /// else `text/html` (what a CDN or load balancer sends).
    Status(u16, String),
    /// Waits this long, then answers normally: for client time-outs.
    Hang(Duration),
    /// 200 with the normal page cut in half, correctly framed (the JSON is what is broken).
    Truncated,
    /// 200 with the normal JSON page but `content-type: text/html`.
    WrongContentType,
    /// 200 `application/json` streamed without `content-length`, exactly this many bytes (at
    /// least 64): a `results` entry with an enormous name. For capped reads.
    Huge(usize),
    /// 302 to this URL.
    Redirect(String),
    /// 200 headers and half the normal page, then the connection is dropped mid-body.
    Disconnect,
}

impl Failure {
    /// The documented Hub API 429 with only `X-Retry-After`.
    pub fn rate_limited(retry_in_secs: u64) -> Self {
        Failure::RateLimited {
            retry_in_secs,
            retry_after_header: false,
        }
    }

    /// A generic HTML error page with this status, like a load balancer's 502/503.
    pub fn html(status: u16) -> Self {
        let body = format!(
            "<html>\r\n<head><title>{status} Error</title></head>\r\n<body>\r\n\
             <center><h1>{status} Error</h1></center>\r\n</body>\r\n</html>\r\n"
        );
        Failure::Status(status, body)
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct HubRequest {
    pub method: Method,
    pub path: String,
    /// Raw query string, `""` when there was none.
    pub query: String,
    pub authorization: Option<String>,
    /// Arrival time on tokio's clock (virtual under `tokio::time::pause`), for back-off tests.
    pub at: Instant,
}

impl HubRequest {
    pub fn has_auth(&self) -> bool {
        self.authorization.is_some()
    }

    /// The decoded value of a query parameter (the last one when repeated, as Django reads it).
    pub fn param(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .last()
    }
}

// ---------------------------------------------------------------------------------------------
// The fake server
// ---------------------------------------------------------------------------------------------

/// A running fake Hub on `127.0.0.1:<ephemeral>`. Dropping it aborts the server and all its
/// connections.
pub struct HubFake {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for HubFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// State shared with the handlers. A std `Mutex` because no lock is held across an await and
/// test-side setters are synchronous.
#[derive(Default)]
struct Shared {
    state: Mutex<FakeState>,
    /// Woken on every arrival, for `wait_for_requests`.
    arrived: Notify,
}

struct FakeState {
    repos: HashMap<String, Repo>,
    next_id: u64,
    token: Option<String>,
    /// `POST /v2/auth/token`: (identifier, secret, access token handed out).
    login: Option<(String, String, String)>,
    escape_html: bool,
    rate: RateWindow,
    script: VecDeque<Failure>,
    always: Option<Failure>,
    delay: Duration,
    requests: Vec<HubRequest>,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            repos: HashMap::new(),
            next_id: 1_000_000,
            token: None,
            login: None,
            escape_html: true,
            rate: RateWindow::new(DEFAULT_RATE_LIMIT),
            script: VecDeque::new(),
            always: None,
            delay: Duration::ZERO,
            requests: Vec::new(),
        }
    }
}

struct Repo {
    id: u64,
    private: bool,
    tags: Vec<HubTag>,
}

impl HubFake {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Hub");
        let addr = listener.local_addr().expect("fake Hub address");
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(serve(listener, router(shared.clone())));
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most used (undocumented) listing URL for `namespace/name`, without query.
    pub fn tags_url(&self, repo: &str) -> String {
        format!("{}/v2/repositories/{repo}/tags", self.url())
    }

    /// Creates (or wholly replaces) a public repository, e.g. `"library/nginx"`.
    pub fn add_repo(&self, repo: &str, tags: Vec<HubTag>) {
        let mut state = self.state();
        let id = state.fresh_id();
        let tags = state.assign_ids(&[], tags);
        let repo_entry = Repo {
            id,
            private: false,
            tags,
        };
        state.repos.insert(repo.to_owned(), repo_entry);
    }

    /// Replaces a repository's tags between refreshes (moved, added, deleted tags). Tags that
    /// keep their name keep their id; a missing repository is created.
    pub fn set_tags(&self, repo: &str, tags: Vec<HubTag>) {
        let mut state = self.state();
        let Some(old) = state.repos.remove(repo) else {
            drop(state);
            return self.add_repo(repo, tags);
        };
        let tags = state.assign_ids(&old.tags, tags);
        state.repos.insert(repo.to_owned(), Repo { tags, ..old });
    }

    pub fn remove_repo(&self, repo: &str) {
        self.state().repos.remove(repo);
    }

    /// A private repository answers anonymous and wrong-token callers with the unknown-repo 404.
    pub fn set_private(&self, repo: &str, private: bool) {
        self.with_repo(repo, |r| r.private = private);
    }

    /// Sets the numeric `repository` field its tags carry (ids are otherwise arbitrary).
    pub fn set_repository_id(&self, repo: &str, id: u64) {
        self.with_repo(repo, |r| r.id = id);
    }

    /// Accepts `Authorization: Bearer <token>` (or the older `JWT <token>`) as signed in;
    /// any other `Authorization` gets 401.
    pub fn set_token(&self, token: &str) {
        self.state().token = Some(token.to_owned());
    }

    pub fn clear_token(&self) {
        self.state().token = None;
    }

    /// Enables `POST /v2/auth/token` (latest.yaml "Create an authentication token"): the body
    /// `{"identifier": .., "secret": ..}` matching these gets `200 {"access_token": token}`, and
    /// `token` becomes the accepted bearer token; anything else gets 401.
    pub fn set_login(&self, identifier: &str, secret: &str, token: &str) {
        self.state().login = Some((identifier.into(), secret.into(), token.into()));
    }

    /// Requests allowed per 60-second window (default 180). Every normally answered request
    /// spends one; when none is left the fake answers the documented 429 until the window
    /// resets. Scripted failures do not spend any.
    pub fn set_rate_limit(&self, limit: u32) {
        self.state().rate = RateWindow::new(limit);
    }

    /// Go-style `\u0026` escaping in bodies, on by default as in the real 2023 capture.
    pub fn set_escape_html(&self, on: bool) {
        self.state().escape_html = on;
    }

    /// Delay before every answer (applies to scripted failures too).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// The next `n` requests get `failure`, after any already scripted.
    pub fn fail_next(&self, n: usize, failure: Failure) {
        let mut state = self.state();
        state.script.extend(std::iter::repeat_n(failure, n));
    }

    /// Every request gets `failure` (after the scripted ones) until `clear_failures`.
    pub fn fail_always(&self, failure: Failure) {
        self.state().always = Some(failure);
    }

    pub fn clear_failures(&self) {
        let mut state = self.state();
        state.script.clear();
        state.always = None;
    }

    /// Every request received since the start or the last `reset_counts`, oldest first.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.state().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state().requests.len()
    }

    pub fn reset_counts(&self) {
        self.state().requests.clear();
    }

    /// Waits until at least `n` requests have arrived; `false` if `timeout` passed first.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.count() >= n;
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.shared.state()
    }

    fn with_repo(&self, repo: &str, change: impl FnOnce(&mut Repo)) {
        let mut state = self.state();
        let entry = state.repos.get_mut(repo);
        change(entry.unwrap_or_else(|| panic!("fake Hub has no repository {repo:?}")));
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an arrival and decides how to answer it.
    fn arrive(&self, request: HubRequest) -> (Duration, Option<Failure>) {
        let mut state = self.state();
        state.requests.push(request);
        let failure = state.script.pop_front().or_else(|| state.always.clone());
        let delay = state.delay;
        drop(state);
        self.arrived.notify_waiters();
        (delay, failure)
    }
}

impl FakeState {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Gives every tag without an id the id its name had before, or a new one.
    fn assign_ids(&mut self, old: &[HubTag], mut tags: Vec<HubTag>) -> Vec<HubTag> {
        for tag in tags.iter_mut().filter(|t| t.id.is_none()) {
            let previous = old.iter().find(|o| o.name == tag.name).and_then(|o| o.id);
            tag.id = Some(previous.unwrap_or_else(|| self.fresh_id()));
        }
        tags
    }
}

/// The Hub API's per-minute counter, behind the `X-RateLimit-*` headers.
struct RateWindow {
    limit: u32,
    remaining: u32,
    /// Unix seconds at which the window restarts; 0 before the first request.
    reset: u64,
}

#[derive(Clone, Copy)]
struct RateHeaders {
    limit: u32,
    remaining: u32,
    reset: u64,
}

impl RateWindow {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            remaining: limit,
            reset: 0,
        }
    }

    /// Spends one request; `Err` when the window was already empty.
    fn take(&mut self) -> Result<RateHeaders, RateHeaders> {
        let now = unix_now();
        if now >= self.reset {
            self.remaining = self.limit;
            self.reset = now + RATE_WINDOW_SECS;
        }
        let allowed = self.remaining > 0;
        self.remaining = self.remaining.saturating_sub(1);
        let headers = RateHeaders {
            limit: self.limit,
            remaining: self.remaining,
            reset: self.reset,
        };
        if allowed { Ok(headers) } else { Err(headers) }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

/// Both listing paths, each with and without the trailing slash (which `next` echoes).
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v2/namespaces/{ns}/repositories/{repo}/tags",
            get(list_tags),
        )
        .route(
            "/v2/namespaces/{ns}/repositories/{repo}/tags/",
            get(list_tags),
        )
        .route("/v2/repositories/{ns}/{repo}/tags", get(list_tags))
        .route("/v2/repositories/{ns}/{repo}/tags/", get(list_tags))
        .route("/v2/auth/token", axum::routing::post(login))
        .with_state(shared)
}

/// An accept loop that owns its connections, so that aborting this task cuts them all at once.
/// (`axum::serve` detaches them and lets in-flight requests, such as a `Hang`, finish after the
/// fake is dropped.)
async fn serve(listener: TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_connection(stream, app.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, app: Router) {
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper_util::service::TowerToHyperService::new(app);
    // A connection error (client gone, `Disconnect`) only ends that connection.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

/// What a listing request asked for, reduced to what the answer depends on.
struct Call {
    repo: String,
    namespace: String,
    repository: String,
    host: String,
    path: String,
    params: BTreeMap<String, Vec<String>>,
    authorization: Option<String>,
}

/// `POST /v2/auth/token`: the Hub API login. Recorded like every request (path `/v2/auth/token`).
async fn login(State(shared): State<Arc<Shared>>, uri: Uri, body: Bytes) -> Response {
    let request = HubRequest {
        method: Method::POST,
        path: uri.path().to_owned(),
        query: String::new(),
        authorization: None,
        at: Instant::now(),
    };
    let _ = shared.arrive(request);
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut state = shared.state();
    let Some((id, secret, token)) = state.login.clone() else {
        return (StatusCode::NOT_FOUND, "login not enabled in this fake").into_response();
    };
    if sent["identifier"] == id.as_str() && sent["secret"] == secret.as_str() {
        state.token = Some(token.clone());
        let body = serde_json::json!({ "access_token": token });
        return (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let body = r#"{"detail":"Incorrect authentication credentials"}"#;
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn list_tags(
    State(shared): State<Arc<Shared>>,
    Path((namespace, repository)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let call = Call::new(namespace, repository, &uri, &headers);
    let request = HubRequest {
        method,
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        authorization: call.authorization.clone(),
        at: Instant::now(),
    };
    let (delay, failure) = shared.arrive(request);
    tokio::time::sleep(delay).await;
    match failure {
        None => shared.state().answer(&call).into_response(),
        Some(Failure::Hang(wait)) => {
            tokio::time::sleep(wait).await;
            shared.state().answer(&call).into_response()
        }
        Some(failure) => failure.respond(&mut shared.state(), &call),
    }
}

impl Call {
    fn new(namespace: String, repository: String, uri: &Uri, headers: &HeaderMap) -> Self {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let mut params = BTreeMap::<String, Vec<String>>::new();
        for (key, value) in url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        {
            params
                .entry(key.into_owned())
                .or_default()
                .push(value.into_owned());
        }
        Self {
            repo: format!("{namespace}/{repository}"),
            namespace,
            repository,
            host: text(header::HOST).unwrap_or("127.0.0.1").to_owned(),
            path: uri.path().to_owned(),
            params,
            authorization: text(header::AUTHORIZATION).map(str::to_owned),
        }
    }

    /// Django's `QueryDict.get`: the last value of a repeated key.
    fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key)?.last().map(String::as_str)
    }

    /// The same URL on the same host with `page` replaced, parameters sorted by key, as DRF's
    /// `replace_query_param` writes it; DRF drops `page` altogether for page 1.
    fn link(&self, page: usize) -> String {
        let mut params = self.params.clone();
        if page == 1 {
            params.remove("page");
        } else {
            params.insert("page".to_owned(), vec![page.to_string()]);
        }
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (key, values) in &params {
            for value in values {
                query.append_pair(key, value);
            }
        }
        let query = query.finish();
        let separator = if query.is_empty() { "" } else { "?" };
        format!("http://{}{}{separator}{query}", self.host, self.path)
    }
}

/// A normal (non-scripted) answer.
struct Reply {
    status: StatusCode,
    body: String,
    rate: Option<RateHeaders>,
}

impl Reply {
    fn json(status: StatusCode, body: String) -> Self {
        Self {
            status,
            body,
            rate: None,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(rate) = self.rate {
            rate.apply(headers);
        }
        response
    }
}

impl RateHeaders {
    fn apply(self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", self.limit.into());
        headers.insert("x-ratelimit-remaining", self.remaining.into());
        headers.insert("x-ratelimit-reset", self.reset.into());
    }
}

/// How the caller identified itself.
#[derive(PartialEq)]
enum Caller {
    Anonymous,
    SignedIn,
}

/// `ordering=` values; anything else falls back to the default, as DRF ignores unknown fields.
enum SortOrder {
    NewestFirst,
    OldestFirst,
    Name,
}

/// The paging part of a request, with the Hub's defaults and clamp applied.
struct PageQuery {
    page: usize,
    page_size: usize,
    ordering: SortOrder,
    name: Option<String>,
}

impl PageQuery {
    /// `None` for a page that is not a positive integer (answered like a page past the end).
    fn parse(call: &Call) -> Option<Self> {
        let page = call.param("page").map_or(Some(1), |p| p.parse().ok())?;
        let page_size = call
            .param("page_size")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&s| s > 0)
            .map_or(DEFAULT_PAGE_SIZE, |s| s.min(MAX_PAGE_SIZE));
        let ordering = match call.param("ordering") {
            Some("-last_updated") => SortOrder::OldestFirst,
            Some("name") => SortOrder::Name,
            _ => SortOrder::NewestFirst,
        };
        let name = call.param("name").map(str::to_lowercase);
        (page >= 1).then_some(Self {
            page,
            page_size,
            ordering,
            name,
        })
    }

    fn offset(&self) -> usize {
        (self.page - 1).saturating_mul(self.page_size)
    }

    /// Filters (case-insensitive substring; case handling unverified) and sorts. Tags without
    /// `last_updated` count as oldest.
    fn select<'a>(&self, tags: &'a [HubTag]) -> Vec<&'a HubTag> {
        let wanted = |t: &&HubTag| {
            self.name
                .as_ref()
                .is_none_or(|n| t.name.to_lowercase().contains(n))
        };
        let mut selected: Vec<&HubTag> = tags.iter().filter(wanted).collect();
        match self.ordering {
            SortOrder::NewestFirst => selected.sort_by_key(|t| Reverse(t.last_updated)),
            SortOrder::OldestFirst => selected.sort_by_key(|t| t.last_updated),
            SortOrder::Name => selected.sort_by(|a, b| a.name.cmp(&b.name)),
        }
        selected
    }
}

impl FakeState {
    /// The real answer: spends the rate limit, then lists the page or explains why not.
    fn answer(&mut self, call: &Call) -> Reply {
        let rate = match self.rate.take() {
            Ok(rate) => rate,
            Err(rate) => return rate_limited_reply(rate),
        };
        let mut reply = self.page(call).unwrap_or_else(|error| error);
        reply.rate = Some(rate);
        reply
    }

    /// Checks in the order the Hub presumably does: credentials, repository, offset cap, page.
    fn page(&self, call: &Call) -> Result<Reply, Reply> {
        let caller = self.caller(call)?;
        let repo = self
            .repos
            .get(&call.repo)
            .filter(|r| !r.private || caller == Caller::SignedIn)
            .ok_or_else(|| unknown_repo(call))?;
        let query = PageQuery::parse(call).ok_or_else(past_end)?;
        if caller == Caller::Anonymous && query.offset() >= ANONYMOUS_OFFSET_CAP {
            return Err(Reply::json(
                StatusCode::FORBIDDEN,
                OFFSET_CAP_BODY.to_owned(),
            ));
        }
        let tags = query.select(&repo.tags);
        if query.page > 1 && query.offset() >= tags.len() {
            return Err(past_end());
        }
        Ok(Reply::json(
            StatusCode::OK,
            self.page_body(call, &query, &tags, repo.id),
        ))
    }

    fn caller(&self, call: &Call) -> Result<Caller, Reply> {
        let Some(authorization) = &call.authorization else {
            return Ok(Caller::Anonymous);
        };
        let presented = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("JWT "));
        match (presented, &self.token) {
            (Some(presented), Some(token)) if presented == token => Ok(Caller::SignedIn),
            _ => Err(Reply::json(
                StatusCode::UNAUTHORIZED,
                BAD_TOKEN_BODY.to_owned(),
            )),
        }
    }

    fn page_body(&self, call: &Call, query: &PageQuery, tags: &[&HubTag], repo_id: u64) -> String {
        let start = query.offset().min(tags.len());
        let end = start.saturating_add(query.page_size).min(tags.len());
        let page = WirePage {
            count: tags.len(),
            next: (end < tags.len()).then(|| call.link(query.page + 1)),
            previous: (query.page > 1).then(|| call.link(query.page - 1)),
            results: tags[start..end].iter().map(|t| t.wire(repo_id)).collect(),
        };
        let json = serde_json::to_string(&page).expect("page serializes");
        if self.escape_html {
            go_escape(json)
        } else {
            json
        }
    }
}

fn unknown_repo(call: &Call) -> Reply {
    let body = error_body(
        NOT_FOUND_MESSAGE,
        Some(&call.namespace),
        Some(&call.repository),
    );
    Reply::json(StatusCode::NOT_FOUND, body)
}

fn past_end() -> Reply {
    Reply::json(StatusCode::NOT_FOUND, PAST_END_BODY.to_owned())
}

fn rate_limited_reply(rate: RateHeaders) -> Reply {
    Reply {
        status: StatusCode::TOO_MANY_REQUESTS,
        body: RATE_LIMIT_BODY.to_owned(),
        rate: Some(rate),
    }
}

impl Failure {
    /// Plays this failure; the variants that distort the real answer ask `state` for it.
    fn respond(self, state: &mut FakeState, call: &Call) -> Response {
        match self {
            Failure::RateLimited {
                retry_in_secs,
                retry_after_header,
            } => rate_limited(state.rate.limit, retry_in_secs, retry_after_header),
            Failure::Abuse429 => abuse_429(),
            Failure::Status(status, body) => status_page(status, body),
            Failure::Hang(_) => state.answer(call).into_response(),
            Failure::Truncated => json_200(
                Body::from(first_half(state.answer(call).body)),
                "application/json",
            ),
            Failure::WrongContentType => json_200(Body::from(state.answer(call).body), "text/html"),
            Failure::Huge(bytes) => json_200(huge_body(bytes), "application/json"),
            Failure::Redirect(location) => redirect(&location),
            Failure::Disconnect => {
                json_200(broken_body(state.answer(call).body), "application/json")
            }
        }
    }
}

fn rate_limited(limit: u32, retry_in_secs: u64, retry_after_header: bool) -> Response {
    let at = unix_now() + retry_in_secs;
    let mut response = rate_limited_reply(RateHeaders {
        limit,
        remaining: 0,
        reset: at,
    })
    .into_response();
    let headers = response.headers_mut();
    headers.insert("x-retry-after", at.into());
    if retry_after_header {
        headers.insert(header::RETRY_AFTER, retry_in_secs.into());
    }
    response
}

fn abuse_429() -> Response {
    let headers = [
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONNECTION, "close"),
        (header::CONTENT_TYPE, "text/plain"),
        (header::RETRY_AFTER, "60"),
    ];
    (StatusCode::TOO_MANY_REQUESTS, headers, ABUSE_BODY).into_response()
}

fn status_page(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).expect("valid status code");
    let content_type = if body.trim_start().starts_with(['{', '[']) {
        "application/json"
    } else {
        "text/html"
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn json_200(body: Body, content_type: &'static str) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn redirect(location: &str) -> Response {
    let location = HeaderValue::from_str(location).expect("redirect location is a header value");
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

/// Exactly `total` bytes of syntactically plausible JSON, produced 64 KiB at a time so that the
/// fake never holds it in memory.
fn huge_body(total: usize) -> Body {
    const CHUNK: usize = 64 * 1024;
    let head = r#"{"count":1,"next":null,"previous":null,"results":[{"name":""#;
    let tail = r#""}]}"#;
    let filler = total.saturating_sub(head.len() + tail.len());
    let chunks = (0..filler.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(filler - i * CHUNK);
        Bytes::from(vec![b'a'; len])
    });
    let parts = std::iter::once(Bytes::from_static(head.as_bytes()))
        .chain(chunks)
        .chain(std::iter::once(Bytes::from_static(tail.as_bytes())));
    Body::from_stream(stream::iter(parts.map(Ok::<_, Infallible>)))
}

/// The first half of `body`'s bytes (a byte cut: the point is to break the document).
fn first_half(body: String) -> Vec<u8> {
    let mut bytes = body.into_bytes();
    bytes.truncate(bytes.len() / 2);
    bytes
}

/// Half of `body`, then (after a pause that lets hyper flush the headers and that half, so the
/// client sees a 200 first) a stream error, which makes hyper drop the connection.
fn broken_body(body: String) -> Body {
    let half = stream::once(async move { Ok(Bytes::from(first_half(body))) });
    let drop = stream::once(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err(std::io::Error::other("fake Hub drops the connection"))
    });
    Body::from_stream(half.chain(drop))
}
