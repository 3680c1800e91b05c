//! What pollers want: `sort`, `order`, `semver`, `filter`, `exclude`, `arch`, `limit`,
//! `/tags/latest`, ETag/304, compression, and the OpenAPI document.

use serde_json::{Value, json};

use crate::support::app::App;
use crate::support::hub::{HubFake, HubImage, HubTag};

/// A Docker Hub repository with the tag shapes real repositories carry.
async fn fixture() -> (HubFake, App) {
    let hub = HubFake::start().await;
    let t = |name: &str, date: &str, platforms: &[&str]| {
        HubTag::new(name)
            .pushed_at(date)
            .images(platforms.iter().map(|p| HubImage::platform(p)).collect())
    };
    hub.add_repo(
        "library/nginx",
        vec![
            t(
                "latest",
                "2026-01-10T00:00:00Z",
                &["amd64", "arm64/v8", "arm/v7"],
            ),
            t("mainline", "2026-01-10T00:00:00Z", &["amd64", "arm64/v8"]),
            t("2.0.0-rc1", "2026-01-09T00:00:00Z", &["amd64"]),
            t("1.25.3", "2026-01-05T00:00:00Z", &["amd64", "arm64/v8"]),
            t(
                "1.25.3-alpine",
                "2026-01-05T00:00:00Z",
                &["amd64", "arm/v7"],
            ),
            t("v1.25.2", "2025-12-01T00:00:00Z", &["amd64"]),
            t("1.25", "2025-11-01T00:00:00Z", &["amd64", "arm64/v8"]),
            t("1.9", "2020-01-01T00:00:00Z", &["amd64"]),
            t("1.10", "2021-01-01T00:00:00Z", &["amd64"]),
            t("stable", "2024-01-01T00:00:00Z", &["s390x"]),
        ],
    );
    hub.add_repo(
        "acme/noversions",
        vec![
            t("edge", "2026-01-01T00:00:00Z", &["amd64"]),
            t("nightly", "2026-02-01T00:00:00Z", &["amd64"]),
        ],
    );
    let endpoint = format!("docker={}", hub.url());
    let app = App::start(&["--registry-endpoint", &endpoint]).await;
    (hub, app)
}

fn names(body: &Value) -> Vec<&str> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

async fn names_for(app: &App, query: &str) -> Vec<String> {
    let (_, body) = app.tags(&format!("image=nginx&{query}")).await;
    names(&body).into_iter().map(String::from).collect()
}

#[tokio::test]
async fn default_output_is_unchanged_by_explicit_defaults() {
    let (_hub, app) = fixture().await;
    let plain = app.get("/tags?image=nginx").await.bytes().await.unwrap();
    for q in ["sort=date", "sort=date&order=desc", "semver=false"] {
        let same = app
            .get(&format!("/tags?image=nginx&{q}"))
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(same, plain, "{q}");
    }
    let body: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(
        names(&body),
        [
            "latest",
            "mainline",
            "2.0.0-rc1",
            "1.25.3",
            "1.25.3-alpine",
            "v1.25.2",
            "1.25",
            "stable",
            "1.10",
            "1.9"
        ],
        "newest first; equal dates by name"
    );
}

