//! `/tags` against the real CNCF distribution registry (Debian's `docker-registry`) on loopback,
//! with images pushed through its HTTP API: indexes with attestations, Docker lists, single
//! manifests, pagination, moved and deleted tags, basic and bearer auth, faults, and exactly how
//! many upstream requests each answer costs.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::{App, Binary};
use crate::support::registry::{
    CountingProxy, Fault, ImageMedia, ImageSpec, IndexMedia, IndexOptions, Kind, ManyTags,
    Registry, RegistryAuth, TagPaging,
};

/// An app allowed to reach `host` (plain http, as the test registry speaks).
async fn app_for(host: &str, url: &str, extra: &[&str]) -> App {
    let endpoint = format!("{host}={url}");
    let mut args = vec![
        "--allowed-registries",
        host,
        "--registry-endpoint",
        endpoint.as_str(),
    ];
    args.extend_from_slice(extra);
    App::start(&args).await
}

fn tag<'a>(body: &'a Value, name: &str) -> &'a Value {
    body.as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tag {name} in {body}"))
}

fn names(body: &Value) -> Vec<String> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn spec(arch: &str, created: &str, salt: u64) -> ImageSpec {
    ImageSpec::linux(arch).created(created).salt(salt)
}

#[tokio::test]
async fn every_manifest_kind_gives_digest_architectures_and_date() {
    let reg = Registry::start(RegistryAuth::None).await;
    let p = reg.pusher();
    let multi = p
        .push_index(
            "acme/app",
            "multi",
            &[
                spec("amd64", "2025-01-01T00:00:00Z", 1),
                spec("arm64", "2025-03-01T12:00:00Z", 2).variant("v8"),
            ],
            &IndexOptions {
                media: IndexMedia::Oci,
                attestation: true,
                created: None,
            },
        )
        .await;
    assert_eq!(
        multi.attestations.len(),
        2,
        "the index carries attestation manifests"
    );
    let annotated = p
        .push_index(
            "acme/app",
            "annotated",
            &[spec("amd64", "2020-01-01T00:00:00Z", 3)],
            &IndexOptions {
                media: IndexMedia::Oci,
                attestation: true,
                created: Some("2026-01-02T03:04:05Z".into()),
            },
        )
        .await;
    let list = p
        .push_index(
            "acme/app",
            "list",
            &[
                spec("amd64", "2024-05-01T00:00:00Z", 4).media(ImageMedia::Docker),
                spec("arm", "2024-05-02T00:00:00Z", 5)
                    .variant("v7")
                    .media(ImageMedia::Docker),
            ],
            &IndexOptions {
                media: IndexMedia::DockerList,
                ..Default::default()
            },
        )
        .await;
    let single = p
        .push_image(
            "acme/app",
            "single",
            &spec("arm64", "2023-07-01T00:00:00Z", 6),
        )
        .await;
    let docker = p
        .push_image(
            "acme/app",
            "docker",
            &spec("amd64", "2022-02-02T02:02:02Z", 7).media(ImageMedia::Docker),
        )
        .await;
    let nodate = p
        .push_image("acme/app", "nodate", &ImageSpec::linux("s390x").salt(8))
        .await;

    let app = app_for(&reg.host(), &reg.url(), &[]).await;
    let query = format!("image=acme/app&registry={}", reg.host());
    let (headers, body) = app.tags(&query).await;
    assert_eq!(headers["x-cache"], "miss");
    assert_eq!(
        names(&body),
        ["annotated", "multi", "list", "single", "docker", "nodate"]
    );

    let t = tag(&body, "multi");
    assert_eq!(t["digest"], multi.digest.as_str());
    assert_eq!(
        t["architectures"],
        json!(["amd64", "arm64"]),
        "no unknown from attestations"
    );
    assert_eq!(t["platforms"], json!(["linux/amd64", "linux/arm64/v8"]));
    assert_eq!(
        t["last_updated"], "2025-03-01T12:00:00Z",
        "newest created of its images"
    );

    let t = tag(&body, "annotated");
    assert_eq!(t["digest"], annotated.digest.as_str());
    assert_eq!(
        t["last_updated"], "2026-01-02T03:04:05Z",
        "the index annotation"
    );
    assert_eq!(t["architectures"], json!(["amd64"]));

    let t = tag(&body, "list");
    assert_eq!(t["digest"], list.digest.as_str());
    assert_eq!(t["architectures"], json!(["amd64", "arm"]));
    assert_eq!(t["platforms"], json!(["linux/amd64", "linux/arm/v7"]));
    assert_eq!(t["last_updated"], "2024-05-02T00:00:00Z");

    let t = tag(&body, "single");
    assert_eq!(
        (t["digest"].as_str(), &t["architectures"]),
        (Some(single.as_str()), &json!(["arm64"]))
    );
    assert_eq!(t["last_updated"], "2023-07-01T00:00:00Z");
    let t = tag(&body, "docker");
    assert_eq!(
        (t["digest"].as_str(), &t["architectures"]),
        (Some(docker.as_str()), &json!(["amd64"]))
    );
    assert_eq!(t["last_updated"], "2022-02-02T02:02:02Z");
    let t = tag(&body, "nodate");
    assert_eq!(t["digest"], nodate.as_str());
    assert_eq!(
        t["last_updated"],
        Value::Null,
        "no created → null, never now"
    );
    assert_eq!(t["architectures"], json!(["s390x"]));
}

