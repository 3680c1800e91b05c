//! A real OCI registry for the integration tests: Debian's `docker-registry` (CNCF distribution
//! 2.8), started per test with the auth modes real upstreams use, a [`Pusher`] that writes images
//! through the registry's HTTP API, and a [`CountingProxy`] that counts and disturbs the traffic
//! between the app and the registry.
//!
//! Behaviour of distribution 2.8.2 that tests must know (each checked in `selftest_registry`):
//! - `tags/list` ignores `n` and `last`, never sends `Link`, lists tags in storage order (not
//!   lexical) and answers `"tags": null` once every tag of a repository is deleted. Spec
//!   pagination is emulated by [`CountingProxy::paginate_tags`].
//! - Manifests are only served when `Accept` names their type: an OCI index/manifest without the
//!   OCI type is `404 MANIFEST_UNKNOWN` ("OCI index found, but accept header does not support OCI
//!   indexes"); a Docker manifest list or v2 manifest without its type is `400 MANIFEST_INVALID`
//!   (the schema1 down-conversion fails).
//! - `DELETE /v2/<name>/manifests/<digest>` (202) also removes every tag pointing at the digest;
//!   deleting by tag is refused (400).
//! - Token auth: RS256 JWTs whose `x5c` header carries a certificate found in `rootcertbundle`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures_util::{FutureExt, StreamExt, stream};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Media types and digests
// ---------------------------------------------------------------------------------------------

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// Every manifest type the harness pushes; 2.8 only serves a manifest whose type is accepted.
pub const ALL_MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";
const SLSA_PROVENANCE_V02: &str = "https://slsa.dev/provenance/v0.2";

/// `sha256:<hex>` of exactly these bytes: the digest a registry gives the content.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut hex_out = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(bytes), &mut hex_out).expect("32 bytes fit 64 hex chars");
    format!(
        "sha256:{}",
        std::str::from_utf8(&hex_out).expect("hex is ASCII")
    )
}

// ---------------------------------------------------------------------------------------------
// Small shared helpers
// ---------------------------------------------------------------------------------------------

/// A client that never uses an environment proxy (traffic must stay on loopback) and never
/// follows redirects (the tests look at them).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

async fn bind_loopback() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

fn spawn_server(listener: TcpListener, router: Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("test HTTP server failed");
    })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("system randomness");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn query_param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// The `(user, password)` of a `Basic` Authorization header, if there is a well-formed one.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Serializes with a given indentation: buildkit writes 2 spaces, Docker 3; registries keep
/// whatever bytes they get, so this only makes the fixtures look like the real thing.
fn pretty_json(value: &Value, indent: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(indent);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut serializer).expect("serialize JSON");
    out
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(bytes), "size": bytes.len() })
}

/// Reads a response and panics with its body when the status is not the expected one: the
/// harness must fail loudly at the step that went wrong, not later.
async fn expect_status(
    response: reqwest::Result<reqwest::Response>,
    want: u16,
    what: &str,
) -> (HeaderMap, Bytes) {
    let response = response.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{what}: body: {e}"));
    let text = String::from_utf8_lossy(&body);
    assert_eq!(
        status.as_u16(),
        want,
        "{what}: unexpected status; body: {text}"
    );
    (headers, body)
}

// ---------------------------------------------------------------------------------------------
// Registry process
// ---------------------------------------------------------------------------------------------

const REGISTRY_BINARY: &str = "docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// A freshly picked free port can be taken before the registry binds it; then try another.
const START_ATTEMPTS: usize = 3;
/// Account the [`Pusher`] uses, so that its token requests are not counted as the app's.
const PUSHER_USER: &str = "harness-pusher";
/// `service` of the token mode (the JWT `aud`).
pub const TOKEN_SERVICE: &str = "oci-tag-proxy-test-registry";
/// `issuer` of the token mode (the JWT `iss`).
pub const TOKEN_ISSUER: &str = "oci-tag-proxy-test-token-issuer";
/// Path of the token endpoint on the token server (and on a [`CountingProxy`] that routes it).
pub const TOKEN_PATH: &str = "/token";

/// How the registry authenticates clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Anonymous pull and push.
    None,
    /// HTTP Basic against a bcrypt htpasswd file (`WWW-Authenticate: Basic realm=...`).
    Htpasswd { user: String, password: String },
    /// Docker token auth: `WWW-Authenticate: Bearer realm=...`, JWTs from a [`TokenServer`].
    Token { user: String, password: String },
}

impl RegistryAuth {
    pub fn htpasswd(user: &str, password: &str) -> Self {
        Self::Htpasswd {
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn token(user: &str, password: &str) -> Self {
        Self::Token {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The user's credentials, if this mode has any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match self {
            Self::None => None,
            Self::Htpasswd { user, password } | Self::Token { user, password } => {
                Some((user, password))
            }
        }
    }
}

/// A running `docker-registry serve` on `127.0.0.1:<free port>` with filesystem storage in a
/// temporary directory (on `/dev/shm` when there is one). Dropping it kills the process (by its
/// PID) and removes the storage.
pub struct Registry {
    child: Child,
    port: u16,
    auth: RegistryAuth,
    token_server: Option<TokenServer>,
    pusher: Pusher,
    // Declared last: removed only after the process is gone.
    dir: TempDir,
}

impl Registry {
    /// Starts the registry and waits (at most 15 s) until `/v2/` answers.
    /// Needs a tokio runtime with real time (the token server runs on it).
    pub async fn start(auth: RegistryAuth) -> Registry {
        let binary = find_registry_binary();
        let dir = storage_tempdir();
        let pusher_password = random_hex(16);
        let token_server = match &auth {
            RegistryAuth::Token { user, password } => {
                Some(TokenServer::start(user, password, &pusher_password).await)
            }
            _ => None,
        };
        let auth_yaml = auth_config(dir.path(), &auth, &pusher_password, token_server.as_ref());
        let (child, port) = launch(&binary, dir.path(), &auth_yaml).await;
        let pusher_auth = PusherAuth::for_mode(&auth, &pusher_password, token_server.as_ref());
        let pusher = Pusher::new(&format!("http://127.0.0.1:{port}"), pusher_auth);
        Registry {
            child,
            port,
            auth,
            token_server,
            pusher,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, as it appears in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// The test user's credentials (not the pusher's), if the mode has any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.credentials()
    }

    /// The token server in [`RegistryAuth::Token`] mode.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Token requests made by anyone but the pusher (0 outside token mode).
    pub fn token_requests(&self) -> usize {
        self.token_server
            .as_ref()
            .map_or(0, TokenServer::request_count)
    }

    /// Writes and reads images with an internal account that has every right.
    pub fn pusher(&self) -> &Pusher {
        &self.pusher
    }

    /// The registry's own log (errors only), for diagnosing a failing test.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Storage on tmpfs when there is one: the registry does several file operations per request,
/// and on a disk they dominate bulk pushes.
fn storage_tempdir() -> TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("oci-tag-proxy-registry-");
    let shm = Path::new("/dev/shm");
    let on_tmpfs = shm.is_dir().then(|| builder.tempdir_in(shm).ok()).flatten();
    on_tmpfs.unwrap_or_else(|| builder.tempdir().expect("tempdir for the registry"))
}

fn find_registry_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join(REGISTRY_BINARY))
        .chain([PathBuf::from("/usr/bin/docker-registry")])
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the `docker-registry` binary (CNCF distribution 2.8) is not installed; \
                 install it with `apt-get install docker-registry` to run the registry tests"
            )
        })
}