#[tokio::test]
async fn sort_order_semver_filter_exclude_arch_limit() {
    let (hub, app) = fixture().await;
    assert_eq!(
        names_for(&app, "semver=true").await,
        [
            "2.0.0-rc1",
            "1.25.3",
            "1.25.3-alpine",
            "v1.25.2",
            "1.25",
            "1.10",
            "1.9"
        ]
    );
    assert_eq!(
        names_for(&app, "sort=semver").await,
        [
            "2.0.0-rc1",
            "1.25.3",
            "1.25.3-alpine",
            "v1.25.2",
            "1.25",
            "1.10",
            "1.9",
            "latest",
            "mainline",
            "stable"
        ],
        "pre-release above lower releases; non-versions last"
    );
    assert_eq!(
        names_for(&app, "sort=semver&order=asc&semver=true").await,
        [
            "1.9",
            "1.10",
            "1.25",
            "v1.25.2",
            "1.25.3-alpine",
            "1.25.3",
            "2.0.0-rc1"
        ],
        "two-part versions, v prefix, variant before its plain tag"
    );
    assert_eq!(
        names_for(&app, "sort=name&limit=3").await,
        ["1.10", "1.25", "1.25.3"]
    );
    assert_eq!(
        names_for(&app, "sort=name&order=desc&limit=2").await,
        ["v1.25.2", "stable"]
    );
    assert_eq!(
        names_for(&app, "sort=date&order=asc&limit=2").await,
        ["1.9", "1.10"]
    );
    assert_eq!(
        names_for(&app, "filter=%5E1%5C.25").await,
        ["1.25.3", "1.25.3-alpine", "1.25"]
    );
    assert_eq!(
        names_for(&app, "semver=true&exclude=-(alpine|rc)").await,
        ["1.25.3", "v1.25.2", "1.25", "1.10", "1.9"]
    );
    assert_eq!(
        names_for(&app, "arch=arm/v7").await,
        ["latest", "1.25.3-alpine"]
    );
    assert_eq!(
        names_for(&app, "arch=arm64&semver=true&sort=semver&limit=1").await,
        ["1.25.3"],
        "is there a newer semver tag for arm64?"
    );
    assert_eq!(names_for(&app, "arch=linux/s390x").await, ["stable"]);
    assert!(
        names_for(&app, "filter=nomatch").await.is_empty(),
        "empty result is 200 []"
    );
    assert_eq!(
        names_for(&app, "limit=1000").await.len(),
        10,
        "limit above the count"
    );
    assert_eq!(hub.count(), 1, "one upstream fetch for all of it");
}

#[tokio::test]
async fn latest_in_json_and_text() {
    let (_hub, app) = fixture().await;
    let (headers, best) = app.tags_at("/tags/latest?image=nginx").await;
    assert_eq!(
        best["name"], "1.25.3",
        "highest release, not the pre-release"
    );
    assert_eq!(best["architectures"], json!(["amd64", "arm64"]));
    assert!(headers.get("etag").is_some());

    let resp = app
        .get("/tags/latest?image=nginx&format=text&filter=alpine")
        .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(resp.text().await.unwrap(), "1.25.3-alpine\n");

    let resp = app
        .get("/tags/latest?image=acme/noversions&format=text")
        .await;
    assert_eq!(
        resp.text().await.unwrap(),
        "nightly\n",
        "no versions: newest by date"
    );

    let resp = app
        .get("/tags/latest?image=nginx&sort=name&format=text")
        .await;
    assert_eq!(
        resp.text().await.unwrap(),
        "1.10\n",
        "an explicit sort picks its first"
    );

    let resp = app.get("/tags/latest?image=nginx&filter=nomatch").await;
    assert_eq!(resp.status(), 404);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(resp.text().await.unwrap().contains("no tag"));
}