#[tokio::test]
async fn pages_are_followed_and_unchanged_refresh_costs_only_heads() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_many_tags("acme/many", 250, &ManyTags::shared_images(5))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    proxy.paginate_tags(Some(TagPaging {
        default_n: Some(100),
        max_n: Some(100),
    }));
    let app = app_for(&proxy.host(), &proxy.url(), &["--refresh-interval", "1s"]).await;
    let query = format!("image=acme/many&registry={}", proxy.host());
    let (_, body) = app.tags(&query).await;
    assert_eq!(body.as_array().unwrap().len(), 250);
    assert_eq!(
        proxy.count(Kind::TagList),
        3,
        "Link followed over three pages"
    );
    assert_eq!(proxy.count(Kind::ManifestHead), 250, "one HEAD per tag");
    assert_eq!(
        proxy.count(Kind::ManifestGet),
        5,
        "one GET per distinct digest"
    );
    assert_eq!(proxy.count(Kind::Blob), 5, "one config per distinct digest");
    let heads_without_accept = proxy
        .requests()
        .iter()
        .filter(|r| r.kind == Kind::ManifestHead)
        .filter(|r| {
            !r.accept
                .iter()
                .any(|a| a.contains("application/vnd.oci.image.index.v1+json"))
        })
        .count();
    assert_eq!(heads_without_accept, 0, "every HEAD accepts OCI indexes");

    // A refresh where nothing changed: pages and HEADs, no manifest GET, no blob.
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (headers, _) = app.tags(&query).await;
    assert_eq!(headers["x-cache"], "stale");
    for _ in 0..100 {
        if proxy.count(Kind::ManifestHead) == 250 && app.get("/metrics").await.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.count(Kind::TagList), 3);
    assert_eq!(proxy.count(Kind::ManifestHead), 250);
    assert_eq!(proxy.count(Kind::ManifestGet), 0);
    assert_eq!(proxy.count(Kind::Blob), 0);
}

