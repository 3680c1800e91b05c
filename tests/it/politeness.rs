//! Being a good upstream citizen: back-off on 429 and "0 remaining", bounded retries, the
//! circuit breaker, the rate cap, credentials (Docker config, Hub login), incremental Docker Hub
//! refreshes, and cache keys that keep credentialed answers apart. Each test counts requests.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::support::app::App;
use crate::support::hub::{Failure, HubFake, generate_tags};
use crate::support::registry::{CountingProxy, Fault, ImageSpec, Kind, Registry, RegistryAuth};

fn tag_pages(hub: &HubFake) -> usize {
    hub.requests()
        .iter()
        .filter(|r| r.path.ends_with("/tags"))
        .count()
}

async fn metrics(app: &App) -> String {
    app.get("/metrics").await.text().await.unwrap()
}

#[tokio::test]
async fn a_429_backs_off_the_whole_host() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/one", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.add_repo("acme/two", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.fail_next(1, Failure::rate_limited(40));
    let app = App::for_hub(&hub, &[]).await;
    let resp = app.get("/tags?image=acme/one").await;
    assert_eq!(resp.status(), 429);
    // Another image on the same host: answered 429 at once, nothing sent upstream.
    let resp = app.get("/tags?image=acme/two").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((30..=41).contains(&retry), "{retry}");
    assert_eq!(hub.count(), 1, "no request during the back-off");
    let m = metrics(&app).await;
    assert!(
        m.contains("tag_proxy_upstream_refused_total{registry=\"docker\",reason=\"backoff\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_and_stale_answers_during_back_off() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_image(
            "acme/app",
            "v1",
            &ImageSpec::linux("amd64").created("2024-01-01T00:00:00Z"),
        )
        .await;
    reg.pusher()
        .push_image("acme/other", "v1", &ImageSpec::linux("amd64").salt(2))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    let endpoint = format!("{}={}", proxy.host(), proxy.url());
    let app = App::start(&[
        "--allowed-registries",
        &proxy.host(),
        "--registry-endpoint",
        &endpoint,
        "--refresh-interval",
        "1s",
    ])
    .await;
    let app_path = format!("/tags?image=acme/app&registry={}", proxy.host());
    let (_, good) = app.tags_at(&app_path).await;

    let when = chrono::Utc::now() + chrono::TimeDelta::seconds(20);
    let date = when.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    proxy.fault(
        Fault::on(Kind::TagList)
            .respond(429)
            .header("Retry-After", &date)
            .times(1),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    proxy.reset();
    // The stale answer is served; its background refresh meets the 429.
    let (headers, body) = app.tags_at(&app_path).await;
    assert_eq!(headers["x-cache"], "stale");
    assert_eq!(body, good);
    for _ in 0..100 {
        if proxy.count(Kind::TagList) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // During the back-off: cached answers still served, misses get 429 without a request.
    let (headers, _) = app.tags_at(&app_path).await;
    assert_eq!(headers["x-cache"], "stale");
    let miss = app
        .get(&format!("/tags?image=acme/other&registry={}", proxy.host()))
        .await;
    assert_eq!(miss.status(), 429);
    let retry: u64 = miss.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (15..=21).contains(&retry),
        "HTTP-date Retry-After honoured: {retry}"
    );
    assert_eq!(proxy.total(), 1, "only the request that met the 429");
}

#[tokio::test]
async fn ratelimit_remaining_zero_backs_off_and_is_exported() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/one", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.add_repo("acme/two", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.set_rate_limit(1);
    let app = App::for_hub(&hub, &[]).await;
    let (_, body) = app.tags("image=acme/one").await;
    assert_eq!(
        body.as_array().unwrap().len(),
        3,
        "the answer that said 0 remaining is good"
    );
    let resp = app.get("/tags?image=acme/two").await;
    assert_eq!(resp.status(), 429, "no request after remaining hit 0");
    assert_eq!(hub.count(), 1);
    let m = metrics(&app).await;
    assert!(
        m.contains("tag_proxy_upstream_ratelimit_limit{registry=\"docker\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tag_proxy_upstream_ratelimit_remaining{registry=\"docker\"} 0"),
        "{m}"
    );
}

