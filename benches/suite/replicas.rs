//! Item 7, the Redis shared tier across replicas (issue 7):
//!
//! 1. Upstream requests per image with 1, 2 and 3 replicas under the same load. One real
//!    `redis-server` per configuration (so configurations share no state); N services, each
//!    on its own fresh cache directory, share it (`--redis-url`) and run with a short
//!    `--refresh-interval`. The load is the same for every N: a fixed set of clients (each its
//!    own connection pool, all released at once, client `c` talking to replica `c mod N`)
//!    each ask for every uncached image (Docker Hub images from the Hub fake, OCI images on the
//!    real registry), in an order rotated per client; once cold, and once more after the
//!    refresh interval has passed (answered stale, each starting a background refresh, which
//!    is awaited until nothing more arrives upstream). The injected latency applies to every
//!    upstream request. Requests are counted per image where they arrive (the Hub fake's log,
//!    the counting proxy's) and cross-checked against the sum of the services' own
//!    `tag_proxy_upstream_requests_total`. As the contrast, in the same run, the same load on
//!    3 replicas without Redis (each its own embedded cache). After the refresh phase every
//!    replica is asked once more for every image, which must be a fresh hit without any
//!    upstream request (the refresh reached every replica).
//! 2. Latency of a memory-tier miss answered from Redis. Replica A (with Redis) caches K Docker
//!    Hub images; replica B (with Redis, empty memory, its own empty disk) then asks for each
//!    once, one request at a time (every answer must be `X-Cache: hit` with no upstream
//!    request: a Redis-tier hit), then for each again (memory hits). For reference, A's cache
//!    directory is reopened by a service without Redis (A stopped with SIGTERM): disk-tier
//!    hits, then memory hits. Timed by the client, from sending to the last byte of the body.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::metrics::{Counts, KINDS, Scrape, delta};
use crate::report::{ItemResult, Row, noise};
use crate::service::{Logging, Service};
use crate::stats::{median, round, summary};
use crate::support::hub::generate_tags;
use crate::support::redis::RedisServer;
use crate::support::registry::{Fault, Kind};
use crate::{Env, loadavg, progress};

/// Part 1's configurations, in report order: (replicas, shared Redis).
const CONFIGS: [(usize, bool); 4] = [(1, true), (2, true), (3, true), (3, false)];
/// Upstream counts must stand still this long before a phase counts as finished.
const SETTLED: Duration = Duration::from_millis(500);
/// Longest wait for a phase's fetches to finish.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests in flight while replica A fills the cache of part 2.
const FILL_CONCURRENCY: usize = 16;

fn hub_image(i: usize) -> String {
    format!("replicas/hub{i:02}")
}

fn oci_image(i: usize) -> String {
    format!("replicas/oci{i:02}")
}

/// Part 2's images; index `lat_images` is the unmeasured warm-up.
fn lat_image(i: usize) -> String {
    format!("replicas/lat{i:04}")
}

// ---------------------------------------------------------------------------------------------
// Part 1: upstream requests per image with 1, 2, 3 replicas
// ---------------------------------------------------------------------------------------------

/// Upstream requests of one phase (all replicas together), as they arrived and as sent.
#[derive(Clone, PartialEq)]
struct Phase {
    /// Per Docker Hub image (image order): tag pages, and first pages (= whole fetches).
    hub_pages: Vec<u64>,
    hub_fetches: Vec<u64>,
    /// Per OCI image: every request, and `tags/list` without `last` (= whole fetches).
    oci_requests: Vec<u64>,
    oci_fetches: Vec<u64>,
    /// OCI requests by kind, all images together.
    oci_by_kind: Counts,
    /// What arrived upstream, by kind (Hub fake + counting proxy).
    arrived: Counts,
    /// What the services counted (`tag_proxy_upstream_requests_total`, summed over replicas).
    sent: Counts,
}

impl Phase {
    fn json(&self) -> Value {
        json!({
            "docker_hub_pages_per_image": self.hub_pages,
            "docker_hub_fetches_per_image": self.hub_fetches,
            "oci_requests_per_image": self.oci_requests,
            "oci_fetches_per_image": self.oci_fetches,
            "oci_by_kind": self.oci_by_kind,
            "arrived_upstream": self.arrived,
            "sent_by_services": self.sent,
            "metrics_agree": self.sent == self.arrived,
        })
    }
}

