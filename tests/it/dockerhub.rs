//! `/tags?registry=docker` against the Docker Hub fake: shape, order, paging, caps and failures.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::App;
use crate::support::hub::{Failure, HubFake, HubImage, HubTag, generate_tags};

fn names(body: &Value) -> Vec<&str> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn shape_order_and_nulls() {
    let hub = HubFake::start().await;
    hub.add_repo(
        "library/nginx",
        vec![
            HubTag::multi_arch(
                "1.25",
                "2025-06-01T10:00:00Z",
                &["amd64", "arm64/v8", "arm/v7"],
            ),
            HubTag::multi_arch("latest", "2026-02-07T08:15:30Z", &["amd64", "arm64/v8"]).images(
                vec![
                    HubImage::platform("amd64"),
                    HubImage::platform("arm64/v8"),
                    HubImage::unknown(),
                ],
            ),
            HubTag::new("undated")
                .without_digest()
                .last_updated(None)
                .tag_last_pushed(None)
                .images(vec![]),
        ],
    );
    let app = App::for_hub(&hub, &[]).await;
    let (headers, body) = app.tags("image=nginx").await;
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-cache"], "miss");
    assert!(headers.get("x-tags-truncated").is_none());
    assert_eq!(names(&body), ["latest", "1.25", "undated"]);
    let latest = &body[0];
    assert_eq!(latest["last_updated"], "2026-02-07T08:15:30Z");
    assert_eq!(latest["architectures"], json!(["amd64", "arm64"]));
    assert_eq!(
        latest["platforms"],
        json!(["linux/amd64", "linux/arm64/v8"])
    );
    assert!(latest["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(body[1]["architectures"], json!(["amd64", "arm", "arm64"]));
    let undated = &body[2];
    assert_eq!(
        undated["last_updated"],
        Value::Null,
        "a null date stays null"
    );
    assert_eq!(undated["digest"], Value::Null);
    assert_eq!(undated["architectures"], json!([]));
    let keys: Vec<_> = latest.as_object().unwrap().keys().cloned().collect();
    for k in ["name", "last_updated", "architectures", "digest"] {
        assert!(keys.contains(&k.to_string()), "{k} in {keys:?}");
    }

    // The request used the documented endpoint, newest first, 100 per page.
    let reqs = hub.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].path,
        "/v2/namespaces/library/repositories/nginx/tags"
    );
    assert_eq!(reqs[0].param("ordering").as_deref(), Some("last_updated"));
    assert_eq!(reqs[0].param("page_size").as_deref(), Some("100"));
    assert!(!reqs[0].has_auth());

    // The second answer comes from the cache, byte for byte, without a request.
    let (headers, again) = app.tags("image=library/nginx&registry=docker").await;
    assert_eq!(headers["x-cache"], "hit");
    assert_eq!(again, body);
    assert_eq!(hub.count(), 1);
}

#[tokio::test]
async fn follows_next_across_pages() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(250, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &[]).await;
    let (_, body) = app.tags("image=acme/app").await;
    assert_eq!(body.as_array().unwrap().len(), 250);
    assert_eq!(names(&body)[0], "1.249.0", "newest first");
    assert_eq!(hub.count(), 3, "three pages of 100");
}

#[tokio::test]
async fn max_tags_stops_paging_early() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(500, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &["--max-tags", "150"]).await;
    let (headers, body) = app.tags("image=acme/app").await;
    assert_eq!(body.as_array().unwrap().len(), 150);
    assert_eq!(names(&body)[0], "1.499.0");
    assert_eq!(headers["x-tags-truncated"], "true");
    assert_eq!(hub.count(), 2, "stops once max-tags is reached");

    // Exactly max-tags tags, and the list ends there: complete, not truncated.
    hub.add_repo("acme/exact", generate_tags(150, "2024-01-01T00:00:00Z"));
    let (headers, body) = app.tags("image=acme/exact").await;
    assert_eq!(body.as_array().unwrap().len(), 150);
    assert!(headers.get("x-tags-truncated").is_none());
}

