//! Proves the real-registry harness (`support::registry`) works and pins down what the real
//! distribution 2.8.2 registry does (UPSTREAM.md §3, §4, §7, §8), using a plain reqwest client,
//! so that tests of the service against it mean something. Every test starts its own registry.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LINK, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::support::registry::{
    ALL_MANIFEST_TYPES, CountingProxy, DOCKER_LIST, DOCKER_MANIFEST, Fault, IN_TOTO, ImageMedia,
    ImageSpec, IndexMedia, IndexOptions, Kind, ManyTags, OCI_INDEX, OCI_MANIFEST, PushedIndex,
    Registry, RegistryAuth, TOKEN_ISSUER, TOKEN_SERVICE, TagPaging, sha256_digest,
};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";
const PULL_APP: &str = "repository:team/app:pull";

/// A client that shows redirects instead of following them.
fn raw_client() -> Client {
    let builder = Client::builder().no_proxy();
    builder
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client that follows redirects like an ordinary one (reqwest drops `Authorization` when
/// the redirect leaves the origin).
fn following_client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

async fn get(client: &Client, url: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn head(url: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = raw_client().head(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn json_of(response: Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn header(response: &Response, name: impl reqwest::header::AsHeaderName) -> String {
    let value = response.headers().get(name);
    value
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn error_code(body: &Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or_default()
}

/// Asks the token endpoint for `scope`, with or without credentials.
async fn token_response(realm: &str, scope: &str, credentials: Option<(&str, &str)>) -> Response {
    let query = [("service", TOKEN_SERVICE), ("scope", scope)];
    let mut request = raw_client().get(realm).query(&query);
    if let Some((user, password)) = credentials {
        request = request.header(AUTHORIZATION, basic(user, password));
    }
    request.send().await.unwrap()
}

/// The token body for `scope`, asked with the test user's credentials.
async fn user_token(realm: &str, scope: &str) -> Value {
    let response = token_response(realm, scope, Some((USER, PASSWORD))).await;
    assert_eq!(response.status(), StatusCode::OK);
    json_of(response).await
}

/// `GET url` with `Authorization: Bearer <token>`.
async fn bearer_get(url: &str, token: &str) -> Response {
    get(
        &raw_client(),
        url,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// Decodes part `index` (0 = header, 1 = claims) of a JWT.
fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn lifetime(claims: &Value) -> u64 {
    claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap()
}

fn tags_of(body: &Value) -> Vec<String> {
    let tags = body["tags"].as_array().unwrap();
    tags.iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn anonymous_registry_answers_the_base_endpoint() {
    let registry = Registry::start(RegistryAuth::None).await;
    assert_eq!(
        registry.host(),
        registry.url().trim_start_matches("http://")
    );
    let base = get(&raw_client(), &format!("{}/v2/", registry.url()), &[]).await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(
        header(&base, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert!(registry.pusher().tags_list("demo/unknown").await.is_empty());
    assert_eq!(registry.token_requests(), 0);
}

#[tokio::test]
async fn single_images_keep_their_bytes_platform_and_created_date() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let oci = ImageSpec::linux("amd64").created("2024-03-01T10:00:00Z");
    let docker = ImageSpec::linux("arm64")
        .variant("v8")
        .created("2023-11-05T08:30:00Z");
    let docker = docker.media(ImageMedia::Docker);
    let oci_digest = pusher.push_image("demo/app", "1.0", &oci).await;
    let docker_digest = pusher.push_image("demo/app", "1.0-docker", &docker).await;

    let (content_type, bytes) = pusher.manifest("demo/app", "1.0").await.unwrap();
    assert_eq!(
        (content_type.as_str(), sha256_digest(&bytes)),
        (OCI_MANIFEST, oci_digest.clone())
    );
    let (content_type, bytes) = pusher.manifest("demo/app", "1.0-docker").await.unwrap();
    assert_eq!(
        (content_type.as_str(), sha256_digest(&bytes)),
        (DOCKER_MANIFEST, docker_digest)
    );
    assert!(
        bytes.starts_with(b"{\n   \""),
        "Docker manifests use 3-space indentation"
    );

    let config = pusher.config("demo/app", "1.0").await;
    assert_eq!(
        (config["created"].as_str(), config["os"].as_str()),
        (Some("2024-03-01T10:00:00Z"), Some("linux"))
    );
    let config = pusher.config("demo/app", "1.0-docker").await;
    assert_eq!(config["created"], "2023-11-05T08:30:00Z");
    assert_eq!(
        (config["architecture"].as_str(), config["variant"].as_str()),
        (Some("arm64"), Some("v8"))
    );
    assert!(
        pusher
            .config("demo/app", "1.0")
            .await
            .get("variant")
            .is_none()
    );
}

#[tokio::test]
async fn equal_specs_share_a_digest_and_salt_separates_them() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let spec = ImageSpec::linux("amd64");
    let first = pusher.push_image("demo/app", "a", &spec).await;
    assert_eq!(pusher.push_image("demo/app", "b", &spec).await, first);
    assert_ne!(
        pusher
            .push_image("demo/app", "c", &spec.clone().salt(1))
            .await,
        first
    );
    assert_eq!(pusher.digest_of("demo/app", "b").await, Some(first));
    let mut tags = pusher.tags_list("demo/app").await;
    tags.sort();
    assert_eq!(tags, ["a", "b", "c"]);
}

#[tokio::test]
async fn manifests_are_only_served_to_a_matching_accept() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    pusher
        .push_image("demo/app", "oci", &ImageSpec::linux("amd64"))
        .await;
    let docker = ImageSpec::linux("amd64").media(ImageMedia::Docker);
    pusher.push_image("demo/app", "docker", &docker).await;
    let url = |tag: &str| format!("{}/v2/demo/app/manifests/{tag}", registry.url());

    let no_accept = json_of(get(&raw_client(), &url("oci"), &[]).await).await;
    assert_eq!(error_code(&no_accept), "MANIFEST_UNKNOWN");
    let message = no_accept["errors"][0]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "OCI manifest found, but accept header does not support OCI manifests"
    );
    // A Docker v2 manifest without its Accept: 2.8 tries a schema1 rewrite and fails.
    let docker = get(&raw_client(), &url("docker"), &[]).await;
    assert_eq!(docker.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&json_of(docker).await), "MANIFEST_INVALID");

    let head = head(&url("oci"), &[("accept", ALL_MANIFEST_TYPES)]).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, CONTENT_TYPE), OCI_MANIFEST);
    let digest = header(&head, "docker-content-digest");
    assert_eq!(header(&head, "etag"), format!("\"{digest}\""));
    let (_, bytes) = pusher.manifest("demo/app", "oci").await.unwrap();
    assert_eq!(header(&head, CONTENT_LENGTH), bytes.len().to_string());
}

#[tokio::test]
async fn htpasswd_registry_demands_basic_credentials() {
    let registry = Registry::start(RegistryAuth::htpasswd(USER, PASSWORD)).await;
    let pusher = registry.pusher();
    let digest = pusher
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let url = format!("{}/v2/team/app/tags/list", registry.url());

    let anonymous = get(&raw_client(), &url, &[]).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&anonymous, WWW_AUTHENTICATE),
        "Basic realm=\"oci-tag-proxy-test\""
    );
    let wrong = get(
        &raw_client(),
        &url,
        &[("authorization", &basic(USER, "wrong"))],
    )
    .await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let listed = get(
        &raw_client(),
        &url,
        &[("authorization", &basic(USER, PASSWORD))],
    )
    .await;
    assert_eq!(listed.status(), StatusCode::OK);
    assert_eq!(json_of(listed).await["tags"], json!(["v1"]));
    assert_eq!(pusher.digest_of("team/app", "v1").await, Some(digest));
    assert_eq!(registry.credentials(), Some((USER, PASSWORD)));
}

#[tokio::test]
async fn token_registry_challenges_and_refuses_anonymous_tokens() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    let server = registry.token_server().unwrap();
    let realm = server.realm();
    let url = format!("{}/v2/team/app/tags/list", registry.url());

    let challenge = get(&raw_client(), &url, &[]).await;
    assert_eq!(challenge.status(), StatusCode::UNAUTHORIZED);
    let expected =
        format!("Bearer realm=\"{realm}\",service=\"{TOKEN_SERVICE}\",scope=\"{PULL_APP}\"");
    assert_eq!(header(&challenge, WWW_AUTHENTICATE), expected);

    // Anonymous: 200 with `access: []`, which the registry refuses with insufficient_scope.
    let anonymous = json_of(token_response(&realm, PULL_APP, None).await).await;
    let anonymous = anonymous["token"].as_str().unwrap();
    assert_eq!(jwt_part(anonymous, 1)["access"], json!([]));
    assert_eq!(jwt_part(anonymous, 1)["sub"], "");
    let refused = bearer_get(&url, anonymous).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&refused, WWW_AUTHENTICATE).ends_with(",error=\"insufficient_scope\""));

    let wrong = token_response(&realm, PULL_APP, Some((USER, "nope"))).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        (requests[0].user.as_deref(), requests[0].authenticated),
        (None, false)
    );
    assert_eq!(
        (requests[1].user.as_deref(), requests[1].authenticated),
        (Some(USER), false)
    );
}