#[tokio::test]
async fn moved_and_deleted_tags_show_after_refresh() {
    let reg = Registry::start(RegistryAuth::None).await;
    let p = reg.pusher();
    let old = p
        .push_image(
            "acme/app",
            "moving",
            &spec("amd64", "2024-01-01T00:00:00Z", 1),
        )
        .await;
    let doomed = p
        .push_image(
            "acme/app",
            "doomed",
            &spec("amd64", "2023-01-01T00:00:00Z", 2),
        )
        .await;
    p.push_image(
        "acme/app",
        "stays",
        &spec("amd64", "2022-01-01T00:00:00Z", 3),
    )
    .await;
    let app = app_for(&reg.host(), &reg.url(), &["--refresh-interval", "1s"]).await;
    let query = format!("image=acme/app&registry={}", reg.host());
    let (_, body) = app.tags(&query).await;
    assert_eq!(tag(&body, "moving")["digest"], old.as_str());

    let new = p
        .push_image(
            "acme/app",
            "moving",
            &spec("arm64", "2026-01-01T00:00:00Z", 4),
        )
        .await;
    p.delete_manifest("acme/app", &doomed).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (headers, _) = app.tags(&query).await;
    assert_eq!(headers["x-cache"], "stale");
    let mut body = Value::Null;
    for _ in 0..100 {
        (_, body) = app.tags(&query).await;
        if tag(&body, "moving")["digest"] == new.as_str() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moving = tag(&body, "moving");
    assert_eq!(
        moving["digest"],
        new.as_str(),
        "a moved tag shows its new digest"
    );
    assert_eq!(moving["architectures"], json!(["arm64"]));
    assert_eq!(
        names(&body),
        ["moving", "stays"],
        "a deleted tag disappears"
    );
}

#[tokio::test]
async fn missing_repository_is_404() {
    let reg = Registry::start(RegistryAuth::None).await;
    let app = app_for(&reg.host(), &reg.url(), &[]).await;
    let resp = app
        .get(&format!("/tags?image=nobody/here&registry={}", reg.host()))
        .await;
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("404") && text.contains("/v2/nobody/here/tags/list"),
        "{text}"
    );
}

#[tokio::test]
async fn artifact_tags_are_skipped() {
    let reg = Registry::start(RegistryAuth::None).await;
    let p = reg.pusher();
    let digest = p
        .push_image("acme/app", "v1", &spec("amd64", "2024-01-01T00:00:00Z", 1))
        .await;
    let sig_tag = format!("{}.sig", digest.replace(':', "-"));
    p.push_image(
        "acme/app",
        &sig_tag,
        &spec("amd64", "2024-01-02T00:00:00Z", 2),
    )
    .await;
    let app = app_for(&reg.host(), &reg.url(), &[]).await;
    let (_, body) = app
        .tags(&format!("image=acme/app&registry={}", reg.host()))
        .await;
    assert_eq!(names(&body), ["v1"]);
    let app = app_for(&reg.host(), &reg.url(), &["--include-artifact-tags"]).await;
    let (_, body) = app
        .tags(&format!("image=acme/app&registry={}", reg.host()))
        .await;
    assert_eq!(names(&body), [sig_tag.as_str(), "v1"]);
}

