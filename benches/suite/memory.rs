//! Items 5 and 6, on the same cache:
//!
//! 5. Memory: resident memory (`VmRSS`) of the service after caching 1,000 Docker Hub images of
//!    100 tags each (every answer in the memory tier and on disk), minus its resident memory
//!    just after start, per cached tag. Each run starts a fresh service on an empty cache.
//! 6. Restart: with those 1,000 images on disk, the time from spawning the process to the
//!    first `200` answer for a cached image (polled every millisecond; the answer must be a
//!    cache hit, and no request may reach the upstream). For reference: the time from spawn
//!    to `/healthz` on an empty cache directory.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, TimeDelta};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::metrics::Scrape;
use crate::report::{ItemResult, Row, noise};
use crate::service::{Logging, Service};
use crate::stats::{median, round, summary};
use crate::support::hub::generate_tags;
use crate::{Env, loadavg, progress};

fn image(i: usize) -> String {
    format!("mem/img{i:04}")
}

/// Requests in flight while filling the cache.
const FILL_CONCURRENCY: usize = 16;

struct Fill {
    rss_before_kib: u64,
    rss_after_kib: u64,
    peak_kib: u64,
    seconds: f64,
    disk_bytes: u64,
    body_bytes: u64,
    memory_entries: f64,
}

impl Fill {
    fn delta_bytes(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib) * 1024) as f64
    }

    fn json(&self, tags: usize) -> Value {
        json!({
            "rss_before_mib": round(self.rss_before_kib as f64 / 1024.0, 1),
            "rss_after_mib": round(self.rss_after_kib as f64 / 1024.0, 1),
            "rss_peak_mib": round(self.peak_kib as f64 / 1024.0, 1),
            "bytes_per_cached_tag": round(self.delta_bytes() / tags as f64, 1),
            "fill_seconds": round(self.seconds, 2),
            "disk_bytes": self.disk_bytes,
            "answer_json_bytes": self.body_bytes,
            "memory_tier_entries": self.memory_entries,
        })
    }
}

fn setup(env: &Env) {
    let plan = &env.plan;
    let base = NaiveDate::from_ymd_opt(2020, 1, 1)
        .expect("date")
        .and_hms_opt(0, 0, 0)
        .expect("time");
    for i in 0..plan.mem_images {
        let start = (base + TimeDelta::hours(i as i64)).format("%Y-%m-%dT%H:%M:%SZ");
        env.hub
            .add_repo(&image(i), generate_tags(plan.mem_tags, &start.to_string()));
    }
}

/// A fresh service; every image fetched once. Returns the service still running.
async fn fill(env: &Env) -> (Fill, Service, std::path::PathBuf) {
    let plan = &env.plan;
    let dir = env.fresh_dir("memory");
    let service = Service::start(&dir, &env.upstreams, &[], Logging::Default).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before_kib, _) = service.memory_kib();
    let started = Instant::now();
    let base = service.url.clone();
    let sizes: Vec<u64> = futures_util::stream::iter(0..plan.mem_images)
        .map(|i| {
            let url = format!("{base}/tags?image={}", image(i));
            let client = env.client.clone();
            let tags = plan.mem_tags;
            async move { crate::get_all_tags(&client, &url, tags).await }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after_kib, peak_kib) = service.memory_kib();
    let disk_bytes = std::fs::metadata(dir.join("cache.redb")).map_or(0, |m| m.len());
    let memory_entries = Scrape::take(&env.client, &service.url)
        .await
        .sum("tag_proxy_cache_entries", &[("tier", "memory")]);
    let fill = Fill {
        rss_before_kib,
        rss_after_kib,
        peak_kib,
        seconds,
        disk_bytes,
        body_bytes: sizes.iter().sum(),
        memory_entries,
    };
    (fill, service, dir)
}

