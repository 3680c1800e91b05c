//! The benchmark suite: what the proxy exists for, side by side with its ceilings.
//!
//! `./scripts/bench` (full, a few minutes) or `./scripts/bench --quick` (a smoke run of seconds);
//! both run `cargo bench --bench suite`, which measures the release binary. BENCHMARKS.md says
//! what each item measures and how; the figures land in a JSON results file and a Markdown
//! table. Everything runs on loopback against servers this process starts and stops: the real
//! `docker-registry` behind the tests' `CountingProxy` (which counts requests, injects the
//! upstream latency and emulates `Link` paging) and a memo of content-addressed reads
//! (`immutable`), the tests' Docker Hub fake, `nginx` as the ceiling, `wrk` as the
//! load generator. Every loop is bounded in count and time, and the whole run is bounded too.
//!
//! Flags (after `--`): `--quick`, `--reps N`, `--out FILE.json`, `--only ITEM,...` where ITEM is
//! one of hot, cold, requests, coalescing, memory (memory includes restart), replicas.

#[path = "../../tests/it/support/mod.rs"]
mod support;

mod coalescing;
mod cold;
mod hot;
mod immutable;
mod load;
mod memory;
mod metrics;
mod replicas;
mod report;
mod requests;
mod service;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::Barrier;

use crate::immutable::ImmutableCache;
use crate::service::Upstreams;
use crate::support::hub::HubFake;
use crate::support::registry::{CountingProxy, ImageSpec, Kind, Registry, RegistryAuth, TagPaging};

/// Item names for `--only`.
const ITEMS: [&str; 6] = [
    "hot",
    "cold",
    "requests",
    "coalescing",
    "memory",
    "replicas",
];

/// What to run and how big.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Repetitions of every repeated measurement (medians are quoted).
    pub reps: usize,
    /// Item 1: tags of the cached image, wrk rounds (each server once per round), seconds per
    /// wrk run, warm-up seconds, connections and wrk threads.
    pub hot_tags: usize,
    pub hot_rounds: usize,
    pub hot_seconds: u64,
    pub hot_warmup_seconds: u64,
    pub connections: usize,
    pub wrk_threads: usize,
    /// Items 2 and 3: tags of the OCI and Docker Hub images, injected latency per upstream
    /// request, page size of the emulated `tags/list` paging.
    pub tags: usize,
    pub latency: Duration,
    pub page_size: usize,
    /// Runs of item 2's sequential reference (over a minute each in the full plan).
    pub sequential_reps: usize,
    /// Tags moved between the refreshes of item 3.
    pub moved: usize,
    /// Item 4.
    pub co_images: usize,
    pub co_clients: usize,
    pub co_hub_tags: usize,
    pub co_oci_tags: usize,
    /// Items 5 and 6.
    pub mem_images: usize,
    pub mem_tags: usize,
    pub restarts: usize,
    /// Item 7, part 1: uncached Docker Hub and OCI images and their tags, clients (a multiple
    /// of 6, so 1, 2 and 3 replicas get the same clients each), `--refresh-interval`.
    pub rep_hub_images: usize,
    pub rep_hub_tags: usize,
    pub rep_oci_images: usize,
    pub rep_oci_tags: usize,
    pub rep_clients: usize,
    pub rep_refresh: Duration,
    /// Item 7, part 2: Docker Hub images read from Redis, and their tags.
    pub lat_images: usize,
    pub lat_tags: usize,
    /// The whole run is cut off (and fails) after this long.
    pub budget: Duration,
}

impl Plan {
    fn new(quick: bool, reps: Option<usize>) -> Plan {
        let full = Plan {
            quick,
            reps: 3,
            hot_tags: 1000,
            hot_rounds: 7,
            hot_seconds: 2,
            hot_warmup_seconds: 1,
            connections: 64,
            wrk_threads: 2,
            tags: 1000,
            latency: Duration::from_millis(20),
            page_size: 100,
            sequential_reps: 1,
            moved: 10,
            co_images: 20,
            co_clients: 200,
            co_hub_tags: 1000,
            co_oci_tags: 20,
            mem_images: 1000,
            mem_tags: 100,
            restarts: 5,
            rep_hub_images: 10,
            rep_hub_tags: 300,
            rep_oci_images: 10,
            rep_oci_tags: 10,
            rep_clients: 30,
            rep_refresh: Duration::from_secs(3),
            lat_images: 200,
            lat_tags: 100,
            budget: Duration::from_secs(14 * 60),
        };
        let mut plan = match quick {
            false => full,
            true => Plan {
                reps: 1,
                hot_rounds: 1,
                hot_seconds: 1,
                hot_warmup_seconds: 1,
                tags: 100,
                latency: Duration::from_millis(5),
                co_hub_tags: 100,
                co_oci_tags: 5,
                mem_images: 100,
                restarts: 1,
                rep_hub_images: 4,
                rep_hub_tags: 200,
                rep_oci_images: 4,
                rep_oci_tags: 3,
                rep_clients: 12,
                lat_images: 50,
                budget: Duration::from_secs(4 * 60),
                ..full
            },
        };
        if let Some(reps) = reps {
            plan.reps = reps.clamp(1, 9);
            plan.hot_rounds = plan.hot_rounds.max(plan.reps);
        }
        plan
    }
}