/// What the clients saw in one phase.
struct Load {
    requests: usize,
    non_200: usize,
    x_cache: BTreeMap<String, usize>,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Load {
    fn json(&self) -> Value {
        json!({
            "requests": self.requests, "non_200": self.non_200, "x_cache": self.x_cache,
            "seconds": round(self.seconds, 3),
            "client_p50_ms": round(self.p50_ms, 2), "client_p99_ms": round(self.p99_ms, 2),
        })
    }
}

/// One configuration, one repetition.
struct ConfigRun {
    replicas: usize,
    redis: bool,
    cold: Phase,
    refresh: Phase,
    cold_load: Load,
    refresh_load: Load,
    /// The check after the refresh: one request per image per replica.
    verify_requests: usize,
    verify_hits: usize,
    verify_non_200: usize,
    verify_upstream: u64,
}

impl ConfigRun {
    fn hub_per_image(&self) -> Vec<u64> {
        sum_vecs(&self.cold.hub_pages, &self.refresh.hub_pages)
    }

    fn oci_per_image(&self) -> Vec<u64> {
        sum_vecs(&self.cold.oci_requests, &self.refresh.oci_requests)
    }

    fn all_200(&self) -> bool {
        self.cold_load.non_200 == 0 && self.refresh_load.non_200 == 0 && self.verify_non_200 == 0
    }

    fn metrics_agree(&self) -> bool {
        self.cold.sent == self.cold.arrived && self.refresh.sent == self.refresh.arrived
    }

    fn refreshed_everywhere(&self) -> bool {
        self.verify_hits == self.verify_requests && self.verify_upstream == 0
    }