#[tokio::test]
async fn etag_304_and_cache_headers() {
    let (_hub, app) = fixture().await;
    for path in [
        "/tags?image=nginx",
        "/tags?image=nginx&semver=true&limit=2",
        "/tags/latest?image=nginx&format=text",
    ] {
        let first = app.get(path).await;
        assert_eq!(first.status(), 200);
        let etag = first.headers()["etag"].to_str().unwrap().to_owned();
        assert!(
            etag.starts_with('"') && !etag.starts_with("W/"),
            "strong: {etag}"
        );
        let cc = first.headers()["cache-control"]
            .to_str()
            .unwrap()
            .to_owned();
        let max_age: u64 = cc.strip_prefix("max-age=").unwrap().parse().unwrap();
        assert!(
            (86_000..=86_400).contains(&max_age),
            "{cc}: until the entry goes stale"
        );
        assert!(first.headers().get("age").is_some());
        assert!(first.headers().get("x-cache").is_some());

        let again = app
            .client
            .get(format!("{}{path}", app.url()))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert!(again.bytes().await.unwrap().is_empty());

        let changed = app
            .client
            .get(format!("{}{path}", app.url()))
            .header("if-none-match", "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(changed.status(), 200);
    }
}

#[tokio::test]
async fn compressed_answers_decode_with_a_real_client() {
    let (_hub, app) = fixture().await;
    let raw = app.get("/tags?image=nginx").await.bytes().await.unwrap();
    for encoding in ["gzip", "br"] {
        let decoding = reqwest::Client::builder()
            .no_proxy()
            .gzip(encoding == "gzip")
            .brotli(encoding == "br")
            .build()
            .unwrap();
        let resp = decoding
            .get(format!("{}/tags?image=nginx", app.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.bytes().await.unwrap(),
            raw,
            "{encoding} decodes to the same JSON"
        );
        // And it really was compressed on the wire.
        let wire = app
            .client
            .get(format!("{}/tags?image=nginx&semver=true", app.url()))
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(wire.headers()["content-encoding"], encoding);
        assert_eq!(wire.headers()["vary"], "accept-encoding");
        let etag = wire.headers()["etag"].to_str().unwrap().to_owned();
        assert!(etag.ends_with(&format!(
            "-{}\"",
            if encoding == "br" { "br" } else { "gzip" }
        )));
    }
}

#[tokio::test]
async fn every_invalid_value_is_400() {
    let (_hub, app) = fixture().await;
    let long = "a".repeat(300);
    for (query, needle) in [
        ("sort=size", "\"sort\""),
        ("sort=", "\"sort\""),
        ("order=up", "\"order\""),
        ("semver=yes", "\"semver\""),
        ("semver=1", "\"semver\""),
        ("filter=(", "invalid filter pattern"),
        ("exclude=%5B", "invalid exclude pattern"),
        ("exclude=", "\"exclude\""),
        ("filter=", "\"filter\""),
        (&format!("filter={long}") as &str, "longer than 256"),
        ("filter=(%3F:a%7B1000%7D)%7B1000%7D", "too complex"),
        ("arch=ARM64", "\"arch\""),
        ("arch=a/b/c/d", "\"arch\""),
        ("arch=", "\"arch\""),
        ("limit=0", "\"limit\""),
        ("limit=-1", "\"limit\""),
        ("limit=ten", "\"limit\""),
        ("limit=100001", "\"limit\""),
        ("limit=1.5", "\"limit\""),
        ("format=text", "only for /tags/latest"),
        ("limit=1&limit=2", "more than once"),
        ("filter=%ff", "not UTF-8"),
        ("exclude=a%C3", "not UTF-8"),
        ("arch=%C3%28", "not UTF-8"),
    ] {
        let resp = app.get(&format!("/tags?image=nginx&{query}")).await;
        assert_eq!(resp.status(), 400, "{query}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(needle), "{query}: {text}");
    }
    let resp = app.get("/tags/latest?image=nginx&format=xml").await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("\"format\""));
}

#[tokio::test]
async fn openapi_document_describes_the_api() {
    let app = App::start(&[]).await;
    let resp = app.get("/openapi.json").await;
    assert_eq!(resp.status(), 200);
    let doc: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/tags",
        "/tags/latest",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} documented");
    }
    let params: Vec<&str> = doc["paths"]["/tags"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let names = [
        "image", "registry", "sort", "order", "semver", "filter", "exclude", "arch", "limit",
    ];
    assert_eq!(params, names, "/tags takes these, and not format");
    let latest: Vec<&str> = doc["paths"]["/tags/latest"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(latest[..names.len()], names);
    assert_eq!(
        latest[names.len()..],
        ["format"],
        "/tags/latest adds format"
    );
    let image = doc["paths"]["/tags"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "image")
        .unwrap();
    assert_eq!(image["required"], true);
    let responses = doc["paths"]["/tags"]["get"]["responses"]
        .as_object()
        .unwrap();
    for status in ["200", "304", "400", "404", "429", "502", "504"] {
        assert!(responses.contains_key(status), "{status}");
    }
    let tag = &doc["components"]["schemas"]["Tag"];
    let required: Vec<&str> = tag["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in ["name", "last_updated", "architectures", "digest"] {
        assert!(tag["properties"][field].is_object(), "{field}");
        assert!(
            required.contains(&field),
            "{field} is required (it may be null)"
        );
    }
}
