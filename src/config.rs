//! Configuration: flags and environment variables (`clap`), validated into [`Settings`].
//!
//! Every flag can also be given as a `TAG_PROXY_*` environment variable, which is how a
//! container is usually configured. `Cli` holds the raw values; `Settings` the checked ones,
//! and code past start-up only ever sees `Settings`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use url::Url;

/// The registries a caller may name when the operator does not say otherwise.
pub const DEFAULT_ALLOWED_REGISTRIES: &[&str] = &[
    "ghcr.io",
    "quay.io",
    "registry.gitlab.com",
    "public.ecr.aws",
    "gcr.io",
    "mcr.microsoft.com",
    "registry.k8s.io",
    "docker.elastic.co",
    "nvcr.io",
    "lscr.io",
    "codeberg.org",
];

/// Answers which tags a container image has, from a cache that refreshes in the background.
#[derive(Parser, Clone)]
#[command(
    version,
    about,
    after_help = "Subcommand: `oci-tag-proxy healthcheck [URL]` asks a running service for /healthz (default: the port from TAG_PROXY_PORT or TAG_PROXY_LISTEN, else 8080) and exits 0 when it answers 200, else 1: a container health check without a shell or curl."
)]
pub struct Cli {
    /// Port to listen on.
    #[arg(long, env = "TAG_PROXY_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "TAG_PROXY_LISTEN", default_value = "0.0.0.0")]
    pub listen: IpAddr,

    /// Directory of the on-disk cache (an embedded redb database).
    #[arg(long, env = "TAG_PROXY_DIR", default_value = "./tag_cache")]
    pub dir: PathBuf,

    /// At most this many tags (most recently updated first) are kept per image.
    #[arg(long, env = "TAG_PROXY_MAX_TAGS", default_value_t = 1000)]
    pub max_tags: usize,

    /// Docker Hub JWT, sent to the Hub API (lifts the anonymous 1,000-tag paging cap).
    #[arg(long, env = "TAG_PROXY_JWT", hide_env_values = true)]
    pub jwt: Option<String>,

    /// How old a cached answer may get before it is refreshed in the background
    /// (`30m`, `1h`, `24h`, `7d`).
    #[arg(long, env = "TAG_PROXY_REFRESH_INTERVAL", default_value = "24h", value_parser = parse_duration)]
    pub refresh_interval: Duration,

    /// Docker Hub refreshes stop at the first unchanged page; the whole tag list is walked
    /// again (so deleted tags disappear) once the last whole walk is older than this.
    #[arg(long, env = "TAG_PROXY_FULL_REFRESH_INTERVAL", default_value = "24h", value_parser = parse_duration)]
    pub full_refresh_interval: Duration,

    /// Registry hosts that callers may name, comma-separated (replaces the default list).
    /// `docker` and `ghcr` are always allowed.
    #[arg(long, env = "TAG_PROXY_ALLOWED_REGISTRIES", value_delimiter = ',')]
    pub allowed_registries: Option<Vec<String>>,

    /// Allow upstream requests, redirects and links to loopback, link-local and private
    /// addresses (off by default, so the proxy cannot be used to reach internal services).
    #[arg(long, env = "TAG_PROXY_ALLOW_PRIVATE_NETWORKS")]
    pub allow_private_networks: bool,