fn config_yaml(port: u16, storage: &Path, auth_yaml: &str) -> String {
    format!(
        "version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: oci-tag-proxy-test-secret
{auth_yaml}",
        storage = storage.display()
    )
}

/// The `auth:` section of the registry config, writing the files it refers to.
fn auth_config(
    dir: &Path,
    auth: &RegistryAuth,
    pusher_password: &str,
    token_server: Option<&TokenServer>,
) -> String {
    match auth {
        RegistryAuth::None => String::new(),
        RegistryAuth::Htpasswd { user, password } => {
            let path = dir.join("htpasswd");
            let lines =
                htpasswd_line(user, password) + &htpasswd_line(PUSHER_USER, pusher_password);
            fs::write(&path, lines).expect("write htpasswd");
            format!(
                "auth:\n  htpasswd:\n    realm: oci-tag-proxy-test\n    path: {}\n",
                path.display()
            )
        }
        RegistryAuth::Token { .. } => {
            let server = token_server.expect("token mode starts a token server");
            let bundle = dir.join("token-root.pem");
            fs::write(&bundle, &signing_material().cert_pem).expect("write rootcertbundle");
            format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    \
                 issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                server.realm(),
                bundle.display()
            )
        }
    }
}

/// One bcrypt line, made by the same tool operators use (`htpasswd -Bbn`).
fn htpasswd_line(user: &str, password: &str) -> String {
    let output = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("running htpasswd (apt-get install apache2-utils): {e}"));
    assert!(output.status.success(), "htpasswd failed: {output:?}");
    let line = String::from_utf8(output.stdout).expect("htpasswd prints UTF-8");
    format!("{}\n", line.trim_end())
}

async fn launch(binary: &Path, dir: &Path, auth_yaml: &str) -> (Child, u16) {
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let port = free_port();
        let config = dir.join("config.yml");
        fs::write(&config, config_yaml(port, &dir.join("storage"), auth_yaml))
            .expect("write registry config");
        let log = dir.join("registry.log");
        let mut child = spawn_registry(binary, &config, &log);
        match wait_ready(&mut child, port).await {
            Ok(()) => return (child, port),
            Err(reason) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = fs::read_to_string(&log).unwrap_or_default();
                failures.push(format!("port {port}: {reason}; log: {log}"));
            }
        }
    }
    panic!("docker-registry did not start: {failures:#?}");
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn spawn_registry(binary: &Path, config: &Path, log: &Path) -> Child {
    let log = File::create(log).expect("create registry log");
    let log_err = log.try_clone().expect("clone log handle");
    Command::new(binary)
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()))
}

/// Polls `/v2/` until the registry (and not some other process on the port) answers.
async fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let client = http_client();
    let url = format!("http://127.0.0.1:{port}/v2/");
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited with {status}"));
        }
        let answer = client
            .get(&url)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if answer.is_ok_and(|r| r.headers().contains_key("docker-distribution-api-version")) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("/v2/ did not answer within {START_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------------

/// RSA key and self-signed certificate made once per test process with the `openssl` CLI
/// (2048-bit generation is the slow part).
struct SigningMaterial {
    key: RsaKeyPair,
    /// Standard base64 of the DER certificate: the `x5c` header value.
    cert_der_b64: String,
    cert_pem: String,
}

fn signing_material() -> &'static SigningMaterial {
    static MATERIAL: OnceLock<SigningMaterial> = OnceLock::new();
    MATERIAL.get_or_init(generate_signing_material)
}

fn generate_signing_material() -> SigningMaterial {
    let dir = tempfile::tempdir().expect("tempdir for keys");
    for command in [
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=oci-tag-proxy-test-token-issuer \
         -keyout key.pem -out cert.pem",
        "pkcs8 -topk8 -nocrypt -in key.pem -outform DER -out key.der",
        "x509 -in cert.pem -outform DER -out cert.der",
    ] {
        openssl(dir.path(), command);
    }
    let read = |name: &str| fs::read(dir.path().join(name)).expect("read openssl output");
    SigningMaterial {
        key: RsaKeyPair::from_pkcs8(&read("key.der")).expect("openssl wrote a PKCS#8 RSA key"),
        cert_der_b64: STANDARD.encode(read("cert.der")),
        cert_pem: String::from_utf8(read("cert.pem")).expect("PEM is ASCII"),
    }
}

/// Runs `openssl <command>` (space-separated arguments) in `dir`.
fn openssl(dir: &Path, command: &str) {
    let output = Command::new("openssl")
        .args(command.split_whitespace())
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (apt-get install openssl): {e}"));
    assert!(
        output.status.success(),
        "openssl {command} failed: {output:?}"
    );
}

/// An RS256 JWT with the certificate in `x5c`: distribution 2.8 verifies that chain against
/// its `rootcertbundle` and then the signature with the leaf's key.
fn sign_jwt(claims: &Value) -> String {
    let material = signing_material();
    let header = json!({ "typ": "JWT", "alg": "RS256", "x5c": [material.cert_der_b64] });
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("JSON"));
    let signing_input = format!("{}.{}", encode(&header), encode(claims));
    let mut signature = vec![0u8; material.key.public().modulus_len()];
    material
        .key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .expect("RS256 signature");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// One request the token server answered (the pusher's own requests are not kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub service: Option<String>,
    /// Every `scope` asked for (repeated parameters and space-separated lists flattened).
    pub scopes: Vec<String>,
    /// The Basic user name presented, valid or not.
    pub user: Option<String>,
    /// Whether Basic credentials were presented and matched.
    pub authenticated: bool,
    /// Scopes granted (all requested ones when authenticated, none otherwise).
    pub granted: Vec<String>,
}

struct TokenState {
    accounts: HashMap<String, String>,
    expires_in: Mutex<Option<u64>>,
    issue_expired: AtomicBool,
    log: Mutex<Vec<TokenRequest>>,
}

/// The token endpoint of [`RegistryAuth::Token`] mode, on `127.0.0.1:<port>/token`.
///
/// `GET /token?service=..&scope=repository:<name>:pull[,push]`: valid Basic credentials get every
/// scope asked for; anonymous requests get a token with `access: []` (as Docker Hub does for
/// private repositories, so the registry answers 401 `insufficient_scope`); wrong credentials
/// get 401.
pub struct TokenServer {
    origin: String,
    state: Arc<TokenState>,
    task: JoinHandle<()>,
}

/// `expires_in` advertised (and used as JWT lifetime) unless changed.
pub const DEFAULT_EXPIRES_IN: u64 = 300;
/// Lifetime a client must assume when `expires_in` is missing (token spec).
const SPEC_DEFAULT_EXPIRES_IN: u64 = 60;
const PUSHER_TOKEN_LIFETIME: u64 = 3600;
/// distribution 2.8 accepts a JWT up to 60 s after its `exp`; expired tokens are issued
/// further back than that.
const EXPIRED_SINCE: u64 = 120;