#[tokio::test]
async fn transient_bursts_are_retried_client_errors_are_not() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &[]).await;
    hub.fail_next(2, Failure::html(503));
    let (_, body) = app.tags("image=acme/app").await;
    assert_eq!(body.as_array().unwrap().len(), 3);
    assert_eq!(hub.count(), 3, "two 503s, then the answer");

    let app = App::for_hub(&hub, &[]).await;
    hub.reset_counts();
    hub.fail_next(1, Failure::Status(400, "{\"message\":\"bad\"}".into()));
    assert_eq!(app.get("/tags?image=acme/app").await.status(), 502);
    assert_eq!(hub.count(), 1, "a 400 is not retried");
    hub.fail_next(1, Failure::Status(403, "{\"message\":\"no\"}".into()));
    assert_eq!(app.get("/tags?image=acme/app").await.status(), 403);
    assert_eq!(hub.count(), 2, "a 403 is not retried");
}

#[tokio::test]
async fn circuit_breaker_opens_and_closes() {
    let hub = HubFake::start().await;
    for name in ["acme/a", "acme/b", "acme/c", "acme/d"] {
        hub.add_repo(name, generate_tags(2, "2024-01-01T00:00:00Z"));
    }
    let app = App::for_hub(
        &hub,
        &[
            "--upstream-retries",
            "0",
            "--breaker-threshold",
            "2",
            "--breaker-cooldown",
            "1s",
        ],
    )
    .await;
    hub.fail_always(Failure::html(502));
    assert_eq!(app.get("/tags?image=acme/a").await.status(), 502);
    assert_eq!(app.get("/tags?image=acme/b").await.status(), 502);
    let open = app.get("/tags?image=acme/c").await;
    assert_eq!(open.status(), 503, "breaker open");
    assert!(open.headers().contains_key("retry-after"));
    assert!(open.text().await.unwrap().contains("kept failing"));
    assert_eq!(hub.count(), 2, "nothing sent while open");
    assert!(metrics(&app).await.contains("reason=\"breaker_open\"} 1"));

    hub.clear_failures();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = app.tags("image=acme/c").await;
    assert_eq!(
        body.as_array().unwrap().len(),
        2,
        "one trial after the cooldown, and it closes"
    );
    app.tags("image=acme/d").await;
    assert_eq!(hub.count(), 4);
}

#[tokio::test]
async fn request_rate_cap_spaces_requests() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(450, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &["--upstream-rate-limit", "2"]).await;
    app.tags("image=acme/app").await;
    let at: Vec<_> = hub.requests().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 5);
    // A burst of two, then one every half second.
    for pair in at[2..].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(400), "gap {gap:?}");
    }
}

#[tokio::test]
async fn docker_hub_refresh_stops_at_the_first_unchanged_page() {
    let hub = HubFake::start().await;
    hub.set_rate_limit(10_000);
    let mut tags = generate_tags(450, "2024-01-01T00:00:00Z");
    hub.add_repo("acme/app", tags.clone());
    let app = App::for_hub(&hub, &["--refresh-interval", "1s"]).await;
    app.tags("image=acme/app").await;
    assert_eq!(tag_pages(&hub), 5, "the first fetch walks every page");

    async fn refresh(app: &App, hub: &HubFake, pages_before: usize) -> Value {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (h, _) = app.tags("image=acme/app").await;
        assert_eq!(h["x-cache"], "stale");
        for _ in 0..100 {
            if tag_pages(hub) > pages_before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.tags("image=acme/app").await.1
    }

    // Nothing changed: one request.
    let body = refresh(&app, &hub, 5).await;
    assert_eq!(tag_pages(&hub), 6);
    assert_eq!(body.as_array().unwrap().len(), 450);

    // Ten tags re-pushed: they come first; page 1 holds them plus 90 unchanged tags, and page 2
    // is entirely unchanged: two requests.
    for t in tags.iter_mut().take(10) {
        *t = t
            .clone()
            .pushed_at("2026-06-01T00:00:00Z")
            .digest(Some(&format!("sha256:{}", "9".repeat(64))));
    }
    hub.set_tags("acme/app", tags);
    let body = refresh(&app, &hub, 6).await;
    assert_eq!(tag_pages(&hub), 8);
    assert_eq!(body.as_array().unwrap().len(), 450);
    assert_eq!(body[0]["last_updated"], "2026-06-01T00:00:00Z");
}

#[tokio::test]
async fn docker_hub_login_pages_past_the_anonymous_cap_and_renews() {
    let hub = HubFake::start().await;
    hub.set_rate_limit(10_000);
    hub.add_repo("acme/big", generate_tags(1_100, "2020-01-01T00:00:00Z"));
    // A JWT that expires in 75 s: the proxy renews it 60 s early, so it is good for ~15 s.
    let exp = chrono::Utc::now().timestamp() + 75;
    let claims =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
    let jwt = format!("e30.{claims}.sig");
    hub.set_login("alice", "dckr_pat_secret", &jwt);
    let app = App::for_hub(
        &hub,
        &[
            "--max-tags",
            "2000",
            "--docker-hub-username",
            "alice",
            "--docker-hub-token",
            "dckr_pat_secret",
        ],
    )
    .await;
    let (headers, body) = app.tags("image=acme/big").await;
    assert_eq!(
        body.as_array().unwrap().len(),
        1_100,
        "past offset 1000 with the login"
    );
    assert!(headers.get("x-tags-truncated").is_none());
    let logins = |hub: &HubFake| {
        hub.requests()
            .iter()
            .filter(|r| r.path == "/v2/auth/token")
            .count()
    };
    assert_eq!(logins(&hub), 1);
    assert!(
        hub.requests()
            .iter()
            .filter(|r| r.path.ends_with("/tags"))
            .all(|r| r.has_auth())
    );
    tokio::time::sleep(Duration::from_secs(16)).await;
    hub.add_repo("acme/small", generate_tags(2, "2020-01-01T00:00:00Z"));
    app.tags("image=acme/small").await;
    assert_eq!(logins(&hub), 2, "an expiring login is renewed");

    // Wrong secret: a clear error, and the secret appears nowhere.
    let bad = App::for_hub(
        &hub,
        &[
            "--docker-hub-username",
            "alice",
            "--docker-hub-token",
            "wrong-secret",
        ],
    )
    .await;
    let resp = bad.get("/tags?image=acme/small").await;
    assert_eq!(resp.status(), 403);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("wrong-secret") && !text.contains("dckr_pat"),
        "{text}"
    );
    assert!(!metrics(&bad).await.contains("wrong-secret"));
}

