//! Proves the Docker Hub fake answers like the real Hub API (`shared/reference/UPSTREAM.md` §1,
//! §9 quirks 1–5), using a plain reqwest client, so that tests of the service against it mean
//! something.

use std::time::Duration;

use reqwest::header::{CONTENT_LENGTH, HOST, LOCATION, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

use crate::support::hub::{
    ABUSE_BODY, DOCKER_MANIFEST_LIST, Failure, HubFake, HubImage, HubTag, OCI_INDEX,
    OFFSET_CAP_BODY, PAST_END_BODY, RATE_LIMIT_BODY, generate_tags,
};

/// `dockerhub-tags-page.json` from the reference (REAL, 2023): the first `page_size=2` page of
/// `library/debian`, compact, with Go's `\u0026` in `next`.
const DEBIAN_2023_PAGE: &str = r#"{"count":1755,"next":"https://registry.hub.docker.com/v2/repositories/library/debian/tags?page=2\u0026page_size=2","previous":null,"results":[{"creator":621950,"id":5956353,"images":[{"architecture":"amd64","features":"","variant":null,"digest":"sha256:9340772107855de9351e88e3ba2636d045f730e05b177c5313613894c223b4d4","os":"linux","os_features":"","os_version":null,"size":29124691,"status":"active","last_pulled":"2023-06-17T01:02:17.603158Z","last_pushed":"2023-06-12T23:58:09.075548Z"},{"architecture":"s390x","features":"","variant":null,"digest":"sha256:eee0d222c03513dcdf8f3a12c6c342add8a6161af09bcb9a38eef9ef7d486122","os":"linux","os_features":"","os_version":null,"size":27490253,"status":"active","last_pulled":"2023-06-16T07:34:00.087434Z","last_pushed":"2023-06-13T04:58:23.89489Z"}],"last_updated":"2023-06-13T04:58:31.821511Z","last_updater":1156886,"last_updater_username":"example-bot","name":"unstable-slim","repository":6315,"full_size":29124691,"v2":true,"tag_status":"active","tag_last_pulled":"2023-06-17T01:02:17.603158Z","tag_last_pushed":"2023-06-13T04:58:31.821511Z","media_type":"application/vnd.docker.distribution.manifest.list.v2+json","content_type":"image","digest":"sha256:2ae17aff4c3c8cdb2d3d9c885d7c59ad518bffc89e8351598ff1f3f918183b7c"},{"creator":1156886,"id":456210846,"images":[{"architecture":"amd64","features":"","variant":null,"digest":"sha256:9340772107855de9351e88e3ba2636d045f730e05b177c5313613894c223b4d4","os":"linux","os_features":"","os_version":null,"size":29124691,"status":"active","last_pulled":"2023-06-17T01:02:17.603158Z","last_pushed":"2023-06-12T23:58:09.075548Z"},{"architecture":"s390x","features":"","variant":null,"digest":"sha256:eee0d222c03513dcdf8f3a12c6c342add8a6161af09bcb9a38eef9ef7d486122","os":"linux","os_features":"","os_version":null,"size":27490253,"status":"active","last_pulled":"2023-06-16T07:34:00.087434Z","last_pushed":"2023-06-13T04:58:23.89489Z"}],"last_updated":"2023-06-13T04:58:26.736918Z","last_updater":1156886,"last_updater_username":"example-bot","name":"unstable-20230612-slim","repository":6315,"full_size":29124691,"v2":true,"tag_status":"active","tag_last_pulled":"2023-06-17T01:02:17.603158Z","tag_last_pushed":"2023-06-13T04:58:26.736918Z","media_type":"application/vnd.docker.distribution.manifest.list.v2+json","content_type":"image","digest":"sha256:2ae17aff4c3c8cdb2d3d9c885d7c59ad518bffc89e8351598ff1f3f918183b7c"}]}
"#;

/// `dockerhub-tags-page-2025-images-empty.json` from the reference (REAL excerpt, 2025).
const NODE_2025_PAGE: &str = r#"{
  "count": 18,
  "next": null,
  "previous": null,
  "results": [
    {
      "creator": 1156886,
      "id": 947522758,
      "images": [],
      "last_updated": "2025-08-04T15:40:07.906572Z",
      "last_updater": 1156886,
      "last_updater_username": "example-bot",
      "name": "22.18.0-slim",
      "repository": 21176,
      "full_size": 78914007,
      "v2": true,
      "tag_status": "active",
      "tag_last_pulled": "2025-08-11T14:01:54.103614048Z",
      "tag_last_pushed": "2025-08-04T15:40:07.906572Z",
      "media_type": "application/vnd.oci.image.index.v1+json",
      "content_type": "image",
      "digest": "sha256:88f44fbb06cc98e1451e4e015c122f84030ec55c603f753ed97b889db0bb8d4d"
    }
  ]
}
"#;