impl TokenServer {
    async fn start(user: &str, password: &str, pusher_password: &str) -> TokenServer {
        signing_material();
        let accounts = HashMap::from([
            (user.to_owned(), password.to_owned()),
            (PUSHER_USER.to_owned(), pusher_password.to_owned()),
        ]);
        let state = Arc::new(TokenState {
            accounts,
            expires_in: Mutex::new(Some(DEFAULT_EXPIRES_IN)),
            issue_expired: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let (listener, port) = bind_loopback().await;
        let router = Router::new()
            .route(TOKEN_PATH, get(issue_token).post(issue_token_oauth))
            .with_state(state.clone());
        let task = spawn_server(listener, router);
        TokenServer {
            origin: format!("http://127.0.0.1:{port}"),
            state,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The realm the registry advertises: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("{}{TOKEN_PATH}", self.origin)
    }

    pub fn service(&self) -> &'static str {
        TOKEN_SERVICE
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    /// Every scope asked for, in order.
    pub fn scopes(&self) -> Vec<String> {
        self.requests().into_iter().flat_map(|r| r.scopes).collect()
    }

    /// `Some(n)`: advertise `expires_in: n` and make the JWT expire after n s. `None`: omit
    /// `expires_in` (clients must assume 60 s; the JWT then lives 60 s).
    pub fn set_expires_in(&self, expires_in: Option<u64>) {
        *self.state.expires_in.lock().unwrap() = expires_in;
    }

    /// On: JWTs are issued already expired (beyond the registry's 60 s leeway) while the
    /// response still advertises `expires_in`, so the registry answers 401
    /// `error="invalid_token"` at once: how a test makes a cached token go stale without waiting.
    pub fn set_issue_expired(&self, on: bool) {
        self.state.issue_expired.store(on, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issue_token(
    State(state): State<Arc<TokenState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = parse_query(query.as_deref().unwrap_or(""));
    let caller = state.authenticate(&headers);
    let scopes = requested_scopes(&params);
    let granted: Vec<String> = match caller.authenticated {
        true => scopes
            .iter()
            .filter(|s| parse_scope(s).is_some())
            .cloned()
            .collect(),
        false => Vec::new(),
    };
    if !caller.is_pusher() {
        state.record(&params, scopes, &caller, &granted);
    }
    if caller.user.is_some() && !caller.authenticated {
        let message = "incorrect username or password";
        return registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    }
    token_response(&granted, &caller.subject(), state.lifetime_for(&caller))
}

/// The OAuth2 form (`POST`, `grant_type=refresh_token`), as clients with Docker's
/// `identitytoken` use it. Here an account's password doubles as its refresh token.
async fn issue_token_oauth(State(state): State<Arc<TokenState>>, body: String) -> Response {
    let params = parse_query(&body);
    let refresh = query_param(&params, "refresh_token").unwrap_or("");
    let user = state
        .accounts
        .iter()
        .find(|(_, password)| {
            query_param(&params, "grant_type") == Some("refresh_token") && *password == refresh
        })
        .map(|(user, _)| user.clone());
    let caller = Caller {
        authenticated: user.is_some(),
        user,
    };
    let scopes = requested_scopes(&params);
    if !caller.authenticated {
        state.record(&params, scopes, &caller, &[]);
        return registry_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "invalid refresh token",
        );
    }
    state.record(&params, scopes.clone(), &caller, &scopes);
    token_response(&scopes, &caller.subject(), state.lifetime_for(&caller))
}

/// Who asked for a token.
struct Caller {
    /// The Basic user name presented, valid or not.
    user: Option<String>,
    authenticated: bool,
}

impl Caller {
    fn is_pusher(&self) -> bool {
        self.authenticated && self.user.as_deref() == Some(PUSHER_USER)
    }

    /// JWT `sub`: the user when authenticated, empty for anonymous (as Docker Hub does).
    fn subject(&self) -> String {
        match self.authenticated {
            true => self.user.clone().unwrap_or_default(),
            false => String::new(),
        }
    }
}

/// `expires_in` to advertise and whether to backdate the JWT's `exp`.
struct Lifetime {
    expires_in: Option<u64>,
    expired: bool,
}

impl TokenState {
    fn authenticate(&self, headers: &HeaderMap) -> Caller {
        match basic_credentials(headers) {
            Some((user, password)) => {
                let authenticated = self.accounts.get(&user) == Some(&password);
                Caller {
                    user: Some(user),
                    authenticated,
                }
            }
            None => Caller {
                user: None,
                authenticated: false,
            },
        }
    }

    fn record(
        &self,
        params: &[(String, String)],
        scopes: Vec<String>,
        caller: &Caller,
        granted: &[String],
    ) {
        let entry = TokenRequest {
            service: query_param(params, "service").map(str::to_owned),
            scopes,
            user: caller.user.clone(),
            authenticated: caller.authenticated,
            granted: granted.to_vec(),
        };
        self.log.lock().unwrap().push(entry);
    }

    /// The pusher always gets long-lived valid tokens, whatever a test configured.
    fn lifetime_for(&self, caller: &Caller) -> Lifetime {
        match caller.is_pusher() {
            true => Lifetime {
                expires_in: Some(PUSHER_TOKEN_LIFETIME),
                expired: false,
            },
            false => Lifetime {
                expires_in: *self.expires_in.lock().unwrap(),
                expired: self.issue_expired.load(Ordering::SeqCst),
            },
        }
    }
}

fn requested_scopes(params: &[(String, String)]) -> Vec<String> {
    params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned))
        .collect()
}

/// `type:name:actions`; the name may itself contain `:` (a `host:port`), so split at the ends.
fn parse_scope(scope: &str) -> Option<(&str, &str, Vec<&str>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        kind,
        name,
        actions.split(',').filter(|a| !a.is_empty()).collect(),
    ))
}

fn access_claims(granted: &[String]) -> Value {
    let entries: Vec<Value> = granted
        .iter()
        .filter_map(|s| parse_scope(s))
        .map(|(kind, name, actions)| json!({ "type": kind, "name": name, "actions": actions }))
        .collect();
    Value::Array(entries)
}

/// Claims laid out as Docker Hub's (`nbf` = `iat` - 300, string `aud`).
fn token_response(granted: &[String], subject: &str, lifetime: Lifetime) -> Response {
    let now = unix_now();
    let exp = match lifetime.expired {
        true => now - EXPIRED_SINCE,
        false => now + lifetime.expires_in.unwrap_or(SPEC_DEFAULT_EXPIRES_IN),
    };
    let claims = json!({
        "iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE,
        "exp": exp, "nbf": now - 300, "iat": now,
        "jti": random_hex(16), "access": access_claims(granted),
    });
    let token = sign_jwt(&claims);
    let issued_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let mut body = json!({ "token": token, "access_token": token, "issued_at": issued_at });
    if let Some(seconds) = lifetime.expires_in {
        body["expires_in"] = json!(seconds);
    }
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).expect("JSON");
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// An error in the registry's `{"errors":[...]}` format.
fn registry_error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({ "errors": [{ "code": code, "message": message }] }),
    )
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// Docker or OCI media types for an image manifest, its config and layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageMedia {
    #[default]
    Oci,
    Docker,
}

impl ImageMedia {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Self::Oci => OCI_MANIFEST,
            Self::Docker => DOCKER_MANIFEST,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Self::Oci => OCI_CONFIG,
            Self::Docker => DOCKER_CONFIG,
        }
    }

    fn layer_type(self) -> &'static str {
        match self {
            Self::Oci => OCI_LAYER,
            Self::Docker => DOCKER_LAYER,
        }
    }

    fn indent(self) -> &'static [u8] {
        match self {
            Self::Oci => b"  ",
            Self::Docker => b"   ",
        }
    }
}

/// One single-platform image. `salt` changes the config and layer bytes so that otherwise equal
/// specs get distinct digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// RFC 3339 `created` of the config (absent when `None`, as the spec allows).
    pub created: Option<String>,
    pub media: ImageMedia,
    pub salt: u64,
}

