//! The results: a JSON file (every run's raw figures, medians, spreads, the plan, the machine)
//! and a Markdown table of the medians against their references and targets, printed and
//! written next to the JSON.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::Plan;
use crate::stats::{NOISY_SPREAD, round, spread};

/// One line of the summary table.
pub struct Row {
    pub item: &'static str,
    pub measure: String,
    /// The median (with unit).
    pub value: String,
    /// What it is compared with, measured in the same run.
    pub against: String,
    pub ratio: String,
    pub target: String,
    /// `None` where the item has no target.
    pub met: Option<bool>,
    /// Spread of the repeated runs, or "exact" for counts.
    pub noise: String,
}

/// What one item hands back.
pub struct ItemResult {
    pub json: Value,
    pub rows: Vec<Row>,
    /// Further Markdown (item 3's count table).
    pub tables: Vec<String>,
}

/// `±x% over n runs`, flagged when the runs were more than 10 % apart.
pub fn noise(values: &[f64]) -> String {
    if values.len() < 2 {
        return "1 run".into();
    }
    let s = spread(values);
    let flag = if s > NOISY_SPREAD { " **noisy**" } else { "" };
    format!("{:.0}% over {} runs{flag}", s * 100.0, values.len())
}

pub struct Report {
    plan: Plan,
    items: Map<String, Value>,
    rows: Vec<Row>,
    tables: Vec<String>,
    started_at: String,
    /// Taken at the start: what was built and measured, not what the tree holds at the end.
    git: (Option<String>, bool),
}

impl Report {
    pub fn new(plan: &Plan) -> Report {
        Report {
            plan: plan.clone(),
            items: Map::new(),
            rows: Vec::new(),
            tables: Vec::new(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            git: git_state(),
        }
    }

    pub fn add(&mut self, name: &str, result: ItemResult) {
        self.items.insert(name.to_owned(), result.json);
        self.rows.extend(result.rows);
        self.tables.extend(result.tables);
    }

    pub fn finish(self, out: &Path, elapsed: Duration, load_start: f64, load_end: f64) {
        let (commit, dirty) = self.git.clone();
        let doc = json!({
            "suite": "oci-tag-proxy benchmarks (cargo bench --bench suite)",
            "mode": if self.plan.quick { "quick" } else { "full" },
            // The service binary comes from the same profile as this one.
            "build": if cfg!(debug_assertions) { "debug: figures not meaningful" } else { "release" },
            "started_at": self.started_at,
            "duration_s": round(elapsed.as_secs_f64(), 1),
            "commit": commit,
            "worktree_dirty": dirty,
            "machine": {
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|s| s.trim().to_owned()).unwrap_or_default(),
                "loadavg_1m_start": load_start,
                "loadavg_1m_end": load_end,
            },
            "tools": tool_versions(),
            "plan": plan_json(&self.plan),
            "summary": self.rows.iter().map(row_json).collect::<Vec<_>>(),
            "items": Value::Object(self.items),
        });
        let markdown = markdown(&self.rows, &self.tables, &doc);
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).expect("results directory");
        }
        let text = serde_json::to_string_pretty(&doc).expect("results JSON");
        std::fs::write(out, text + "\n").expect("write the results JSON");
        let md_path = out.with_extension("md");
        std::fs::write(&md_path, &markdown).expect("write the results table");
        println!("{markdown}");
        println!(
            "results: {} and {} ({:.0} s)",
            out.display(),
            md_path.display(),
            elapsed.as_secs_f64()
        );
    }
}

fn row_json(row: &Row) -> Value {
    json!({
        "item": row.item,
        "measure": row.measure,
        "value": row.value,
        "against": row.against,
        "ratio": row.ratio,
        "target": row.target,
        "met": row.met,
        "noise": row.noise,
    })
}

fn markdown(rows: &[Row], tables: &[String], doc: &Value) -> String {
    let mut md = format!(
        "Run: {} mode, {} build, {}, commit {}{}, {} s, load average {} → {} (1 min, {} CPUs)\n\n",
        doc["mode"].as_str().unwrap_or_default(),
        doc["build"].as_str().unwrap_or_default(),
        doc["started_at"].as_str().unwrap_or_default(),
        doc["commit"].as_str().unwrap_or("?"),
        if doc["worktree_dirty"] == true {
            " (+ uncommitted changes)"
        } else {
            ""
        },
        doc["duration_s"],
        doc["machine"]["loadavg_1m_start"],
        doc["machine"]["loadavg_1m_end"],
        doc["machine"]["cpus"],
    );
    md.push_str(
        "| # | measure | median | measured against (same run) | ratio | target | met | runs |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.item, r.measure, r.value, r.against, r.ratio, r.target, met, r.noise
        ));
    }
    for table in tables {
        md.push('\n');
        md.push_str(table);
    }
    md
}

fn plan_json(p: &Plan) -> Value {
    json!({
        "repetitions": p.reps,
        "hot": { "tags": p.hot_tags, "rounds": p.hot_rounds, "seconds_per_run": p.hot_seconds,
                 "warmup_seconds": p.hot_warmup_seconds, "connections": p.connections,
                 "wrk_threads": p.wrk_threads },
        "cold": { "tags": p.tags, "latency_ms": p.latency.as_millis() as u64,
                  "sequential_runs": p.sequential_reps,
                  "page_size": p.page_size, "moved_tags": p.moved },
        "coalescing": { "images": p.co_images, "clients": p.co_clients,
                        "hub_tags_per_image": p.co_hub_tags, "oci_tags_per_image": p.co_oci_tags },
        "memory": { "images": p.mem_images, "tags_per_image": p.mem_tags, "restarts": p.restarts },
        "replicas": { "hub_images": p.rep_hub_images, "hub_tags_per_image": p.rep_hub_tags,
                      "oci_images": p.rep_oci_images, "oci_tags_per_image": p.rep_oci_tags,
                      "clients": p.rep_clients,
                      "refresh_interval_ms": p.rep_refresh.as_millis() as u64,
                      "latency_images": p.lat_images, "latency_tags_per_image": p.lat_tags },
        "budget_s": p.budget.as_secs(),
    })
}

/// The commit measured, and whether the work tree had changes on top of it.
fn git_state() -> (Option<String>, bool) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"]);
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    (commit, dirty)
}

fn tool_versions() -> Value {
    let first_line = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let nginx = if Path::new("/usr/sbin/nginx").is_file() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    json!({
        "wrk": first_line("wrk", &["-v"]),
        "nginx": first_line(nginx, &["-v"]),
        "docker-registry": first_line("docker-registry", &["--version"]),
        "rustc": first_line("rustc", &["--version"]),
    })
}