    /// Endpoint override, `NAME=URL`, repeatable or comma-separated: `docker=URL` replaces the
    /// Hub API base (https://hub.docker.com), `HOST=URL` the base URL of a registry (mirrors, tests).
    #[arg(
        long = "registry-endpoint",
        env = "TAG_PROXY_REGISTRY_ENDPOINTS",
        value_delimiter = ','
    )]
    pub registry_endpoints: Vec<String>,

    /// Credentials for a registry, `HOST=USER:PASSWORD`, repeatable or comma-separated.
    #[arg(
        long = "credentials",
        env = "TAG_PROXY_CREDENTIALS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub credentials: Vec<String>,

    /// A Docker `config.json` whose `auths` entries (`auth`, `username`/`password`,
    /// `identitytoken`) give registry credentials; `--credentials` wins for the same host.
    /// Default: `$DOCKER_CONFIG/config.json` when `DOCKER_CONFIG` is set.
    #[arg(long, env = "TAG_PROXY_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,

    /// Docker Hub username; with `--docker-hub-token`, the proxy logs in to the Hub API
    /// (and renews the login when it expires) instead of needing a `--jwt`.
    #[arg(long, env = "TAG_PROXY_DOCKER_HUB_USERNAME")]
    pub docker_hub_username: Option<String>,

    /// Docker Hub personal access token (or password) for `--docker-hub-username`.
    #[arg(long, env = "TAG_PROXY_DOCKER_HUB_TOKEN", hide_env_values = true)]
    pub docker_hub_token: Option<String>,

    /// Most upstream requests in flight at once per registry host.
    #[arg(long, env = "TAG_PROXY_UPSTREAM_CONCURRENCY", default_value_t = 8)]
    pub upstream_concurrency: usize,

    /// Retries of a transient upstream failure (connection error, time-out, 5xx), with
    /// jittered exponential back-off. 4xx other than 401/429 are never retried.
    #[arg(long, env = "TAG_PROXY_UPSTREAM_RETRIES", default_value_t = 2)]
    pub upstream_retries: u32,

    /// Most upstream requests per second per registry host (0: no cap).
    #[arg(long, env = "TAG_PROXY_UPSTREAM_RATE_LIMIT", default_value_t = 0)]
    pub upstream_rate_limit: u32,

    /// Failed requests in a row (after retries) that open a host's circuit breaker.
    #[arg(long, env = "TAG_PROXY_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,

    /// How long an open breaker refuses requests before letting one trial through.
    #[arg(long, env = "TAG_PROXY_BREAKER_COOLDOWN", default_value = "30s", value_parser = parse_duration)]
    pub breaker_cooldown: Duration,

    /// Time allowed for one upstream request, body included (`10s`, `1m`).
    #[arg(long, env = "TAG_PROXY_UPSTREAM_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Largest upstream body read, in bytes (tag pages, manifests, configs).
    #[arg(long, env = "TAG_PROXY_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most tag-list pages walked per image before the answer is marked truncated.
    #[arg(long, env = "TAG_PROXY_MAX_PAGES", default_value_t = 200)]
    pub max_pages: usize,

    /// Page size asked of OCI registries (`n`); a registry that refuses it is asked again smaller.
    #[arg(long, env = "TAG_PROXY_PAGE_SIZE", default_value_t = 1000)]
    pub page_size: usize,

    /// Most tags of one OCI image whose manifests are looked at. When a repository has more,
    /// the last ones in listing order are used and the answer is marked truncated.
    #[arg(long, env = "TAG_PROXY_MAX_SCAN_TAGS", default_value_t = 5000)]
    pub max_scan_tags: usize,

    /// Keep cosign artifact tags (`sha256-<hex>.sig`, `.att`, `.sbom`) in answers.
    #[arg(long, env = "TAG_PROXY_INCLUDE_ARTIFACT_TAGS")]
    pub include_artifact_tags: bool,

    /// Redis (or Valkey) URL, e.g. `redis://127.0.0.1:6379/0`: the tier that several replicas
    /// share. Without it the embedded store is the only persistent tier.
    #[arg(long, env = "TAG_PROXY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// How long an image's cluster-wide refresh lock lives without renewal (it is renewed
    /// while the refresh runs; a replica that dies frees it after this long).
    #[arg(long, env = "TAG_PROXY_REDIS_LOCK_TTL", default_value = "30s", value_parser = parse_duration)]
    pub redis_lock_ttl: Duration,

    /// Most images kept in the in-memory tier.
    #[arg(long, env = "TAG_PROXY_MEMORY_ENTRIES", default_value_t = 10_000)]
    pub memory_entries: u64,
}

