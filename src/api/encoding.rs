//! HTTP caching and compression for tag answers: strong ETags, `If-None-Match`, and gzip or
//! brotli chosen from `Accept-Encoding`.
//!
//! Compression is done here rather than by `tower-http`'s layer so that the answer for a cached
//! image is compressed once and kept with the cache entry, instead of on every request.
//! Each encoding is its own representation, so it gets its own strong ETag (`"<hash>-br"`);
//! `If-None-Match` matches any representation of the same content.

use std::io::Write;

use axum::http::HeaderMap;
use axum::http::header;
use sha2::{Digest, Sha256};

/// Bodies smaller than this are not worth compressing.
pub const MIN_COMPRESS_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    /// The best encoding the client accepts: brotli, then gzip, honouring `q=0`.
    pub fn negotiate(headers: &HeaderMap, body_len: usize) -> Encoding {
        if body_len < MIN_COMPRESS_LEN {
            return Encoding::Identity;
        }
        let Some(accept) = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
        else {
            return Encoding::Identity;
        };
        let q = |name: &str| accept_q(accept, name);
        let (br, gzip) = (q("br"), q("gzip"));
        if br > 0.0 && br >= gzip {
            Encoding::Brotli
        } else if gzip > 0.0 {
            Encoding::Gzip
        } else {
            Encoding::Identity
        }
    }

    /// The `Content-Encoding` value, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gzip"),
            Encoding::Brotli => Some("br"),
        }
    }

    pub fn compress(self, body: &[u8]) -> bytes::Bytes {
        let out = match self {
            Encoding::Identity => return bytes::Bytes::copy_from_slice(body),
            Encoding::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(body).expect("writing to a Vec");
                e.finish().expect("writing to a Vec")
            }
            Encoding::Brotli => {
                let mut out = Vec::new();
                let params = brotli::enc::BrotliEncoderParams {
                    quality: 5,
                    ..Default::default()
                };
                brotli::BrotliCompress(&mut &body[..], &mut out, &params)
                    .expect("writing to a Vec");
                out
            }
        };
        bytes::Bytes::from(out)
    }

    /// The ETag of this representation of a body whose identity ETag is `etag`.
    pub fn etag(self, etag: &str) -> String {
        match self.header() {
            None => etag.to_owned(),
            Some(enc) => format!("{}-{enc}\"", etag.trim_end_matches('"')),
        }
    }
}

/// The `q` a client gives `name` in `Accept-Encoding` (`*` counts; absent means 0).
fn accept_q(accept: &str, name: &str) -> f32 {
    let mut star = 0.0;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case(name) {
            return q;
        }
        if coding == "*" {
            star = q;
        }
    }
    star
}

/// A strong ETag of `body`: 128 bits of its SHA-256.
pub fn etag_of(body: &[u8]) -> String {
    let hash = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&hash[..16]))
}

/// Whether `If-None-Match` names any representation of the content whose identity ETag is
/// `etag` (or is `*`).
pub fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    let base = etag.trim_matches('"');
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| {
            t == "*"
                || t == base
                || t.strip_prefix(base)
                    .is_some_and(|rest| matches!(rest, "-gzip" | "-br"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn negotiation() {
        let n = |v: &'static str| Encoding::negotiate(&headers(&[("accept-encoding", v)]), 10_000);
        assert_eq!(n("gzip, deflate, br"), Encoding::Brotli);
        assert_eq!(n("gzip"), Encoding::Gzip);
        assert_eq!(n("br;q=0, gzip"), Encoding::Gzip);
        assert_eq!(n("br;q=0.5, gzip;q=0.9"), Encoding::Gzip);
        assert_eq!(n("identity"), Encoding::Identity);
        assert_eq!(n("*"), Encoding::Brotli);
        assert_eq!(n("*;q=0"), Encoding::Identity);
        assert_eq!(
            Encoding::negotiate(&HeaderMap::new(), 10_000),
            Encoding::Identity
        );
        assert_eq!(
            Encoding::negotiate(&headers(&[("accept-encoding", "gzip")]), 10),
            Encoding::Identity,
            "tiny bodies stay as they are"
        );
    }

    #[test]
    fn etags_and_conditionals() {
        let etag = etag_of(b"[]");
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34);
        assert_eq!(
            Encoding::Gzip.etag(&etag),
            format!("{}-gzip\"", &etag[..33])
        );
        let gz = Encoding::Gzip.etag(&etag);
        let h = |v: String| {
            let mut m = HeaderMap::new();
            m.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&v).unwrap());
            m
        };
        assert!(not_modified(&h(etag.clone()), &etag));
        assert!(
            not_modified(&h(gz), &etag),
            "any representation of the content"
        );
        assert!(not_modified(&h(format!("\"x\", W/{etag}")), &etag));
        assert!(not_modified(&h("*".into()), &etag));
        assert!(!not_modified(&h("\"other\"".into()), &etag));
        assert!(!not_modified(&HeaderMap::new(), &etag));
    }

    #[test]
    fn compression_round_trips() {
        let body = br#"[{"name":"latest"}]"#.repeat(100);
        let gz = Encoding::Gzip.compress(&body);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out).unwrap();
        assert_eq!(out, body);
        let br = Encoding::Brotli.compress(&body);
        let mut out = Vec::new();
        brotli::BrotliDecompress(&mut &br[..], &mut out).unwrap();
        assert_eq!(out, body);
        assert!(br.len() < body.len() / 5);
    }
}