struct Options {
    quick: bool,
    reps: Option<usize>,
    out: Option<PathBuf>,
    only: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Options {
        let mut options = Options {
            quick: false,
            reps: None,
            out: None,
            only: ITEMS.iter().map(|s| s.to_string()).collect(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--bench" => {}
                "--quick" => options.quick = true,
                "--reps" => {
                    options.reps = it.next().and_then(|n| n.parse().ok());
                    assert!(options.reps.is_some(), "--reps needs a number");
                }
                "--out" => options.out = Some(it.next().expect("--out needs a path").into()),
                "--only" => {
                    let list = it.next().expect("--only needs a list");
                    options.only = list.split(',').map(|s| s.trim().to_owned()).collect();
                    for item in &options.only {
                        assert!(
                            ITEMS.contains(&item.as_str()),
                            "unknown item {item:?}; items: {ITEMS:?}"
                        );
                    }
                }
                other => eprintln!("bench: ignoring unknown argument {other:?}"),
            }
        }
        options
    }
}

/// The upstreams and scratch space every item uses.
pub struct Env {
    pub plan: Plan,
    pub hub: HubFake,
    /// In front of the memo, which is in front of the registry: see `immutable`.
    pub proxy: CountingProxy,
    pub memo: ImmutableCache,
    pub upstreams: Upstreams,
    pub client: reqwest::Client,
    pub workdir: TempDir,
    dirs: AtomicUsize,
    // Declared last: the registry stops after the proxy in front of it.
    pub registry: Registry,
}

impl Env {
    async fn start(plan: Plan) -> Env {
        let hub = HubFake::start().await;
        // The real Hub allows 180 requests a minute; the fake must not throttle the benchmark.
        hub.set_rate_limit(u32::MAX);
        let registry = Registry::start(RegistryAuth::None).await;
        let memo = ImmutableCache::start(&registry.url()).await;
        let proxy = CountingProxy::start(memo.url()).await;
        // distribution 2.8 has no tags/list paging; emulate a registry that caps pages at 100.
        proxy.paginate_tags(Some(TagPaging {
            default_n: Some(plan.page_size),
            max_n: Some(plan.page_size),
        }));
        let upstreams = Upstreams {
            hub_url: hub.url(),
            registry_host: proxy.host(),
            registry_url: proxy.url(),
        };
        let workdir = tempfile::Builder::new()
            .prefix("oci-tag-proxy-bench-")
            .tempdir()
            .expect("bench work dir");
        Env {
            plan,
            hub,
            proxy,
            memo,
            upstreams,
            client: client(),
            workdir,
            dirs: AtomicUsize::new(0),
            registry,
        }
    }

    /// A new, empty cache directory (the service creates it).
    pub fn fresh_dir(&self, name: &str) -> PathBuf {
        let n = self.dirs.fetch_add(1, Ordering::SeqCst);
        self.workdir.path().join(format!("{name}-{n}"))
    }

    /// `/tags?...` for an image on the OCI registry (through the counting proxy).
    pub fn oci_path(&self, image: &str) -> String {
        format!(
            "/tags?image={image}&registry={}",
            self.upstreams.registry_host
        )
    }
}

impl Env {
    /// Pushes `tags` tags to each of `images` images named by `name`, every image with its own
    /// content (`salt` apart from every other item's), so no fetch is shortened by another
    /// image's digests. Tag `v{k}` of image `i` is dated `{year}-MM-DD` by `i` and `k`.
    pub async fn push_distinct(
        &self,
        images: usize,
        tags: usize,
        year: u32,
        salt: u64,
        name: impl Fn(usize) -> String,
    ) {
        use futures_util::StreamExt;
        let pusher = self.registry.pusher();
        let name = &name;
        let pushes = (0..images).flat_map(|i| {
            (0..tags).map(move |k| {
                let spec = ImageSpec::linux("amd64")
                    .created(&format!(
                        "{year}-{:02}-{:02}T00:00:00Z",
                        i % 12 + 1,
                        k % 28 + 1
                    ))
                    .salt(salt + (i * 1000 + k) as u64);
                async move { pusher.push_image(&name(i), &format!("v{k}"), &spec).await }
            })
        });
        futures_util::stream::iter(pushes)
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
    }

    /// What arrived at the registry side (the counting proxy), by the service's request kinds.
    pub fn registry_arrived(&self) -> metrics::Counts {
        let kinds = [
            Kind::TagList,
            Kind::ManifestHead,
            Kind::ManifestGet,
            Kind::Blob,
            Kind::Token,
        ];
        metrics::KINDS
            .iter()
            .zip(kinds)
            .map(|(name, kind)| (*name, self.proxy.count(kind) as u64))
            .collect()
    }
}

