//! Reading registry credentials from a Docker `config.json`.
//!
//! Only the `auths` map is read: an entry's `auth` (base64 `user:password`), or its
//! `username`/`password`, or its `identitytoken`. Credential helpers (`credsStore`,
//! `credHelpers`) run programs and are not supported; they are reported, not silently ignored.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use crate::config::{ConfigError, Credentials};

/// The key under which Docker Hub's login is kept (Docker writes `https://index.docker.io/v1/`).
pub const DOCKER_HUB: &str = "docker.io";

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// `https://index.docker.io/v1/` → `docker.io`, `https://ghcr.io` → `ghcr.io`, `ghcr` →
/// `ghcr.io`, `localhost:5000` stays.
pub fn normalize_host(key: &str) -> String {
    let key = key.trim().to_ascii_lowercase();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(&key);
    let host = key.split('/').next().unwrap_or("");
    match host {
        "index.docker.io"
        | "registry-1.docker.io"
        | "docker.io"
        | "docker"
        | "registry.hub.docker.com"
        | "hub.docker.com" => DOCKER_HUB.to_owned(),
        "ghcr" => "ghcr.io".to_owned(),
        h => h.to_owned(),
    }
}

/// Reads the credentials of every usable `auths` entry of a Docker config file.
pub fn read_docker_config(path: &Path) -> Result<HashMap<String, Credentials>, ConfigError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read Docker config {shown}: {e}")))?;
    let config: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| ConfigError(format!("Docker config {shown} is not valid JSON: {e}")))?;
    if config.creds_store.is_some() || !config.cred_helpers.is_empty() {
        tracing::warn!(path = %shown,
            "Docker credential helpers (credsStore/credHelpers) are not supported; only auths entries are used");
    }
    let mut out = HashMap::new();
    for (key, entry) in config.auths {
        match entry.credentials() {
            Some(c) => {
                out.insert(normalize_host(&key), c);
            }
            None => {
                tracing::warn!(registry = %key, "Docker config entry without usable credentials")
            }
        }
    }
    Ok(out)
}

impl AuthEntry {
    fn credentials(self) -> Option<Credentials> {
        if let Some(token) = self.identitytoken.filter(|t| !t.is_empty()) {
            return Some(Credentials {
                username: self.username.unwrap_or_default(),
                password: String::new(),
                identity_token: Some(token),
            });
        }
        if let (Some(u), Some(p)) = (&self.username, &self.password)
            && !u.is_empty()
        {
            return Some(Credentials::new(u, p));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(self.auth?.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        Some(Credentials::new(u, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_entry_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"YWxpY2U6aHViLXRva2Vu"},
                "ghcr.io":{"username":"bob","password":"ghp_x"},
                "localhost:5000":{"identitytoken":"refresh-me"},
                "broken.example":{"auth":"!!!"}
            },"credsStore":"desktop"}"#,
        )
        .unwrap();
        let creds = read_docker_config(&path).unwrap();
        assert_eq!(creds[DOCKER_HUB], Credentials::new("alice", "hub-token"));
        assert_eq!(creds["ghcr.io"], Credentials::new("bob", "ghp_x"));
        assert_eq!(
            creds["localhost:5000"].identity_token.as_deref(),
            Some("refresh-me")
        );
        assert!(!creds.contains_key("broken.example"));
        let debug = format!("{creds:?}");
        assert!(
            !debug.contains("hub-token") && !debug.contains("refresh-me"),
            "{debug}"
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = read_docker_config(Path::new("/nonexistent/config.json")).unwrap_err();
        assert!(e.to_string().contains("cannot read"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{").unwrap();
        assert!(
            read_docker_config(&path)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("https://GHCR.io"), "ghcr.io");
        assert_eq!(normalize_host("localhost:5000"), "localhost:5000");
    }
}
