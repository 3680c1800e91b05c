//! Load from a second process (`wrk`) and the ceiling it is compared with (`nginx` serving the
//! same bytes as a static file).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::service::signal;
use crate::support::app::free_port;

/// wrk's `done` hook, printing one JSON line with the figures the report needs (latencies in
/// microseconds, as wrk keeps them).
const WRK_REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"errors":%.0f,"status_errors":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"#;

/// What one wrk run measured.
#[derive(Clone, Debug, Deserialize)]
pub struct WrkRun {
    pub requests: f64,
    pub duration_us: f64,
    pub bytes: f64,
    pub errors: f64,
    pub status_errors: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl WrkRun {
    pub fn rps(&self) -> f64 {
        self.requests / (self.duration_us / 1e6)
    }

    pub fn json(&self) -> serde_json::Value {
        use crate::stats::round;
        serde_json::json!({
            "requests_per_s": round(self.rps(), 1),
            "p50_ms": round(self.p50_us / 1000.0, 3),
            "p90_ms": round(self.p90_us / 1000.0, 3),
            "p99_ms": round(self.p99_us / 1000.0, 3),
            "max_ms": round(self.max_us / 1000.0, 3),
            "requests": self.requests,
            "errors": self.errors,
            "non_2xx": self.status_errors,
            "mean_ms": round(self.mean_us / 1000.0, 3),
            "mbytes_per_s": round(self.bytes / (self.duration_us / 1e6) / 1e6, 1),
        })
    }
}

/// `wrk` as a separate process.
pub struct Wrk {
    script: PathBuf,
    pub threads: usize,
    pub connections: usize,
}

impl Wrk {
    pub fn new(workdir: &Path, threads: usize, connections: usize) -> Wrk {
        let script = workdir.join("wrk-report.lua");
        fs::write(&script, WRK_REPORT_LUA).expect("write the wrk script");
        Wrk {
            script,
            threads,
            connections,
        }
    }

    /// `wrk -t<threads> -c<connections> -d<seconds>s --latency` against `url`; bounded by the
    /// duration plus a margin.
    pub async fn run(&self, url: &str, seconds: u64, header: Option<&str>) -> WrkRun {
        let mut cmd = tokio::process::Command::new("wrk");
        if let Some(header) = header {
            cmd.args(["-H", header]);
        }
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{seconds}s"))
            .args(["--timeout", "5s", "-s"])
            .arg(&self.script)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let limit = Duration::from_secs(seconds + 20);
        let output = tokio::time::timeout(limit, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("wrk did not finish within {limit:?}"))
            .expect("wrk runs (install it with apt-get install wrk)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("WRK_JSON "))
            .unwrap_or_else(|| {
                panic!(
                    "wrk printed no result; stdout: {stdout}; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        serde_json::from_str(line).expect("wrk result JSON")
    }
}

/// What one nginx serves at every path: a body, optionally its gzip form (`gzip_static`, sent
/// to clients that accept gzip), with or without `sendfile`.
pub struct Site<'a> {
    pub name: &'a str,
    pub body: &'a [u8],
    pub gzip: Option<&'a [u8]>,
    pub sendfile: bool,
}

/// `nginx` (Debian's) serving one file at every path, as the ceiling for cached answers: two
/// worker processes (one per core), no access log, `sendfile` (or, as a diagnostic, without
/// it), and keep-alive connections that are never closed for their request count (hyper does
/// not close them either).
pub struct Nginx {
    child: Option<Child>,
    pid: u32,
    pub url: String,
}

impl Nginx {
    pub async fn start(workdir: &Path, site: &Site<'_>) -> Nginx {
        let dir = workdir.join(site.name);
        let www = dir.join("www");
        fs::create_dir_all(&www).expect("nginx dirs");
        fs::write(www.join("tags.json"), site.body).expect("write the static answer");
        if let Some(gzip) = site.gzip {
            fs::write(www.join("tags.json.gz"), gzip).expect("write the gzip answer");
            fs::set_permissions(www.join("tags.json.gz"), fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        // Workers run as an unprivileged user when the suite runs as root: let them read it.
        for d in [workdir, &dir, &www] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::set_permissions(www.join("tags.json"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(&dir, &www, port, site)).expect("write nginx.conf");
        let log = fs::File::create(dir.join("stderr.log")).expect("nginx log");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nginx starts (install it with apt-get install nginx-light)");
        let nginx = Nginx {
            pid: child.id(),
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
        };
        nginx.wait_ready(&dir).await;
        nginx
    }

    async fn wait_ready(&self, dir: &Path) {
        let client = crate::client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/tags", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "nginx did not serve within 10 s; {}",
            fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }

    /// SIGTERM to the master, which stops its workers; bounded wait. (SIGKILL would orphan the
    /// workers, so it is the last resort.)
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            signal(self.pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            signal(self.pid, "TERM");
            for _ in 0..250 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

fn nginx_conf(dir: &Path, www: &Path, port: u16, site: &Site<'_>) -> String {
    format!(
        "daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile {sendfile};
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/client_body;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{
            default_type application/json;
            gzip_static {gzip};
            try_files /tags.json =404;
        }}
    }}
}}
",
        workers = std::thread::available_parallelism().map_or(2, |n| n.get()),
        dir = dir.display(),
        www = www.display(),
        sendfile = if site.sendfile { "on" } else { "off" },
        gzip = if site.gzip.is_some() { "on" } else { "off" },
    )
}

/// `GET` over a plain HTTP/1.1 connection, returning the status, the headers (lower-cased
/// names) and the body exactly as sent: no client-side decompression, whatever features the
/// HTTP client crates were built with.
pub async fn raw_get(
    base: &str,
    path: &str,
    accept_encoding: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept-Encoding: {accept_encoding}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("answer within 30 s")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        body.truncate(len.parse().expect("content-length"));
    }
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "{base}{path}: a chunked answer; expected Content-Length"
    );
    (status, headers, body)
}