/// `GET url`, which must answer `200` with exactly `tags` tags; the body's length.
pub async fn get_all_tags(client: &reqwest::Client, url: &str, tags: usize) -> u64 {
    let resp = client.get(url).send().await.expect("/tags");
    assert_eq!(resp.status(), 200, "{url}");
    let body = resp.bytes().await.expect("body");
    let n = serde_json::from_slice::<Vec<serde_json::Value>>(&body)
        .expect("JSON")
        .len();
    assert_eq!(n, tags, "{url}: every tag");
    body.len() as u64
}

/// One answer of a [`storm`]: status (0 when the request failed), `X-Cache`, and the time from
/// sending to the last byte, in milliseconds.
pub struct Answer {
    pub status: u16,
    pub x_cache: String,
    pub ms: f64,
}

/// `clients` clients, each with its own connection pool, released at once by a barrier; client
/// `c` talks to `bases[c mod N]` and asks for every path once, in an order rotated per client,
/// so that every path is asked for by several clients at the same moment.
pub async fn storm(bases: &[String], paths: &Arc<Vec<String>>, clients: usize) -> Vec<Answer> {
    let barrier = Arc::new(Barrier::new(clients));
    let tasks = (0..clients).map(|c| {
        let (paths, barrier) = (paths.clone(), barrier.clone());
        let base = bases[c % bases.len()].clone();
        tokio::spawn(async move {
            let client = crate::client();
            let n = paths.len();
            barrier.wait().await;
            let mut seen = Vec::with_capacity(n);
            for j in 0..n {
                let path = &paths[(c + j) % n];
                let t = Instant::now();
                let (status, x_cache) = match client.get(format!("{base}{path}")).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let x_cache = x_cache(&r);
                        let _ = r.bytes().await;
                        (status, x_cache)
                    }
                    Err(_) => (0, String::new()),
                };
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                seen.push(Answer {
                    status,
                    x_cache,
                    ms,
                });
            }
            seen
        })
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("client task"))
        .collect()
}

/// The answer's `X-Cache` header (empty when absent).
pub fn x_cache(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A client that never uses an environment proxy (traffic stays on loopback), asks for
/// uncompressed bodies (as wrk does: the answers measured are the identity JSON), and waits
/// longer than the slowest measured request.
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT_ENCODING,
        reqwest::header::HeaderValue::from_static("identity"),
    );
    reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .timeout(Duration::from_secs(180))
        .build()
        .expect("reqwest client")
}

/// A progress line on stderr (the results go to stdout and the files).
pub fn progress(message: &str) {
    eprintln!("bench: {message}");
}

/// `/proc/loadavg`'s one-minute figure: other work on the machine while measuring.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench binaries without it,
    // and benchmarks are not tests.
    if !args.iter().any(|a| a == "--bench") {
        println!("benchmark suite: run it with ./scripts/bench (cargo bench --bench suite)");
        return;
    }
    let options = Options::parse(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        let plan = Plan::new(options.quick, options.reps);
        let budget = plan.budget;
        match tokio::time::timeout(budget, run(plan, &options)).await {
            Ok(()) => 0,
            Err(_) => {
                eprintln!("bench: the run exceeded its {budget:?} budget and was stopped");
                1
            }
        }
    });
    drop(runtime);
    std::process::exit(code);
}

async fn run(plan: Plan, options: &Options) {
    let started = Instant::now();
    let load_start = loadavg();
    let selected = |item: &str| options.only.iter().any(|i| i == item);
    progress(&format!(
        "{} run: {} repetitions; starting docker-registry, the Docker Hub fake, the counting proxy",
        if plan.quick { "quick" } else { "full" },
        plan.reps
    ));
    let env = Env::start(plan.clone()).await;
    let mut report = report::Report::new(&plan);
    if selected("hot") {
        report.add("hot_cache", hot::run(&env).await);
    }
    if selected("cold") || selected("requests") {
        cold::push_image(&env).await;
    }
    if selected("cold") {
        report.add("cold_fetch", cold::run(&env).await);
    }
    if selected("requests") {
        report.add("upstream_requests", requests::run(&env).await);
    }
    if selected("coalescing") {
        report.add("coalescing", coalescing::run(&env).await);
    }
    if selected("memory") {
        let (memory, restart) = memory::run(&env).await;
        report.add("memory", memory);
        report.add("restart", restart);
    }
    if selected("replicas") {
        report.add("replicas", replicas::run(&env).await);
    }
    let out = options.out.clone().unwrap_or_else(|| {
        let name = if plan.quick { "quick" } else { "results" };
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench/{name}.json"))
    });
    report.finish(&out, started.elapsed(), load_start, loadavg());
}
