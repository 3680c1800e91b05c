//! The service under test: in-process on `127.0.0.1:0`, or the real binary as a child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use oci_tag_proxy::config::{Cli, Settings};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Flags every test app gets: everything here runs on loopback, so private networks are
/// allowed unless a test asks for the default policy with [`App::start_strict`].
const TEST_FLAGS: &[&str] = &["--allow-private-networks", "--listen", "127.0.0.1"];

/// The service running inside the test process.
pub struct App {
    url: String,
    dir: PathBuf,
    _tmp: Option<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub client: reqwest::Client,
}

impl App {
    /// Starts the service with `args` (clap flags) and a fresh cache directory.
    pub async fn start(args: &[&str]) -> App {
        let tmp = TempDir::new().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut app = App::start_in(&dir, args).await;
        app._tmp = Some(tmp);
        app
    }

    /// Starts the service with the Docker Hub fake as its Hub API, plus `extra` flags.
    pub async fn for_hub(hub: &super::hub::HubFake, extra: &[&str]) -> App {
        let endpoint = format!("docker={}", hub.url());
        let mut args = vec!["--registry-endpoint", endpoint.as_str()];
        args.extend_from_slice(extra);
        App::start(&args).await
    }

    /// Starts the service with the default private-network policy (refusing redirects and
    /// links to loopback), to test that policy.
    pub async fn start_strict(args: &[&str]) -> App {
        let tmp = TempDir::new().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut app = App::launch(&dir, &["--listen", "127.0.0.1"], args).await;
        app._tmp = Some(tmp);
        app
    }

    /// Starts the service on an existing cache directory (to test persistence).
    pub async fn start_in(dir: &Path, args: &[&str]) -> App {
        App::launch(dir, TEST_FLAGS, args).await
    }

    async fn launch(dir: &Path, base: &[&str], args: &[&str]) -> App {
        let mut all = vec!["oci-tag-proxy", "--dir", dir.to_str().unwrap()];
        all.extend_from_slice(base);
        all.extend_from_slice(args);
        let settings = Settings::try_from(Cli::try_parse_from(all).expect("flags parse"))
            .expect("settings valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            oci_tag_proxy::serve(settings, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("service runs");
        });
        App {
            url,
            dir: dir.to_path_buf(),
            _tmp: None,
            stop: Some(tx),
            task: Some(task),
            client: client(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `GET <path>` on the service.
    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path_and_query}", self.url))
            .send()
            .await
            .expect("service answers")
    }

    /// `GET /tags?...` and the parsed JSON (panics unless 200).
    pub async fn tags(&self, query: &str) -> (reqwest::header::HeaderMap, serde_json::Value) {
        self.tags_at(&format!("/tags?{query}")).await
    }

    /// `GET <path>` and the parsed JSON (panics unless 200).
    pub async fn tags_at(&self, path: &str) -> (reqwest::header::HeaderMap, serde_json::Value) {
        let resp = self.get(path).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        (headers, serde_json::from_str(&body).expect("JSON body"))
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("service stops within 20 s")
                .expect("service task ends cleanly");
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client that sends no `Accept-Encoding`, so tests see bodies as the service sends them.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .no_gzip()
        .no_brotli()
        .build()
        .unwrap()
}

/// The real binary, run as a child process.
pub struct Binary {
    pub url: String,
    child: tokio::process::Child,
}

impl Binary {
    /// Runs `oci-tag-proxy` with `args` on a free port and waits until `/healthz` answers.
    pub async fn spawn(dir: &Path, args: &[&str]) -> Binary {
        Binary::launch(dir, args, None).await
    }

    /// Like [`Binary::spawn`], started with an open-file soft limit of `soft` (the hard limit
    /// as it is), as service managers and container runtimes often start services.
    pub async fn spawn_with_open_file_limit(dir: &Path, args: &[&str], soft: u64) -> Binary {
        Binary::launch(dir, args, Some(soft)).await
    }

    async fn launch(dir: &Path, args: &[&str], soft_open_files: Option<u64>) -> Binary {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oci-tag-proxy"));
        cmd.args(["--dir", dir.to_str().unwrap(), "--port", &port.to_string()])
            .args(TEST_FLAGS)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(soft) = soft_open_files {
            use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
            let hard = getrlimit(Resource::Nofile).maximum;
            // SAFETY: setrlimit(2) is async-signal-safe, and the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = Rlimit {
                        current: Some(soft),
                        maximum: hard,
                    };
                    setrlimit(Resource::Nofile, limit).map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("binary starts");
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy(&url).await;
        Binary { url, child }
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path_and_query}", self.url))
            .send()
            .await
            .expect("binary answers")
    }

    /// The child's process ID (to read its `/proc` entry).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL, no chance to clean up.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, and the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY-free: kill(2) through the `kill` command, on our own child's PID.
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits within 20 s after SIGTERM")
            .expect("wait")
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_healthy(url: &str) {
    let c = client();
    for _ in 0..200 {
        if let Ok(r) = c.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not become healthy within 10 s");
}