#[tokio::test]
async fn docker_config_credentials_and_separate_cache_keys() {
    let reg = Registry::start(RegistryAuth::htpasswd("alice", "pw-from-config")).await;
    reg.pusher()
        .push_image(
            "private/app",
            "v1",
            &ImageSpec::linux("arm64").created("2024-01-01T00:00:00Z"),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:pw-from-config");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let endpoint = format!("{}={}", reg.host(), reg.url());
    let base = [
        "--allowed-registries",
        &reg.host(),
        "--registry-endpoint",
        &endpoint,
    ];
    let query = format!("image=private/app&registry={}", reg.host());

    let mut args = base.to_vec();
    args.extend(["--docker-config", config.to_str().unwrap()]);
    let app = App::start_in(cache.path(), &args).await;
    let (_, body) = app.tags(&query).await;
    assert_eq!(body[0]["architectures"], serde_json::json!(["arm64"]));
    app.stop().await;

    // The same cache directory without credentials: the private answer is not served.
    let anonymous = App::start_in(cache.path(), &base).await;
    let resp = anonymous.get(&format!("/tags?{query}")).await;
    assert_eq!(
        resp.status(),
        403,
        "fetched anew without credentials, and refused"
    );
}

#[tokio::test]
async fn docker_config_identity_token_uses_the_oauth2_form() {
    let reg = Registry::start(RegistryAuth::token("carol", "carols-refresh-token")).await;
    reg.pusher()
        .push_image(
            "team/app",
            "v1",
            &ImageSpec::linux("amd64").created("2024-01-01T00:00:00Z"),
        )
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths":{{"{}":{{"identitytoken":"carols-refresh-token"}}}}}}"#,
            proxy.host()
        ),
    )
    .unwrap();
    let endpoint = format!("{}={}", proxy.host(), proxy.url());
    let app = App::start(&[
        "--allowed-registries",
        &proxy.host(),
        "--registry-endpoint",
        &endpoint,
        "--docker-config",
        config.to_str().unwrap(),
    ])
    .await;
    let (_, body) = app
        .tags(&format!("image=team/app&registry={}", proxy.host()))
        .await;
    assert_eq!(body[0]["name"], "v1");
    let token_requests: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Token)
        .collect();
    assert_eq!(token_requests.len(), 1);
    assert_eq!(token_requests[0].method, reqwest::Method::POST);
    let ts = reg.token_server().unwrap();
    assert!(ts.requests().iter().all(|r| r.authenticated));
}