/// `30m`, `1h`, `24h`, `7d`, `90s`, and combinations such as `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// A username and password (or access token) for one registry, or an OAuth2 identity token
/// (Docker's `identitytoken`, exchanged at the registry's token server).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub identity_token: Option<String>,
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
            identity_token: None,
        }
    }

    /// A short, one-way fingerprint: cache entries fetched with these credentials are kept
    /// apart from others, and the fingerprint reveals nothing usable.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"oci-tag-proxy credentials v1\0");
        h.update(self.username.as_bytes());
        h.update(b"\0");
        h.update(self.password.as_bytes());
        h.update(b"\0");
        h.update(self.identity_token.as_deref().unwrap_or("").as_bytes());
        hex::encode(&h.finalize()[..8])
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Validated configuration, built once at start-up.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub max_tags: usize,
    pub docker_hub_jwt: Option<String>,
    /// Docker Hub login for the Hub API (username and access token).
    pub docker_hub_login: Option<Credentials>,
    pub refresh_interval: Duration,
    pub full_refresh_interval: Duration,
    pub allowed_registries: Vec<String>,
    pub allow_private_networks: bool,
    /// The Hub API base URL.
    pub docker_hub_api: Url,
    /// Base URLs of registries by host; a host not listed is `https://<host>`.
    pub registry_endpoints: HashMap<String, Url>,
    pub credentials: HashMap<String, Credentials>,
    pub upstream_concurrency: usize,
    pub upstream_retries: u32,
    /// Requests per second per host; `None`: no cap.
    pub upstream_rate_limit: Option<u32>,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_pages: usize,
    pub page_size: usize,
    pub max_scan_tags: usize,
    pub include_artifact_tags: bool,
    pub memory_entries: u64,
    pub redis_url: Option<String>,
    pub redis_lock_ttl: Duration,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("dir", &self.dir)
            .field("max_tags", &self.max_tags)
            .field(
                "docker_hub_jwt",
                &self.docker_hub_jwt.as_ref().map(|_| "<redacted>"),
            )
            .field("refresh_interval", &self.refresh_interval)
            .field("allowed_registries", &self.allowed_registries)
            .field("allow_private_networks", &self.allow_private_networks)
            .field("docker_hub_api", &self.docker_hub_api.as_str())
            .field("registry_endpoints", &self.registry_endpoints)
            .field("credentials", &self.credentials)
            .field("upstream_concurrency", &self.upstream_concurrency)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A configuration value that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl TryFrom<Cli> for Settings {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Settings, ConfigError> {
        let err = |m: String| ConfigError(m);
        if cli.max_tags == 0 || cli.upstream_concurrency == 0 || cli.page_size == 0 {
            return Err(err(
                "--max-tags, --upstream-concurrency and --page-size must be at least 1".into(),
            ));
        }
        if cli.max_pages == 0 || cli.max_scan_tags == 0 || cli.max_body_bytes < 1024 {
            return Err(err(
                "--max-pages and --max-scan-tags must be at least 1, --max-body-bytes at least 1024"
                    .into(),
            ));
        }
        let (docker_hub_api, registry_endpoints) = parse_endpoints(&cli.registry_endpoints)?;
        let mut credentials = match docker_config_path(cli.docker_config.as_deref()) {
            Some(path) => crate::credentials::read_docker_config(&path)?,
            None => HashMap::new(),
        };
        credentials.extend(parse_credentials(&cli.credentials)?);
        let docker_hub_login = match (cli.docker_hub_username, cli.docker_hub_token) {
            (Some(u), Some(t)) if !u.is_empty() && !t.is_empty() => Some(Credentials::new(&u, &t)),
            (None, None) => credentials.remove(crate::credentials::DOCKER_HUB),
            _ => {
                return Err(err(
                    "--docker-hub-username and --docker-hub-token go together".into(),
                ));
            }
        };
        let allowed_registries = match cli.allowed_registries {
            Some(list) => list.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
            None => DEFAULT_ALLOWED_REGISTRIES
                .iter()
                .map(|h| h.to_string())
                .collect(),
        };
        Ok(Settings {
            listen: SocketAddr::new(cli.listen, cli.port),
            dir: cli.dir,
            max_tags: cli.max_tags,
            docker_hub_jwt: cli.jwt.filter(|j| !j.is_empty()),
            docker_hub_login,
            refresh_interval: cli.refresh_interval,
            full_refresh_interval: cli.full_refresh_interval,
            allowed_registries,
            allow_private_networks: cli.allow_private_networks,
            docker_hub_api,
            registry_endpoints,
            credentials,
            upstream_concurrency: cli.upstream_concurrency,
            upstream_retries: cli.upstream_retries,
            upstream_rate_limit: (cli.upstream_rate_limit > 0).then_some(cli.upstream_rate_limit),
            breaker_threshold: cli.breaker_threshold.max(1),
            breaker_cooldown: cli.breaker_cooldown,
            upstream_timeout: cli.upstream_timeout,
            max_body_bytes: cli.max_body_bytes,
            max_pages: cli.max_pages,
            page_size: cli.page_size,
            max_scan_tags: cli.max_scan_tags,
            include_artifact_tags: cli.include_artifact_tags,
            memory_entries: cli.memory_entries,
            redis_url: cli.redis_url.filter(|u| !u.is_empty()),
            redis_lock_ttl: cli.redis_lock_ttl,
        })
    }
}

