//! The cache: single flight, stale-while-revalidate, stale-if-error, persistence across restarts
//! (graceful and `kill -9`), and refreshes that drop deleted tags and move moved ones.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use crate::support::app::{App, Binary};
use crate::support::hub::{Failure, HubFake, HubTag, generate_tags};

fn find<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.as_array().unwrap().iter().find(|t| t["name"] == name)
}

/// Polls `/tags` until `check` holds (bounded: 10 s).
async fn eventually(app: &App, query: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let (_, body) = app.tags(query).await;
        if check(&body) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within 10 s");
}

#[tokio::test]
async fn concurrent_requests_share_one_upstream_fetch() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(250, "2024-01-01T00:00:00Z"));
    hub.set_delay(Duration::from_millis(300));
    let app = App::for_hub(&hub, &[]).await;
    let requests = (0..50).map(|_| app.get("/tags?image=acme/app"));
    let responses = join_all(requests).await;
    let mut bodies = Vec::new();
    for r in responses {
        assert_eq!(r.status(), 200);
        bodies.push(r.bytes().await.unwrap());
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every caller got the same answer"
    );
    assert_eq!(hub.count(), 3, "one fetch of three pages for fifty callers");
}

#[tokio::test]
async fn stale_answer_is_served_while_refreshing_and_refresh_applies_changes() {
    let hub = HubFake::start().await;
    let old_digest = format!("sha256:{}", "1".repeat(64));
    let new_digest = format!("sha256:{}", "2".repeat(64));
    hub.add_repo(
        "acme/app",
        vec![
            HubTag::new("moving")
                .pushed_at("2025-01-01T00:00:00Z")
                .digest(Some(&old_digest)),
            HubTag::new("doomed").pushed_at("2024-01-01T00:00:00Z"),
        ],
    );
    let app = App::for_hub(&hub, &["--refresh-interval", "1s"]).await;
    let (_, first) = app.tags("image=acme/app").await;
    assert_eq!(
        find(&first, "moving").unwrap()["digest"],
        old_digest.as_str()
    );

    // Upstream changes: `moving` points elsewhere, `doomed` is deleted, `fresh` is new.
    hub.set_tags(
        "acme/app",
        vec![
            HubTag::new("moving")
                .pushed_at("2026-01-01T00:00:00Z")
                .digest(Some(&new_digest)),
            HubTag::new("fresh").pushed_at("2025-06-01T00:00:00Z"),
        ],
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (headers, stale) = app.tags("image=acme/app").await;
    assert_eq!(headers["x-cache"], "stale");
    assert_eq!(stale, first, "the stale answer is served at once");

    let refreshed = eventually(&app, "image=acme/app", |b| find(b, "fresh").is_some()).await;
    assert_eq!(
        find(&refreshed, "moving").unwrap()["digest"],
        new_digest.as_str()
    );
    assert!(
        find(&refreshed, "doomed").is_none(),
        "deleted tags disappear"
    );
    assert_eq!(hub.count(), 2, "one initial fetch, one background refresh");
}

#[tokio::test]
async fn failed_refresh_keeps_serving_the_last_good_answer() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(5, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &["--refresh-interval", "1s"]).await;
    let (_, good) = app.tags("image=acme/app").await;
    hub.fail_always(Failure::html(503));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (headers, body) = app.tags("image=acme/app").await;
    assert_eq!(headers["x-cache"], "stale");
    assert_eq!(body, good);
    // The refresh (one attempt and two retries) fails; the failure is counted...
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = app.get("/metrics").await.text().await.unwrap();
        if metrics.contains("tag_proxy_refresh_errors_total{registry=\"docker\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains("tag_proxy_refresh_errors_total{registry=\"docker\"} 1"),
        "{metrics}"
    );
    // ...and the last good answer keeps being served.
    let (headers, body) = app.tags("image=acme/app").await;
    assert_eq!(headers["x-cache"], "stale");
    assert_eq!(body, good);
    // A failing registry is not asked again on every request.
    assert_eq!(
        hub.count(),
        4,
        "one fetch, then one refresh of three attempts"
    );
}

#[tokio::test]
async fn answers_survive_a_graceful_restart_without_upstream_requests() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(120, "2024-01-01T00:00:00Z"));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("docker={}", hub.url());
    let args = ["--registry-endpoint", endpoint.as_str()];
    let bin = Binary::spawn(dir.path(), &args).await;
    let first = bin.get("/tags?image=acme/app").await.text().await.unwrap();
    let status = bin.terminate().await;
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    let requests_before = hub.count();

    let bin = Binary::spawn(dir.path(), &args).await;
    let resp = bin.get("/tags?image=acme/app").await;
    assert_eq!(resp.headers()["x-cache"], "hit");
    assert_eq!(resp.text().await.unwrap(), first);
    assert_eq!(
        hub.count(),
        requests_before,
        "no upstream request after the restart"
    );
    bin.terminate().await;
}