/// A client that never uses a proxy (only 127.0.0.1 is reachable) and shows redirects as-is.
fn client() -> Client {
    Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

async fn get(url: &str) -> Response {
    client().get(url).send().await.expect("request the fake")
}

/// Status and parsed JSON body.
async fn get_json(url: &str) -> (StatusCode, Value) {
    let response = get(url).await;
    let status = response.status();
    let body = response.bytes().await.expect("read body");
    (status, serde_json::from_slice(&body).expect("JSON body"))
}

fn names(page: &Value) -> Vec<String> {
    let results = page["results"].as_array().expect("results array");
    results
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect()
}

fn header(response: &Response, name: &str) -> String {
    let value = response.headers().get(name);
    let value = value.unwrap_or_else(|| panic!("missing header {name}"));
    value.to_str().expect("ASCII header").to_owned()
}

fn unix_now() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.expect("clock after 1970").as_secs()
}

/// A fake with `library/app` holding `count` generated tags.
async fn hub_with(count: usize) -> HubFake {
    let hub = HubFake::start().await;
    hub.add_repo("library/app", generate_tags(count, "2024-01-01T00:00:00Z"));
    hub
}

/// The two debian tags of the 2023 capture, field for field.
fn debian_2023_tags() -> Vec<HubTag> {
    let amd64 = HubImage::platform("amd64")
        .digest(Some(
            "sha256:9340772107855de9351e88e3ba2636d045f730e05b177c5313613894c223b4d4",
        ))
        .size(29124691)
        .last_pulled(Some("2023-06-17T01:02:17.603158Z"))
        .last_pushed(Some("2023-06-12T23:58:09.075548Z"));
    let s390x = HubImage::platform("s390x")
        .digest(Some(
            "sha256:eee0d222c03513dcdf8f3a12c6c342add8a6161af09bcb9a38eef9ef7d486122",
        ))
        .size(27490253)
        .last_pulled(Some("2023-06-16T07:34:00.087434Z"))
        .last_pushed(Some("2023-06-13T04:58:23.89489Z"));
    let tag = |name: &str, id: u64, creator: u64, date: &str| {
        HubTag::new(name)
            .id(id)
            .creator(creator)
            .images(vec![amd64.clone(), s390x.clone()])
            .last_updated(Some(date))
            .tag_last_pushed(Some(date))
            .tag_last_pulled(Some("2023-06-17T01:02:17.603158Z"))
            .media_type(DOCKER_MANIFEST_LIST)
            .digest(Some(
                "sha256:2ae17aff4c3c8cdb2d3d9c885d7c59ad518bffc89e8351598ff1f3f918183b7c",
            ))
    };
    vec![
        tag(
            "unstable-slim",
            5956353,
            621950,
            "2023-06-13T04:58:31.821511Z",
        ),
        tag(
            "unstable-20230612-slim",
            456210846,
            1156886,
            "2023-06-13T04:58:26.736918Z",
        ),
    ]
}

#[tokio::test]
async fn reproduces_the_2023_debian_page_byte_for_byte() {
    let hub = HubFake::start().await;
    // 1,753 older tags make `count` 1755 as in the capture; the two real ones sort first.
    let mut tags = generate_tags(1753, "2000-01-01T00:00:00Z");
    tags.extend(debian_2023_tags());
    hub.add_repo("library/debian", tags);
    hub.set_repository_id("library/debian", 6315);

    let url = format!("{}?page_size=2", hub.tags_url("library/debian"));
    let response = client()
        .get(url)
        .header(HOST, "registry.hub.docker.com")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), "application/json");
    assert_eq!(header(&response, "x-ratelimit-limit"), "180");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "179");
    let body = response.text().await.expect("body");
    // The fake speaks plain HTTP; everything else is the captured bytes (the file's final
    // newline is the reference files' convention, not evidence about the wire).
    assert_eq!(
        body,
        DEBIAN_2023_PAGE.trim_end().replace("https://", "http://")
    );
}

