//! The container image's binary in an empty root filesystem.
//!
//! `scripts/build-static` builds the binary exactly as the Dockerfile does; `./scripts/test` runs
//! it and names the result in `TAG_PROXY_STATIC_BINARY` (without it this test only says it was
//! skipped). The test lays out a root holding nothing but that binary at the image's path, the
//! CA bundle, and the `/etc` files a container gets from its runtime (`hosts`, `resolv.conf`) and
//! from the distroless base (`nsswitch.conf`: `hosts: files dns`), then runs the binary there
//! under `chroot` as distroless's `nonroot` user (65532), configured only by `TAG_PROXY_*`
//! variables, with the cache directory as the image has it. It must serve a real `/tags` from
//! the distribution registry reached three ways:
//! - by a name from `/etc/hosts`, over plain HTTP;
//! - by a name only a DNS server knows (a small one on port 53 of a loopback address in
//!   127.84/16, named in `resolv.conf`): static glibc resolves through `files` and `dns`, which
//!   are built into libc, without NSS modules;
//! - over HTTPS through a TLS terminator (`socat`) whose certificate is signed by a test CA added
//!   to the root's CA bundle: the binary trusts the bundle at the path distroless ships.
//!
//! It also runs `oci-tag-proxy healthcheck` in the root (no shell), and stops the service with
//! SIGTERM. Needs root: `chroot`, and port 53 for the DNS server.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};

use crate::support::app::free_port;
use crate::support::registry::{ImageSpec, IndexMedia, IndexOptions, Registry, RegistryAuth};