#[tokio::test]
async fn answers_survive_kill_9() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/one", generate_tags(30, "2024-01-01T00:00:00Z"));
    hub.add_repo("acme/two", generate_tags(40, "2023-01-01T00:00:00Z"));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("docker={}", hub.url());
    let args = ["--registry-endpoint", endpoint.as_str()];
    let bin = Binary::spawn(dir.path(), &args).await;
    let one = bin.get("/tags?image=acme/one").await.text().await.unwrap();
    // Kill while a second fetch is in flight (its write may or may not land; nothing breaks).
    hub.set_delay(Duration::from_millis(200));
    let url = format!("{}/tags?image=acme/two", bin.url);
    let pending = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    bin.kill9().await;
    let _ = pending.await;
    hub.set_delay(Duration::ZERO);
    let requests_before = hub.count();

    let bin = Binary::spawn(dir.path(), &args).await;
    let resp = bin.get("/tags?image=acme/one").await;
    assert_eq!(resp.headers()["x-cache"], "hit");
    assert_eq!(resp.text().await.unwrap(), one);
    assert_eq!(hub.count(), requests_before);
    let two = bin.get("/tags?image=acme/two").await;
    assert_eq!(two.status(), 200, "the database is usable after kill -9");
    bin.terminate().await;
}

/// Reads one HTTP/1.1 response (with `Content-Length`) from `stream`, `chunk` bytes at a time
/// with a pause between reads, as a slow client would: returns the head and the body.
async fn read_response_slowly(
    stream: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
    chunk: usize,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; chunk];
    let mut read_more = async |pending: &mut Vec<u8>| {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "connection closed mid-response");
        pending.extend_from_slice(&buf[..n]);
    };
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(pending).await;
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    while pending.len() < head_end + length {
        read_more(pending).await;
    }
    let body = pending[head_end..head_end + length].to_vec();
    pending.drain(..head_end + length);
    (head, body)
}

/// Large cached answers are sent with `sendfile` from sealed memfds (`src/sendfile.rs`): the
/// real binary, started with a low open-file soft limit, raises it, keeps its 1,000-tag
/// answer in a memfd, and every client gets the same bytes: a fast one, one reading slowly
/// with two requests pipelined on one connection (so `sendfile` writes short and resumes),
/// and one that asks for gzip.
#[tokio::test]
async fn large_answers_are_sent_from_sealed_memfds_byte_for_byte() {
    use tokio::io::AsyncWriteExt;
    let hub = HubFake::start().await;
    hub.add_repo("acme/big", generate_tags(1000, "2024-01-01T00:00:00Z"));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("docker={}", hub.url());
    let args = ["--registry-endpoint", endpoint.as_str()];
    let bin = Binary::spawn_with_open_file_limit(dir.path(), &args, 64).await;

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bin.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit raised to the hard one: {limits}"
    );

    let miss = bin.get("/tags?image=acme/big").await;
    assert_eq!(miss.headers()["x-cache"], "miss");
    let expected = miss.bytes().await.unwrap().to_vec();
    assert!(expected.len() > 200_000, "{} bytes", expected.len());
    let tags: Value = serde_json::from_slice(&expected).unwrap();
    assert_eq!(tags.as_array().unwrap().len(), 1000);
    let hit = bin.get("/tags?image=acme/big").await;
    assert_eq!(hit.headers()["x-cache"], "hit");
    assert_eq!(hit.bytes().await.unwrap().to_vec(), expected);

    let memfds = std::fs::read_dir(format!("/proc/{}/fd", bin.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| {
            target
                .to_string_lossy()
                .starts_with("/memfd:oci-tag-proxy-answer")
        })
        .count();
    assert!(memfds >= 1, "the answer is held in a memfd");

    let addr = bin.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!("GET /tags?image=acme/big HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(format!("{request}{request}").as_bytes())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let (head, body) = read_response_slowly(&mut stream, &mut pending, 4096).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, expected, "slow pipelined reader gets the same bytes");
    }

    let gzip = reqwest::Client::builder()
        .no_proxy()
        .gzip(true)
        .build()
        .unwrap()
        .get(format!("{}/tags?image=acme/big", bin.url))
        .send()
        .await
        .unwrap();
    assert_eq!(gzip.status(), 200);
    assert_eq!(gzip.bytes().await.unwrap().to_vec(), expected);
    let status = bin.terminate().await;
    assert!(status.success(), "{status:?}");
}