/// Spawn to first `200` for `path`, polling every millisecond (bounded: 30 s).
async fn time_to_answer(env: &Env, dir: &Path, path: &str) -> (f64, String) {
    let client = crate::client();
    let started = Instant::now();
    let service = Service::spawn(dir, &env.upstreams, &[], Logging::Default);
    let url = format!("{}{path}", service.url);
    let deadline = started + Duration::from_secs(30);
    let (ms, cache) = loop {
        if let Ok(resp) = client.get(&url).send().await {
            assert_eq!(resp.status(), 200, "{url} after restart");
            let cache = resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let _ = resp.bytes().await;
            break (started.elapsed().as_secs_f64() * 1000.0, cache);
        }
        assert!(Instant::now() < deadline, "no answer within 30 s of spawn");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    service.stop().await;
    (ms, cache)
}

pub async fn run(env: &Env) -> (ItemResult, ItemResult) {
    let plan = &env.plan;
    let tags = plan.mem_images * plan.mem_tags;
    progress(&format!(
        "5 memory: {} Docker Hub images x {} tags, {} repetitions; 6 restart: {} restarts",
        plan.mem_images, plan.mem_tags, plan.reps, plan.restarts
    ));
    let load_start = loadavg();
    setup(env);
    let mut fills = Vec::new();
    let mut kept = None;
    for rep in 0..plan.reps {
        let (fill, service, dir) = fill(env).await;
        progress(&format!(
            "  run {}: RSS {:.1} → {:.1} MiB, {:.0} B per cached tag, filled in {:.1} s",
            rep + 1,
            fill.rss_before_kib as f64 / 1024.0,
            fill.rss_after_kib as f64 / 1024.0,
            fill.delta_bytes() / tags as f64,
            fill.seconds
        ));
        fills.push(fill);
        if let Some((old, _)) = kept.replace((service, dir)) {
            Service::stop(old).await;
        }
    }
    let (service, dir) = kept.expect("at least one run");
    service.stop().await;

    // Item 6: restarts on the last run's cache.
    let hub_before = env.hub.count();
    let mut restart_ms = Vec::new();
    let mut caches = Vec::new();
    for k in 0..plan.restarts {
        let path = format!("/tags?image={}", image(k * 7 % plan.mem_images));
        let (ms, cache) = time_to_answer(env, &dir, &path).await;
        restart_ms.push(ms);
        caches.push(cache);
    }
    let upstream_during_restarts = env.hub.count() - hub_before;
    let mut empty_ms = Vec::new();
    for _ in 0..plan.restarts {
        let (ms, _) = time_to_answer(env, &env.fresh_dir("empty"), "/healthz").await;
        empty_ms.push(ms);
    }
    progress(&format!(
        "  restarts: {restart_ms:.1?} ms to a cached answer; empty cache to /healthz {empty_ms:.1?} ms"
    ));
    let all_hits = caches.iter().all(|c| c == "hit");

    let per_tag: Vec<f64> = fills
        .iter()
        .map(|f| f.delta_bytes() / tags as f64)
        .collect();
    let rss_after: Vec<f64> = fills
        .iter()
        .map(|f| f.rss_after_kib as f64 / 1024.0)
        .collect();
    let rss_before: Vec<f64> = fills
        .iter()
        .map(|f| f.rss_before_kib as f64 / 1024.0)
        .collect();
    let last = fills.last().expect("a run");
    let json_per_tag = last.body_bytes as f64 / tags as f64;
    let disk_per_tag = last.disk_bytes as f64 / tags as f64;
    let memory_json = json!({
        "images": plan.mem_images,
        "tags_per_image": plan.mem_tags,
        "cached_tags": tags,
        "rss_before_mib": summary(&rss_before),
        "rss_after_mib": summary(&rss_after),
        "bytes_per_cached_tag": summary(&per_tag),
        "answer_json_bytes_per_tag": round(json_per_tag, 1),
        "disk_bytes_per_tag": round(disk_per_tag, 1),
        "runs": fills.iter().map(|f| f.json(tags)).collect::<Vec<_>>(),
        "loadavg_1m": [load_start, loadavg()],
    });
    let memory_rows = vec![
        Row {
            item: "5",
            measure: format!(
                "resident memory after caching {} images × {} tags",
                plan.mem_images, plan.mem_tags
            ),
            value: format!("{:.1} MiB", median(&rss_after)),
            against: format!("{:.1} MiB just after start", median(&rss_before)),
            ratio: "–".into(),
            target: "–".into(),
            met: None,
            noise: noise(&rss_after),
        },
        Row {
            item: "5",
            measure: "memory per cached tag".into(),
            value: format!("{:.0} B", median(&per_tag)),
            against: format!(
                "its JSON answer {json_per_tag:.0} B/tag; on disk {disk_per_tag:.0} B/tag"
            ),
            ratio: format!("{:.1}× the JSON", median(&per_tag) / json_per_tag),
            target: "–".into(),
            met: None,
            noise: noise(&per_tag),
        },
    ];
    let restart_json = json!({
        "images_on_disk": plan.mem_images,
        "tags_per_image": plan.mem_tags,
        "disk_bytes": last.disk_bytes,
        "time_to_cached_answer_ms": summary(&restart_ms),
        "empty_cache_time_to_healthz_ms": summary(&empty_ms),
        "answers_were_cache_hits": all_hits,
        "upstream_requests_during_restarts": upstream_during_restarts,
        "poll_interval_ms": 1,
    });
    let restart_rows = vec![Row {
        item: "6",
        measure: format!(
            "restart: process start → cached answer, {} images ({:.0} MB) on disk",
            plan.mem_images,
            last.disk_bytes as f64 / 1e6
        ),
        value: format!("{:.0} ms", median(&restart_ms)),
        against: format!("empty cache, start → /healthz {:.0} ms", median(&empty_ms)),
        ratio: "–".into(),
        target: "a cache hit, no upstream request".into(),
        met: Some(all_hits && upstream_during_restarts == 0),
        noise: noise(&restart_ms),
    }];
    (
        ItemResult {
            json: memory_json,
            rows: memory_rows,
            tables: vec![],
        },
        ItemResult {
            json: restart_json,
            rows: restart_rows,
            tables: vec![],
        },
    )
}
