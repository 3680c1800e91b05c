//! Registry authentication: `WWW-Authenticate` challenges, bearer tokens and Basic auth.
//!
//! A registry tells us how to authenticate in its `401` challenge. We remember the challenge per
//! registry origin, so later requests carry a token on the first try, and cache tokens per
//! (realm, service, scope) until shortly before they expire. The scope is always built from the
//! repository being read (`repository:<name>:pull`): the placeholder scope that some `/v2/`
//! challenges carry (GHCR) grants nothing. Concurrent requests for the same token wait for one
//! token request instead of each sending their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::{self, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::http::{HttpClient, Request, Response, origin};
use super::{UpstreamError, display_url};
use crate::config::Credentials;
use crate::metrics::UpstreamKind;

/// Token lifetime when the token server does not say (the Docker token spec's default).
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

/// How a registry asked to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value; prefers Bearer when several challenges are offered.
///
/// Written by hand rather than with `http-auth`: registries send unquoted URL values
/// (`realm=https://...`) that the RFC 7235 token grammar forbids and strict parsers reject.
/// Quoted values may hold commas (`scope="repository:a:pull,push"`) and escapes.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let challenges = split_challenges(value);
    let param = |params: &[(String, String)], name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if let Some((_, params)) = challenges
        .iter()
        .find(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
    {
        return Some(Challenge::Bearer {
            realm: param(params, "realm").filter(|r| !r.is_empty())?,
            service: param(params, "service").filter(|s| !s.is_empty()),
        });
    }
    challenges
        .iter()
        .any(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .then_some(Challenge::Basic)
}

type Params = Vec<(String, String)>;

/// Splits a header value into (scheme, params) challenges.
fn split_challenges(value: &str) -> Vec<(String, Params)> {
    let mut out: Vec<(String, Params)> = Vec::new();
    let mut rest = value.trim_start_matches([' ', ',']);
    while !rest.is_empty() {
        let word_end = rest.find([' ', '=', ',']).unwrap_or(rest.len());
        let (word, after) = rest.split_at(word_end);
        let after_trim = after.trim_start();
        if after_trim.starts_with('=') && !out.is_empty() {
            // `key=value` of the current challenge.
            let (v, remaining) = read_value(after_trim[1..].trim_start());
            if let Some(last) = out.last_mut() {
                last.1.push((word.to_owned(), v));
            }
            rest = remaining;
        } else if word.is_empty() {
            return out; // stray `=` or other garbage: stop here
        } else {
            out.push((word.to_owned(), Vec::new()));
            rest = after;
        }
        rest = rest.trim_start_matches([' ', ',']);
    }
    out
}

/// Reads a quoted string (with `\` escapes) or an unquoted value up to the next comma.
fn read_value(s: &str) -> (String, &str) {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find(',').unwrap_or(s.len());
        return (s[..end].trim().to_owned(), &s[end..]);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, &quoted[i + 1..]),
            c => value.push(c),
        }
    }
    (value, "")
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: Option<String>,
    scope: String,
}

