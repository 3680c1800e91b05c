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