/// The exact bytes of one image; the registry stores them as they are.
#[derive(Clone, Debug)]
pub struct ImageBlobs {
    pub config: Vec<u8>,
    pub layer: Vec<u8>,
    pub manifest: Vec<u8>,
    pub media_type: &'static str,
}

impl ImageSpec {
    pub fn new(os: &str, architecture: &str) -> Self {
        Self {
            os: os.into(),
            architecture: architecture.into(),
            variant: None,
            created: None,
            media: ImageMedia::Oci,
            salt: 0,
        }
    }

    pub fn linux(architecture: &str) -> Self {
        Self::new("linux", architecture)
    }

    pub fn variant(mut self, variant: &str) -> Self {
        self.variant = Some(variant.into());
        self
    }

    pub fn created(mut self, created: &str) -> Self {
        self.created = Some(created.into());
        self
    }

    pub fn media(mut self, media: ImageMedia) -> Self {
        self.media = media;
        self
    }

    pub fn salt(mut self, salt: u64) -> Self {
        self.salt = salt;
        self
    }

    /// `os/architecture[/variant]`
    pub fn platform(&self) -> String {
        let base = format!("{}/{}", self.os, self.architecture);
        self.variant
            .as_ref()
            .map_or(base.clone(), |v| format!("{base}/{v}"))
    }

    /// The `platform` object of an index entry.
    pub fn platform_json(&self) -> Value {
        let mut platform = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            platform["variant"] = json!(variant);
        }
        platform
    }

    pub fn build(&self) -> ImageBlobs {
        let layer = format!("layer {} salt={}\n", self.platform(), self.salt).into_bytes();
        let config = serde_json::to_vec(&self.config_json(&layer)).expect("JSON");
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.media.manifest_type(),
            "config": descriptor(self.media.config_type(), &config),
            "layers": [descriptor(self.media.layer_type(), &layer)],
        });
        let manifest = pretty_json(&manifest, self.media.indent());
        ImageBlobs {
            config,
            layer,
            manifest,
            media_type: self.media.manifest_type(),
        }
    }

    /// The image config. `diff_ids` reuse the layer digest (the harness layer is not really
    /// compressed); registries do not check it.
    fn config_json(&self, layer: &[u8]) -> Value {
        let mut config = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/hello"],
                "Labels": { "org.oci-tag-proxy.test.salt": self.salt.to_string() },
            },
            "rootfs": { "type": "layers", "diff_ids": [sha256_digest(layer)] },
        });
        if let Some(variant) = &self.variant {
            config["variant"] = json!(variant);
        }
        if let Some(created) = &self.created {
            config["created"] = json!(created);
            config["history"] =
                json!([{ "created": created, "created_by": "COPY hello / # buildkit" }]);
        }
        config
    }
}

/// Media type family of an index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexMedia {
    #[default]
    Oci,
    DockerList,
}

impl IndexMedia {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Oci => OCI_INDEX,
            Self::DockerList => DOCKER_LIST,
        }
    }

    fn image_media(self) -> ImageMedia {
        match self {
            Self::Oci => ImageMedia::Oci,
            Self::DockerList => ImageMedia::Docker,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexOptions {
    pub media: IndexMedia,
    /// OCI only: add one buildkit attestation manifest (`unknown/unknown`) per platform.
    pub attestation: bool,
    /// OCI only: `org.opencontainers.image.created` annotation of the index.
    pub created: Option<String>,
}

/// Digests of what [`Pusher::push_index`] pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedIndex {
    pub digest: String,
    /// Platform manifests, in the order of the specs.
    pub platforms: Vec<String>,
    /// Attestation manifests, one per platform (empty without attestation).
    pub attestations: Vec<String>,
}

/// A buildkit "classic" attestation manifest for one platform manifest: an in-toto statement
/// layer and an `unknown/unknown` config (as in the reference `attestation-manifest.json`).
fn attestation_image(repo: &str, tag: &str, spec: &ImageSpec, subject: &str) -> ImageBlobs {
    let platform =
        url::form_urlencoded::byte_serialize(spec.platform().as_bytes()).collect::<String>();
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": SLSA_PROVENANCE_V02,
        "subject": [{
            "name": format!("pkg:docker/{repo}@{tag}?platform={platform}"),
            "digest": { "sha256": subject.trim_start_matches("sha256:") },
        }],
        "predicate": { "builder": { "id": "" }, "buildType": "https://mobyproject.org/buildkit@v1" },
    });
    let layer = serde_json::to_vec(&statement).expect("JSON");
    let config = json!({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [sha256_digest(&layer)] },
    });
    let config = serde_json::to_vec(&config).expect("JSON");
    let mut layer_descriptor = descriptor(IN_TOTO, &layer);
    layer_descriptor["annotations"] = json!({ "in-toto.io/predicate-type": SLSA_PROVENANCE_V02 });
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [layer_descriptor],
    });
    let manifest = pretty_json(&manifest, b"  ");
    ImageBlobs {
        config,
        layer,
        manifest,
        media_type: OCI_MANIFEST,
    }
}

fn platform_entry(spec: &ImageSpec, image: &ImageBlobs) -> Value {
    let mut entry = descriptor(image.media_type, &image.manifest);
    entry["platform"] = spec.platform_json();
    entry
}

fn attestation_entry(attestation: &ImageBlobs, subject: &str) -> Value {
    let mut entry = descriptor(OCI_MANIFEST, &attestation.manifest);
    entry["annotations"] = json!({
        "vnd.docker.reference.digest": subject,
        "vnd.docker.reference.type": "attestation-manifest",
    });
    entry["platform"] = json!({ "architecture": "unknown", "os": "unknown" });
    entry
}

fn index_bytes(options: &IndexOptions, entries: Vec<Value>) -> Vec<u8> {
    let mut index = json!({
        "schemaVersion": 2,
        "mediaType": options.media.media_type(),
        "manifests": entries,
    });
    if let (IndexMedia::Oci, Some(created)) = (options.media, &options.created) {
        index["annotations"] = json!({ "org.opencontainers.image.created": created });
    }
    pretty_json(&index, options.media.image_media().indent())
}

/// How [`Pusher::push_many_tags`] lays out its tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManyTags {
    /// Tag `i` is `format!("{prefix}{i:04}")`, so lexical order is push order up to 10,000.
    pub prefix: String,
    /// `None`: one image per tag. `Some(k)`: `k` images, tag `i` points at image `i % k`.
    pub distinct_images: Option<usize>,
    pub media: ImageMedia,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Default for ManyTags {
    fn default() -> Self {
        Self {
            prefix: "t".into(),
            distinct_images: None,
            media: ImageMedia::Oci,
            concurrency: 8,
        }
    }
}

impl ManyTags {
    pub fn one_image_per_tag() -> Self {
        Self::default()
    }

    pub fn shared_images(images: usize) -> Self {
        Self {
            distinct_images: Some(images.max(1)),
            ..Self::default()
        }
    }

    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn media(mut self, media: ImageMedia) -> Self {
        self.media = media;
        self
    }

    pub fn tag_name(&self, i: usize) -> String {
        format!("{}{i:04}", self.prefix)
    }

    /// `created` of image `j`: 2020-01-01T00:00:00Z plus `j` days, so later images are newer.
    pub fn created_of(j: usize) -> String {
        let base = chrono::NaiveDate::from_ymd_opt(2020, 1, 1).expect("valid date");
        let day = base + chrono::TimeDelta::days(j as i64);
        format!("{}T00:00:00Z", day.format("%Y-%m-%d"))
    }