fn parse_endpoints(raw: &[String]) -> Result<(Url, HashMap<String, Url>), ConfigError> {
    let mut hub = Url::parse("https://hub.docker.com").expect("static URL");
    let mut map = HashMap::new();
    for entry in raw.iter().filter(|e| !e.trim().is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("registry endpoint {entry:?} is not NAME=URL")))?;
        let url = Url::parse(url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| ConfigError(format!("registry endpoint {entry:?}: bad URL")))?;
        match name.trim().to_ascii_lowercase().as_str() {
            "docker" | "docker.io" | "hub.docker.com" => hub = url,
            "ghcr" => {
                map.insert("ghcr.io".to_owned(), url);
            }
            host => {
                map.insert(host.to_owned(), url);
            }
        }
    }
    Ok((hub, map))
}

/// The Docker config file to read: the flag, else `$DOCKER_CONFIG/config.json` if set.
fn docker_config_path(flag: Option<&std::path::Path>) -> Option<PathBuf> {
    flag.map(PathBuf::from)
        .or_else(|| std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")))
}

fn parse_credentials(raw: &[String]) -> Result<HashMap<String, Credentials>, ConfigError> {
    let mut map = HashMap::new();
    for entry in raw.iter().filter(|e| !e.trim().is_empty()) {
        // Never echo the entry: it holds a secret.
        let bad = || ConfigError("a --credentials entry is not HOST=USER:PASSWORD".into());
        let (host, secret) = entry.split_once('=').ok_or_else(bad)?;
        let (username, password) = secret.split_once(':').ok_or_else(bad)?;
        let host = crate::credentials::normalize_host(host);
        map.insert(host, Credentials::new(username, password));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["oci-tag-proxy"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    #[test]
    fn reference_defaults() {
        let s = Settings::try_from(cli(&[])).unwrap();
        assert_eq!(s.listen.port(), 8080);
        assert_eq!(s.dir, PathBuf::from("./tag_cache"));
        assert_eq!(s.max_tags, 1000);
        assert_eq!(s.refresh_interval, Duration::from_secs(24 * 3600));
        assert!(s.allowed_registries.contains(&"quay.io".to_owned()));
        assert_eq!(s.docker_hub_api.as_str(), "https://hub.docker.com/");
    }

    #[test]
    fn durations_in_reference_forms() {
        for (s, secs) in [("1h", 3600), ("30m", 1800), ("7d", 7 * 86400), ("90s", 90)] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_secs(secs));
        }
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn endpoints_and_credentials() {
        let s = Settings::try_from(cli(&[
            "--registry-endpoint",
            "docker=http://127.0.0.1:9,ghcr=http://127.0.0.1:10",
            "--credentials",
            "127.0.0.1:5000=alice:s3cr:et",
        ]))
        .unwrap();
        assert_eq!(s.docker_hub_api.as_str(), "http://127.0.0.1:9/");
        assert_eq!(
            s.registry_endpoints["ghcr.io"].as_str(),
            "http://127.0.0.1:10/"
        );
        assert_eq!(s.credentials["127.0.0.1:5000"].password, "s3cr:et");
        let debug = format!("{s:?}");
        assert!(!debug.contains("s3cr"), "Debug must redact: {debug}");
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |args: &[&str]| Settings::try_from(cli(args)).is_err();
        assert!(bad(&["--max-tags", "0"]));
        assert!(bad(&["--registry-endpoint", "ghcr"]));
        assert!(bad(&["--registry-endpoint", "ghcr=ftp://x"]));
        assert!(bad(&["--credentials", "host-without-secret"]));
        let e = Settings::try_from(cli(&["--credentials", "h=nocolon"]))
            .err()
            .unwrap();
        assert!(!e.to_string().contains("nocolon"));
    }
}