#[tokio::test]
async fn token_registry_accepts_x5c_signed_jwts_for_the_granted_scope() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    let server = registry.token_server().unwrap();
    registry
        .pusher()
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let url = format!("{}/v2/team/app/tags/list", registry.url());

    let body = user_token(&server.realm(), PULL_APP).await;
    let token = body["token"].as_str().unwrap();
    assert_eq!(
        (&body["access_token"], &body["expires_in"]),
        (&json!(token), &json!(300))
    );
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    let (jwt_header, claims) = (jwt_part(token, 0), jwt_part(token, 1));
    assert_eq!(jwt_header["alg"], "RS256");
    assert_eq!(jwt_header["x5c"].as_array().unwrap().len(), 1);
    assert_eq!(
        (claims["iss"].as_str(), claims["sub"].as_str()),
        (Some(TOKEN_ISSUER), Some(USER))
    );
    assert_eq!(
        (claims["aud"].as_str(), lifetime(&claims)),
        (Some(TOKEN_SERVICE), 300)
    );
    let access = json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}]);
    assert_eq!(claims["access"], access);

    let listed = bearer_get(&url, token).await;
    assert_eq!(listed.status(), StatusCode::OK);
    assert_eq!(json_of(listed).await["tags"], json!(["v1"]));
    let other = bearer_get(
        &format!("{}/v2/team/other/tags/list", registry.url()),
        token,
    )
    .await;
    assert_eq!(
        other.status(),
        StatusCode::UNAUTHORIZED,
        "outside the granted scope"
    );

    // The pusher's own token requests are not counted.
    assert_eq!(registry.token_requests(), 1);
    assert_eq!(server.requests()[0].granted, [PULL_APP]);
    assert_eq!(server.scopes(), [PULL_APP]);
}

