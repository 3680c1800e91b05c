//! The service under measurement: the release binary (`CARGO_BIN_EXE_oci-tag-proxy`, built by
//! `cargo bench` with the release profile) as a child process on a loopback port, with its PID
//! (for resident memory) and its log in a file, as a service manager would keep it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::app::free_port;

const BINARY: &str = env!("CARGO_BIN_EXE_oci-tag-proxy");
/// Longest wait for a start or a graceful stop.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Flags every benchmarked instance gets: loopback only, and the upstreams of this run.
pub struct Upstreams {
    pub hub_url: String,
    /// `127.0.0.1:PORT` of the counting proxy in front of the real registry.
    pub registry_host: String,
    pub registry_url: String,
}

impl Upstreams {
    fn args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            "127.0.0.1".into(),
            "--allow-private-networks".into(),
            "--registry-endpoint".into(),
            format!("docker={}", self.hub_url),
            "--registry-endpoint".into(),
            format!("{}={}", self.registry_host, self.registry_url),
            "--allowed-registries".into(),
            self.registry_host.clone(),
        ]
    }
}

/// How the service logs: its default (`info`, one line per request), or only warnings.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Logging {
    Default,
    Quiet,
}

/// A running `oci-tag-proxy`. Dropping it kills the process (by its PID) if it still runs.
pub struct Service {
    child: Option<Child>,
    pub url: String,
    pub pid: u32,
    pub log: PathBuf,
}

impl Service {
    /// Starts the binary on `dir` and a free port, without waiting for it.
    pub fn spawn(dir: &Path, upstreams: &Upstreams, extra: &[&str], logging: Logging) -> Service {
        let port = free_port();
        let log = dir.with_extension("log");
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("service log file");
        let mut cmd = Command::new(BINARY);
        cmd.arg("--dir")
            .arg(dir)
            .args(["--port", &port.to_string()])
            .args(upstreams.args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        match logging {
            Logging::Default => cmd.env_remove("RUST_LOG"),
            Logging::Quiet => cmd.env("RUST_LOG", "warn"),
        };
        let child = cmd.spawn().expect("the oci-tag-proxy binary starts");
        Service {
            pid: child.id(),
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// Starts the binary and waits until `/healthz` answers.
    pub async fn start(
        dir: &Path,
        upstreams: &Upstreams,
        extra: &[&str],
        logging: Logging,
    ) -> Service {
        let service = Service::spawn(dir, upstreams, extra, logging);
        service.wait_healthy().await;
        service
    }

    pub async fn wait_healthy(&self) {
        let client = crate::client();
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "oci-tag-proxy at {} not healthy within {PROCESS_TIMEOUT:?}; log: {}",
            self.url,
            self.log.display()
        );
    }

    /// `VmRSS` and `VmHWM` (peak) from `/proc/<pid>/status`, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM (the graceful stop), then waits for the exit, bounded.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(self.pid, "TERM");
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "oci-tag-proxy (pid {}) ignored SIGTERM for {PROCESS_TIMEOUT:?}; killing it",
            self.pid
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kill -<sig> <pid>` on a process this suite started.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// CPU time (user + system, all threads) a process has used so far, in seconds; 0 when it is
/// gone. `/proc/<pid>/stat` counts in USER_HZ ticks, which Linux fixes at 100 per second.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state, ppid, ..., utime (14th field of the line), stime (15th).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// PIDs of this process's own children whose command is `name` (`/proc/<pid>/stat`).
pub fn children_named(name: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let comm = stat
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map(|(c, _)| c);
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1));
            comm == Some(name) && ppid == Some(me.as_str())
        })
        .collect()
}