    fn image(&self, j: usize) -> (ImageBlobs, String) {
        let created = Self::created_of(j);
        let spec = ImageSpec::linux("amd64")
            .created(&created)
            .media(self.media);
        (spec.build(), created)
    }
}

/// One tag written by [`Pusher::push_many_tags`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedTag {
    pub tag: String,
    pub digest: String,
    pub created: String,
}

// ---------------------------------------------------------------------------------------------
// Pusher
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum PusherAuth {
    Anonymous,
    Basic(String),
    Token { realm: String, basic: String },
}

impl PusherAuth {
    fn for_mode(auth: &RegistryAuth, password: &str, token: Option<&TokenServer>) -> Self {
        match (auth, token) {
            (RegistryAuth::None, _) => Self::Anonymous,
            (RegistryAuth::Htpasswd { .. }, _) => Self::Basic(basic_header(PUSHER_USER, password)),
            (RegistryAuth::Token { .. }, Some(server)) => Self::Token {
                realm: server.realm(),
                basic: basic_header(PUSHER_USER, password),
            },
            (RegistryAuth::Token { .. }, None) => unreachable!("token mode has a token server"),
        }
    }
}

struct PusherInner {
    base: String,
    client: reqwest::Client,
    auth: PusherAuth,
    /// Bearer token per repository (pull,push,delete), valid for an hour.
    tokens: Mutex<HashMap<String, String>>,
    /// `repo@digest` of blobs already uploaded, so shared layers go up once.
    blobs: Mutex<HashSet<String>>,
}

/// Writes and reads images through the registry's HTTP API as a privileged internal account.
/// Cheap to clone; clones share token and blob caches.
#[derive(Clone)]
pub struct Pusher {
    inner: Arc<PusherInner>,
}

impl Pusher {
    fn new(base: &str, auth: PusherAuth) -> Self {
        let inner = PusherInner {
            base: base.trim_end_matches('/').to_owned(),
            client: http_client(),
            auth,
            tokens: Mutex::new(HashMap::new()),
            blobs: Mutex::new(HashSet::new()),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The same account against another base URL (e.g. a [`CountingProxy`] in front).
    pub fn with_base(&self, base: &str) -> Pusher {
        Pusher::new(base, self.inner.auth.clone())
    }

    pub fn base(&self) -> &str {
        &self.inner.base
    }

    /// The `Authorization` value for `repo`, fetching a push token in token mode.
    pub async fn authorization(&self, repo: &str) -> Option<String> {
        match &self.inner.auth {
            PusherAuth::Anonymous => None,
            PusherAuth::Basic(value) => Some(value.clone()),
            PusherAuth::Token { realm, basic } => Some(format!(
                "Bearer {}",
                self.token_for(repo, realm, basic).await
            )),
        }
    }

    async fn token_for(&self, repo: &str, realm: &str, basic: &str) -> String {
        if let Some(token) = self.inner.tokens.lock().unwrap().get(repo) {
            return token.clone();
        }
        let scope = format!("repository:{repo}:pull,push,delete");
        let query = [("service", TOKEN_SERVICE), ("scope", scope.as_str())];
        let response = self
            .inner
            .client
            .get(realm)
            .query(&query)
            .header(header::AUTHORIZATION, basic);
        let (_, body) = expect_status(response.send().await, 200, "pusher token").await;
        let body: Value = serde_json::from_slice(&body).expect("token response is JSON");
        let token = body["token"]
            .as_str()
            .expect("token response has `token`")
            .to_owned();
        self.inner
            .tokens
            .lock()
            .unwrap()
            .insert(repo.to_owned(), token.clone());
        token
    }

    /// A request to `path_or_url` (relative to the base unless absolute), authenticated for `repo`.
    async fn request(
        &self,
        method: Method,
        repo: &str,
        path_or_url: &str,
    ) -> reqwest::RequestBuilder {
        let url = match path_or_url.starts_with("http") {
            true => path_or_url.to_owned(),
            false => format!("{}{path_or_url}", self.inner.base),
        };
        let builder = self.inner.client.request(method, url);
        match self.authorization(repo).await {
            Some(value) => builder.header(header::AUTHORIZATION, value),
            None => builder,
        }
    }

    /// Monolithic upload: `POST .../blobs/uploads/`, then `PUT <Location>&digest=...`.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let key = format!("{repo}@{digest}");
        if self.inner.blobs.lock().unwrap().contains(&key) {
            return digest;
        }
        let start = self
            .request(Method::POST, repo, &format!("/v2/{repo}/blobs/uploads/"))
            .await;
        let (headers, _) = expect_status(start.send().await, 202, "start blob upload").await;
        let location = self.upload_url(&headers, &digest);
        let finish = self.request(Method::PUT, repo, location.as_str()).await;
        let finish = finish
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec());
        expect_status(finish.send().await, 201, "finish blob upload").await;
        self.inner.blobs.lock().unwrap().insert(key);
        digest
    }

    fn upload_url(&self, headers: &HeaderMap, digest: &str) -> url::Url {
        let location = header_str(headers, header::LOCATION).expect("upload has a Location");
        let base = url::Url::parse(&self.inner.base).expect("base URL");
        let mut url = base.join(&location).expect("valid upload Location");
        url.query_pairs_mut().append_pair("digest", digest);
        url
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with these exact bytes; checks that the registry
    /// reports their sha256 as `Docker-Content-Digest`.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256_digest(bytes);
        let put = self
            .request(
                Method::PUT,
                repo,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .await;
        let put = put
            .header(header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec());
        let (headers, _) = expect_status(put.send().await, 201, "push manifest").await;
        let stored = header_str(&headers, "docker-content-digest");
        assert_eq!(
            stored.as_deref(),
            Some(digest.as_str()),
            "registry stored other bytes"
        );
        digest
    }

    /// `DELETE /v2/<repo>/manifests/<digest>`: in 2.8 this also removes every tag on it.
    pub async fn delete_manifest(&self, repo: &str, digest: &str) {
        let delete = self
            .request(
                Method::DELETE,
                repo,
                &format!("/v2/{repo}/manifests/{digest}"),
            )
            .await;
        expect_status(delete.send().await, 202, "delete manifest").await;
    }

    /// Pushes config and layer, then the manifest under `reference` (its digest when `None`).
    pub async fn push_built(
        &self,
        repo: &str,
        reference: Option<&str>,
        image: &ImageBlobs,
    ) -> String {
        self.push_blob(repo, &image.config).await;
        self.push_blob(repo, &image.layer).await;
        let digest = sha256_digest(&image.manifest);
        let reference = reference.unwrap_or(&digest);
        self.push_manifest(repo, reference, image.media_type, &image.manifest)
            .await
    }

    /// One single-platform image tagged `tag`; returns the manifest digest.
    pub async fn push_image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> String {
        self.push_built(repo, Some(tag), &spec.build()).await
    }

    /// A multi-platform index: each platform image by digest (with the index's media family),
    /// for OCI with `attestation` one attestation manifest per platform, then the index as `tag`.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[ImageSpec],
        options: &IndexOptions,
    ) -> PushedIndex {
        let media = options.media.image_media();
        let specs: Vec<ImageSpec> = platforms.iter().map(|s| s.clone().media(media)).collect();
        let mut entries = Vec::new();
        let mut platform_digests = Vec::new();
        for spec in &specs {
            let image = spec.build();
            platform_digests.push(self.push_built(repo, None, &image).await);
            entries.push(platform_entry(spec, &image));
        }
        let attestations = match options.attestation && options.media == IndexMedia::Oci {
            true => {
                let subjects = specs.iter().zip(&platform_digests);
                self.push_attestations(repo, tag, subjects, &mut entries)
                    .await
            }
            false => Vec::new(),
        };
        let bytes = index_bytes(options, entries);
        let digest = self
            .push_manifest(repo, tag, options.media.media_type(), &bytes)
            .await;
        PushedIndex {
            digest,
            platforms: platform_digests,
            attestations,
        }
    }

