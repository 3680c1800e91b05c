//! A memo in front of the real registry for content-addressed reads only: `GET`/`HEAD` of
//! `/v2/<name>/manifests/sha256:…` and `/v2/<name>/blobs/sha256:…`. What a digest names never
//! changes, so answering those from memory is exactly what the registry would answer (real
//! registries serve them from caches and CDNs too); everything else — tag lists, manifests by
//! tag, uploads — goes to the registry every time, so moved tags are seen at once.
//!
//! Why: Debian's `docker-registry` 2.8.2 spends about 2 ms of CPU per manifest request here.
//! A cold fetch of 1,000 tags makes 3,010 requests, so without the memo the registry alone
//! needs some 11 CPU-seconds, more than the 7.7 s the latency bound allows on this 2-core
//! machine, and item 2 would measure the test registry instead of the proxy. The chain is
//! service → `CountingProxy` (counts, injected latency, paging) → this memo → registry, so the
//! counts and the latency apply to every request the service sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

type Key = (Method, String, String);

struct Memo {
    upstream: String,
    client: reqwest::Client,
    answers: Mutex<HashMap<Key, (StatusCode, HeaderMap, Bytes)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The memo server on `127.0.0.1:<free port>`; stops when dropped.
pub struct ImmutableCache {
    url: String,
    memo: Arc<Memo>,
    task: JoinHandle<()>,
}

impl ImmutableCache {
    pub async fn start(upstream: &str) -> ImmutableCache {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the memo");
        let url = format!("http://{}", listener.local_addr().expect("memo address"));
        let memo = Arc::new(Memo {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("memo client"),
            answers: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(memo.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("memo server");
        });
        ImmutableCache { url, memo, task }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// (answered from memory, forwarded) content-addressed requests so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.memo.hits.load(Ordering::Relaxed),
            self.memo.misses.load(Ordering::Relaxed),
        )
    }
}

impl Drop for ImmutableCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_content_addressed(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (path.contains("/manifests/sha256:")
            || (path.contains("/blobs/sha256:") && !path.contains("/blobs/uploads")))
}

async fn handle(State(memo): State<Arc<Memo>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let memoize = is_content_addressed(&parts.method, parts.uri.path());
    let key = (parts.method.clone(), path_and_query.clone(), accept);
    if memoize && let Some(answer) = memo.answers.lock().unwrap().get(&key).cloned() {
        memo.hits.fetch_add(1, Ordering::Relaxed);
        return respond(answer);
    }
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut forward = memo.client.request(
        parts.method.clone(),
        format!("{}{path_and_query}", memo.upstream),
    );
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) && name != header::HOST && name != header::CONTENT_LENGTH {
            forward = forward.header(name, value);
        }
    }
    if !body.is_empty() {
        forward = forward.body(body);
    }
    let upstream = match forward.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("memo: {e}")).into_response(),
    };
    let status = upstream.status();
    let mut headers = HeaderMap::new();
    for (name, value) in upstream.headers() {
        if !is_hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let Ok(bytes) = upstream.bytes().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let answer = (status, headers, bytes);
    if memoize && status == StatusCode::OK {
        memo.misses.fetch_add(1, Ordering::Relaxed);
        memo.answers.lock().unwrap().insert(key, answer.clone());
    }
    respond(answer)
}

/// The stored answer; `Content-Length` is kept, so a `HEAD` answer still tells the size.
fn respond((status, headers, body): (StatusCode, HeaderMap, Bytes)) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
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
