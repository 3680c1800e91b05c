//! Finds the `rel="next"` target in an RFC 8288 `Link` header.
//!
//! Written here rather than taken from `parse_link_header`: that crate splits on every comma and
//! rejects query strings without `=`, and registries send opaque cursors (Quay's old
//! `next_page=...`, anything a registry likes) that must be followed exactly as given. This
//! parser only splits outside `<...>` and quoted strings.

/// The raw URI of the first link whose `rel` includes `next`.
pub fn next_link(header: &str) -> Option<&str> {
    let mut rest = header;
    loop {
        let open = rest.find('<')?;
        let close = open + rest[open..].find('>')?;
        let target = rest[open + 1..close].trim();
        let params_end = close + params_len(&rest[close + 1..]) + 1;
        if rel_is_next(&rest[close + 1..params_end]) {
            return Some(target);
        }
        rest = &rest[params_end..];
    }
}

/// The length of the parameter list after `>`: up to the next comma outside quotes.
fn params_len(s: &str) -> usize {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => return i,
            _ => {}
        }
    }
    s.len()
}

fn rel_is_next(params: &str) -> bool {
    params.split(';').any(|p| {
        let Some((k, v)) = p.split_once('=') else {
            return false;
        };
        k.trim().eq_ignore_ascii_case("rel")
            && v.trim()
                .trim_matches('"')
                .split_ascii_whitespace()
                .any(|r| r.eq_ignore_ascii_case("next"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_and_ghcr_form() {
        assert_eq!(
            next_link(r#"</v2/example-org/example-app/tags/list?last=v1.2.0&n=100>; rel="next""#),
            Some("/v2/example-org/example-app/tags/list?last=v1.2.0&n=100")
        );
    }

    #[test]
    fn quay_opaque_cursor_and_unquoted_rel() {
        assert_eq!(
            next_link("</v2/org/repo/tags/list?next_page=gAAAAABk,x==&n=50>; rel=next"),
            Some("/v2/org/repo/tags/list?next_page=gAAAAABk,x==&n=50")
        );
    }

    #[test]
    fn picks_next_among_several() {
        let h = r#"<https://r.example/a?p=1>; rel="prev", <https://r.example/a?p=3>; title="x, y"; rel="next""#;
        assert_eq!(next_link(h), Some("https://r.example/a?p=3"));
        assert_eq!(next_link(r#"<https://r.example/a>; rel="last""#), None);
        assert_eq!(next_link("garbage"), None);
        assert_eq!(next_link("<unterminated; rel=next"), None);
        assert_eq!(next_link(""), None);
    }
}