#[derive(Clone)]
struct CachedToken {
    value: HeaderValue,
    expires: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

type TokenSlot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

/// Produces `Authorization` headers for registry requests.
pub struct Authenticator {
    http: Arc<HttpClient>,
    credentials: HashMap<String, Credentials>,
    /// The last challenge seen per registry origin. A std mutex: never held across an await.
    challenges: Mutex<HashMap<String, Challenge>>,
    /// One slot per token; the async mutex inside makes concurrent callers share one request.
    tokens: Mutex<HashMap<TokenKey, TokenSlot>>,
}

impl Authenticator {
    pub fn new(http: Arc<HttpClient>, credentials: HashMap<String, Credentials>) -> Authenticator {
        Authenticator {
            http,
            credentials,
            challenges: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The header to send with a request for `repo` at `base`, if the registry is known to
    /// want one. `host` names the registry for credentials and metrics.
    pub async fn authorization(
        &self,
        base: &Url,
        host: &str,
        repo: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let challenge = self
            .challenges
            .lock()
            .expect("challenge lock")
            .get(&origin(base))
            .cloned();
        match challenge {
            None => Ok(None),
            Some(c) => self.answer(&c, base, host, repo, None).await.map(Some),
        }
    }

    /// Handles a `401`: learns the challenge and returns a new header to retry with. The
    /// header that was just refused (`rejected`) is not handed out again.
    pub async fn on_unauthorized(
        &self,
        base: &Url,
        host: &str,
        repo: &str,
        resp: &Response,
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        let challenge = resp
            .header_str(header::WWW_AUTHENTICATE.as_str())
            .and_then(parse_challenge)
            .ok_or_else(|| resp.error())?;
        self.challenges
            .lock()
            .expect("challenge lock")
            .insert(origin(base), challenge.clone());
        self.answer(&challenge, base, host, repo, rejected).await
    }

    async fn answer(
        &self,
        challenge: &Challenge,
        base: &Url,
        host: &str,
        repo: &str,
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        match challenge {
            Challenge::Basic => self.basic(host).ok_or_else(|| UpstreamError::Denied {
                status: 401,
                url: display_url(base),
            }),
            Challenge::Bearer { realm, service } => {
                let key = TokenKey {
                    realm: realm.clone(),
                    service: service.clone(),
                    scope: format!("repository:{repo}:pull"),
                };
                self.bearer(key, base, host, rejected).await
            }
        }
    }

    fn basic(&self, host: &str) -> Option<HeaderValue> {
        let c = self.credentials.get(host)?;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// A cached token, or a new one from the token server when there is none, it expired, or
    /// it is the one just `rejected`.
    async fn bearer(
        &self,
        key: TokenKey,
        base: &Url,
        host: &str,
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        let slot = self
            .tokens
            .lock()
            .expect("token lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        if let Some(t) = guard.as_ref()
            && t.expires > Instant::now()
            && Some(&t.value) != rejected
        {
            return Ok(t.value.clone());
        }
        let token = self.request_token(&key, base, host).await?;
        let value = token.value.clone();
        *guard = Some(token);
        Ok(value)
    }

    async fn request_token(
        &self,
        key: &TokenKey,
        base: &Url,
        host: &str,
    ) -> Result<CachedToken, UpstreamError> {
        let url = self.realm_url(&key.realm, base).await?;
        let identity = self
            .credentials
            .get(host)
            .and_then(|c| c.identity_token.as_deref());
        let req = match identity {
            Some(refresh_token) => oauth_request(url, key, refresh_token, host),
            None => self.get_token_request(url, key, host),
        };
        let resp = self.http.send(req).await?;
        if !resp.status.is_success() {
            return Err(resp.error());
        }
        let parsed: TokenResponse = resp.json()?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UpstreamError::Malformed {
                url: display_url(&resp.url),
                reason: "token response without a token".into(),
            })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            UpstreamError::Malformed {
                url: display_url(&resp.url),
                reason: "token is not a valid header value".into(),
            }
        })?;
        value.set_sensitive(true);
        let ttl = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_TTL);
        // Renew a little early so a token never expires between our check and its use.
        let margin = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        Ok(CachedToken {
            value,
            expires: Instant::now() + ttl.saturating_sub(margin),
        })
    }

    /// The token spec's GET: `?service=..&scope=..`, with Basic credentials when configured.
    fn get_token_request(&self, mut url: Url, key: &TokenKey, host: &str) -> Request {
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = &key.service {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &key.scope);
        }
        let mut req = Request::get(url, UpstreamKind::token, host);
        if let Some(basic) = self.basic(host) {
            req = req.header(header::AUTHORIZATION, basic);
        }
        req
    }

    /// The realm must be an http(s) URL; it may not downgrade https, and a realm on another
    /// origin must pass the private-address check like any other place a registry sends us.
    async fn realm_url(&self, realm: &str, base: &Url) -> Result<Url, UpstreamError> {
        let url = base.join(realm).map_err(|_| UpstreamError::Malformed {
            url: display_url(base),
            reason: "auth challenge with an invalid realm".into(),
        })?;
        let refused = |reason: &str| UpstreamError::Refused {
            url: display_url(&url),
            reason: reason.into(),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused("auth realm is not an http(s) URL"));
        }
        if base.scheme() == "https" && url.scheme() != "https" {
            return Err(refused("auth realm downgrades https to http"));
        }
        if origin(&url) != origin(base) {
            self.http.check_destination(&url).await?;
        }
        Ok(url)
    }
}

/// The OAuth2 form of the token spec, for Docker's `identitytoken`: a refresh token POSTed
/// as `grant_type=refresh_token`.
fn oauth_request(url: Url, key: &TokenKey, refresh_token: &str, host: &str) -> Request {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "refresh_token")
        .append_pair("refresh_token", refresh_token)
        .append_pair("client_id", "oci-tag-proxy")
        .append_pair("scope", &key.scope);
    if let Some(service) = &key.service {
        form.append_pair("service", service);
    }
    let mut req = Request::get(url, UpstreamKind::token, host).header(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    req.method = reqwest::Method::POST;
    req.body = Some(bytes::Bytes::from(form.finish()));
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_and_unquoted_bearer() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        let c = parse_challenge(r#"bearer realm=https://ghcr.io/token, service=ghcr.io"#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: Some("ghcr.io".into()),
            })
        );
    }

    #[test]
    fn bearer_without_service_and_with_error() {
        let c = parse_challenge(
            r#"Bearer realm="https://r.example/token",scope="repository:a/b:pull",error="insufficient_scope""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://r.example/token".into(),
                service: None,
            })
        );
    }

    #[test]
    fn basic_and_garbage() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("\u{0}"), None);
        assert_eq!(parse_challenge("=,=\"\\"), None);
        assert_eq!(
            parse_challenge(r#"Basic realm="a", Bearer realm="https://t.example/token""#),
            Some(Challenge::Bearer {
                realm: "https://t.example/token".into(),
                service: None,
            })
        );
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "no realm");
    }
}
