//! `oci-tag-proxy healthcheck [URL]`: asks the running service for `/healthz` and exits 0 when it
//! answers `200`, 1 otherwise. The container image has no shell and no curl, so this is what a
//! compose `healthcheck` (exec form) runs inside the container.
//!
//! Without `URL` it asks `http://127.0.0.1:$TAG_PROXY_PORT/healthz` (port 8080 by default), or
//! the address in `TAG_PROXY_LISTEN` when the service listens on one address only: the same
//! environment the service reads, so one `environment:` block configures both. A `URL` must be
//! plain `http://`; its path can be `/readyz`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Time for the whole check: connect, send, read the status line.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the check; the result is the process exit code.
pub fn run(mut args: impl Iterator<Item = String>) -> i32 {
    let target = match (args.next(), args.next()) {
        (None, _) => default_target(
            std::env::var("TAG_PROXY_LISTEN").ok().as_deref(),
            std::env::var("TAG_PROXY_PORT").ok().as_deref(),
        ),
        (Some(url), None) => Target::from_url(&url),
        (Some(_), Some(_)) => {
            Err("usage: oci-tag-proxy healthcheck [http://HOST:PORT/PATH]".into())
        }
    };
    match target.and_then(|t| check(&t)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            1
        }
    }
}

/// Where to ask.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `host:port` as written in the `Host` header.
    authority: String,
    path: String,
}

impl Target {
    fn from_url(url: &str) -> Result<Target, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!("{url:?}: only http:// URLs are supported"));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("{url:?}: no host"))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        Ok(Target {
            authority: format!("{host}:{port}"),
            path: parsed.path().to_owned(),
        })
    }
}

/// `/healthz` on the address the service listens on, from the service's own variables.
fn default_target(listen: Option<&str>, port: Option<&str>) -> Result<Target, String> {
    let port: u16 = match port.map(str::trim).filter(|p| !p.is_empty()) {
        Some(p) => p
            .parse()
            .map_err(|_| format!("TAG_PROXY_PORT={p:?} is not a port"))?,
        None => 8080,
    };
    let ip = match listen.map(str::trim).filter(|l| !l.is_empty()) {
        Some(l) => l
            .parse::<IpAddr>()
            .map_err(|_| format!("TAG_PROXY_LISTEN={l:?} is not an IP address"))?,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    // Listening on every address: ask loopback of the same family.
    let ip = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    Ok(Target {
        authority: SocketAddr::new(ip, port).to_string(),
        path: "/healthz".into(),
    })
}

fn check(target: &Target) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = target
        .authority
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", target.authority))?
        .collect();
    let mut last_error = format!("{}: no address", target.authority);
    for addr in addrs {
        match ask(addr, target) {
            Ok(200) => return Ok(()),
            Ok(status) => {
                return Err(format!(
                    "http://{}{} answered {status}",
                    target.authority, target.path
                ));
            }
            Err(e) => last_error = format!("http://{}{}: {e}", target.authority, target.path),
        }
    }
    Err(last_error)
}

/// One `GET`, and the status code of the answer.
fn ask(addr: SocketAddr, target: &Target) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: oci-tag-proxy-healthcheck\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer is not HTTP/1.x",
        )
    })
}

/// The code of an `HTTP/1.x NNN ...` status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_loopback_on_the_service_port() {
        let t = default_target(None, None).unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/healthz");
        let t = default_target(Some("0.0.0.0"), Some("9000")).unwrap();
        assert_eq!(t.authority, "127.0.0.1:9000");
        let t = default_target(Some("::"), Some("9000")).unwrap();
        assert_eq!(t.authority, "[::1]:9000");
        let t = default_target(Some("10.1.2.3"), None).unwrap();
        assert_eq!(t.authority, "10.1.2.3:8080");
        assert!(default_target(None, Some("http")).is_err());
        assert!(default_target(Some("any"), None).is_err());
    }

    #[test]
    fn urls_are_plain_http() {
        let t = Target::from_url("http://localhost:8081/readyz").unwrap();
        assert_eq!(t.authority, "localhost:8081");
        assert_eq!(t.path, "/readyz");
        assert_eq!(Target::from_url("http://h/").unwrap().authority, "h:80");
        assert!(Target::from_url("https://h/healthz").is_err());
        assert!(Target::from_url("not a url").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nx: y\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn asks_a_live_server_and_reports_its_status() {
        use std::net::TcpListener;
        for (answer, expected) in [
            ("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n", Ok(())),
            ("HTTP/1.1 503 Service Unavailable\r\n\r\n", Err(())),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                let mut request = [0u8; 1024];
                let n = conn.read(&mut request).unwrap();
                conn.write_all(answer.as_bytes()).unwrap();
                String::from_utf8_lossy(&request[..n]).into_owned()
            });
            let url = format!("http://{addr}/healthz");
            let result = Target::from_url(&url).and_then(|t| check(&t));
            assert_eq!(result.map_err(|_| ()), expected, "{answer:?}");
            let request = server.join().unwrap();
            assert!(
                request.starts_with("GET /healthz HTTP/1.1\r\n"),
                "{request}"
            );
        }
        // Nothing listening: an error, not a hang.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = Target::from_url(&format!("http://127.0.0.1:{port}/healthz")).unwrap();
        assert!(check(&target).is_err());
    }
}