    /// One attestation manifest per `(platform spec, platform digest)`, by digest; their index
    /// entries go after the platform entries, as buildkit orders them.
    async fn push_attestations(
        &self,
        repo: &str,
        tag: &str,
        subjects: impl Iterator<Item = (&ImageSpec, &String)>,
        entries: &mut Vec<Value>,
    ) -> Vec<String> {
        let mut digests = Vec::new();
        for (spec, subject) in subjects {
            let attestation = attestation_image(repo, tag, spec, subject);
            digests.push(self.push_built(repo, None, &attestation).await);
            entries.push(attestation_entry(&attestation, subject));
        }
        digests
    }

    /// `count` tags laid out by `plan`, pushed concurrently; results in tag order.
    /// Per tag this costs one config upload (2 requests) and one manifest PUT, or only the PUT
    /// when tags share images.
    pub async fn push_many_tags(
        &self,
        repo: &str,
        count: usize,
        plan: &ManyTags,
    ) -> Vec<PushedTag> {
        let distinct = plan.distinct_images.unwrap_or(count).min(count);
        let images: Vec<(ImageBlobs, String)> = (0..distinct).map(|j| plan.image(j)).collect();
        if let Some((first, _)) = images.first() {
            // The layer is shared: upload it once before going concurrent.
            self.push_blob(repo, &first.layer).await;
        }
        stream::iter(&images)
            .for_each_concurrent(plan.concurrency, |(image, _)| {
                self.push_blob(repo, &image.config).map(drop)
            })
            .await;
        stream::iter(0..count)
            .map(|i| self.push_tag_of(repo, plan.tag_name(i), &images[i % distinct]))
            .buffered(plan.concurrency)
            .collect()
            .await
    }

    async fn push_tag_of(
        &self,
        repo: &str,
        tag: String,
        (image, created): &(ImageBlobs, String),
    ) -> PushedTag {
        let digest = self
            .push_manifest(repo, &tag, image.media_type, &image.manifest)
            .await;
        PushedTag {
            tag,
            digest,
            created: created.clone(),
        }
    }

    /// Tags as the registry lists them (2.8: storage order); empty for an unknown repository
    /// or `"tags": null`.
    pub async fn tags_list(&self, repo: &str) -> Vec<String> {
        let response = self
            .request(Method::GET, repo, &format!("/v2/{repo}/tags/list"))
            .await
            .send()
            .await;
        if response
            .as_ref()
            .is_ok_and(|r| r.status() == StatusCode::NOT_FOUND)
        {
            return Vec::new();
        }
        let (_, body) = expect_status(response, 200, "tags/list").await;
        let body: Value = serde_json::from_slice(&body).expect("tags/list is JSON");
        let tags = body["tags"].as_array().cloned().unwrap_or_default();
        tags.iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }

    /// `Docker-Content-Digest` of a `HEAD` on the manifest; `None` if it does not exist.
    pub async fn digest_of(&self, repo: &str, reference: &str) -> Option<String> {
        let head = self
            .request(
                Method::HEAD,
                repo,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .await;
        let response = head.header(header::ACCEPT, ALL_MANIFEST_TYPES).send().await;
        if response
            .as_ref()
            .is_ok_and(|r| r.status() == StatusCode::NOT_FOUND)
        {
            return None;
        }
        let (headers, _) = expect_status(response, 200, "manifest HEAD").await;
        Some(header_str(&headers, "docker-content-digest").expect("HEAD has Docker-Content-Digest"))
    }

    /// `(Content-Type, bytes)` of a manifest; `None` if it does not exist.
    pub async fn manifest(&self, repo: &str, reference: &str) -> Option<(String, Vec<u8>)> {
        let get = self
            .request(
                Method::GET,
                repo,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .await;
        let response = get.header(header::ACCEPT, ALL_MANIFEST_TYPES).send().await;
        if response
            .as_ref()
            .is_ok_and(|r| r.status() == StatusCode::NOT_FOUND)
        {
            return None;
        }
        let (headers, body) = expect_status(response, 200, "manifest GET").await;
        let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
        Some((content_type, body.to_vec()))
    }

    /// The parsed config of a single-platform image manifest.
    pub async fn config(&self, repo: &str, reference: &str) -> Value {
        let (_, manifest) = self
            .manifest(repo, reference)
            .await
            .expect("manifest exists");
        let manifest: Value = serde_json::from_slice(&manifest).expect("manifest is JSON");
        let digest = manifest["config"]["digest"]
            .as_str()
            .expect("manifest has a config");
        serde_json::from_slice(&self.blob(repo, digest).await).expect("config is JSON")
    }

    /// The bytes of a blob (e.g. an image config).
    pub async fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let get = self
            .request(Method::GET, repo, &format!("/v2/{repo}/blobs/{digest}"))
            .await;
        let (_, body) = expect_status(get.send().await, 200, "blob GET").await;
        body.to_vec()
    }
}

// ---------------------------------------------------------------------------------------------
// Counting, fault-injecting reverse proxy
// ---------------------------------------------------------------------------------------------

/// What a request was, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `.../tags/list`
    TagList,
    ManifestHead,
    ManifestGet,
    /// `GET`/`HEAD .../blobs/<digest>` (not uploads).
    Blob,
    /// The token endpoint (`/token`).
    Token,
    /// Everything else (`/v2/`, uploads, manifest PUT/DELETE, ...).
    Other,
}

fn classify(method: &Method, path: &str) -> Kind {
    if path.ends_with("/tags/list") {
        Kind::TagList
    } else if path.contains("/manifests/") {
        match *method {
            Method::HEAD => Kind::ManifestHead,
            Method::GET => Kind::ManifestGet,
            _ => Kind::Other,
        }
    } else if path.contains("/blobs/") && !path.contains("/blobs/uploads") {
        Kind::Blob
    } else if path == TOKEN_PATH || path.ends_with("/token") {
        Kind::Token
    } else {
        Kind::Other
    }
}