#[tokio::test]
async fn token_registry_verifies_the_signature() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    registry
        .pusher()
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let body = user_token(&registry.token_server().unwrap().realm(), PULL_APP).await;
    let token = body["token"].as_str().unwrap();
    // Change the signature's first character (the last may only carry ignored padding bits).
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed}.{flipped}{}", &signature[1..]);

    let url = format!("{}/v2/team/app/tags/list", registry.url());
    let rejected = bearer_get(&url, &tampered).await;
    assert_eq!(rejected.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&rejected, WWW_AUTHENTICATE).ends_with(",error=\"invalid_token\""));
    assert_eq!(bearer_get(&url, token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn token_server_grants_push_to_the_user() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    let realm = registry.token_server().unwrap().realm();
    let push = user_token(&realm, "repository:team/new:pull,push").await;
    let bearer = format!("Bearer {}", push["token"].as_str().unwrap());
    let upload = raw_client().post(format!("{}/v2/team/new/blobs/uploads/", registry.url()));
    let upload = upload.header(AUTHORIZATION, &bearer).send().await.unwrap();
    assert_eq!(upload.status(), StatusCode::ACCEPTED);
    let pull_only = user_token(&realm, "repository:team/new:pull").await;
    let bearer = format!("Bearer {}", pull_only["token"].as_str().unwrap());
    let upload = raw_client().post(format!("{}/v2/team/new/blobs/uploads/", registry.url()));
    let upload = upload.header(AUTHORIZATION, &bearer).send().await.unwrap();
    assert_eq!(upload.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_server_scripts_expires_in_and_stale_tokens() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    let server = registry.token_server().unwrap();
    let realm = server.realm();
    registry
        .pusher()
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let url = format!("{}/v2/team/app/tags/list", registry.url());

    server.set_expires_in(None);
    let omitted = user_token(&realm, PULL_APP).await;
    assert!(omitted.get("expires_in").is_none());
    assert_eq!(
        lifetime(&jwt_part(omitted["token"].as_str().unwrap(), 1)),
        60
    );
    server.set_expires_in(Some(120));
    assert_eq!(user_token(&realm, PULL_APP).await["expires_in"], 120);

    // An already-expired JWT is refused at once although expires_in says 120 s.
    server.set_issue_expired(true);
    let stale = user_token(&realm, PULL_APP).await;
    assert_eq!(stale["expires_in"], 120);
    let refused = bearer_get(&url, stale["token"].as_str().unwrap()).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&refused, WWW_AUTHENTICATE).ends_with(",error=\"invalid_token\""));
    server.set_issue_expired(false);
    let fresh = user_token(&realm, PULL_APP).await;
    assert_eq!(
        bearer_get(&url, fresh["token"].as_str().unwrap())
            .await
            .status(),
        200
    );

    assert_eq!(registry.token_requests(), 4);
    server.reset();
    assert_eq!(registry.token_requests(), 0);
}