    fn json(&self) -> Value {
        json!({
            "replicas": self.replicas,
            "redis": self.redis,
            "docker_hub_requests_per_image": self.hub_per_image(),
            "oci_requests_per_image": self.oci_per_image(),
            "cold": { "upstream": self.cold.json(), "clients": self.cold_load.json() },
            "refresh": { "upstream": self.refresh.json(), "clients": self.refresh_load.json() },
            "after_refresh_check": {
                "requests": self.verify_requests, "hits": self.verify_hits,
                "non_200": self.verify_non_200, "upstream_requests": self.verify_upstream,
            },
            "all_200": self.all_200(),
        })
    }
}

fn sum_vecs(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn mean(v: &[u64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n => v.iter().sum::<u64>() as f64 / n as f64,
    }
}

/// A per-image figure: the integer when every image had the same, else the mean and range.
fn per_image(v: &[u64]) -> String {
    let (min, max) = (
        v.iter().copied().min().unwrap_or(0),
        v.iter().copied().max().unwrap_or(0),
    );
    match min == max {
        true => min.to_string(),
        false => format!("{:.1} ({min}–{max})", mean(v)),
    }
}

/// `n / images`, as an integer when it divides.
fn share(n: u64, images: usize) -> String {
    let images = images.max(1) as u64;
    match n.is_multiple_of(images) {
        true => (n / images).to_string(),
        false => format!("{:.2}", n as f64 / images as f64),
    }
}

async fn setup(env: &Env) {
    let plan = &env.plan;
    for i in 0..plan.rep_hub_images {
        env.hub.add_repo(
            &hub_image(i),
            generate_tags(plan.rep_hub_tags, "2023-03-01T00:00:00Z"),
        );
    }
    for i in 0..=plan.lat_images {
        env.hub.add_repo(
            &lat_image(i),
            generate_tags(plan.lat_tags, "2022-05-01T00:00:00Z"),
        );
    }
    env.push_distinct(
        plan.rep_oci_images,
        plan.rep_oci_tags,
        2024,
        3_000_000,
        oci_image,
    )
    .await;
}

/// The Hub fake's listing paths of `namespace/name`; first pages only when `first`.
fn hub_counts(env: &Env) -> (Vec<u64>, Vec<u64>) {
    let requests = env.hub.requests();
    let per = |i: usize, first: bool| {
        let name = hub_image(i);
        let (ns, repo) = name.split_once('/').expect("namespace/name");
        let paths = [
            format!("/v2/namespaces/{ns}/repositories/{repo}/tags"),
            format!("/v2/repositories/{ns}/{repo}/tags"),
        ];
        requests
            .iter()
            .filter(|r| paths.iter().any(|p| r.path.trim_end_matches('/') == p))
            .filter(|r| !first || r.param("page").is_none_or(|p| p == "1"))
            .count() as u64
    };
    let n = env.plan.rep_hub_images;
    (
        (0..n).map(|i| per(i, false)).collect(),
        (0..n).map(|i| per(i, true)).collect(),
    )
}

fn oci_counts(env: &Env) -> (Vec<u64>, Vec<u64>, Counts) {
    let requests = env.proxy.requests();
    let n = env.plan.rep_oci_images;
    let mut all = Vec::with_capacity(n);
    let mut fetches = Vec::with_capacity(n);
    for i in 0..n {
        let prefix = format!("/v2/{}/", oci_image(i));
        let mine: Vec<_> = requests
            .iter()
            .filter(|r| r.path.starts_with(&prefix))
            .collect();
        all.push(mine.len() as u64);
        fetches.push(
            mine.iter()
                .filter(|r| r.kind == Kind::TagList)
                .filter(|r| !r.query.as_deref().unwrap_or("").contains("last="))
                .count() as u64,
        );
    }
    (all, fetches, env.registry_arrived())
}

/// Everything that arrived upstream, by the service's request kinds: every Hub request is a
/// tag page.
fn arrived(env: &Env) -> Counts {
    let (_, _, mut by_kind) = oci_counts(env);
    *by_kind.get_mut("tag_page").expect("kind") += env.hub.count() as u64;
    by_kind
}

async fn sent(env: &Env, replicas: &[Service]) -> Counts {
    let mut total: Counts = KINDS.iter().map(|k| (*k, 0)).collect();
    for r in replicas {
        for (k, v) in Scrape::take(&env.client, &r.url).await.upstream_by_kind() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

/// Upstream totals and the services' finished fetches: what must stand still.
async fn activity(env: &Env, replicas: &[Service]) -> (usize, usize, u64) {
    let mut fetches = 0;
    for r in replicas {
        fetches += Scrape::take(&env.client, &r.url).await.fetches();
    }
    (env.hub.count(), env.proxy.total(), fetches)
}

/// Waits until nothing more arrives upstream and no fetch finishes for [`SETTLED`].
async fn settle(env: &Env, replicas: &[Service]) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = activity(env, replicas).await;
    let mut still_since = Instant::now();
    while still_since.elapsed() < SETTLED {
        assert!(
            Instant::now() < deadline,
            "upstream requests still arriving after {SETTLE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = activity(env, replicas).await;
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
}

/// The load: `clients` clients released at once, client `c` on replica `c mod N`, each asking
/// for every path once, in an order rotated per client.
async fn load(bases: &[String], paths: &Arc<Vec<String>>, clients: usize) -> Load {
    let started = Instant::now();
    let results = crate::storm(bases, paths, clients).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut x_cache = BTreeMap::new();
    for r in &results {
        *x_cache.entry(r.x_cache.clone()).or_insert(0) += 1;
    }
    let mut ms: Vec<f64> = results.iter().map(|r| r.ms).collect();
    ms.sort_by(f64::total_cmp);
    Load {
        requests: results.len(),
        non_200: results.iter().filter(|r| r.status != 200).count(),
        x_cache,
        seconds,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
    }
}

/// Nearest rank on sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n as f64 - 1.0) * p).round() as usize],
    }
}

/// Counts of one phase; the counters are reset at its start.
async fn phase_counts(env: &Env, replicas: &[Service], before: &Counts) -> (Phase, Counts) {
    let after = sent(env, replicas).await;
    let (hub_pages, hub_fetches) = hub_counts(env);
    let (oci_requests, oci_fetches, oci_by_kind) = oci_counts(env);
    let phase = Phase {
        hub_pages,
        hub_fetches,
        oci_requests,
        oci_fetches,
        oci_by_kind,
        arrived: arrived(env),
        sent: delta(before, &after),
    };
    (phase, after)
}

async fn config_run(env: &Env, replicas: usize, redis: bool) -> ConfigRun {
    let plan = &env.plan;
    let server = match redis {
        true => Some(RedisServer::start().await),
        false => None,
    };
    let url = server.as_ref().map(RedisServer::url).unwrap_or_default();
    let interval = format!("{}ms", plan.rep_refresh.as_millis());
    let mut flags = vec!["--refresh-interval", interval.as_str()];
    if redis {
        flags.extend(["--redis-url", url.as_str()]);
    }
    let mut services = Vec::new();
    for _ in 0..replicas {
        let dir = env.fresh_dir(&format!("replicas-{replicas}-{redis}"));
        services.push(Service::start(&dir, &env.upstreams, &flags, Logging::Default).await);
    }
    let bases: Vec<String> = services.iter().map(|s| s.url.clone()).collect();
    let paths: Vec<String> = (0..plan.rep_hub_images)
        .map(|i| format!("/tags?image={}", hub_image(i)))
        .chain((0..plan.rep_oci_images).map(|i| env.oci_path(&oci_image(i))))
        .collect();
    let paths = Arc::new(paths);
    env.hub.set_delay(plan.latency);
    env.proxy.fault(Fault::any().delay(plan.latency));

    // Cold: every image uncached everywhere.
    env.hub.reset_counts();
    env.proxy.reset();
    let m0 = sent(env, &services).await;
    let cold_load = load(&bases, &paths, plan.rep_clients).await;
    let cold_end = Instant::now();
    settle(env, &services).await;
    let (cold, m1) = phase_counts(env, &services, &m0).await;

    // Refresh: every entry has gone stale; the first request for it on a replica starts a
    // background refresh.
    tokio::time::sleep_until((cold_end + plan.rep_refresh + Duration::from_millis(300)).into())
        .await;
    env.hub.reset_counts();
    env.proxy.reset();
    let refresh_load = load(&bases, &paths, plan.rep_clients).await;
    settle(env, &services).await;
    let (refresh, _) = phase_counts(env, &services, &m1).await;
    env.hub.set_delay(Duration::ZERO);
    env.proxy.clear_faults();

    // Every replica now answers every image fresh, without asking upstream.
    let upstream_before = (env.hub.count() + env.proxy.total()) as u64;
    let mut verify_hits = 0;
    let mut verify_non_200 = 0;
    for base in &bases {
        for path in paths.iter() {
            let resp = env
                .client
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("/tags");
            verify_non_200 += usize::from(resp.status() != 200);
            verify_hits += usize::from(crate::x_cache(&resp) == "hit");
            let _ = resp.bytes().await;
        }
    }
    let verify_upstream = (env.hub.count() + env.proxy.total()) as u64 - upstream_before;

    join_all(services.into_iter().map(Service::stop)).await;
    if let Some(mut server) = server {
        server.stop().await;
    }
    ConfigRun {
        replicas,
        redis,
        cold,
        refresh,
        cold_load,
        refresh_load,
        verify_requests: bases.len() * paths.len(),
        verify_hits,
        verify_non_200,
        verify_upstream,
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: latency of a memory-tier miss answered from Redis (and, for reference, from disk)
// ---------------------------------------------------------------------------------------------

/// One pass: every image once, one request at a time.
struct Pass {
    ms: Vec<f64>,
    hits: usize,
    non_200: usize,
}

impl Pass {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn p50(&self) -> f64 {
        percentile(&self.sorted(), 0.5)
    }

    fn p99(&self) -> f64 {
        percentile(&self.sorted(), 0.99)
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.ms.len(), "hits": self.hits, "non_200": self.non_200,
            "p50_ms": round(self.p50(), 3), "p99_ms": round(self.p99(), 3),
            "mean_ms": round(self.ms.iter().sum::<f64>() / self.ms.len().max(1) as f64, 3),
            "max_ms": round(self.sorted().last().copied().unwrap_or(0.0), 3),
        })
    }
}

async fn pass(client: &reqwest::Client, base: &str, images: usize) -> Pass {
    let mut pass = Pass {
        ms: Vec::with_capacity(images),
        hits: 0,
        non_200: 0,
    };
    for i in 0..images {
        let url = format!("{base}/tags?image={}", lat_image(i));
        let t = Instant::now();
        let resp = client.get(&url).send().await.expect("/tags");
        let ok = resp.status() == 200;
        let hit = crate::x_cache(&resp) == "hit";
        let _ = resp.bytes().await.expect("body");
        pass.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        pass.non_200 += usize::from(!ok);
        pass.hits += usize::from(hit);
    }
    pass
}

/// One unmeasured request (connections to the client, Redis, the disk warmed up).
async fn warm_up(client: &reqwest::Client, base: &str, images: usize) {
    let url = format!("{base}/tags?image={}", lat_image(images));
    let resp = client.get(&url).send().await.expect("/tags");
    assert_eq!(resp.status(), 200, "{url}");
    let _ = resp.bytes().await;
}

struct LatencyRun {
    fill_seconds: f64,
    redis_hit: Pass,
    redis_memory_hit: Pass,
    disk_hit: Pass,
    disk_memory_hit: Pass,
    upstream_requests: u64,
    /// What replica B's own metrics say it sent upstream.
    b_sent: u64,
}

impl LatencyRun {
    fn ok(&self) -> bool {
        let all = |p: &Pass| p.hits == p.ms.len() && p.non_200 == 0;
        all(&self.redis_hit)
            && all(&self.redis_memory_hit)
            && all(&self.disk_hit)
            && all(&self.disk_memory_hit)
            && self.upstream_requests == 0
            && self.b_sent == 0
    }

    fn json(&self) -> Value {
        json!({
            "fill_seconds": round(self.fill_seconds, 2),
            "redis_tier_hit": self.redis_hit.json(),
            "memory_hit_after_redis": self.redis_memory_hit.json(),
            "disk_tier_hit_without_redis": self.disk_hit.json(),
            "memory_hit_after_disk": self.disk_memory_hit.json(),
            "upstream_requests_during_passes": self.upstream_requests,
            "replica_b_upstream_requests_by_metrics": self.b_sent,
        })
    }
}

async fn latency_run(env: &Env) -> LatencyRun {
    let plan = &env.plan;
    let images = plan.lat_images;
    env.hub.set_delay(Duration::ZERO);
    let mut server = RedisServer::start().await;
    let url = server.url();
    let with_redis = ["--redis-url", url.as_str()];

    // Replica A caches every image (and the warm-up image): memory, Redis, its disk.
    let dir_a: PathBuf = env.fresh_dir("replicas-lat-a");
    let a = Service::start(&dir_a, &env.upstreams, &with_redis, Logging::Default).await;
    let started = Instant::now();
    let base = a.url.clone();
    futures_util::stream::iter(0..=images)
        .map(|i| {
            let url = format!("{base}/tags?image={}", lat_image(i));
            let client = env.client.clone();
            let tags = plan.lat_tags;
            async move {
                crate::get_all_tags(&client, &url, tags).await;
            }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let fill_seconds = started.elapsed().as_secs_f64();
    a.stop().await;

    // B: Redis, an empty memory tier, its own empty disk. D: A's disk, no Redis.
    let b = Service::start(
        &env.fresh_dir("replicas-lat-b"),
        &env.upstreams,
        &with_redis,
        Logging::Default,
    )
    .await;
    let d = Service::start(&dir_a, &env.upstreams, &[], Logging::Default).await;
    let client = crate::client();
    env.hub.reset_counts();
    warm_up(&client, &b.url, images).await;
    let redis_hit = pass(&client, &b.url, images).await;
    let redis_memory_hit = pass(&client, &b.url, images).await;
    warm_up(&client, &d.url, images).await;
    let disk_hit = pass(&client, &d.url, images).await;
    let disk_memory_hit = pass(&client, &d.url, images).await;
    let upstream_requests = env.hub.count() as u64;
    let b_sent = Scrape::take(&env.client, &b.url)
        .await
        .upstream_by_kind()
        .values()
        .sum();
    join_all([b.stop(), d.stop()]).await;
    server.stop().await;
    LatencyRun {
        fill_seconds,
        redis_hit,
        redis_memory_hit,
        disk_hit,
        disk_memory_hit,
        upstream_requests,
        b_sent,
    }
}

// ---------------------------------------------------------------------------------------------
// The item
// ---------------------------------------------------------------------------------------------

pub async fn run(env: &Env) -> ItemResult {
    let plan = &env.plan;
    progress(&format!(
        "7 replicas: {} clients, {} Docker Hub ({} tags) + {} OCI ({} tags) images, {} ms per upstream request, refresh every {} s, on 1/2/3 replicas with Redis and 3 without; then {} images x {} tags from Redis, {} repetitions",
        plan.rep_clients,
        plan.rep_hub_images,
        plan.rep_hub_tags,
        plan.rep_oci_images,
        plan.rep_oci_tags,
        plan.latency.as_millis(),
        plan.rep_refresh.as_secs_f64(),
        plan.lat_images,
        plan.lat_tags,
        plan.reps
    ));
    assert!(
        plan.rep_clients.is_multiple_of(6),
        "the same clients per replica for 1, 2 and 3 replicas"
    );
    let load_start = loadavg();
    setup(env).await;

    // runs[rep][config]
    let mut runs: Vec<Vec<ConfigRun>> = Vec::new();
    let mut latency: Vec<LatencyRun> = Vec::new();
    for rep in 0..plan.reps {
        let mut configs = Vec::new();
        for (replicas, redis) in CONFIGS {
            let run = config_run(env, replicas, redis).await;
            progress(&format!(
                "  run {}: {replicas} replica(s){}: requests per image Docker Hub {}, OCI {}; cold {:.2} s, p99 {:.0} ms; all 200: {}; refreshed everywhere: {}",
                rep + 1,
                if redis { " + Redis" } else { ", no Redis" },
                per_image(&run.hub_per_image()),
                per_image(&run.oci_per_image()),
                run.cold_load.seconds,
                run.cold_load.p99_ms,
                run.all_200(),
                run.refreshed_everywhere(),
            ));
            configs.push(run);
        }
        runs.push(configs);
        let lat = latency_run(env).await;
        progress(&format!(
            "  run {}: p50 / p99 ms: Redis-tier hit {:.3} / {:.3}, memory hit {:.3} / {:.3}; disk-tier hit {:.3} / {:.3}, memory hit {:.3} / {:.3}; all hits, no upstream: {}",
            rep + 1,
            lat.redis_hit.p50(),
            lat.redis_hit.p99(),
            lat.redis_memory_hit.p50(),
            lat.redis_memory_hit.p99(),
            lat.disk_hit.p50(),
            lat.disk_hit.p99(),
            lat.disk_memory_hit.p50(),
            lat.disk_memory_hit.p99(),
            lat.ok()
        ));
        latency.push(lat);
    }

    // Part 1 figures.
    let reps = runs.len();
    let identical = runs.windows(2).all(|w| {
        w[0].iter()
            .zip(&w[1])
            .all(|(a, b)| a.cold == b.cold && a.refresh == b.refresh)
    });
    let all_200 = runs.iter().flatten().all(ConfigRun::all_200);
    let metrics_agree = runs.iter().flatten().all(ConfigRun::metrics_agree);
    let refreshed = runs.iter().flatten().all(ConfigRun::refreshed_everywhere);
    // Per configuration: the median over the runs of the mean requests per image.
    let med = |c: usize, f: fn(&ConfigRun) -> Vec<u64>| {
        median(&runs.iter().map(|r| mean(&f(&r[c]))).collect::<Vec<_>>())
    };
    let equal_across_n = |f: fn(&ConfigRun) -> Vec<u64>| {
        runs.iter()
            .all(|r| (1..3).all(|c| r[c].redis && f(&r[c]) == f(&r[0])))
    };
    let hub_equal = equal_across_n(ConfigRun::hub_per_image);
    let oci_equal = equal_across_n(ConfigRun::oci_per_image);
    let exact = match (reps, identical) {
        (1, _) => "exact, 1 run".to_owned(),
        (n, true) => format!("exact, same in {n} runs"),
        (_, false) => "**differed between runs**".to_owned(),
    };
    let fmt_count = |x: f64| match x.fract() == 0.0 {
        true => format!("{x:.0}"),
        false => format!("{x:.2}"),
    };
    let part1_row = |name: &str, detail: String, f: fn(&ConfigRun) -> Vec<u64>, equal: bool| {
        let with: Vec<f64> = (0..3).map(|c| med(c, f)).collect();
        let without = med(3, f);
        let base = with[0].max(f64::MIN_POSITIVE);
        Row {
            item: "7",
            measure: format!(
                "{name} ({detail}), {} clients round-robin, cold + 1 refresh: upstream requests per image, 1 / 2 / 3 replicas sharing Redis",
                plan.rep_clients
            ),
            value: with
                .iter()
                .map(|x| fmt_count(*x))
                .collect::<Vec<_>>()
                .join(" / "),
            against: format!(
                "3 replicas without Redis: {}; all answers 200: {}; metrics = upstream: {}",
                fmt_count(without),
                if all_200 { "yes" } else { "no" },
                if metrics_agree { "yes" } else { "no" }
            ),
            ratio: format!(
                "{} (no Redis: {:.2})",
                with.iter()
                    .map(|x| format!("{:.2}", x / base))
                    .collect::<Vec<_>>()
                    .join(" / "),
                without / base
            ),
            target: "equal for 1, 2, 3 replicas; all 200".into(),
            met: Some(equal && all_200),
            noise: exact.clone(),
        }
    };
    let mut rows = vec![
        part1_row(
            &format!("{} Docker Hub images", plan.rep_hub_images),
            format!("{} tags", plan.rep_hub_tags),
            ConfigRun::hub_per_image,
            hub_equal,
        ),
        part1_row(
            &format!("{} OCI images", plan.rep_oci_images),
            format!("{} tags, one image each", plan.rep_oci_tags),
            ConfigRun::oci_per_image,
            oci_equal,
        ),
    ];

    // Part 2 figures.
    let col = |f: fn(&LatencyRun) -> f64| latency.iter().map(f).collect::<Vec<f64>>();
    let redis_p50 = col(|l| l.redis_hit.p50());
    let redis_p99 = col(|l| l.redis_hit.p99());
    let mem_p50 = col(|l| l.redis_memory_hit.p50());
    let mem_p99 = col(|l| l.redis_memory_hit.p99());
    let disk_p50 = col(|l| l.disk_hit.p50());
    let disk_p99 = col(|l| l.disk_hit.p99());
    let dmem_p50 = col(|l| l.disk_memory_hit.p50());
    let dmem_p99 = col(|l| l.disk_memory_hit.p99());
    let overhead = col(|l| l.redis_hit.p50() - l.redis_memory_hit.p50());
    let disk_overhead = col(|l| l.disk_hit.p50() - l.disk_memory_hit.p50());
    let latency_ok = latency.iter().all(LatencyRun::ok);
    let ratio = |a: &[f64], b: &[f64]| median(a) / median(b).max(f64::MIN_POSITIVE);
    rows.push(Row {
        item: "7",
        measure: format!(
            "memory-tier miss answered from Redis: {} Docker Hub images × {} tags, one request at a time: p50 / p99",
            plan.lat_images, plan.lat_tags
        ),
        value: format!("{:.3} / {:.3} ms", median(&redis_p50), median(&redis_p99)),
        against: format!(
            "memory hit, same replica {:.3} / {:.3} ms",
            median(&mem_p50),
            median(&mem_p99)
        ),
        ratio: format!(
            "p50 +{:.3} ms, {:.1}×",
            median(&overhead),
            ratio(&redis_p50, &mem_p50)
        ),
        target: "X-Cache hit, no upstream request".into(),
        met: Some(latency_ok),
        noise: noise(&redis_p50),
    });
    rows.push(Row {
        item: "7",
        measure: "reference without Redis: memory-tier miss answered from disk (after a restart): p50 / p99"
            .into(),
        value: format!("{:.3} / {:.3} ms", median(&disk_p50), median(&disk_p99)),
        against: format!(
            "memory hit, same process {:.3} / {:.3} ms",
            median(&dmem_p50),
            median(&dmem_p99)
        ),
        ratio: format!(
            "p50 +{:.3} ms, {:.1}×",
            median(&disk_overhead),
            ratio(&disk_p50, &dmem_p50)
        ),
        target: "X-Cache hit, no upstream request".into(),
        met: Some(latency_ok),
        noise: noise(&disk_p50),
    });

    let configs_json: Vec<Value> = CONFIGS
        .iter()
        .enumerate()
        .map(|(c, (replicas, redis))| {
            json!({
                "replicas": replicas,
                "redis": redis,
                "docker_hub_requests_per_image": med(c, ConfigRun::hub_per_image),
                "oci_requests_per_image": med(c, ConfigRun::oci_per_image),
                "ratio_to_1_replica": {
                    "docker_hub": round(med(c, ConfigRun::hub_per_image)
                        / med(0, ConfigRun::hub_per_image).max(f64::MIN_POSITIVE), 3),
                    "oci": round(med(c, ConfigRun::oci_per_image)
                        / med(0, ConfigRun::oci_per_image).max(f64::MIN_POSITIVE), 3),
                },
                "cold_seconds": summary(&runs.iter().map(|r| r[c].cold_load.seconds).collect::<Vec<_>>()),
                "cold_client_p99_ms": summary(&runs.iter().map(|r| r[c].cold_load.p99_ms).collect::<Vec<_>>()),
                "runs": runs.iter().map(|r| r[c].json()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let json = json!({
        "upstream_requests_per_image": {
            "clients": plan.rep_clients,
            "requests_per_client_per_phase": plan.rep_hub_images + plan.rep_oci_images,
            "docker_hub": { "images": plan.rep_hub_images, "tags_per_image": plan.rep_hub_tags },
            "oci": { "images": plan.rep_oci_images, "tags_per_image": plan.rep_oci_tags,
                     "page_size": plan.page_size },
            "latency_ms": plan.latency.as_millis() as u64,
            "refresh_interval_ms": plan.rep_refresh.as_millis() as u64,
            "configurations": configs_json,
            "equal_across_replicas_with_redis": { "docker_hub": hub_equal, "oci": oci_equal },
            "all_200": all_200,
            "metrics_agree_with_upstream": metrics_agree,
            "refresh_reached_every_replica": refreshed,
            "identical_in_every_run": identical,
            "runs": reps,
        },
        "redis_tier_latency": {
            "images": plan.lat_images,
            "tags_per_image": plan.lat_tags,
            "redis_hit_p50_ms": summary(&redis_p50),
            "redis_hit_p99_ms": summary(&redis_p99),
            "memory_hit_p50_ms": summary(&mem_p50),
            "memory_hit_p99_ms": summary(&mem_p99),
            "overhead_p50_ms": summary(&overhead),
            "overhead_ratio_p50": round(ratio(&redis_p50, &mem_p50), 3),
            "disk_hit_p50_ms": summary(&disk_p50),
            "disk_hit_p99_ms": summary(&disk_p99),
            "memory_hit_after_disk_p50_ms": summary(&dmem_p50),
            "memory_hit_after_disk_p99_ms": summary(&dmem_p99),
            "disk_overhead_p50_ms": summary(&disk_overhead),
            "all_hits_no_upstream": latency_ok,
            "runs": latency.iter().map(LatencyRun::json).collect::<Vec<_>>(),
        },
        "target_met": hub_equal && oci_equal && all_200 && latency_ok,
        "loadavg_1m": [load_start, loadavg()],
    });
    ItemResult {
        json,
        rows,
        tables: vec![count_table(plan, &runs[0], &exact)],
    }
}

/// Requests per image by configuration and phase (the first run; `exact` says whether the
/// others were the same).
fn count_table(plan: &crate::Plan, runs: &[ConfigRun], exact: &str) -> String {
    let (hubs, ocis) = (plan.rep_hub_images, plan.rep_oci_images);
    let mut md = format!(
        "Item 7, upstream requests per image under the same load ({} clients, each asking for all {} Docker Hub and {} OCI images once cold and once after the {} s refresh interval; counted where they arrive, {}):\n\n\
         | replicas | Redis | Docker Hub pages: cold + refresh | OCI cold: pages + HEAD + GET + blob | OCI refresh | fetches per image, cold / refresh (Hub; OCI) | services' metrics = arrived | answers 200 | cold phase: wall / client p99 | after refresh: fresh hits, no upstream |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        plan.rep_clients,
        hubs,
        ocis,
        plan.rep_refresh.as_secs_f64(),
        exact
    );
    let kinds = |c: &Counts| {
        ["tag_page", "manifest_head", "manifest_get", "blob"]
            .iter()
            .map(|k| share(c[k], ocis))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    for r in runs {
        md.push_str(&format!(
            "| {} | {} | {} + {} | {} | {} | {} / {}; {} / {} | {} | {} | {:.2} s / {:.0} ms | {} |\n",
            r.replicas,
            if r.redis { "shared" } else { "none" },
            per_image(&r.cold.hub_pages),
            per_image(&r.refresh.hub_pages),
            kinds(&r.cold.oci_by_kind),
            kinds(&r.refresh.oci_by_kind),
            per_image(&r.cold.hub_fetches),
            per_image(&r.refresh.hub_fetches),
            per_image(&r.cold.oci_fetches),
            per_image(&r.refresh.oci_fetches),
            if r.metrics_agree() { "yes" } else { "**no**" },
            if r.all_200() { "yes" } else { "**no**" },
            r.cold_load.seconds,
            r.cold_load.p99_ms,
            if r.refreshed_everywhere() {
                "yes".to_owned()
            } else {
                format!(
                    "**{} of {} hits, {} upstream**",
                    r.verify_hits, r.verify_requests, r.verify_upstream
                )
            },
        ));
    }
    md
}