/// Names the binary to check; set by `./scripts/test` after `scripts/build-static`.
const BINARY_VAR: &str = "TAG_PROXY_STATIC_BINARY";
/// Where the Dockerfile puts the binary.
const IMAGE_BINARY: &str = "usr/local/bin/oci-tag-proxy";
/// The image's `TAG_PROXY_DIR`.
const IMAGE_CACHE_DIR: &str = "var/cache/oci-tag-proxy";
/// distroless's `nonroot`.
const NONROOT: u32 = 65532;
const HOSTS_NAME: &str = "registry.hosts.test";
const DNS_NAME: &str = "registry.dns.test";
const TLS_NAME: &str = "registry.tls.test";
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[tokio::test]
async fn static_binary_serves_tags_from_an_empty_root() {
    let Some(binary) = std::env::var_os(BINARY_VAR).map(PathBuf::from) else {
        eprintln!(
            "skipped: {BINARY_VAR} is not set (./scripts/test builds the static binary and sets it)"
        );
        return;
    };
    assert!(
        is_root(),
        "{BINARY_VAR} is set but this test needs root (chroot, DNS on port 53)"
    );
    let binary = binary
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));

    // The upstream: a multi-platform tag and a single-platform one.
    let registry = Registry::start(RegistryAuth::None).await;
    let pusher = registry.pusher();
    let single = pusher
        .push_image(
            "acme/app",
            "1.0",
            &ImageSpec::linux("amd64").created("2025-01-01T00:00:00Z"),
        )
        .await;
    let multi = pusher
        .push_index(
            "acme/app",
            "2.0",
            &[
                ImageSpec::linux("amd64")
                    .created("2025-06-01T00:00:00Z")
                    .salt(1),
                ImageSpec::linux("arm64")
                    .variant("v8")
                    .created("2025-06-01T00:00:00Z")
                    .salt(2),
            ],
            &IndexOptions {
                media: IndexMedia::Oci,
                attestation: true,
                created: None,
            },
        )
        .await;

    // Under target/tmp rather than /tmp, which may be mounted noexec.
    let work = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let tls = Tls::start(work.path(), registry.port()).await;
    let dns = DnsServer::start(DNS_NAME, Ipv4Addr::LOCALHOST).await;
    let root = make_root(work.path(), &binary, &tls.ca_pem, dns.ip);
    eprintln!("empty root {}:\n{}", root.display(), listing(&root));
    assert_eq!(
        files_in(&root),
        [
            "etc/hosts",
            "etc/nsswitch.conf",
            "etc/resolv.conf",
            "etc/ssl/certs/ca-certificates.crt",
            IMAGE_BINARY,
        ],
        "the root holds only the binary, the CA bundle and the runtime's /etc files"
    );

    // Configured like a container: environment only, the image's cache directory.
    let plain = |name: &str| format!("{name}:{}", registry.port());
    let tls_host = format!("{TLS_NAME}:{}", tls.port);
    let env = [
        ("TAG_PROXY_LISTEN", "127.0.0.1".into()),
        ("TAG_PROXY_DIR", format!("/{IMAGE_CACHE_DIR}")),
        ("TAG_PROXY_ALLOW_PRIVATE_NETWORKS", "true".into()),
        (
            "TAG_PROXY_ALLOWED_REGISTRIES",
            [plain(HOSTS_NAME), plain(DNS_NAME), tls_host.clone()].join(","),
        ),
        // Plain HTTP for the first two; the TLS one keeps the default https://.
        (
            "TAG_PROXY_REGISTRY_ENDPOINTS",
            format!(
                "{h}=http://{h},{d}=http://{d}",
                h = plain(HOSTS_NAME),
                d = plain(DNS_NAME)
            ),
        ),
        ("RUST_LOG", "info".into()),
    ];
    let log = work.path().join("proxy.log");
    let (proxy, port) = start_in_root(&root, &env, &log).await;
    let url = format!("http://127.0.0.1:{port}");

    let client = crate::support::app::client();
    for host in [plain(HOSTS_NAME), plain(DNS_NAME), tls_host.clone()] {
        let answer = client
            .get(format!("{url}/tags?image=acme/app&registry={host}"))
            .send()
            .await
            .expect("proxy answers");
        let status = answer.status();
        let body = answer.text().await.expect("body");
        assert_eq!(
            status,
            200,
            "/tags via {host}: {body}\nlog:\n{}",
            read(&log)
        );
        let tags: Value = serde_json::from_str(&body).expect("JSON");
        eprintln!("/tags?image=acme/app&registry={host} -> {tags}");
        assert_eq!(tags[0]["name"], "2.0", "{tags}");
        assert_eq!(tags[0]["digest"], multi.digest.as_str());
        assert_eq!(
            tags[0]["architectures"],
            serde_json::json!(["amd64", "arm64"])
        );
        assert_eq!(tags[0]["last_updated"], "2025-06-01T00:00:00Z");
        assert_eq!(tags[1]["name"], "1.0", "{tags}");
        assert_eq!(tags[1]["digest"], single.as_str());
        assert_eq!(tags[1]["architectures"], serde_json::json!(["amd64"]));
    }
    let queries = dns.queries();
    eprintln!("DNS queries seen: {queries:?}");
    assert!(
        queries
            .iter()
            .any(|(name, qtype)| name == DNS_NAME && *qtype == 1),
        "{DNS_NAME} was resolved through the DNS server: {queries:?}"
    );
    assert!(
        !queries.iter().any(|(name, _)| name == HOSTS_NAME),
        "{HOSTS_NAME} came from /etc/hosts (`files` before `dns`): {queries:?}"
    );
    assert!(
        tls.handshakes() > 0,
        "the TLS registry was reached through socat"
    );

    // The healthcheck subcommand, in the same root: no shell, no curl.
    let port_env = [("TAG_PROXY_PORT", port.to_string())];
    let healthy = run_in_root(&root, &["healthcheck"], &port_env).await;
    assert!(healthy.status.success(), "healthcheck: {healthy:?}");
    let readyz = format!("{url}/readyz");
    let ready = run_in_root(&root, &["healthcheck", &readyz], &[]).await;
    assert!(ready.status.success(), "healthcheck /readyz: {ready:?}");
    let dead = [("TAG_PROXY_PORT", free_port().to_string())];
    let down = run_in_root(&root, &["healthcheck"], &dead).await;
    assert_eq!(down.status.code(), Some(1), "nothing listening: {down:?}");
    eprintln!(
        "healthcheck: exit {:?} while serving, exit {:?} with nothing listening ({})",
        healthy.status.code(),
        down.status.code(),
        String::from_utf8_lossy(&down.stderr).trim()
    );

    // The non-root user wrote the cache where the image's volume is.
    let db = root.join(IMAGE_CACHE_DIR).join("cache.redb");
    let meta = fs::metadata(&db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    assert_eq!(meta.uid(), NONROOT, "cache written by the nonroot user");

    let status = terminate(proxy).await;
    assert!(status.success(), "SIGTERM ends it cleanly: {status}");
    eprintln!("after SIGTERM: {status}\nproxy log:\n{}", read(&log));
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// The root filesystem: the binary where the image has it, the CA bundle (the host's plus the
/// test CA), `/etc/hosts` naming the plain and TLS registries, `resolv.conf` naming the test DNS
/// server, distroless's `hosts: files dns`, and the empty cache directory owned by nonroot.
fn make_root(work: &Path, binary: &Path, test_ca: &str, dns_ip: Ipv4Addr) -> PathBuf {
    let root = work.join("root");
    let write = |path: &str, contents: &[u8]| {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).expect("mkdir");
        fs::write(&path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    };
    write(IMAGE_BINARY, &fs::read(binary).expect("read the binary"));
    fs::set_permissions(root.join(IMAGE_BINARY), fs::Permissions::from_mode(0o755))
        .expect("chmod binary");
    let mut bundle = fs::read_to_string(HOST_CA_BUNDLE).unwrap_or_default();
    bundle.push_str(test_ca);
    write("etc/ssl/certs/ca-certificates.crt", bundle.as_bytes());
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.0.1\t{HOSTS_NAME}\n127.0.0.1\t{TLS_NAME}\n");
    write("etc/hosts", hosts.as_bytes());
    write(
        "etc/resolv.conf",
        format!("nameserver {dns_ip}\n").as_bytes(),
    );
    write("etc/nsswitch.conf", b"hosts: files dns\n");
    let cache = root.join(IMAGE_CACHE_DIR);
    fs::create_dir_all(&cache).expect("cache dir");
    std::os::unix::fs::chown(&cache, Some(NONROOT), Some(NONROOT)).expect("chown cache dir");
    // Every directory readable and searchable by nonroot (the temp dir is 0700).
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    root
}

/// Relative paths of the files under `root`, sorted.
fn files_in(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                files.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

/// `size  path` per file, for the log.
fn listing(root: &Path) -> String {
    files_in(root)
        .iter()
        .map(|f| {
            let size = fs::metadata(root.join(f)).map(|m| m.len()).unwrap_or(0);
            format!("  {size:>10}  /{f}\n")
        })
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// `chroot --userspec=65532:65532 ROOT /usr/local/bin/oci-tag-proxy ARGS` with only `env`.
fn in_root(root: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(chroot_path());
    cmd.arg(format!("--userspec={NONROOT}:{NONROOT}"))
        .arg(root)
        .arg(format!("/{IMAGE_BINARY}"))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null());
    cmd
}

async fn run_in_root(root: &Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let run = in_root(root, args, env).output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("finishes within 20 s")
        .expect("chroot runs")
}

/// `chroot` from coreutils (in sbin, which a test's PATH may lack).
fn chroot_path() -> PathBuf {
    ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("chroot (coreutils) is installed")
}

/// The service in the root on a free port, healthy; another port when the one picked was taken
/// before the service bound it.
async fn start_in_root(root: &Path, env: &[(&str, String)], log: &Path) -> (Child, u16) {
    let client = crate::support::app::client();
    for _ in 0..3 {
        let port = free_port();
        let mut env = env.to_vec();
        env.push(("TAG_PROXY_PORT", port.to_string()));
        let mut child = in_root(root, &[], &env)
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("chroot starts");
        let url = format!("http://127.0.0.1:{port}/healthz");
        for _ in 0..300 {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let log = read(log);
                assert!(
                    log.contains("cannot listen"),
                    "the binary exited with {status}; log:\n{log}"
                );
                break;
            }
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return (child, port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the binary did not become healthy; log:\n{}", read(log));
}

async fn terminate(mut child: Child) -> ExitStatus {
    let pid = child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .expect("wait")
}

// ---------------------------------------------------------------------------------------------
// DNS: answers A for one name, nothing for its other types, NXDOMAIN for the rest
// ---------------------------------------------------------------------------------------------

struct DnsServer {
    /// The loopback address it listens on, port 53 (resolv.conf cannot name another port).
    ip: Ipv4Addr,
    queries: Arc<Mutex<Vec<(String, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Binds port 53 on an address in 127.84.0.0/16 (all of 127/8 is loopback on Linux), picked
    /// by process id so that test runs side by side do not collide, and the next one if taken.
    async fn start(name: &'static str, answer: Ipv4Addr) -> DnsServer {
        let seed = std::process::id();
        let mut errors = Vec::new();
        let mut bound = None;
        for attempt in 0..16u32 {
            let n = seed.wrapping_add(attempt.wrapping_mul(7919)) % 65_000 + 256;
            let [.., hi, lo] = n.to_be_bytes();
            let ip = Ipv4Addr::new(127, 84, hi, lo);
            match UdpSocket::bind(SocketAddr::from((ip, 53))).await {
                Ok(socket) => {
                    bound = Some((ip, socket));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    errors.push(format!("{ip}: {e}"))
                }
                Err(e) => panic!("bind the test DNS server on {ip}:53: {e}"),
            }
        }
        let (ip, socket) = bound.unwrap_or_else(|| panic!("no free DNS address: {errors:?}"));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let seen = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some((qname, qtype, reply)) = dns_reply(&buf[..n], name, answer) {
                    seen.lock().unwrap().push((qname, qtype));
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        DnsServer { ip, queries, task }
    }

    fn queries(&self) -> Vec<(String, u16)> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The question's name and type, and the answer to send.
fn dns_reply(query: &[u8], name: &str, ip: Ipv4Addr) -> Option<(String, u16, Vec<u8>)> {
    const A: u16 = 1;
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        let label = query.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += 1 + len;
    }
    let question = query.get(12..at + 5)?;
    let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
    let qname = labels.join(".");
    let (rcode, answer) = match (qname == name, qtype == A) {
        (true, true) => (0u8, true),
        (true, false) => (0, false),
        (false, _) => (3, false), // NXDOMAIN
    };
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&query[..2]); // id
    reply.push(0x84 | (query[2] & 0x01)); // response, authoritative, RD copied
    reply.push(0x80 | rcode); // recursion available
    reply.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if answer {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some((qname, qtype, reply))
}

// ---------------------------------------------------------------------------------------------
// TLS: socat terminates TLS for the registry with a certificate from a test CA
// ---------------------------------------------------------------------------------------------

struct Tls {
    port: u16,
    ca_pem: String,
    /// socat's `-d -d` log: one "SSL connection using" line per completed handshake.
    log: PathBuf,
    _socat: Child,
}

impl Tls {
    async fn start(work: &Path, upstream_port: u16) -> Tls {
        let dir = work.join("tls");
        fs::create_dir_all(&dir).expect("tls dir");
        let ext = format!(
            "subjectAltName=DNS:{TLS_NAME}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        );
        fs::write(dir.join("ext.cnf"), ext).expect("ext.cnf");
        for command in [
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN=oci-tag-proxy-test-ca -keyout ca.key -out ca.pem",
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -subj /CN=registry.tls.test -keyout tls.key -out tls.csr",
            "x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile ext.cnf -out tls.pem",
        ] {
            let out = std::process::Command::new("openssl")
                .args(command.split_whitespace())
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("openssl (apt-get install openssl): {e}"));
            assert!(out.status.success(), "openssl {command}: {out:?}");
        }
        let ca_pem = fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.join(format!("socat-{port}.log"));
            let listen = format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                dir.join("tls.pem").display(),
                dir.join("tls.key").display()
            );
            let mut socat = Command::new("socat")
                .args([
                    "-d",
                    "-d",
                    &listen,
                    &format!("TCP:127.0.0.1:{upstream_port}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("socat log"))
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("socat (apt-get install socat): {e}"));
            for _ in 0..100 {
                if socat.try_wait().expect("try_wait").is_some() {
                    break;
                }
                if read(&log).contains("listening on") {
                    return Tls {
                        port,
                        ca_pem,
                        log,
                        _socat: socat,
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = socat.kill().await;
            failures.push(format!("port {port}: {}", read(&log)));
        }
        panic!("socat did not start: {failures:#?}");
    }

    fn handshakes(&self) -> usize {
        read(&self.log).matches("SSL connection using").count()
    }
}