/// Checks the attestation entries of `index` against what `push_index` reported.
fn assert_attestations(index: &Value, pushed: &PushedIndex) {
    let entries = &index["manifests"].as_array().unwrap()[pushed.platforms.len()..];
    assert_eq!(entries.len(), pushed.attestations.len());
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["digest"], pushed.attestations[i]);
        assert_eq!(
            entry["platform"],
            json!({"architecture": "unknown", "os": "unknown"})
        );
        let annotations = &entry["annotations"];
        assert_eq!(
            annotations["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        assert_eq!(
            annotations["vnd.docker.reference.digest"],
            pushed.platforms[i]
        );
    }
}

#[tokio::test]
async fn oci_index_with_attestations_is_served_only_to_an_oci_accept() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let platforms = [
        ImageSpec::linux("amd64"),
        ImageSpec::linux("arm64").variant("v8"),
    ];
    let created = Some("2025-01-02T03:04:05Z".to_owned());
    let options = IndexOptions {
        attestation: true,
        created,
        ..IndexOptions::default()
    };
    let pushed = pusher
        .push_index("demo/multi", "2.0", &platforms, &options)
        .await;
    let url = format!("{}/v2/demo/multi/manifests/2.0", registry.url());

    let docker_only = [("accept", DOCKER_LIST), ("accept", DOCKER_MANIFEST)];
    let refused = json_of(get(&raw_client(), &url, &docker_only).await).await;
    let message = "OCI index found, but accept header does not support OCI indexes";
    assert_eq!(
        (error_code(&refused), &refused["errors"][0]["message"]),
        ("MANIFEST_UNKNOWN", &json!(message))
    );

    let served = get(&raw_client(), &url, &[("accept", OCI_INDEX)]).await;
    assert_eq!(header(&served, CONTENT_TYPE), OCI_INDEX);
    assert_eq!(header(&served, "docker-content-digest"), pushed.digest);
    let bytes = served.bytes().await.unwrap();
    assert_eq!(sha256_digest(&bytes), pushed.digest);
    let index: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        index["annotations"]["org.opencontainers.image.created"],
        "2025-01-02T03:04:05Z"
    );
    assert_eq!(index["manifests"].as_array().unwrap().len(), 4);
    let arm = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    assert_eq!(index["manifests"][1]["platform"], arm);
    assert_attestations(&index, &pushed);
}

