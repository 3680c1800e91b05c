//! Several replicas sharing one real `redis-server`: one upstream fetch per image cluster-wide,
//! prompt propagation of fresh answers, Redis outages that fail no request, and a lock holder
//! killed mid-fetch.

use std::time::Duration;

use futures_util::future::join_all;

use crate::support::app::{App, Binary};
use crate::support::hub::{HubFake, HubTag, generate_tags};
use crate::support::redis::RedisServer;

async fn replica(hub: &HubFake, redis: &RedisServer, extra: &[&str]) -> App {
    let endpoint = format!("docker={}", hub.url());
    let url = redis.url();
    let mut args = vec![
        "--registry-endpoint",
        endpoint.as_str(),
        "--redis-url",
        url.as_str(),
    ];
    args.extend_from_slice(extra);
    App::start(&args).await
}

fn pages(hub: &HubFake, repo: &str) -> usize {
    let path = format!(
        "/v2/namespaces/{}/repositories/{}/tags",
        repo.split('/').next().unwrap(),
        repo.split('/').nth(1).unwrap()
    );
    hub.requests().iter().filter(|r| r.path == path).count()
}

/// The body of `path` once it contains `needle`, or the last one after 5 s.
async fn text_until(app: &App, path: &str, needle: &str) -> String {
    let mut body = String::new();
    for _ in 0..50 {
        body = text(app, path).await;
        if body.contains(needle) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    body
}

async fn text(app: &App, path: &str) -> String {
    app.get(path).await.text().await.unwrap()
}

#[tokio::test]
async fn three_replicas_fetch_each_image_once() {
    let redis = RedisServer::start().await;
    let hub = HubFake::start().await;
    hub.set_rate_limit(10_000);
    for repo in ["acme/one", "acme/two"] {
        hub.add_repo(repo, generate_tags(250, "2024-01-01T00:00:00Z"));
    }
    hub.set_delay(Duration::from_millis(200));
    let replicas = [
        replica(&hub, &redis, &[]).await,
        replica(&hub, &redis, &[]).await,
        replica(&hub, &redis, &[]).await,
    ];
    let requests = (0..60).map(|i| {
        let app = &replicas[i % 3];
        let repo = if i % 2 == 0 { "acme/one" } else { "acme/two" };
        async move { app.get(&format!("/tags?image={repo}")).await }
    });
    let responses = join_all(requests).await;
    let mut bodies = std::collections::HashMap::new();
    for (i, r) in responses.into_iter().enumerate() {
        assert_eq!(r.status(), 200);
        bodies
            .entry(i % 2)
            .or_insert_with(Vec::new)
            .push(r.bytes().await.unwrap());
    }
    for same in bodies.values() {
        assert!(same.windows(2).all(|w| w[0] == w[1]));
    }
    assert_eq!(
        pages(&hub, "acme/one"),
        3,
        "one fetch (3 pages) for acme/one across 3 replicas"
    );
    assert_eq!(
        pages(&hub, "acme/two"),
        3,
        "one fetch (3 pages) for acme/two across 3 replicas"
    );
}

#[tokio::test]
async fn a_fresh_answer_reaches_the_other_replicas() {
    let redis = RedisServer::start().await;
    let hub = HubFake::start().await;
    hub.add_repo(
        "acme/app",
        vec![HubTag::new("v1").pushed_at("2024-01-01T00:00:00Z")],
    );
    let a = replica(&hub, &redis, &["--refresh-interval", "2s"]).await;
    let b = replica(&hub, &redis, &["--refresh-interval", "2s"]).await;
    let first = text(&a, "/tags?image=acme/app").await;
    let resp = b.get("/tags?image=acme/app").await;
    assert_eq!(
        resp.headers()["x-cache"],
        "hit",
        "b finds a's answer in Redis"
    );
    assert_eq!(resp.text().await.unwrap(), first);
    assert_eq!(hub.count(), 1);

    hub.set_tags(
        "acme/app",
        vec![
            HubTag::new("v2").pushed_at("2025-01-01T00:00:00Z"),
            HubTag::new("v1").pushed_at("2024-01-01T00:00:00Z"),
        ],
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        a.get("/tags?image=acme/app").await.headers()["x-cache"],
        "stale"
    );
    assert!(hub.wait_for_requests(2, Duration::from_secs(5)).await);
    // a's refresh is announced: b drops its old copy and reads the new one from Redis.
    let seen = text_until(&b, "/tags?image=acme/app", "\"v2\"").await;
    assert!(seen.contains("\"v2\""), "{seen}");
    assert_eq!(hub.count(), 2, "b did not fetch it itself");
}

#[tokio::test]
async fn redis_outage_fails_no_request_and_recovers() {
    let mut redis = RedisServer::start().await;
    let hub = HubFake::start().await;
    for repo in ["acme/a", "acme/b", "acme/c"] {
        hub.add_repo(repo, generate_tags(3, "2024-01-01T00:00:00Z"));
    }
    let app = replica(&hub, &redis, &[]).await;
    assert_eq!(app.get("/tags?image=acme/a").await.status(), 200);
    redis.stop().await;
    // Noticed without a request that uses Redis (the update listener and the watchdog).
    let ready = text_until(&app, "/readyz", "redis: DOWN").await;
    assert!(ready.contains("redis: DOWN"), "noticed while idle: {ready}");

    assert_eq!(
        app.get("/tags?image=acme/a").await.status(),
        200,
        "from memory"
    );
    assert_eq!(
        app.get("/tags?image=acme/b").await.status(),
        200,
        "fetched without Redis"
    );
    let ready = text(&app, "/readyz").await;
    assert!(ready.contains("redis: DOWN"), "{ready}");
    assert!(
        text(&app, "/metrics")
            .await
            .contains("tag_proxy_redis_up 0")
    );

    redis.restart().await;
    let mut ready = String::new();
    for _ in 0..50 {
        assert_eq!(app.get("/tags?image=acme/c").await.status(), 200);
        ready = text(&app, "/readyz").await;
        if ready.contains("redis: up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ready.contains("redis: up"),
        "reconnected by itself: {ready}"
    );
    // New answers reach Redis again: a second replica finds the first one's next answer there.
    hub.add_repo("acme/d", generate_tags(2, "2024-01-01T00:00:00Z"));
    assert_eq!(app.get("/tags?image=acme/d").await.status(), 200);
    let other = replica(&hub, &redis, &[]).await;
    let before = hub.count();
    let resp = other.get("/tags?image=acme/d").await;
    assert_eq!(resp.headers()["x-cache"], "hit");
    assert_eq!(hub.count(), before, "served from Redis");
}

#[tokio::test]
async fn a_killed_lock_holder_is_taken_over_after_the_expiry() {
    let redis = RedisServer::start().await;
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.set_delay(Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("docker={}", hub.url());
    let url = redis.url();
    let args = [
        "--registry-endpoint",
        &endpoint,
        "--redis-url",
        &url,
        "--redis-lock-ttl",
        "2s",
    ];
    let holder = Binary::spawn(dir.path(), &args).await;
    let pending = {
        let url = format!("{}/tags?image=acme/app", holder.url);
        tokio::spawn(async move { reqwest::get(url).await })
    };
    assert!(
        hub.wait_for_requests(1, Duration::from_secs(10)).await,
        "the holder is fetching"
    );
    holder.kill9().await;
    let _ = pending.await;
    hub.set_delay(Duration::ZERO);

    let taker = replica(&hub, &redis, &["--redis-lock-ttl", "2s"]).await;
    let started = std::time::Instant::now();
    let resp = taker.get("/tags?image=acme/app").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        hub.count(),
        2,
        "the dead holder's request, then the taker's"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}
