//! Item 3, upstream requests by kind for a 1,000-tag image: the cold fetch, a refresh where
//! nothing changed, and a refresh after 10 tags moved to new images; for Docker Hub (the fake)
//! and for an OCI registry (the real one, with 100-tag pages).
//!
//! Counts come from the service's own `tag_proxy_upstream_requests_total` (by kind) and, as a
//! cross-check, from what arrived upstream (the Hub fake's log, the counting proxy's). The
//! service runs with `--refresh-interval 1s`; a request after that second is answered stale
//! and starts the background refresh, which is awaited through `/metrics`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cold;
use crate::metrics::{Counts, KINDS, Scrape, delta};
use crate::report::{ItemResult, Row};
use crate::service::{Logging, Service};
use crate::support::hub::{HubTag, generate_tags};
use crate::support::registry::{ImageSpec, ManyTags};
use crate::{Env, loadavg, progress};

const HUB_IMAGE: &str = "bench/requests";
const PHASES: [&str; 3] = ["cold", "unchanged", "moved"];

/// One phase: what the service sent (by kind) and what arrived upstream.
#[derive(Clone, PartialEq)]
struct Phase {
    sent: Counts,
    arrived: Counts,
}

impl Phase {
    fn json(&self) -> Value {
        json!({ "sent": self.sent, "arrived_upstream": self.arrived,
                "total": self.sent.values().sum::<u64>() })
    }

    fn only_pages(&self) -> bool {
        self.sent.iter().all(|(k, v)| *k == "tag_page" || *v == 0)
            && self
                .arrived
                .iter()
                .all(|(k, v)| *k == "tag_page" || *v == 0)
    }
}