#[tokio::test]
async fn attestation_manifests_follow_buildkit_classic_form() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let options = IndexOptions {
        attestation: true,
        ..IndexOptions::default()
    };
    let pushed = pusher
        .push_index("demo/att", "1", &[ImageSpec::linux("amd64")], &options)
        .await;
    let (content_type, manifest) = pusher
        .manifest("demo/att", &pushed.attestations[0])
        .await
        .unwrap();
    assert_eq!(content_type, OCI_MANIFEST);
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let layer = &manifest["layers"][0];
    assert_eq!(layer["mediaType"], IN_TOTO);
    assert_eq!(
        layer["annotations"]["in-toto.io/predicate-type"],
        "https://slsa.dev/provenance/v0.2"
    );
    let config = pusher.config("demo/att", &pushed.attestations[0]).await;
    assert_eq!(
        (config["architecture"].as_str(), config["os"].as_str()),
        (Some("unknown"), Some("unknown"))
    );
    let statement = pusher
        .blob("demo/att", layer["digest"].as_str().unwrap())
        .await;
    let statement: Value = serde_json::from_slice(&statement).unwrap();
    let subject = pushed.platforms[0].trim_start_matches("sha256:");
    assert_eq!(statement["subject"][0]["digest"]["sha256"], subject);
}

#[tokio::test]
async fn docker_manifest_list_round_trips() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let platforms = [
        ImageSpec::linux("amd64"),
        ImageSpec::linux("arm").variant("v7"),
    ];
    let media = IndexMedia::DockerList;
    let options = IndexOptions {
        media,
        attestation: true,
        ..IndexOptions::default()
    };
    let pushed = pusher
        .push_index("demo/list", "5.0", &platforms, &options)
        .await;
    assert!(pushed.attestations.is_empty(), "attestations are OCI-only");
    let url = format!("{}/v2/demo/list/manifests/5.0", registry.url());

    let no_accept = get(&raw_client(), &url, &[]).await;
    assert_eq!(
        no_accept.status(),
        StatusCode::BAD_REQUEST,
        "2.8 cannot rewrite it to schema1"
    );
    let served = get(&raw_client(), &url, &[("accept", DOCKER_LIST)]).await;
    assert_eq!(header(&served, CONTENT_TYPE), DOCKER_LIST);
    let list = json_of(served).await;
    let entries = list["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e["mediaType"] == DOCKER_MANIFEST));
    assert_eq!(
        (&entries[0]["digest"], &entries[1]["platform"]["variant"]),
        (&json!(pushed.platforms[0]), &json!("v7"))
    );
    let (content_type, _) = pusher
        .manifest("demo/list", &pushed.platforms[1])
        .await
        .unwrap();
    assert_eq!(content_type, DOCKER_MANIFEST);
}

#[tokio::test]
async fn registry_ignores_n_and_sends_no_link() {
    let registry = Registry::start(RegistryAuth::None).await;
    let plan = ManyTags::shared_images(2);
    let pushed = registry
        .pusher()
        .push_many_tags("demo/many", 5, &plan)
        .await;
    let tags: Vec<&str> = pushed.iter().map(|p| p.tag.as_str()).collect();
    assert_eq!(tags, ["t0000", "t0001", "t0002", "t0003", "t0004"]);
    assert_eq!(pushed[0].digest, pushed[2].digest);
    assert_ne!(pushed[0].digest, pushed[1].digest);

    let url = format!("{}/v2/demo/many/tags/list?n=2&last=t0001", registry.url());
    let direct = get(&raw_client(), &url, &[]).await;
    assert!(
        direct.headers().get(LINK).is_none(),
        "2.8.2 has no tags/list pagination"
    );
    let mut listed = tags_of(&json_of(direct).await);
    listed.sort();
    assert_eq!(listed, tags);
}

