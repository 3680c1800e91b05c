//! Item 1, hot-cache serving: `GET /tags` for a cached 1,000-tag image under wrk (64
//! connections, a second process), against nginx serving the identical bytes as a static file,
//! measured in the same run, in alternating rounds.
//!
//! Six servers take turns in every round, in pairs (see `round_order`): nginx (the ceiling)
//! and the proxy as deployed (default `info` logging, one line per request, to a file); the
//! gzip pair: nginx `gzip_static` serving the proxy's own gzip bytes and the proxy answering
//! `Accept-Encoding: gzip` (its cached gzip form); and two diagnostics: nginx with
//! `sendfile off` (what nginx costs when it copies the body from user memory; the proxy sends
//! its large cached answers with `sendfile` too, see `src/sendfile.rs`) and the proxy with `RUST_LOG=warn` (what the
//! request log costs). Each ratio is computed per round, and its median quoted.
//!
//! Issue 4's answers for pollers run in the same rounds: the proxy answering
//! `semver=true&limit=10` (the cached list narrowed, sorted and serialized per request) next to
//! the plain answer, and `304` revalidations (`If-None-Match` with the proxy's ETag) next to
//! nginx answering `304` to its own ETag.

use serde_json::{Value, json};

use crate::load::{Nginx, Site, Wrk, WrkRun, raw_get};
use crate::report::{ItemResult, Row, noise};
use crate::service::{Logging, Service};
use crate::stats::{median, round, summary};
use crate::support::hub::generate_tags;
use crate::{Env, loadavg, progress};

const IMAGE: &str = "bench/hot";