pub async fn run(env: &Env) -> ItemResult {
    let plan = &env.plan;
    progress(&format!(
        "3 upstream requests: {} tags, cold / unchanged / {} moved, Docker Hub and OCI, {} repetitions",
        plan.tags,
        plan.moved,
        plan.reps.min(2)
    ));
    let load_start = loadavg();
    // Counts are exact: two runs show that they repeat.
    let reps = plan.reps.min(2);
    let mut hub_runs = Vec::new();
    let mut oci_runs = Vec::new();
    for rep in 0..reps {
        hub_runs.push(hub_phases(env, rep).await);
        oci_runs.push(oci_phases(env, rep).await);
    }
    let identical =
        hub_runs.windows(2).all(|w| w[0] == w[1]) && oci_runs.windows(2).all(|w| w[0] == w[1]);
    let (hub, oci) = (&hub_runs[0], &oci_runs[0]);
    let hub_ok = hub.iter().all(Phase::only_pages);
    let oci_unchanged = &oci[1];
    let oci_ok = oci_unchanged.sent["manifest_get"] == 0
        && oci_unchanged.sent["blob"] == 0
        && oci_unchanged.arrived["manifest_get"] == 0
        && oci_unchanged.arrived["blob"] == 0;
    let phases_json = |runs: &Vec<[Phase; 3]>| {
        let first = &runs[0];
        json!({
            "cold": first[0].json(), "unchanged": first[1].json(), "moved": first[2].json(),
        })
    };
    let json = json!({
        "tags": plan.tags,
        "moved_tags": plan.moved,
        "oci_page_size": plan.page_size,
        "docker_hub": phases_json(&hub_runs),
        "oci": phases_json(&oci_runs),
        "identical_in_every_run": identical,
        "runs": reps,
        "target_docker_hub_only_tag_pages": hub_ok,
        "target_oci_unchanged_no_manifest_get_no_blob": oci_ok,
        "loadavg_1m": [load_start, loadavg()],
    });
    let exact = if identical {
        format!("exact, same in {reps} runs")
    } else {
        "**differed between runs**".into()
    };
    let fmt = |p: &Phase| {
        KINDS
            .iter()
            .filter(|k| p.sent[*k] > 0)
            .map(|k| format!("{} {}", p.sent[*k], short(k)))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let rows = vec![
        Row {
            item: "3",
            measure: format!(
                "Docker Hub, {} tags: requests cold / unchanged / {} moved",
                plan.tags, plan.moved
            ),
            value: format!("{} / {} / {}", fmt(&hub[0]), fmt(&hub[1]), fmt(&hub[2])),
            against: "the Hub fake's log".into(),
            ratio: "–".into(),
            target: "tag pages only".into(),
            met: Some(hub_ok),
            noise: exact.clone(),
        },
        Row {
            item: "3",
            measure: format!("OCI, {} tags: requests, cold fetch", plan.tags),
            value: fmt(&oci[0]),
            against: "the registry's side (counting proxy)".into(),
            ratio: "–".into(),
            target: "–".into(),
            met: None,
            noise: exact.clone(),
        },
        Row {
            item: "3",
            measure: "OCI: refresh, nothing changed".into(),
            value: fmt(&oci[1]),
            against: "the registry's side".into(),
            ratio: "–".into(),
            target: "no manifest GET, no blob".into(),
            met: Some(oci_ok),
            noise: exact.clone(),
        },
        Row {
            item: "3",
            measure: format!("OCI: refresh, {} tags moved", plan.moved),
            value: fmt(&oci[2]),
            against: "the registry's side".into(),
            ratio: "–".into(),
            target: "–".into(),
            met: None,
            noise: exact,
        },
    ];
    ItemResult {
        json,
        rows,
        tables: vec![count_table(plan.tags, plan.moved, hub, oci)],
    }
}

fn short(kind: &str) -> &str {
    match kind {
        "tag_page" => "pages",
        "manifest_head" => "HEAD",
        "manifest_get" => "GET",
        "blob" => "blob",
        other => other,
    }
}

fn count_table(tags: usize, moved: usize, hub: &[Phase; 3], oci: &[Phase; 3]) -> String {
    let mut md = format!(
        "Item 3, upstream requests for a {tags}-tag image, by kind (sent by the service = arrived upstream):\n\n\
         | registry | phase | tag pages | manifest HEAD | manifest GET | blob | token | total |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for (name, phases) in [("Docker Hub", hub), ("OCI registry", oci)] {
        for (phase, p) in PHASES.iter().zip(phases.iter()) {
            let label = match *phase {
                "moved" => format!("refresh, {moved} tags moved"),
                "unchanged" => "refresh, nothing changed".into(),
                _ => "cold fetch".into(),
            };
            let cell = |k: &str| match p.sent[k] == p.arrived[k] {
                true => p.sent[k].to_string(),
                false => format!("{} (arrived {})", p.sent[k], p.arrived[k]),
            };
            md.push_str(&format!(
                "| {name} | {label} | {} | {} | {} | {} | {} | {} |\n",
                cell("tag_page"),
                cell("manifest_head"),
                cell("manifest_get"),
                cell("blob"),
                cell("token"),
                p.sent.values().sum::<u64>()
            ));
        }
    }
    md
}

/// Waits out the refresh interval, asks once (answered stale, starting the refresh) and waits
/// until the service has finished `fetches` fetches in all.
async fn refresh(env: &Env, service: &Service, path: &str, fetches: u64) {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = env
        .client
        .get(format!("{}{path}", service.url))
        .send()
        .await
        .expect("/tags");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-cache"],
        "stale",
        "a stale answer starts a refresh"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let scrape = Scrape::take(&env.client, &service.url).await;
        if scrape.fetches() >= fetches {
            let errors = scrape.sum("tag_proxy_refresh_errors_total", &[]);
            assert_eq!(errors, 0.0, "the refresh succeeded");
            break;
        }
        assert!(Instant::now() < deadline, "refresh did not finish in 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fetch is counted just before its answer is stored and its flight ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// GET that must be a cache hit; the JSON answer.
async fn hit(env: &Env, service: &Service, path: &str) -> Vec<Value> {
    let resp = env
        .client
        .get(format!("{}{path}", service.url))
        .send()
        .await
        .expect("/tags");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "hit");
    let body = resp.bytes().await.expect("body");
    serde_json::from_slice(&body).expect("JSON")
}

fn digest_of(body: &[Value], tag: &str) -> String {
    body.iter()
        .find(|t| t["name"] == tag)
        .and_then(|t| t["digest"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn sent(env: &Env, service: &Service) -> Counts {
    Scrape::take(&env.client, &service.url)
        .await
        .upstream_by_kind()
}

fn hub_arrived(env: &Env) -> Counts {
    let mut counts: Counts = KINDS.iter().map(|k| (*k, 0)).collect();
    *counts.get_mut("tag_page").expect("kind") = env.hub.count() as u64;
    counts
}

async fn hub_phases(env: &Env, rep: usize) -> [Phase; 3] {
    let plan = &env.plan;
    let original = generate_tags(plan.tags, "2023-01-01T00:00:00Z");
    env.hub.set_tags(HUB_IMAGE, original.clone());
    let service = Service::start(
        &env.fresh_dir("requests-hub"),
        &env.upstreams,
        &["--refresh-interval", "1s"],
        Logging::Default,
    )
    .await;
    let path = format!("/tags?image={HUB_IMAGE}");

    env.hub.reset_counts();
    let m0 = sent(env, &service).await;
    let resp = env
        .client
        .get(format!("{}{path}", service.url))
        .send()
        .await
        .expect("/tags");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "miss");
    let m1 = sent(env, &service).await;
    let cold = Phase {
        sent: delta(&m0, &m1),
        arrived: hub_arrived(env),
    };

    env.hub.reset_counts();
    refresh(env, &service, &path, 2).await;
    let m2 = sent(env, &service).await;
    let unchanged = Phase {
        sent: delta(&m1, &m2),
        arrived: hub_arrived(env),
    };

    let step = (plan.tags / plan.moved).max(1);
    let mut moved_tags = original;
    let mut expected = Vec::new();
    for k in 0..plan.moved {
        let i = k * step;
        let digest = format!("sha256:{:064x}", (rep * 1000 + k + 1) as u64);
        let date = format!("2026-06-{:02}T00:00:00Z", k % 28 + 1);
        let name = moved_tags[i].name.clone();
        moved_tags[i] =
            HubTag::multi_arch(&name, &date, &["amd64", "arm64/v8"]).digest(Some(&digest));
        expected.push((name, digest));
    }
    env.hub.set_tags(HUB_IMAGE, moved_tags);
    env.hub.reset_counts();
    refresh(env, &service, &path, 3).await;
    let m3 = sent(env, &service).await;
    let moved = Phase {
        sent: delta(&m2, &m3),
        arrived: hub_arrived(env),
    };
    let body = hit(env, &service, &path).await;
    for (name, digest) in &expected {
        assert_eq!(
            &digest_of(&body, name),
            digest,
            "moved tag {name} refreshed"
        );
    }
    service.stop().await;
    [cold, unchanged, moved]
}

async fn oci_phases(env: &Env, rep: usize) -> [Phase; 3] {
    let plan = &env.plan;
    env.proxy.clear_faults();
    let service = Service::start(
        &env.fresh_dir("requests-oci"),
        &env.upstreams,
        &["--refresh-interval", "1s"],
        Logging::Default,
    )
    .await;
    let path = env.oci_path(cold::IMAGE);

    env.proxy.reset();
    let m0 = sent(env, &service).await;
    let resp = env
        .client
        .get(format!("{}{path}", service.url))
        .send()
        .await
        .expect("/tags");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "miss");
    let m1 = sent(env, &service).await;
    let cold = Phase {
        sent: delta(&m0, &m1),
        arrived: env.registry_arrived(),
    };

    env.proxy.reset();
    refresh(env, &service, &path, 2).await;
    let m2 = sent(env, &service).await;
    let unchanged = Phase {
        sent: delta(&m1, &m2),
        arrived: env.registry_arrived(),
    };

    // Move tags to new images, pushed straight to the registry (not through the counter).
    let layout = ManyTags::one_image_per_tag();
    let step = (plan.tags / plan.moved).max(1);
    let mut expected = Vec::new();
    for k in 0..plan.moved {
        let tag = layout.tag_name(k * step);
        let spec = ImageSpec::linux("amd64")
            .created(&format!("2030-01-{:02}T00:00:00Z", k % 28 + 1))
            .salt(1_000_000 + (rep * 1000 + k) as u64);
        let digest = env
            .registry
            .pusher()
            .push_image(cold::IMAGE, &tag, &spec)
            .await;
        expected.push((tag, digest));
    }
    env.proxy.reset();
    refresh(env, &service, &path, 3).await;
    let m3 = sent(env, &service).await;
    let moved = Phase {
        sent: delta(&m2, &m3),
        arrived: env.registry_arrived(),
    };
    let body = hit(env, &service, &path).await;
    for (tag, digest) in &expected {
        assert_eq!(&digest_of(&body, tag), digest, "moved tag {tag} refreshed");
    }
    service.stop().await;
    [cold, unchanged, moved]
}