#[tokio::test]
async fn anonymous_offset_cap_truncates_and_jwt_lifts_it() {
    let hub = HubFake::start().await;
    hub.set_rate_limit(10_000);
    hub.add_repo("acme/big", generate_tags(1_500, "2020-01-01T00:00:00Z"));
    let app = App::for_hub(&hub, &["--max-tags", "5000"]).await;
    let (headers, body) = app.tags("image=acme/big").await;
    assert_eq!(body.as_array().unwrap().len(), 1_000);
    assert_eq!(headers["x-tags-truncated"], "true");
    assert_eq!(hub.count(), 11, "ten pages, then the 403 at offset 1000");

    hub.set_token("hub-jwt-secret");
    hub.reset_counts();
    let app = App::for_hub(&hub, &["--max-tags", "5000", "--jwt", "hub-jwt-secret"]).await;
    let (headers, body) = app.tags("image=acme/big").await;
    assert_eq!(body.as_array().unwrap().len(), 1_500);
    assert!(headers.get("x-tags-truncated").is_none());
    assert!(hub.requests().iter().all(|r| r.has_auth()));
    assert_eq!(hub.count(), 15);
}

#[tokio::test]
async fn unknown_repository_is_404_plain_text() {
    let hub = HubFake::start().await;
    let app = App::for_hub(&hub, &[]).await;
    let resp = app.get("/tags?image=nosuch/repo").await;
    assert_eq!(resp.status(), 404);
    // Asked again at once: the 404 is remembered briefly, no second upstream request.
    let again = app.get("/tags?image=nosuch/repo").await;
    assert_eq!(again.status(), 404);
    assert_eq!(hub.count(), 1);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("404"), "{text}");
    assert!(
        text.contains("/v2/namespaces/nosuch/repositories/repo/tags"),
        "{text}"
    );
}

#[tokio::test]
async fn rate_limit_is_429_with_retry_after_and_no_hammering() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.fail_next(1, Failure::rate_limited(30));
    let app = App::for_hub(&hub, &[]).await;
    let resp = app.get("/tags?image=acme/app").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((25..=31).contains(&retry), "retry-after {retry}");
    assert!(resp.text().await.unwrap().contains("429"));
    // Within the Retry-After window no request goes upstream.
    let resp = app.get("/tags?image=acme/app").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(hub.count(), 1);
}

#[tokio::test]
async fn abuse_limit_plain_text_429() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.fail_next(1, Failure::Abuse429);
    let app = App::for_hub(&hub, &[]).await;
    let resp = app.get("/tags?image=acme/app").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "60");
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    let app = App::for_hub(
        &hub,
        &["--upstream-timeout", "1s", "--max-body-bytes", "65536"],
    )
    .await;
    // Transient failures are retried twice, so they must fail three times to show; malformed
    // answers and refused redirects are not retried.
    let cases: Vec<(Failure, usize, u16, &str)> = vec![
        (Failure::html(503), 3, 502, "503"),
        (Failure::Status(500, "{}".into()), 3, 502, "500"),
        (Failure::Truncated, 1, 502, "invalid JSON"),
        (Failure::WrongContentType, 1, 502, "content type"),
        (Failure::Huge(1_000_000), 1, 502, "larger than"),
        (Failure::Disconnect, 3, 502, ""),
        (
            Failure::Hang(Duration::from_secs(3)),
            3,
            504,
            "did not answer",
        ),
        // The redirect target refuses connections: a network error, so retried.
        (
            Failure::Redirect("http://127.0.0.1:1/elsewhere".into()),
            3,
            502,
            "127.0.0.1:1",
        ),
    ];
    for (failure, times, status, needle) in cases {
        let label = format!("{failure:?}");
        hub.reset_counts();
        hub.fail_next(times, failure);
        let resp = app.get("/tags?image=acme/app").await;
        assert_eq!(resp.status(), status, "{label}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(needle), "{label}: {text}");
        assert_eq!(hub.count(), times, "{label}: attempts");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("kind=\"tag_page\",status=\"timeout\"} 3"),
        "time-outs are counted: {metrics}"
    );
    // After all that, a good answer still comes through.
    let (_, body) = app.tags("image=acme/app").await;
    assert_eq!(body.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn redirect_to_loopback_is_refused_by_default() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", generate_tags(3, "2024-01-01T00:00:00Z"));
    hub.fail_next(
        1,
        Failure::Redirect(format!(
            "{}/v2/namespaces/acme/repositories/app/tags",
            hub.url()
        )),
    );
    let endpoint = format!("docker={}", hub.url());
    let app = App::start_strict(&["--registry-endpoint", &endpoint]).await;
    let resp = app.get("/tags?image=acme/app").await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(text.contains("private address"), "{text}");
}