#[tokio::test]
async fn basic_auth_with_and_without_credentials() {
    let reg = Registry::start(RegistryAuth::htpasswd("alice", "s3cret-pw")).await;
    reg.pusher()
        .push_image(
            "private/app",
            "v1",
            &spec("amd64", "2024-01-01T00:00:00Z", 1),
        )
        .await;
    let query = format!("image=private/app&registry={}", reg.host());

    let anonymous = app_for(&reg.host(), &reg.url(), &[]).await;
    let resp = anonymous.get(&format!("/tags?{query}")).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("401"));

    let creds = format!("{}=alice:s3cret-pw", reg.host());
    let app = app_for(&reg.host(), &reg.url(), &["--credentials", &creds]).await;
    let (_, body) = app.tags(&query).await;
    assert_eq!(names(&body), ["v1"]);
    assert_eq!(tag(&body, "v1")["architectures"], json!(["amd64"]));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("s3cret") && !metrics.contains("alice"));
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_scoped_and_renewed() {
    let reg = Registry::start(RegistryAuth::token("bob", "hunter2")).await;
    reg.pusher()
        .push_many_tags("team/app", 20, &ManyTags::shared_images(2))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    let creds = format!("{}=bob:hunter2", proxy.host());
    let query = format!("image=team/app&registry={}", proxy.host());

    // Without credentials: the anonymous token grants nothing, the registry says 401.
    let anonymous = app_for(&proxy.host(), &proxy.url(), &[]).await;
    let resp = anonymous.get(&format!("/tags?{query}")).await;
    assert_eq!(resp.status(), 403, "{}", resp.text().await.unwrap());

    let ts = reg.token_server().unwrap();
    ts.reset();
    proxy.reset();
    ts.set_expires_in(Some(2));
    let app = app_for(
        &proxy.host(),
        &proxy.url(),
        &["--credentials", &creds, "--refresh-interval", "1s"],
    )
    .await;
    let (_, body) = app.tags(&query).await;
    assert_eq!(body.as_array().unwrap().len(), 20);
    assert_eq!(
        ts.request_count(),
        1,
        "one token for the page, 20 HEADs and the GETs"
    );
    assert!(ts.requests().iter().all(|r| r.authenticated));
    assert_eq!(
        ts.scopes(),
        ["repository:team/app:pull"],
        "scope built from the repository"
    );

    // The token expires after 2 s: the next refresh asks for a new one.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let _ = app.tags(&query).await;
    for _ in 0..100 {
        if ts.request_count() >= 2 && proxy.count(Kind::ManifestHead) >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ts.request_count(), 2, "renewed once after expiry");

    // A cached token the registry rejects mid-listing is replaced once, on the 401.
    ts.reset();
    ts.set_expires_in(Some(300));
    let app = app_for(
        &proxy.host(),
        &proxy.url(),
        &["--credentials", &creds, "--refresh-interval", "1s"],
    )
    .await;
    app.tags(&query).await;
    assert_eq!(ts.request_count(), 1);
    let challenge = format!(
        "Bearer realm=\"{}/token\",service=\"{}\",scope=\"repository:team/app:pull\"",
        proxy.url(),
        ts.service()
    );
    proxy.fault(
        Fault::on(Kind::ManifestHead)
            .respond(401)
            .header("WWW-Authenticate", &challenge)
            .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}"#)
            .times(1),
    );
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (headers, _) = app.tags(&query).await;
    assert_eq!(headers["x-cache"], "stale");
    for _ in 0..100 {
        if proxy.count(Kind::ManifestHead) >= 21 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ts.request_count(),
        2,
        "one new token after the mid-listing 401"
    );
    assert_eq!(
        proxy.count(Kind::ManifestHead),
        21,
        "the refused HEAD was retried once"
    );

    // A token that is refused as soon as it is issued ends in 403, after one token request.
    let fresh = app_for(&proxy.host(), &proxy.url(), &["--credentials", &creds]).await;
    ts.reset();
    ts.set_issue_expired(true);
    let first = fresh.get(&format!("/tags?{query}")).await;
    assert_eq!(first.status(), 403);
    assert_eq!(
        ts.request_count(),
        1,
        "no retry loop on a token that is refused at once"
    );
}

#[tokio::test]
async fn blob_redirects_are_followed_without_authorization() {
    let reg = Registry::start(RegistryAuth::htpasswd("alice", "pw")).await;
    reg.pusher()
        .push_image("acme/app", "v1", &spec("arm64", "2024-01-01T00:00:00Z", 1))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    proxy.redirect_blobs(true);
    let creds = format!("{}=alice:pw", proxy.host());
    let app = app_for(&proxy.host(), &proxy.url(), &["--credentials", &creds]).await;
    let (_, body) = app
        .tags(&format!("image=acme/app&registry={}", proxy.host()))
        .await;
    assert_eq!(tag(&body, "v1")["architectures"], json!(["arm64"]));
    let fetches = proxy.blob_fetches();
    assert_eq!(fetches.len(), 1);
    assert_eq!(
        fetches[0].authorization, None,
        "no credentials sent to the blob host"
    );
}