#[tokio::test]
async fn proxy_paginates_tags_with_a_relative_link() {
    let registry = Registry::start(RegistryAuth::None).await;
    let plan = ManyTags::shared_images(1);
    registry
        .pusher()
        .push_many_tags("demo/many", 5, &plan)
        .await;
    let proxy = CountingProxy::start_for(&registry).await;
    proxy.paginate_tags(Some(TagPaging::default()));

    let mut next = Some("/v2/demo/many/tags/list?n=2".to_owned());
    let (mut links, mut tags) = (Vec::new(), Vec::new());
    while let Some(path) = next.take() {
        let page = get(&raw_client(), &format!("{}{path}", proxy.url()), &[]).await;
        let link = header(&page, LINK);
        next = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(u, _)| u.to_owned());
        links.push(link);
        tags.extend(tags_of(&json_of(page).await));
    }
    assert_eq!(
        links[0],
        "</v2/demo/many/tags/list?last=t0001&n=2>; rel=\"next\""
    );
    assert_eq!((links.len(), links[2].as_str()), (3, ""));
    assert_eq!(tags, ["t0000", "t0001", "t0002", "t0003", "t0004"]);
    assert_eq!(proxy.count(Kind::TagList), 3);

    let zero = get(
        &raw_client(),
        &format!("{}/v2/demo/many/tags/list?n=0", proxy.url()),
        &[],
    )
    .await;
    assert!(zero.headers().get(LINK).is_none());
    assert_eq!(json_of(zero).await["tags"], json!([]));
    let invalid = get(
        &raw_client(),
        &format!("{}/v2/demo/many/tags/list?n=x", proxy.url()),
        &[],
    )
    .await;
    assert_eq!(
        error_code(&json_of(invalid).await),
        "PAGINATION_NUMBER_INVALID"
    );
}

#[tokio::test]
async fn push_many_tags_gives_each_tag_its_own_dated_image() {
    let registry = Registry::start(RegistryAuth::htpasswd(USER, PASSWORD)).await;
    let pusher = registry.pusher();
    let started = Instant::now();
    let plan = ManyTags::one_image_per_tag().prefix("v");
    let pushed = pusher.push_many_tags("demo/bulk", 150, &plan).await;
    let elapsed = started.elapsed();
    let mut digests: Vec<&str> = pushed.iter().map(|p| p.digest.as_str()).collect();
    digests.sort();
    digests.dedup();
    assert_eq!(digests.len(), 150);
    assert_eq!(pusher.tags_list("demo/bulk").await.len(), 150);
    let last = &pushed[149];
    assert_eq!(
        (last.tag.as_str(), last.created.as_str()),
        ("v0149", "2020-05-29T00:00:00Z")
    );
    assert_eq!(
        pusher.config("demo/bulk", &last.tag).await["created"],
        last.created
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "150 tags took {elapsed:?}"
    );
}

#[tokio::test]
async fn deleting_a_manifest_by_digest_removes_its_tags() {
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let first = pusher
        .push_image("demo/del", "1", &ImageSpec::linux("amd64"))
        .await;
    pusher
        .push_image("demo/del", "1-alias", &ImageSpec::linux("amd64"))
        .await;
    let second = pusher
        .push_image("demo/del", "2", &ImageSpec::linux("amd64").salt(7))
        .await;

    pusher.delete_manifest("demo/del", &first).await;
    assert_eq!(pusher.tags_list("demo/del").await, ["2"]);
    assert_eq!(pusher.digest_of("demo/del", "1").await, None);
    assert_eq!(pusher.digest_of("demo/del", &first).await, None);

    let url = format!("{}/v2/demo/del/manifests/2", registry.url());
    let by_tag = raw_client().delete(url).send().await.unwrap();
    assert_eq!(
        by_tag.status(),
        StatusCode::BAD_REQUEST,
        "2.8 deletes by digest only"
    );
    pusher.delete_manifest("demo/del", &second).await;
    let emptied = get(
        &raw_client(),
        &format!("{}/v2/demo/del/tags/list", registry.url()),
        &[],
    )
    .await;
    assert_eq!(emptied.status(), StatusCode::OK);
    assert_eq!(
        json_of(emptied).await,
        json!({"name": "demo/del", "tags": null})
    );
    assert!(pusher.tags_list("demo/del").await.is_empty());
}

#[tokio::test]
async fn proxy_forwards_uploads_through_rewritten_locations() {
    let registry = Registry::start(RegistryAuth::htpasswd(USER, PASSWORD)).await;
    let proxy = CountingProxy::start_for(&registry).await;
    let through_proxy = registry.pusher().with_base(&proxy.url());
    let spec = ImageSpec::linux("amd64");
    let digest = through_proxy.push_image("demo/app", "1.0", &spec).await;
    let requests = proxy.requests();
    let uploads = requests
        .iter()
        .filter(|r| r.path.contains("/blobs/uploads/"))
        .count();
    assert_eq!(
        uploads, 4,
        "POST and PUT per blob, each PUT on the rewritten Location"
    );
    assert!(requests.iter().all(|r| r.authorization));
    assert_eq!(
        registry.pusher().digest_of("demo/app", "1.0").await,
        Some(digest)
    );
    proxy.reset();
    assert_eq!(proxy.total(), 0);
}

