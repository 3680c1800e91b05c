//! Item 4, coalescing under load: 200 concurrent clients (each its own connection pool, all
//! released at once) each ask for all 20 uncached images, in an order rotated per client, so
//! every image is asked for by about ten clients at the same moment and then again while its
//! fetch runs or just after it ends. Upstream fetches per image are counted from what arrived
//! upstream: first tag pages (the Hub fake's `page` 1, the registry's `tags/list` without
//! `last`), one per fetch. The injected latency applies per upstream request, so fetches take
//! long enough to be joined. Docker Hub (1,000-tag images, ten pages each) and OCI (20 tags,
//! one image each) are measured separately, each on a fresh service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::metrics::Scrape;
use crate::report::{ItemResult, Row};
use crate::service::{Logging, Service};
use crate::stats::{median, round, summary};
use crate::support::hub::generate_tags;
use crate::support::registry::{Fault, Kind};
use crate::{Env, loadavg, progress};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Hub,
    Oci,
}

fn image(i: usize) -> String {
    format!("coalesce/img{i:02}")
}

/// One storm: per-image fetch counts and what the clients saw.
struct Storm {
    fetches_per_image: Vec<usize>,
    metric_fetches: u64,
    requests: usize,
    non_200: usize,
    miss: usize,
    hit: usize,
    stale: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Storm {
    fn json(&self) -> Value {
        json!({
            "fetches_per_image": self.fetches_per_image,
            "fetches_total_by_metrics": self.metric_fetches,
            "requests": self.requests, "non_200": self.non_200,
            "x_cache": { "miss": self.miss, "hit": self.hit, "stale": self.stale },
            "seconds": round(self.seconds, 3),
            "client_p50_ms": round(self.p50_ms, 2), "client_p99_ms": round(self.p99_ms, 2),
        })
    }
}

async fn setup(env: &Env) {
    let plan = &env.plan;
    for i in 0..plan.co_images {
        env.hub.add_repo(
            &image(i),
            generate_tags(plan.co_hub_tags, "2022-01-01T00:00:00Z"),
        );
    }
    env.push_distinct(plan.co_images, plan.co_oci_tags, 2021, 2_000_000, image)
        .await;
}

async fn storm(env: &Env, upstream: Upstream) -> Storm {
    let plan = &env.plan;
    let service = Service::start(
        &env.fresh_dir("coalesce"),
        &env.upstreams,
        &[],
        Logging::Default,
    )
    .await;
    env.hub.reset_counts();
    env.proxy.reset();
    match upstream {
        Upstream::Hub => env.hub.set_delay(plan.latency),
        Upstream::Oci => env.proxy.fault(Fault::any().delay(plan.latency)),
    }
    let paths: Vec<String> = (0..plan.co_images)
        .map(|i| match upstream {
            Upstream::Hub => format!("/tags?image={}", image(i)),
            Upstream::Oci => env.oci_path(&image(i)),
        })
        .collect();
    let paths = Arc::new(paths);
    let started = Instant::now();
    let results = crate::storm(std::slice::from_ref(&service.url), &paths, plan.co_clients).await;
    let seconds = started.elapsed().as_secs_f64();
    env.hub.set_delay(Duration::ZERO);
    env.proxy.clear_faults();
    let fetches_per_image = (0..plan.co_images)
        .map(|i| match upstream {
            Upstream::Hub => {
                // Both listing paths the Hub has; first pages only.
                let name = image(i);
                let (ns, repo) = name.split_once('/').expect("namespace/name");
                let paths = [
                    format!("/v2/namespaces/{ns}/repositories/{repo}/tags"),
                    format!("/v2/repositories/{ns}/{repo}/tags"),
                ];
                env.hub
                    .requests()
                    .iter()
                    .filter(|r| paths.iter().any(|p| r.path.trim_end_matches('/') == p))
                    .filter(|r| r.param("page").is_none_or(|p| p == "1"))
                    .count()
            }
            Upstream::Oci => {
                let list = format!("/v2/{}/tags/list", image(i));
                env.proxy
                    .requests()
                    .iter()
                    .filter(|r| r.kind == Kind::TagList && r.path == list)
                    .filter(|r| !r.query.as_deref().unwrap_or("").contains("last="))
                    .count()
            }
        })
        .collect();
    let metric_fetches = Scrape::take(&env.client, &service.url).await.fetches();
    service.stop().await;
    let count = |c: &str| results.iter().filter(|r| r.x_cache == c).count();
    let mut latencies: Vec<f64> = results.iter().map(|r| r.ms).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    Storm {
        fetches_per_image,
        metric_fetches,
        requests: results.len(),
        non_200: results.iter().filter(|r| r.status != 200).count(),
        miss: count("miss"),
        hit: count("hit"),
        stale: count("stale"),
        seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

pub async fn run(env: &Env) -> ItemResult {
    let plan = &env.plan;
    progress(&format!(
        "4 coalescing: {} clients x {} uncached images, {} ms per upstream request, {} repetitions",
        plan.co_clients,
        plan.co_images,
        plan.latency.as_millis(),
        plan.reps
    ));
    let load_start = loadavg();
    setup(env).await;
    let mut hub = Vec::new();
    let mut oci = Vec::new();
    for rep in 0..plan.reps {
        hub.push(storm(env, Upstream::Hub).await);
        oci.push(storm(env, Upstream::Oci).await);
        progress(&format!(
            "  run {}: fetches per image: Docker Hub {:?}, OCI {:?}",
            rep + 1,
            hub[rep].fetches_per_image,
            oci[rep].fetches_per_image
        ));
    }
    let max = |runs: &[Storm]| {
        runs.iter()
            .flat_map(|s| s.fetches_per_image.iter().copied())
            .max()
            .unwrap_or(0)
    };
    let min = |runs: &[Storm]| {
        runs.iter()
            .flat_map(|s| s.fetches_per_image.iter().copied())
            .min()
            .unwrap_or(0)
    };
    let exactly_one = |runs: &[Storm]| min(runs) == 1 && max(runs) == 1;
    let all_ok = |runs: &[Storm]| runs.iter().all(|s| s.non_200 == 0);
    let secs = |runs: &[Storm]| runs.iter().map(|s| s.seconds).collect::<Vec<_>>();
    let p99 = |runs: &[Storm]| runs.iter().map(|s| s.p99_ms).collect::<Vec<_>>();
    let json = json!({
        "clients": plan.co_clients,
        "images": plan.co_images,
        "requests_per_client": plan.co_images,
        "latency_ms": plan.latency.as_millis() as u64,
        "docker_hub": {
            "tags_per_image": plan.co_hub_tags,
            "max_fetches_per_image": max(&hub), "min_fetches_per_image": min(&hub),
            "all_200": all_ok(&hub),
            "storm_seconds": summary(&secs(&hub)), "client_p99_ms": summary(&p99(&hub)),
            "runs": hub.iter().map(Storm::json).collect::<Vec<_>>(),
        },
        "oci": {
            "tags_per_image": plan.co_oci_tags,
            "max_fetches_per_image": max(&oci), "min_fetches_per_image": min(&oci),
            "all_200": all_ok(&oci),
            "storm_seconds": summary(&secs(&oci)), "client_p99_ms": summary(&p99(&oci)),
            "runs": oci.iter().map(Storm::json).collect::<Vec<_>>(),
        },
        "target_met": exactly_one(&hub) && exactly_one(&oci) && all_ok(&hub) && all_ok(&oci),
        "loadavg_1m": [load_start, loadavg()],
    });
    let row = |name: &str, runs: &[Storm], tags: usize| Row {
        item: "4",
        measure: format!(
            "{} clients × {} uncached {name} images ({tags} tags): upstream fetches per image",
            plan.co_clients, plan.co_images
        ),
        value: match min(runs) == max(runs) {
            true => format!("{}", max(runs)),
            false => format!("{}–{}", min(runs), max(runs)),
        },
        against: format!(
            "{} requests, all answered 200: {}; storm {:.2} s",
            runs[0].requests,
            if all_ok(runs) { "yes" } else { "no" },
            median(&secs(runs))
        ),
        ratio: "–".into(),
        target: "exactly 1".into(),
        met: Some(exactly_one(runs) && all_ok(runs)),
        noise: format!("exact, {} runs", runs.len()),
    };
    ItemResult {
        json,
        rows: vec![
            row("Docker Hub", &hub, plan.co_hub_tags),
            row("OCI", &oci, plan.co_oci_tags),
        ],
        tables: vec![],
    }
}