/// A server under load: its index in a round and its name in the results.
type Server = (usize, &'static str);
const NGINX: Server = (0, "nginx");
const PROXY: Server = (1, "proxy");
const PROXY_WARN: Server = (2, "proxy_log_warn");
const NGINX_PLAIN: Server = (3, "nginx_sendfile_off");
const NGINX_GZIP: Server = (4, "nginx_gzip_static");
const PROXY_GZIP: Server = (5, "proxy_gzip");
const PROXY_SEMVER: Server = (6, "proxy_semver_limit_10");
const NGINX_304: Server = (7, "nginx_304");
const PROXY_304: Server = (8, "proxy_304");
const SERVERS: [Server; 9] = [
    NGINX,
    PROXY,
    PROXY_WARN,
    NGINX_PLAIN,
    NGINX_GZIP,
    PROXY_GZIP,
    PROXY_SEMVER,
    NGINX_304,
    PROXY_304,
];
const GZIP: &str = "Accept-Encoding: gzip";
/// Issue 4's selection: what an update checker asks for.
const SEMVER_QUERY: &str = "&semver=true&limit=10";

/// The order of the servers in round `r`: each ceiling right next to what is compared with
/// it, so that a ratio compares runs seconds apart; the groups rotate from round to round and
/// run in reverse order every other round, so none always runs first or last.
fn round_order(r: usize) -> Vec<usize> {
    let groups: [&[Server]; 4] = [
        &[NGINX, PROXY, PROXY_SEMVER],
        &[NGINX_GZIP, PROXY_GZIP],
        &[NGINX_PLAIN, PROXY_WARN],
        &[NGINX_304, PROXY_304],
    ];
    (0..groups.len())
        .flat_map(|k| {
            let group = groups[(r + k) % groups.len()].iter().map(|s| s.0);
            let mut group: Vec<usize> = group.collect();
            if !r.is_multiple_of(2) {
                group.reverse();
            }
            group
        })
        .collect()
}

pub async fn run(env: &Env) -> ItemResult {
    let plan = &env.plan;
    progress(&format!(
        "1 hot cache: {} tags, {} rounds of {} s per server, {} connections",
        plan.hot_tags, plan.hot_rounds, plan.hot_seconds, plan.connections
    ));
    let load_start = loadavg();
    env.hub
        .add_repo(IMAGE, generate_tags(plan.hot_tags, "2024-01-01T00:00:00Z"));
    let path = format!("/tags?image={IMAGE}");
    let default =
        Service::start(&env.fresh_dir("hot"), &env.upstreams, &[], Logging::Default).await;
    let quiet = Service::start(&env.fresh_dir("hot"), &env.upstreams, &[], Logging::Quiet).await;
    let (body, truncated) = cache_and_check(env, &default.url, &path).await;
    let (quiet_body, _) = cache_and_check(env, &quiet.url, &path).await;
    assert_eq!(body, quiet_body, "both instances answer the same bytes");
    let (status, headers, gzip) = raw_get(&default.url, &path, "gzip").await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-encoding" && v == "gzip"),
        "the proxy answers gzip when asked"
    );
    let site = |name, gzip, sendfile| Site {
        name,
        body: &body,
        gzip,
        sendfile,
    };
    let workdir = env.workdir.path();
    let nginx = Nginx::start(workdir, &site("nginx", None, true)).await;
    let plain = Nginx::start(workdir, &site("nginx-sendfile-off", None, false)).await;
    let zipped = Nginx::start(workdir, &site("nginx-gzip", Some(&gzip), true)).await;
    for server in [&nginx.url, &plain.url, &zipped.url] {
        let got = get_body(env, &format!("{server}{path}")).await;
        assert_eq!(got, body, "nginx serves the identical bytes");
    }
    let (_, _, nginx_gzip) = raw_get(&zipped.url, &path, "gzip").await;
    assert_eq!(nginx_gzip, gzip, "nginx serves the proxy's gzip bytes");
    let semver_path = format!("{path}{SEMVER_QUERY}");
    let semver_body = get_body(env, &format!("{}{semver_path}", default.url)).await;
    let semver_tags = serde_json::from_slice::<Vec<Value>>(&semver_body)
        .expect("a JSON array")
        .len();
    assert_eq!(semver_tags, 10.min(plan.hot_tags), "semver=true&limit=10");
    let proxy_etag = revalidates(env, &format!("{}{path}", default.url)).await;
    let nginx_etag = revalidates(env, &format!("{}{path}", nginx.url)).await;
    let if_none_match = |etag: &str| format!("If-None-Match: {etag}");
    let tags = serde_json::from_slice::<Vec<Value>>(&body)
        .expect("a JSON array")
        .len();

    let wrk = Wrk::new(env.workdir.path(), plan.wrk_threads, plan.connections);
    let servers = [
        (NGINX, format!("{}{path}", nginx.url), None),
        (PROXY, format!("{}{path}", default.url), None),
        (PROXY_WARN, format!("{}{path}", quiet.url), None),
        (NGINX_PLAIN, format!("{}{path}", plain.url), None),
        (
            NGINX_GZIP,
            format!("{}{path}", zipped.url),
            Some(GZIP.to_owned()),
        ),
        (
            PROXY_GZIP,
            format!("{}{path}", default.url),
            Some(GZIP.to_owned()),
        ),
        (PROXY_SEMVER, format!("{}{semver_path}", default.url), None),
        (
            NGINX_304,
            format!("{}{path}", nginx.url),
            Some(if_none_match(&nginx_etag)),
        ),
        (
            PROXY_304,
            format!("{}{path}", default.url),
            Some(if_none_match(&proxy_etag)),
        ),
    ];
    for (_, url, header) in &servers {
        wrk.run(url, plan.hot_warmup_seconds, header.as_deref())
            .await;
    }
    // rounds[r][server]
    let mut rounds: Vec<Vec<WrkRun>> = Vec::new();
    for r in 0..plan.hot_rounds {
        let mut got: Vec<Option<WrkRun>> = vec![None; servers.len()];
        for i in round_order(r) {
            let run = wrk
                .run(&servers[i].1, plan.hot_seconds, servers[i].2.as_deref())
                .await;
            assert_eq!(
                run.errors, 0.0,
                "{}: wrk saw errors or answers of 400 and up",
                servers[i].0.1
            );
            if [NGINX_304, PROXY_304].contains(&servers[i].0) {
                // wrk does not count statuses below 400: bodiless 304s are how to tell.
                let per_request = run.bytes / run.requests.max(1.0);
                assert!(
                    per_request < 1000.0,
                    "{}: {per_request:.0} bytes per answer, not a 304",
                    servers[i].0.1
                );
            }
            got[i] = Some(run);
        }
        let runs: Vec<WrkRun> = got
            .into_iter()
            .map(|r| r.expect("every server ran"))
            .collect();
        progress(&format!(
            "  round {}: nginx {:.0}/s, proxy {:.0}/s ({:.2}); proxy RUST_LOG=warn {:.0}/s, \
             nginx without sendfile {:.0}/s; gzip: nginx {:.0}/s, proxy {:.0}/s; \
             semver&limit {:.0}/s; 304: nginx {:.0}/s, proxy {:.0}/s",
            r + 1,
            runs[NGINX.0].rps(),
            runs[PROXY.0].rps(),
            runs[PROXY.0].rps() / runs[NGINX.0].rps(),
            runs[PROXY_WARN.0].rps(),
            runs[NGINX_PLAIN.0].rps(),
            runs[NGINX_GZIP.0].rps(),
            runs[PROXY_GZIP.0].rps(),
            runs[PROXY_SEMVER.0].rps(),
            runs[NGINX_304.0].rps(),
            runs[PROXY_304.0].rps(),
        ));
        rounds.push(runs);
    }
    let log = std::fs::read(&default.log).unwrap_or_default();
    let log_lines = log.iter().filter(|b| **b == b'\n').count();
    nginx.stop().await;
    plain.stop().await;
    zipped.stop().await;
    default.stop().await;
    quiet.stop().await;

    let col =
        |s: Server, f: fn(&WrkRun) -> f64| rounds.iter().map(|r| f(&r[s.0])).collect::<Vec<_>>();
    let rps = |s| col(s, WrkRun::rps);
    let p50 = |s| col(s, |w| w.p50_us / 1000.0);
    let p99 = |s| col(s, |w| w.p99_us / 1000.0);
    let ratio_of = |a: Server, b: Server| {
        rounds
            .iter()
            .map(|r| r[a.0].rps() / r[b.0].rps())
            .collect::<Vec<_>>()
    };
    let ratio = ratio_of(PROXY, NGINX);
    let ratio_quiet = ratio_of(PROXY_WARN, NGINX);
    let ratio_plain = ratio_of(PROXY, NGINX_PLAIN);
    let ratio_gzip = ratio_of(PROXY_GZIP, NGINX_GZIP);
    let ratio_semver = ratio_of(PROXY_SEMVER, PROXY);
    let ratio_304 = ratio_of(PROXY_304, NGINX_304);
    let ratio_304_to_200 = ratio_of(PROXY_304, PROXY);
    let p99_ratio: Vec<f64> = rounds
        .iter()
        .map(|r| r[PROXY.0].p99_us / r[NGINX.0].p99_us)
        .collect();
    let per_server = |f: &dyn Fn(Server) -> Vec<f64>| {
        let mut m = serde_json::Map::new();
        for s in SERVERS {
            m.insert(s.1.to_owned(), summary(&f(s)));
        }
        Value::Object(m)
    };
    let json = json!({
        "image": IMAGE,
        "tags": tags,
        "body_bytes": body.len(),
        "gzip_body_bytes": gzip.len(),
        "x_tags_truncated": truncated,
        "connections": plan.connections,
        "wrk_threads": plan.wrk_threads,
        "seconds_per_run": plan.hot_seconds,
        "requests_per_s": per_server(&|s| rps(s)),
        "p50_ms": per_server(&|s| p50(s)),
        "p99_ms": per_server(&|s| p99(s)),
        "ratio_proxy_to_nginx": summary(&ratio),
        "ratio_proxy_log_warn_to_nginx": summary(&ratio_quiet),
        "ratio_proxy_to_nginx_without_sendfile": summary(&ratio_plain),
        "ratio_proxy_gzip_to_nginx_gzip_static": summary(&ratio_gzip),
        "ratio_p99_proxy_to_nginx": summary(&p99_ratio),
        "semver_query": SEMVER_QUERY,
        "ratio_proxy_semver_limit_10_to_proxy": summary(&ratio_semver),
        "ratio_proxy_304_to_nginx_304": summary(&ratio_304),
        "ratio_proxy_304_to_proxy_200": summary(&ratio_304_to_200),
        "target_ratio": 0.8,
        "target_met": median(&ratio) >= 0.8,
        "proxy_log_bytes_per_line": round(log.len() as f64 / log_lines.max(1) as f64, 1),
        "rounds": rounds.iter().map(|r| {
            let mut m = serde_json::Map::new();
            for s in SERVERS {
                m.insert(s.1.to_owned(), r[s.0].json());
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "loadavg_1m": [load_start, loadavg()],
    });
    let rows = vec![
        Row {
            item: "1",
            measure: format!(
                "hot `/tags`, {tags} tags ({} KB), {} conns: req/s",
                body.len() / 1000,
                plan.connections
            ),
            value: format!("{:.0}/s", median(&rps(PROXY))),
            against: format!("nginx static file {:.0}/s", median(&rps(NGINX))),
            ratio: format!("{:.2}", median(&ratio)),
            target: "≥ 0.8".into(),
            met: Some(median(&ratio) >= 0.8),
            noise: noise(&ratio),
        },
        Row {
            item: "1",
            measure: "hot `/tags`: p50 / p99 latency".into(),
            value: format!("{:.2} / {:.2} ms", median(&p50(PROXY)), median(&p99(PROXY))),
            against: format!(
                "nginx {:.2} / {:.2} ms",
                median(&p50(NGINX)),
                median(&p99(NGINX))
            ),
            ratio: format!("p99 {:.2}", median(&p99_ratio)),
            target: "–".into(),
            met: None,
            noise: noise(&p99(PROXY)),
        },
        Row {
            item: "1",
            measure: "hot `/tags` with `RUST_LOG=warn` (no request log): req/s".into(),
            value: format!("{:.0}/s", median(&rps(PROXY_WARN))),
            against: "nginx (same rounds)".into(),
            ratio: format!("{:.2}", median(&ratio_quiet)),
            target: "–".into(),
            met: None,
            noise: noise(&ratio_quiet),
        },
        Row {
            item: "1",
            measure: format!(
                "hot `/tags` answered gzip ({} KB; `Accept-Encoding: gzip`): req/s",
                gzip.len() / 1000
            ),
            value: format!("{:.0}/s", median(&rps(PROXY_GZIP))),
            against: format!(
                "nginx `gzip_static`, same bytes {:.0}/s",
                median(&rps(NGINX_GZIP))
            ),
            ratio: format!("{:.2}", median(&ratio_gzip)),
            target: "–".into(),
            met: None,
            noise: noise(&ratio_gzip),
        },
        Row {
            item: "1",
            measure: "diagnostic: the proxy against nginx with `sendfile off`".into(),
            value: format!("{:.0}/s", median(&rps(PROXY))),
            against: format!("nginx, sendfile off {:.0}/s", median(&rps(NGINX_PLAIN))),
            ratio: format!("{:.2}", median(&ratio_plain)),
            target: "–".into(),
            met: None,
            noise: noise(&ratio_plain),
        },
        Row {
            item: "1",
            measure: format!(
                "issue 4: hot `/tags?…{SEMVER_QUERY}` (selection per request): req/s, p99"
            ),
            value: format!(
                "{:.0}/s, p99 {:.2} ms",
                median(&rps(PROXY_SEMVER)),
                median(&p99(PROXY_SEMVER))
            ),
            against: format!("the plain answer {:.0}/s", median(&rps(PROXY))),
            ratio: format!("{:.2}", median(&ratio_semver)),
            target: "–".into(),
            met: None,
            noise: noise(&ratio_semver),
        },
        Row {
            item: "1",
            measure: "issue 4: hot `/tags` revalidated, `If-None-Match` → `304`: req/s, p99".into(),
            value: format!(
                "{:.0}/s, p99 {:.2} ms",
                median(&rps(PROXY_304)),
                median(&p99(PROXY_304))
            ),
            against: format!(
                "nginx `304` {:.0}/s, p99 {:.2} ms",
                median(&rps(NGINX_304)),
                median(&p99(NGINX_304))
            ),
            ratio: format!("{:.2}", median(&ratio_304)),
            target: "–".into(),
            met: None,
            noise: noise(&ratio_304),
        },
    ];
    ItemResult {
        json,
        rows,
        tables: vec![],
    }
}

/// Fetches the image once (a miss), then checks that the next answer is a cache hit, and
/// returns its body and whether it was marked truncated.
async fn cache_and_check(env: &Env, base: &str, path: &str) -> (Vec<u8>, bool) {
    let url = format!("{base}{path}");
    let first = env.client.get(&url).send().await.expect("first /tags");
    assert_eq!(first.status(), 200, "first /tags");
    let second = env.client.get(&url).send().await.expect("second /tags");
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-cache"], "hit", "the answer is cached");
    assert!(
        second.headers().get("content-encoding").is_none(),
        "identity body"
    );
    let truncated = second.headers().contains_key("x-tags-truncated");
    (second.bytes().await.expect("body").to_vec(), truncated)
}

/// Checks that `url` answers `304` to `If-None-Match` with its own ETag, and returns the ETag.
async fn revalidates(env: &Env, url: &str) -> String {
    let first = env.client.get(url).send().await.expect("GET");
    assert_eq!(first.status(), 200, "{url}");
    let etag = first.headers()["etag"]
        .to_str()
        .expect("an ASCII ETag")
        .to_owned();
    let again = env
        .client
        .get(url)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("GET with If-None-Match");
    assert_eq!(again.status(), 304, "{url} revalidates {etag}");
    etag
}

async fn get_body(env: &Env, url: &str) -> Vec<u8> {
    let resp = env.client.get(url).send().await.expect("GET");
    assert_eq!(resp.status(), 200, "{url}");
    resp.bytes().await.expect("body").to_vec()
}