#[tokio::test]
async fn proxy_counts_requests_by_kind() {
    let registry = Registry::start(RegistryAuth::htpasswd(USER, PASSWORD)).await;
    let digest = registry
        .pusher()
        .push_image("demo/app", "1.0", &ImageSpec::linux("amd64"))
        .await;
    let (_, manifest) = registry.pusher().manifest("demo/app", "1.0").await.unwrap();
    let config: Value = serde_json::from_slice(&manifest).unwrap();
    let config_digest = config["config"]["digest"].as_str().unwrap();
    let proxy = CountingProxy::start_for(&registry).await;
    let auth = basic(USER, PASSWORD);
    let with_auth = [("authorization", auth.as_str()), ("accept", OCI_MANIFEST)];
    let base = format!("{}/v2/demo/app", proxy.url());

    assert_eq!(
        get(&raw_client(), &format!("{base}/tags/list"), &with_auth)
            .await
            .status(),
        200
    );
    let head = head(&format!("{base}/manifests/1.0"), &with_auth).await;
    assert_eq!(
        header(&head, CONTENT_LENGTH),
        manifest.len().to_string(),
        "HEAD keeps Content-Length"
    );
    let by_digest = get(
        &raw_client(),
        &format!("{base}/manifests/{digest}"),
        &with_auth,
    )
    .await;
    assert_eq!(by_digest.bytes().await.unwrap(), manifest);
    let blob = get(
        &raw_client(),
        &format!("{base}/blobs/{config_digest}"),
        &with_auth,
    )
    .await;
    assert_eq!(blob.status(), StatusCode::OK);
    let anonymous = get(&raw_client(), &format!("{base}/tags/list"), &[]).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let kinds = [
        Kind::TagList,
        Kind::ManifestHead,
        Kind::ManifestGet,
        Kind::Blob,
        Kind::Token,
    ];
    assert_eq!(kinds.map(|kind| proxy.count(kind)), [2, 1, 1, 1, 0]);
    let requests = proxy.requests();
    assert_eq!(requests.iter().filter(|r| !r.authorization).count(), 1);
    assert_eq!(
        (&requests[1].method, &requests[1].accept),
        (&Method::HEAD, &vec![OCI_MANIFEST.to_owned()])
    );
}

#[tokio::test]
async fn proxy_fault_applies_n_times_then_passes() {
    let registry = Registry::start(RegistryAuth::None).await;
    registry
        .pusher()
        .push_image("demo/app", "1.0", &ImageSpec::linux("amd64"))
        .await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let tags = format!("{}/v2/demo/app/tags/list", proxy.url());

    proxy.fault(Fault::too_many_requests(Kind::TagList, 3).times(2));
    for _ in 0..2 {
        let limited = get(&raw_client(), &tags, &[]).await;
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&limited, RETRY_AFTER), "3");
        assert_eq!(error_code(&json_of(limited).await), "TOOMANYREQUESTS");
    }
    assert_eq!(
        get(&raw_client(), &tags, &[]).await.status(),
        StatusCode::OK,
        "429, 429, then 200"
    );
    assert_eq!(proxy.pending_faults(), 0);
    let faulted: Vec<bool> = proxy.requests().iter().map(|r| r.faulted).collect();
    assert_eq!(faulted, [true, true, false]);
}

#[tokio::test]
async fn proxy_persistent_fault_lasts_until_cleared() {
    let registry = Registry::start(RegistryAuth::None).await;
    registry
        .pusher()
        .push_image("demo/app", "1.0", &ImageSpec::linux("amd64"))
        .await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let manifest = format!("{}/v2/demo/app/manifests/1.0", proxy.url());
    let accept = [("accept", OCI_MANIFEST)];

    proxy.fault(Fault::unavailable(Kind::ManifestGet));
    for _ in 0..3 {
        assert_eq!(get(&raw_client(), &manifest, &accept).await.status(), 503);
    }
    assert_eq!(
        head(&manifest, &accept).await.status(),
        200,
        "HEAD is another kind"
    );
    proxy.clear_faults();
    assert_eq!(get(&raw_client(), &manifest, &accept).await.status(), 200);
}

