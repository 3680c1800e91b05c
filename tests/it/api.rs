//! The HTTP contract outside the happy path: every `400`, unknown routes and methods, health,
//! and `/metrics` checked by `promtool`.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::app::App;
use crate::support::hub::{HubFake, generate_tags};

async fn expect_400(app: &App, query: &str, needle: &str) {
    let resp = app.get(&format!("/tags?{query}")).await;
    assert_eq!(resp.status(), 400, "{query}");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{query}"
    );
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(needle),
        "{query}: {text:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn bad_input_is_400_with_a_reason() {
    let app = App::start(&["--allowed-registries", "quay.io,localhost:5000"]).await;
    let long = "a".repeat(256);
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "missing required query parameter \"image\""),
        (
            "image=".into(),
            "missing required query parameter \"image\"",
        ),
        ("registry=docker".into(), "missing required"),
        ("image=Nginx".into(), "lowercase"),
        ("image=/nginx".into(), "must not start or end with '/'"),
        ("image=nginx/".into(), "must not start or end with '/'"),
        ("image=a/../b&registry=quay.io".into(), "\"..\""),
        ("image=a%0Ab".into(), "invalid character"),
        ("image=a%00b".into(), "invalid character"),
        ("image=a%20b".into(), "invalid character"),
        (format!("image={long}&registry=quay.io"), "longer than 255"),
        ("image=a/b/c".into(), "at most two components"),
        ("image=nginx&registry=".into(), "\"registry\" is empty"),
        ("image=nginx&registry=evil.example".into(), "not allowed"),
        ("image=nginx&registry=127.0.0.1:6379".into(), "not allowed"),
        ("image=nginx&registry=http://x".into(), "invalid registry"),
        (
            "image=nginx&registry=quay.io:99999".into(),
            "invalid registry",
        ),
        ("image=nginx&registry=a%20b".into(), "invalid registry"),
        ("image=nginx&image=redis".into(), "more than once"),
        (
            "image=nginx&tag=latest".into(),
            "unknown query parameter \"tag\"",
        ),
    ];
    for (query, needle) in &cases {
        expect_400(&app, query, needle).await;
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let line = format!(
        "tag_proxy_requests_total{{registry=\"none\",status=\"error\"}} {}",
        cases.len()
    );
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_plain_text() {
    let app = App::start(&[]).await;
    let resp = app.get("/nope").await;
    assert_eq!(resp.status(), 404);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let resp = app
        .client
        .post(format!("{}/tags?image=nginx", app.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let app = App::start(&[]).await;
    let resp = app.get("/healthz").await;
    assert_eq!(resp.status(), 200);
    let resp = app.get("/readyz").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("ready"));
    assert!(app.dir().join("cache.redb").exists());
    app.stop().await;
}

/// Runs `promtool check metrics` on `text` and returns its output (panics on failure).
fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; ./scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n---\n{text}"
    );
    report
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_what_happened() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(150, "2024-01-01T00:00:00Z"));
    let endpoint = format!("docker={}", hub.url());
    let app = App::start(&["--registry-endpoint", &endpoint]).await;
    app.tags("image=acme/app").await;
    app.tags("image=acme/app").await;
    let _ = app.get("/tags?image=missing/repo").await;
    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let report = promtool_check(&text);
    assert!(
        report.trim().is_empty(),
        "promtool found problems: {report}"
    );
    for needle in [
        "tag_proxy_requests_total{registry=\"docker\",status=\"success\"} 1",
        "tag_proxy_requests_total{registry=\"docker\",status=\"cache_hit\"} 1",
        "tag_proxy_requests_total{registry=\"docker\",status=\"error\"} 1",
        "tag_proxy_registry_fetch_seconds_count{registry=\"docker\"} 2",
        "tag_proxy_upstream_requests_total{registry=\"docker\",kind=\"tag_page\",status=\"200\"} 2",
        "tag_proxy_upstream_requests_total{registry=\"docker\",kind=\"tag_page\",status=\"404\"} 1",
        "tag_proxy_cache_entries{tier=\"disk\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    assert!(!text.contains("acme"), "no image names in labels");
}