/// One request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub kind: Kind,
    /// Whether an `Authorization` header was present.
    pub authorization: bool,
    pub accept: Vec<String>,
    /// Whether a [`Fault`] was applied.
    pub faulted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CannedResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl CannedResponse {
    fn to_response(&self) -> Response {
        let status = StatusCode::from_u16(self.status).expect("valid status code");
        let mut response = (status, self.body.clone()).into_response();
        for (name, value) in &self.headers {
            let name = HeaderName::try_from(name.as_str()).expect("valid header name");
            let value = HeaderValue::try_from(value.as_str()).expect("valid header value");
            // Insert, not append: a canned Content-Type replaces the body's default one.
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// A scripted disturbance for matching requests: an optional delay, then either a canned
/// response or the real one. Applies `times(n)` times, or forever.
///
/// `Fault::on(Kind::TagList).respond(429).header("Retry-After", "3").times(2)` scripts
/// "429, 429, then the registry's answer".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    kind: Option<Kind>,
    method: Option<Method>,
    path_contains: Option<String>,
    delay: Option<Duration>,
    response: Option<CannedResponse>,
    remaining: Option<usize>,
}

impl Fault {
    /// Matches requests of this kind.
    pub fn on(kind: Kind) -> Self {
        Self {
            kind: Some(kind),
            ..Self::any()
        }
    }

    /// Matches every request.
    pub fn any() -> Self {
        Self {
            kind: None,
            method: None,
            path_contains: None,
            delay: None,
            response: None,
            remaining: None,
        }
    }

    /// 429 `TOOMANYREQUESTS` with `Retry-After: <seconds>`, as the spec recommends.
    pub fn too_many_requests(kind: Kind, retry_after_secs: u64) -> Self {
        let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"too many requests"}]}"#;
        Self::on(kind)
            .respond(429)
            .header("Retry-After", &retry_after_secs.to_string())
            .header("Content-Type", "application/json")
            .body(body)
    }

    /// 503 `UNAVAILABLE`.
    pub fn unavailable(kind: Kind) -> Self {
        let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"service unavailable"}]}"#;
        Self::on(kind)
            .respond(503)
            .header("Content-Type", "application/json")
            .body(body)
    }

    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    pub fn path_contains(mut self, fragment: &str) -> Self {
        self.path_contains = Some(fragment.into());
        self
    }

    /// Answer with this status instead of forwarding (add headers and body with the next calls).
    pub fn respond(mut self, status: u16) -> Self {
        self.response = Some(CannedResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        });
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        let response = self
            .response
            .as_mut()
            .expect("call respond() before header()");
        response.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.response
            .as_mut()
            .expect("call respond() before body()")
            .body = body.into();
        self
    }

    /// Hold the request this long before answering (forwarded or canned).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Apply to the next `n` matching requests only.
    pub fn times(mut self, n: usize) -> Self {
        assert!(n > 0, "a fault must apply at least once");
        self.remaining = Some(n);
        self
    }

    fn matches(&self, kind: Kind, method: &Method, path: &str) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|f| path.contains(f))
    }
}

/// Spec pagination for `tags/list` on top of an upstream that has none (distribution 2.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagPaging {
    /// Page size when the client sends no `n` (`None`: everything, like distribution).
    pub default_n: Option<usize>,
    /// Clamp for large `n` (distribution clamps too).
    pub max_n: Option<usize>,
}

/// A fetch through the redirect target, as the blob host saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFetch {
    pub path: String,
    /// The `Authorization` header that arrived; a correct client sends none cross-origin.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct RedirectState {
    next_id: AtomicU64,
    blobs: Mutex<HashMap<u64, (String, Bytes)>>,
    fetches: Mutex<Vec<BlobFetch>>,
}

struct ProxyState {
    upstream: String,
    token_upstream: Option<String>,
    origin: String,
    redirect_origin: String,
    client: reqwest::Client,
    records: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<Vec<Fault>>,
    redirect_blobs: AtomicBool,
    paging: Mutex<Option<TagPaging>>,
    redirect: Arc<RedirectState>,
}