#[tokio::test]
async fn reproduces_the_2025_entry_with_empty_images() {
    let hub = HubFake::start().await;
    let tag = HubTag::new("22.18.0-slim")
        .id(947522758)
        .images(vec![])
        .full_size(78914007)
        .pushed_at("2025-08-04T15:40:07.906572Z")
        .tag_last_pulled(Some("2025-08-11T14:01:54.103614048Z"))
        .media_type(OCI_INDEX)
        .digest(Some(
            "sha256:88f44fbb06cc98e1451e4e015c122f84030ec55c603f753ed97b889db0bb8d4d",
        ));
    hub.add_repo("library/node", vec![tag, HubTag::new("20-alpine")]);
    hub.set_repository_id("library/node", 21176);

    let response = get(&format!("{}?name=22.18", hub.tags_url("library/node"))).await;
    let raw = response.text().await.expect("body");
    let page: Value = serde_json::from_str(&raw).expect("JSON");
    let reference: Value = serde_json::from_str(NODE_2025_PAGE).expect("reference JSON");

    assert!(raw.contains(r#""images":[]"#), "{raw}");
    assert!(raw.contains(r#""tag_last_pulled":"2025-08-11T14:01:54.103614048Z""#));
    assert_eq!(page["results"], reference["results"]);
    assert_eq!(page["count"], 1, "the name filter leaves one tag");
}

#[tokio::test]
async fn follows_next_to_the_last_page_then_404() {
    let hub = hub_with(25).await;
    let mut url = format!("{}?page_size=10", hub.tags_url("library/app"));
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (status, page) = get_json(&url).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["count"], 25);
        seen.extend(names(&page));
        pages += 1;
        match page["next"].as_str() {
            Some(next) => url = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert_eq!(
        seen.first().map(String::as_str),
        Some("1.24.0"),
        "newest first"
    );
    assert_eq!(seen.last().map(String::as_str), Some("1.0.0"));

    let past = get(&format!(
        "{}?page=4&page_size=10",
        hub.tags_url("library/app")
    ))
    .await;
    assert_eq!(past.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&past, "content-type"), "application/json");
    assert_eq!(past.text().await.expect("body"), PAST_END_BODY);
}

#[tokio::test]
async fn next_and_previous_keep_host_params_and_trailing_slash() {
    let hub = hub_with(30).await;
    let url = format!(
        "{}/v2/repositories/library/app/tags/?page_size=5&ordering=last_updated&name=1.&page=2",
        hub.url()
    );
    let response = client()
        .get(url)
        .header(HOST, "hub.docker.com")
        .send()
        .await
        .expect("request");
    let raw = response.text().await.expect("body");
    let page: Value = serde_json::from_str(&raw).expect("JSON");

    // Parameters sorted by key as Django REST framework writes them; `page` dropped for page 1.
    let base = "http://hub.docker.com/v2/repositories/library/app/tags/";
    assert_eq!(
        page["next"],
        format!("{base}?name=1.&ordering=last_updated&page=3&page_size=5")
    );
    assert_eq!(
        page["previous"],
        format!("{base}?name=1.&ordering=last_updated&page_size=5")
    );
    assert!(
        raw.contains(r"tags/?name=1.\u0026ordering"),
        "Go-style escape: {raw}"
    );
}

#[tokio::test]
async fn escaping_can_be_turned_off() {
    let hub = hub_with(3).await;
    hub.set_escape_html(false);
    let raw = get(&format!(
        "{}?page_size=1&ordering=name",
        hub.tags_url("library/app")
    ))
    .await
    .text()
    .await
    .expect("body");
    assert!(raw.contains("?ordering=name&page=2&page_size=1"), "{raw}");
}

#[tokio::test]
async fn page_size_defaults_to_10_and_is_clamped_to_100() {
    let hub = hub_with(150).await;
    let base = hub.tags_url("library/app");

    let (_, default) = get_json(&base).await;
    assert_eq!(names(&default).len(), 10);
    assert_eq!(default["next"], format!("{base}?page=2"));

    let (status, clamped) = get_json(&format!("{base}?page_size=1000")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&clamped).len(), 100);
    assert_eq!(clamped["count"], 150);
    // The link keeps what the caller sent, as Renovate's `page_size=1000` shows.
    assert_eq!(clamped["next"], format!("{base}?page=2&page_size=1000"));

    let (_, second) = get_json(&format!("{base}?page=2&page_size=1000")).await;
    assert_eq!(names(&second).len(), 50);
    assert_eq!(second["next"], Value::Null);
}

#[tokio::test]
async fn anonymous_offset_1000_is_refused_but_signed_in_is_not() {
    let hub = hub_with(1500).await;
    hub.set_token("hub-jwt");
    let base = hub.tags_url("library/app");

    let (status, page10) = get_json(&format!("{base}?page=10&page_size=100")).await;
    assert_eq!(status, StatusCode::OK, "offset 900 still works");
    assert_eq!(names(&page10).len(), 100);

    for query in [
        "page=11&page_size=100",
        "page=101&page_size=10",
        "page=11&page_size=500",
    ] {
        let refused = get(&format!("{base}?{query}")).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{query}");
        assert_eq!(refused.text().await.expect("body"), OFFSET_CAP_BODY);
    }

    let signed_in = |url: String| client().get(url).bearer_auth("hub-jwt").send();
    let page15 = signed_in(format!("{base}?page=15&page_size=100"))
        .await
        .expect("request");
    assert_eq!(page15.status(), StatusCode::OK);
    let page15: Value = serde_json::from_slice(&page15.bytes().await.expect("body")).expect("JSON");
    assert_eq!(names(&page15).len(), 100);
    assert_eq!(page15["next"], Value::Null);
    let page16 = signed_in(format!("{base}?page=16&page_size=100"))
        .await
        .expect("request");
    assert_eq!(page16.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_wrong_token_gets_401() {
    let hub = hub_with(3).await;
    hub.set_token("right");
    let response = client()
        .get(hub.tags_url("library/app"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    assert!(body["message"].is_string());
}

#[tokio::test]
async fn orders_newest_first_unless_asked_otherwise() {
    let hub = HubFake::start().await;
    let tags = vec![
        HubTag::new("old").pushed_at("2020-01-01T00:00:00Z"),
        HubTag::new("newest").pushed_at("2024-05-01T00:00:00.5Z"),
        HubTag::new("undated").last_updated(None),
        HubTag::new("middle").pushed_at("2022-01-01T00:00:00Z"),
    ];
    hub.add_repo("acme/app", tags);
    let base = hub.tags_url("acme/app");

    let by = |ordering: &str| {
        let url = format!("{base}?{ordering}");
        async move { names(&get_json(&url).await.1) }
    };
    let newest_first = ["newest", "middle", "old", "undated"];
    assert_eq!(by("").await, newest_first);
    assert_eq!(by("ordering=last_updated").await, newest_first);
    assert_eq!(
        by("ordering=-last_updated").await,
        ["undated", "old", "middle", "newest"]
    );
    assert_eq!(
        by("ordering=name").await,
        ["middle", "newest", "old", "undated"]
    );
    assert_eq!(
        by("name=DLE").await,
        ["middle"],
        "case-insensitive substring"
    );
}

#[tokio::test]
async fn null_and_missing_fields_serialize_like_the_reference() {
    let hub = HubFake::start().await;
    let odd = HubTag::new("odd")
        .digest(None)
        .tag_last_pulled(None)
        .tag_last_pushed(None)
        .images(vec![
            HubImage::platform("amd64").digest(None).last_pulled(None),
            HubImage::unknown(),
            HubImage::platform("arm64").architecture(None),
            HubImage::platform("arm/v7").without_architecture(),
        ]);
    let bare = HubTag::new("bare").without_digest().images(vec![]);
    hub.add_repo("acme/odd", vec![odd, bare]);

    let (_, page) = get_json(&format!("{}?ordering=name", hub.tags_url("acme/odd"))).await;
    let (bare, odd) = (&page["results"][0], &page["results"][1]);
    assert_eq!(odd["digest"], Value::Null);
    assert_eq!(odd["tag_last_pulled"], Value::Null);
    assert_eq!(odd["tag_last_pushed"], Value::Null);
    assert_eq!(
        odd["last_updated"], "2024-01-01T00:00:00Z",
        "no fraction when zero"
    );
    let images = &odd["images"];
    assert_eq!(images[0]["digest"], Value::Null);
    assert_eq!(images[0]["last_pulled"], Value::Null);
    assert_eq!(images[0]["variant"], Value::Null);
    assert_eq!(images[0]["features"], "");
    assert_eq!(images[0]["os_version"], Value::Null);
    assert_eq!(
        (&images[1]["architecture"], &images[1]["os"]),
        (&json!("unknown"), &json!("unknown"))
    );
    assert_eq!(images[2]["architecture"], Value::Null);
    assert!(
        images[2]
            .as_object()
            .expect("image")
            .contains_key("architecture")
    );
    assert!(
        !images[3]
            .as_object()
            .expect("image")
            .contains_key("architecture")
    );
    assert_eq!(images[3]["variant"], "v7");
    assert!(!bare.as_object().expect("tag").contains_key("digest"));
    assert_eq!(bare["images"], json!([]));
    assert!(bare["full_size"].as_u64().expect("full_size") > 0);
}

#[tokio::test]
async fn full_size_is_one_platform_not_the_sum() {
    let hub = HubFake::start().await;
    hub.add_repo(
        "acme/multi",
        vec![HubTag::multi_arch(
            "1",
            "2024-02-02T00:00:00Z",
            &["amd64", "arm64/v8"],
        )],
    );
    let (_, page) = get_json(&hub.tags_url("acme/multi")).await;
    let tag = &page["results"][0];
    assert_eq!(tag["full_size"], tag["images"][0]["size"]);
    assert_eq!(tag["media_type"], OCI_INDEX);
    assert_eq!(tag["images"][1]["variant"], "v8");
    assert_ne!(tag["images"][0]["digest"], tag["images"][1]["digest"]);
}

#[tokio::test]
async fn unknown_and_private_repos_get_404_with_errinfo() {
    let hub = hub_with(2).await;
    hub.set_private("library/app", true);
    hub.set_token("jwt");

    let unknown = get(&hub.tags_url("example-org/does-not-exist")).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.text().await.expect("body"),
        r#"{"message":"httperror 404: object not found","errinfo":{"namespace":"example-org","repository":"does-not-exist"}}"#
    );
    let (status, private) = get_json(&hub.tags_url("library/app")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        private["errinfo"],
        json!({"namespace": "library", "repository": "app"})
    );

    let signed_in = client()
        .get(hub.tags_url("library/app"))
        .bearer_auth("jwt")
        .send();
    assert_eq!(signed_in.await.expect("request").status(), StatusCode::OK);
}

#[tokio::test]
async fn an_empty_repo_has_an_empty_first_page_and_no_second() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/empty", vec![]);
    let (status, page) = get_json(&hub.tags_url("acme/empty")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page,
        json!({"count": 0, "next": null, "previous": null, "results": []})
    );
    let second = get(&format!("{}?page=2", hub.tags_url("acme/empty"))).await;
    assert_eq!(second.status(), StatusCode::NOT_FOUND);
    assert_eq!(second.text().await.expect("body"), PAST_END_BODY);
}

#[tokio::test]
async fn both_paths_with_and_without_slash_serve_the_same_page() {
    let hub = hub_with(3).await;
    let paths = [
        "/v2/repositories/library/app/tags",
        "/v2/repositories/library/app/tags/",
        "/v2/namespaces/library/repositories/app/tags",
        "/v2/namespaces/library/repositories/app/tags/",
    ];
    let mut results = Vec::new();
    for path in paths {
        let (status, page) = get_json(&format!("{}{path}", hub.url())).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        results.push(page["results"].clone());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test]
async fn set_tags_moves_and_deletes_tags_and_keeps_ids() {
    let hub = HubFake::start().await;
    hub.add_repo("acme/app", vec![HubTag::new("latest"), HubTag::new("gone")]);
    let (_, before) = get_json(&hub.tags_url("acme/app")).await;
    let moved = HubTag::new("latest")
        .digest(Some("sha256:moved"))
        .pushed_at("2025-01-01T00:00:00Z");
    hub.set_tags("acme/app", vec![moved]);

    let (_, after) = get_json(&hub.tags_url("acme/app")).await;
    assert_eq!(names(&after), ["latest"]);
    assert_eq!(after["results"][0]["digest"], "sha256:moved");
    let latest_before = before["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|t| t["name"] == "latest");
    assert_eq!(
        after["results"][0]["id"],
        latest_before.expect("latest")["id"]
    );

    hub.remove_repo("acme/app");
    assert_eq!(
        get(&hub.tags_url("acme/app")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn scripted_rate_limit_sends_x_retry_after_as_a_timestamp() {
    let hub = hub_with(3).await;
    hub.fail_next(1, Failure::rate_limited(30));
    hub.fail_next(
        1,
        Failure::RateLimited {
            retry_in_secs: 5,
            retry_after_header: true,
        },
    );

    let first = get(&hub.tags_url("library/app")).await;
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_at: u64 = header(&first, "x-retry-after")
        .parse()
        .expect("unix timestamp");
    assert!(
        (unix_now() + 28..=unix_now() + 31).contains(&retry_at),
        "{retry_at}"
    );
    assert_eq!(header(&first, "x-ratelimit-remaining"), "0");
    assert!(first.headers().get(RETRY_AFTER).is_none());
    assert_eq!(first.text().await.expect("body"), RATE_LIMIT_BODY);

    let second = get(&hub.tags_url("library/app")).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "retry-after"), "5");

    assert_eq!(
        get(&hub.tags_url("library/app")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_rate_limit_counts_down_and_runs_out() {
    let hub = hub_with(3).await;
    hub.set_rate_limit(2);
    let first = get(&hub.tags_url("library/app")).await;
    let reset: u64 = header(&first, "x-ratelimit-reset")
        .parse()
        .expect("unix seconds");
    assert!(reset > unix_now() && reset <= unix_now() + 61);
    assert_eq!(header(&first, "x-ratelimit-limit"), "2");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "1");
    let second = get(&hub.tags_url("library/app")).await;
    assert_eq!(header(&second, "x-ratelimit-remaining"), "0");
    assert_eq!(second.status(), StatusCode::OK);
    let third = get(&hub.tags_url("library/app")).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.text().await.expect("body"), RATE_LIMIT_BODY);
}

#[tokio::test]
async fn abuse_429_is_plain_text_with_retry_after_60() {
    let hub = hub_with(1).await;
    hub.fail_next(1, Failure::Abuse429);
    let response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "content-type"), "text/plain");
    assert_eq!(header(&response, "retry-after"), "60");
    assert_eq!(header(&response, "connection"), "close");
    assert_eq!(response.text().await.expect("body"), ABUSE_BODY);
}

#[tokio::test]
async fn status_failures_carry_html_or_json() {
    let hub = hub_with(1).await;
    hub.fail_next(1, Failure::html(502));
    hub.fail_next(
        1,
        Failure::Status(503, r#"{"message":"maintenance"}"#.to_owned()),
    );

    let bad_gateway = get(&hub.tags_url("library/app")).await;
    assert_eq!(bad_gateway.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(header(&bad_gateway, "content-type"), "text/html");
    assert!(
        bad_gateway
            .text()
            .await
            .expect("body")
            .contains("<h1>502 Error</h1>")
    );

    let unavailable = get(&hub.tags_url("library/app")).await;
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&unavailable, "content-type"), "application/json");
    assert_eq!(
        unavailable.text().await.expect("body"),
        r#"{"message":"maintenance"}"#
    );
}

#[tokio::test]
async fn hang_outlasts_a_client_timeout_then_the_fake_recovers() {
    let hub = hub_with(1).await;
    hub.fail_next(1, Failure::Hang(Duration::from_secs(30)));
    let started = tokio::time::Instant::now();
    let outcome = client()
        .get(hub.tags_url("library/app"))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(outcome.expect_err("must time out").is_timeout());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        get(&hub.tags_url("library/app")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn truncated_is_a_well_framed_200_with_broken_json() {
    let hub = hub_with(5).await;
    let (_, whole) = get_json(&hub.tags_url("library/app")).await;
    let whole_len = serde_json::to_string(&whole).expect("JSON").len();
    hub.fail_next(1, Failure::Truncated);
    let response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.expect("complete body");
    assert!(body.starts_with(br#"{"count":5,"#));
    assert!(body.len() < whole_len);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
}

#[tokio::test]
async fn wrong_content_type_is_the_page_labelled_html() {
    let hub = hub_with(2).await;
    hub.fail_next(1, Failure::WrongContentType);
    let response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), "text/html");
    let page: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    assert_eq!(page["count"], 2);
}

#[tokio::test]
async fn huge_streams_exactly_that_many_bytes_without_a_length() {
    let hub = hub_with(1).await;
    hub.fail_next(1, Failure::Huge(5_000_000));
    let mut response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get(CONTENT_LENGTH).is_none());
    let (mut total, mut chunks, mut first) = (0, 0, Vec::new());
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        if first.is_empty() {
            first = chunk.to_vec();
        }
        total += chunk.len();
        chunks += 1;
    }
    assert_eq!(total, 5_000_000);
    assert!(chunks > 1, "streamed, not one buffer");
    assert!(first.starts_with(br#"{"count":1,"#));
}

#[tokio::test]
async fn redirect_points_where_asked() {
    let hub = hub_with(1).await;
    let elsewhere = format!("{}/v2/repositories/library/app/tags?page=1", hub.url());
    hub.fail_next(1, Failure::Redirect(elsewhere.clone()));
    let response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()[LOCATION], elsewhere.as_str());
}

#[tokio::test]
async fn disconnect_drops_the_connection_mid_body() {
    let hub = hub_with(5).await;
    hub.fail_next(1, Failure::Disconnect);
    let response = get(&hub.tags_url("library/app")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.is_err());
}

#[tokio::test]
async fn fail_always_persists_until_cleared_and_delay_slows_every_answer() {
    let hub = hub_with(1).await;
    hub.fail_always(Failure::html(503));
    for _ in 0..3 {
        let status = get(&hub.tags_url("library/app")).await.status();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    hub.clear_failures();
    hub.set_delay(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    assert_eq!(
        get(&hub.tags_url("library/app")).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn records_every_request_with_its_query_and_auth() {
    let hub = hub_with(1).await;
    hub.set_token("jwt");
    get(&format!(
        "{}?page_size=100&ordering=last_updated",
        hub.tags_url("library/app")
    ))
    .await;
    hub.fail_next(1, Failure::html(500));
    let signed_in = client()
        .get(hub.tags_url("library/app"))
        .bearer_auth("jwt")
        .send();
    signed_in.await.expect("request");
    get(&format!(
        "{}/v2/namespaces/library/repositories/app/tags/",
        hub.url()
    ))
    .await;

    let requests = hub.requests();
    assert_eq!(hub.count(), 3);
    assert_eq!(requests[0].path, "/v2/repositories/library/app/tags");
    assert_eq!(requests[0].param("page_size").as_deref(), Some("100"));
    assert_eq!(requests[0].query, "page_size=100&ordering=last_updated");
    assert!(!requests[0].has_auth());
    assert_eq!(requests[1].authorization.as_deref(), Some("Bearer jwt"));
    assert_eq!(
        requests[2].path,
        "/v2/namespaces/library/repositories/app/tags/"
    );
    assert_eq!(requests[2].query, "");

    hub.reset_counts();
    assert_eq!(hub.count(), 0);
    assert!(hub.requests().is_empty());
}

#[tokio::test]
async fn wait_for_requests_returns_when_they_arrive_or_times_out() {
    let hub = hub_with(1).await;
    let url = hub.tags_url("library/app");
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..2 {
            get(&url).await;
        }
    });
    assert!(hub.wait_for_requests(2, Duration::from_secs(5)).await);
    later.await.expect("requests sent");
    assert!(!hub.wait_for_requests(3, Duration::from_millis(100)).await);
}

#[tokio::test]
async fn dropping_the_fake_cuts_pooled_and_in_flight_connections() {
    let hub = hub_with(1).await;
    let url = hub.tags_url("library/app");
    let pooled = client();
    let first = pooled.get(&url).send().await.expect("first request");
    assert_eq!(first.status(), StatusCode::OK);
    hub.fail_next(1, Failure::Hang(Duration::from_secs(30)));
    let in_flight = tokio::spawn(client().get(&url).send());
    assert!(hub.wait_for_requests(2, Duration::from_secs(5)).await);

    drop(hub);
    let cut = tokio::time::timeout(Duration::from_secs(5), in_flight).await;
    let cut = cut
        .expect("must not wait for the hang to end")
        .expect("join");
    assert!(cut.is_err(), "the hung request is cut, not answered");
    assert!(pooled.get(&url).send().await.is_err());
}