#[tokio::test]
async fn proxy_delays_and_filters_by_method_and_path() {
    let registry = Registry::start(RegistryAuth::None).await;
    registry
        .pusher()
        .push_image("demo/app", "1.0", &ImageSpec::linux("amd64"))
        .await;
    let proxy = CountingProxy::start(&registry.url()).await;
    let manifest = format!("{}/v2/demo/app/manifests/1.0", proxy.url());

    proxy.fault(
        Fault::on(Kind::ManifestHead)
            .delay(Duration::from_millis(400))
            .times(1),
    );
    let started = Instant::now();
    assert_eq!(
        head(&manifest, &[("accept", OCI_MANIFEST)]).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(400));

    let teapot = Fault::any()
        .method(Method::GET)
        .path_contains("/other/")
        .respond(418)
        .body("tea");
    proxy.fault(teapot);
    let other = get(
        &raw_client(),
        &format!("{}/v2/other/tags/list", proxy.url()),
        &[],
    )
    .await;
    assert_eq!(other.status().as_u16(), 418);
    assert_eq!(other.text().await.unwrap(), "tea");
    let tags = get(
        &raw_client(),
        &format!("{}/v2/demo/app/tags/list", proxy.url()),
        &[],
    )
    .await;
    assert_eq!(tags.status(), StatusCode::OK, "other paths unaffected");
}

#[tokio::test]
async fn proxy_routes_token_requests_through_itself() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    registry
        .pusher()
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let proxy = CountingProxy::start_for(&registry).await;

    let challenge = get(
        &raw_client(),
        &format!("{}/v2/team/app/tags/list", proxy.url()),
        &[],
    )
    .await;
    let realm = format!("{}/token", proxy.url());
    assert!(header(&challenge, WWW_AUTHENTICATE).starts_with(&format!("Bearer realm=\"{realm}\"")));
    proxy.fault(Fault::unavailable(Kind::Token).times(1));
    let failed = token_response(&realm, PULL_APP, Some((USER, PASSWORD))).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    let token = user_token(&realm, PULL_APP).await;
    let url = format!("{}/v2/team/app/tags/list", proxy.url());
    assert_eq!(
        bearer_get(&url, token["token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    assert_eq!(
        (proxy.count(Kind::Token), registry.token_requests()),
        (2, 1)
    );
}

#[tokio::test]
async fn proxy_redirects_blobs_to_another_origin_without_authorization() {
    let registry = Registry::start(RegistryAuth::token(USER, PASSWORD)).await;
    let digest = registry
        .pusher()
        .push_image("team/app", "v1", &ImageSpec::linux("amd64"))
        .await;
    let (_, manifest) = registry
        .pusher()
        .manifest("team/app", &digest)
        .await
        .unwrap();
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let token = user_token(&registry.token_server().unwrap().realm(), PULL_APP).await;
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let proxy = CountingProxy::start_for(&registry).await;
    proxy.redirect_blobs(true);
    let blob_url = format!("{}/v2/team/app/blobs/{config_digest}", proxy.url());

    let redirect = get(&raw_client(), &blob_url, &[("authorization", &bearer)]).await;
    assert_eq!(redirect.status(), StatusCode::TEMPORARY_REDIRECT);
    assert!(proxy.redirect_origin().starts_with("http://localhost:"));
    assert!(
        header(&redirect, LOCATION).starts_with(&format!("{}/blobs/", proxy.redirect_origin()))
    );
    let followed = get(
        &following_client(),
        &blob_url,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(followed.status(), StatusCode::OK);
    assert_eq!(
        sha256_digest(&followed.bytes().await.unwrap()),
        config_digest
    );
    let fetches = proxy.blob_fetches();
    assert_eq!(fetches.len(), 1);
    assert_eq!(
        fetches[0].authorization, None,
        "Authorization must not cross origins"
    );
    let unauthorized = get(&raw_client(), &blob_url, &[]).await;
    assert_eq!(
        unauthorized.status(),
        StatusCode::UNAUTHORIZED,
        "no redirect without a token"
    );
}