/// What the upstream answered, headers already rewritten to point at the proxy.
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Upstream {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// A reverse proxy on `127.0.0.1:<port>` in front of a registry (or any upstream) that records
/// every request, can inject faults, redirect blob downloads to another origin
/// (`http://localhost:<other port>`, like GHCR's storage host) and emulate `tags/list`
/// pagination. Absolute upstream URLs in `Location`, `Link` and `WWW-Authenticate` are
/// rewritten to the proxy, so clients stay on it.
pub struct CountingProxy {
    state: Arc<ProxyState>,
    tasks: Vec<JoinHandle<()>>,
}

impl CountingProxy {
    /// Proxies everything to `upstream_url` (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream_url: &str) -> CountingProxy {
        Self::start_with(upstream_url, None).await
    }

    /// Proxies `registry`; in token mode also `/token` to its token server, with the challenge
    /// realm rewritten, so token requests are counted (kind [`Kind::Token`]) and can be faulted.
    pub async fn start_for(registry: &Registry) -> CountingProxy {
        let token_upstream = registry.token_server().map(|t| t.origin().to_owned());
        Self::start_with(&registry.url(), token_upstream).await
    }

    async fn start_with(upstream_url: &str, token_upstream: Option<String>) -> CountingProxy {
        let (listener, port) = bind_loopback().await;
        let (redirect_listener, redirect_port) = bind_loopback().await;
        let redirect = Arc::new(RedirectState::default());
        let state = Arc::new(ProxyState {
            upstream: upstream_url.trim_end_matches('/').to_owned(),
            token_upstream,
            origin: format!("http://127.0.0.1:{port}"),
            redirect_origin: format!("http://localhost:{redirect_port}"),
            client: http_client(),
            records: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            redirect_blobs: AtomicBool::new(false),
            paging: Mutex::new(None),
            redirect: redirect.clone(),
        });
        let proxy = Router::new()
            .fallback(proxy_handler)
            .with_state(state.clone());
        let blob_host = Router::new()
            .route("/blobs/{id}", get(serve_redirected_blob))
            .with_state(redirect);
        let tasks = vec![
            spawn_server(listener, proxy),
            spawn_server(redirect_listener, blob_host),
        ];
        CountingProxy { state, tasks }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.state.origin.clone()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.state.origin.trim_start_matches("http://").to_owned()
    }

    /// Origin blob downloads are redirected to: `http://localhost:PORT`.
    pub fn redirect_origin(&self) -> String {
        self.state.redirect_origin.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.records.lock().unwrap().clone()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.state
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    pub fn total(&self) -> usize {
        self.state.records.lock().unwrap().len()
    }

    /// Forgets recorded requests and blob fetches (faults and modes stay).
    pub fn reset(&self) {
        self.state.records.lock().unwrap().clear();
        self.state.redirect.fetches.lock().unwrap().clear();
    }

    /// Adds a fault; faults are tried in the order added, the first match applies.
    pub fn fault(&self, fault: Fault) {
        self.state.faults.lock().unwrap().push(fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Faults that still have uses left.
    pub fn pending_faults(&self) -> usize {
        self.state.faults.lock().unwrap().len()
    }

    /// On: successful blob GETs become `307` to [`Self::redirect_origin`], which serves the bytes.
    pub fn redirect_blobs(&self, on: bool) {
        self.state.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// Fetches that arrived at the redirect target.
    pub fn blob_fetches(&self) -> Vec<BlobFetch> {
        self.state.redirect.fetches.lock().unwrap().clone()
    }

    /// `Some`: answer `tags/list` with spec pagination (`n`, `last`, `Link`); `None`: pass through.
    pub fn paginate_tags(&self, paging: Option<TagPaging>) {
        *self.state.paging.lock().unwrap() = paging;
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

async fn proxy_handler(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let kind = classify(&parts.method, parts.uri.path());
    let fault = state.take_fault(kind, &parts.method, parts.uri.path());
    state.record(&parts, kind, fault.is_some());
    if let Some(fault) = fault {
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(response) = fault.response {
            return response.to_response();
        }
    }
    state.route(kind, &parts, body).await
}

impl ProxyState {
    fn take_fault(&self, kind: Kind, method: &Method, path: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let index = faults.iter().position(|f| f.matches(kind, method, path))?;
        let fault = faults[index].clone();
        if let Some(remaining) = faults[index].remaining.as_mut() {
            *remaining -= 1;
            if *remaining == 0 {
                faults.remove(index);
            }
        }
        Some(fault)
    }

    fn record(&self, parts: &Parts, kind: Kind, faulted: bool) {
        let accept = parts.headers.get_all(header::ACCEPT).iter();
        let record = RecordedRequest {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            kind,
            authorization: parts.headers.contains_key(header::AUTHORIZATION),
            accept: accept
                .filter_map(|v| v.to_str().ok().map(str::to_owned))
                .collect(),
            faulted,
        };
        self.records.lock().unwrap().push(record);
    }

    async fn route(&self, kind: Kind, parts: &Parts, body: Bytes) -> Response {
        let is_get = parts.method == Method::GET;
        let paging = *self.paging.lock().unwrap();
        if kind == Kind::Blob && is_get && self.redirect_blobs.load(Ordering::SeqCst) {
            return self.redirect_blob(parts).await;
        }
        if let (Kind::TagList, true, Some(paging)) = (kind, is_get, paging) {
            return self.paginated_tags(parts, paging).await;
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match self
            .fetch(&parts.method, path_and_query, &parts.headers, body)
            .await
        {
            Ok(upstream) => upstream.into_response(),
            Err(error) => (StatusCode::BAD_GATEWAY, error).into_response(),
        }
    }

    /// The upstream for a path: the token server for `/token` when one is routed.
    fn base_for(&self, path_and_query: &str) -> &str {
        let path = path_and_query.split('?').next().unwrap_or_default();
        match (&self.token_upstream, path == TOKEN_PATH) {
            (Some(token), true) => token,
            _ => &self.upstream,
        }
    }

    async fn fetch(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Upstream, String> {
        let url = format!("{}{path_and_query}", self.base_for(path_and_query));
        let mut request = self
            .client
            .request(method.clone(), url)
            .headers(forwarded_headers(headers));
        if !body.is_empty() {
            request = request.body(body);
        }
        let response = request.send().await.map_err(|e| format!("upstream: {e}"))?;
        let status = response.status();
        let headers = self.rewrite_headers(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("upstream body: {e}"))?;
        Ok(Upstream {
            status,
            headers,
            body,
        })
    }

    /// Drops hop-by-hop headers and points absolute upstream URLs at the proxy. Content-Length
    /// is kept: a HEAD answer must carry the manifest's size.
    fn rewrite_headers(&self, headers: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (name, value) in headers {
            if is_hop_by_hop(name) {
                continue;
            }
            let value =
                match [header::LOCATION, header::LINK, header::WWW_AUTHENTICATE].contains(name) {
                    true => self.rewrite_value(value),
                    false => value.clone(),
                };
            out.append(name.clone(), value);
        }
        out
    }

    fn rewrite_value(&self, value: &HeaderValue) -> HeaderValue {
        let Ok(text) = value.to_str() else {
            return value.clone();
        };
        let mut text = text.replace(&self.upstream, &self.origin);
        if let Some(token) = &self.token_upstream {
            text = text.replace(token.as_str(), &self.origin);
        }
        HeaderValue::try_from(text).unwrap_or_else(|_| value.clone())
    }

    /// Fetches the blob with the client's credentials, parks it on the redirect target and
    /// answers 307 there, like a registry handing out a pre-signed storage URL.
    async fn redirect_blob(&self, parts: &Parts) -> Response {
        let path = parts.uri.path();
        let upstream = match self
            .fetch(&parts.method, path, &parts.headers, Bytes::new())
            .await
        {
            Ok(upstream) => upstream,
            Err(error) => return (StatusCode::BAD_GATEWAY, error).into_response(),
        };
        if upstream.status != StatusCode::OK {
            return upstream.into_response();
        }
        let content_type = header_str(&upstream.headers, header::CONTENT_TYPE)
            .unwrap_or_else(|| "application/octet-stream".into());
        let id = self.redirect.next_id.fetch_add(1, Ordering::SeqCst);
        self.redirect
            .blobs
            .lock()
            .unwrap()
            .insert(id, (content_type, upstream.body));
        let location = format!(
            "{}/blobs/{id}?sig=harness-signature&se=2099-01-01",
            self.redirect_origin
        );
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response()
    }

    async fn paginated_tags(&self, parts: &Parts, paging: TagPaging) -> Response {
        let params = parse_query(parts.uri.query().unwrap_or(""));
        let n = match query_param(&params, "n").map(str::parse::<usize>) {
            Some(Err(_)) => {
                return registry_error(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    "invalid number of results requested",
                );
            }
            Some(Ok(n)) => Some(n),
            None => paging.default_n,
        };
        let n = n.map(|n| paging.max_n.map_or(n, |max| n.min(max)));
        let path = parts.uri.path();
        let upstream = match self
            .fetch(&Method::GET, path, &parts.headers, Bytes::new())
            .await
        {
            Ok(upstream) if upstream.status == StatusCode::OK => upstream,
            Ok(upstream) => return upstream.into_response(),
            Err(error) => return (StatusCode::BAD_GATEWAY, error).into_response(),
        };
        let body: Value = serde_json::from_slice(&upstream.body).unwrap_or_default();
        let page = tag_page(&body, query_param(&params, "last"), n);
        tags_page_response(&body["name"], path, page, n)
    }
}

/// The tags after `last` in lexical order, cut to `n`; the flag says whether more remain.
fn tag_page(body: &Value, last: Option<&str>, n: Option<usize>) -> (Vec<String>, bool) {
    let all = body["tags"].as_array().cloned().unwrap_or_default();
    let mut tags: Vec<String> = all
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    tags.sort();
    tags.retain(|t| last.is_none_or(|last| t.as_str() > last));
    match n {
        Some(0) => (Vec::new(), false),
        Some(n) if tags.len() > n => {
            tags.truncate(n);
            (tags, true)
        }
        _ => (tags, false),
    }
}

/// A page as distribution 3 writes it: origin-relative `Link` with `last` before `n`.
fn tags_page_response(
    name: &Value,
    path: &str,
    (tags, more): (Vec<String>, bool),
    n: Option<usize>,
) -> Response {
    let body = serde_json::to_vec(&json!({ "name": name, "tags": tags })).expect("JSON");
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let (true, Some(last), Some(n)) = (more, tags.last(), n) {
        let last = url::form_urlencoded::byte_serialize(last.as_bytes()).collect::<String>();
        let link = format!("<{path}?last={last}&n={n}>; rel=\"next\"");
        headers.insert(
            header::LINK,
            HeaderValue::try_from(link).expect("valid Link"),
        );
    }
    response
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ]
    .contains(name)
}

/// The client's headers minus hop-by-hop ones, `Host` (reqwest sets the upstream's) and
/// `Content-Length` (reqwest sets it from the body).
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if is_hop_by_hop(name) || name == header::HOST || name == header::CONTENT_LENGTH {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

async fn serve_redirected_blob(
    State(state): State<Arc<RedirectState>>,
    UrlPath(id): UrlPath<u64>,
    request: Request,
) -> Response {
    let authorization = header_str(request.headers(), header::AUTHORIZATION);
    let path = request.uri().path().to_owned();
    state.fetches.lock().unwrap().push(BlobFetch {
        path,
        authorization,
    });
    match state.blobs.lock().unwrap().get(&id) {
        Some((content_type, body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, content_type.clone())],
            body.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