#[tokio::test]
async fn upstream_faults_map_to_statuses() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_image("acme/app", "v1", &spec("amd64", "2024-01-01T00:00:00Z", 1))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    let app = app_for(&proxy.host(), &proxy.url(), &["--upstream-timeout", "1s"]).await;
    let path = format!("/tags?image=acme/app&registry={}", proxy.host());

    proxy.fault(Fault::too_many_requests(Kind::TagList, 7).times(1));
    let resp = app.get(&path).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    tokio::time::sleep(Duration::from_secs(7)).await;

    // Transient failures are retried twice: three in a row are needed to show.
    proxy.fault(Fault::unavailable(Kind::ManifestHead).times(3));
    let resp = app.get(&path).await;
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("503"));

    proxy.fault(
        Fault::on(Kind::ManifestGet)
            .delay(Duration::from_secs(3))
            .times(3),
    );
    let resp = app.get(&path).await;
    assert_eq!(resp.status(), 504);

    proxy.fault(Fault::on(Kind::Blob).respond(404).times(1));
    let (_, body) = app.tags(&path["/tags?".len()..]).await;
    assert_eq!(
        tag(&body, "v1")["architectures"],
        json!([]),
        "a missing config keeps the tag"
    );
    assert!(tag(&body, "v1")["digest"].is_string());

    let app = app_for(&proxy.host(), &proxy.url(), &[]).await;
    proxy.fault(
        Fault::on(Kind::Blob)
            .respond(200)
            .body("{not json")
            .times(1),
    );
    let (_, body) = app.tags(&path["/tags?".len()..]).await;
    assert_eq!(
        tag(&body, "v1")["architectures"],
        json!([]),
        "a malformed config keeps the tag"
    );
}

#[tokio::test]
async fn refused_page_size_is_retried_smaller() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_many_tags("acme/app", 3, &ManyTags::shared_images(1))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    proxy.fault(Fault::on(Kind::TagList).respond(413).times(1));
    let app = app_for(&proxy.host(), &proxy.url(), &[]).await;
    let (_, body) = app
        .tags(&format!("image=acme/app&registry={}", proxy.host()))
        .await;
    assert_eq!(
        body.as_array().unwrap().len(),
        3,
        "never turned into no tags"
    );
    let pages: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::TagList)
        .map(|r| r.query.unwrap_or_default())
        .collect();
    assert_eq!(pages, ["n=1000", "n=100"]);
}

#[tokio::test]
async fn next_link_to_another_host_is_refused_and_truncates() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_image("acme/app", "v1", &spec("amd64", "2024-01-01T00:00:00Z", 1))
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    proxy.fault(
        Fault::on(Kind::TagList)
            .respond(200)
            .header("Content-Type", "application/json")
            .header(
                "Link",
                "<http://169.254.169.254/v2/acme/app/tags/list?last=v1>; rel=\"next\"",
            )
            .body(r#"{"name":"acme/app","tags":["v1",null]}"#)
            .times(1),
    );
    let app = app_for(&proxy.host(), &proxy.url(), &[]).await;
    let (headers, body) = app
        .tags(&format!("image=acme/app&registry={}", proxy.host()))
        .await;
    assert_eq!(names(&body), ["v1"], "null entries skipped");
    assert_eq!(headers["x-tags-truncated"], "true");
    assert_eq!(proxy.count(Kind::TagList), 1);
}

#[tokio::test]
async fn restart_serves_the_same_answer_without_upstream_requests() {
    let reg = Registry::start(RegistryAuth::None).await;
    reg.pusher()
        .push_index(
            "acme/app",
            "latest",
            &[
                spec("amd64", "2025-01-01T00:00:00Z", 1),
                spec("arm64", "2025-01-02T00:00:00Z", 2),
            ],
            &IndexOptions {
                media: IndexMedia::Oci,
                attestation: true,
                created: None,
            },
        )
        .await;
    let proxy = CountingProxy::start_for(&reg).await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("{}={}", proxy.host(), proxy.url());
    let args = [
        "--allowed-registries",
        &proxy.host(),
        "--registry-endpoint",
        &endpoint,
    ];
    let path = format!("/tags?image=acme/app&registry={}", proxy.host());
    let bin = Binary::spawn(dir.path(), &args).await;
    let first = bin.get(&path).await.text().await.unwrap();
    assert!(
        first.contains("\"architectures\":[\"amd64\",\"arm64\"]"),
        "{first}"
    );
    bin.terminate().await;
    proxy.reset();
    let bin = Binary::spawn(dir.path(), &args).await;
    let resp = bin.get(&path).await;
    assert_eq!(resp.headers()["x-cache"], "hit");
    assert_eq!(resp.text().await.unwrap(), first);
    assert_eq!(proxy.total(), 0, "no upstream request after the restart");
    bin.terminate().await;
}
