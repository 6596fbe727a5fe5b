//! The offline bundle: everything a tablet needs to work a session offline — the session's
//! document and clock and the whole catalog — with a weak ETag (session version + catalog
//! version), gzip when asked, and a hard size cap (never a truncated bundle).

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io::Write as _;

/// Bumped when the bundle's shape changes.
pub const SCHEMA_VERSION: u32 = 1;

/// The ETag of a bundle: it changes exactly when the session or the catalog does
/// (`generated_at` aside, hence weak).
pub fn etag(tenant: &str, session_id: &str, session_version: i64, catalog_version: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        tenant,
        session_id,
        &session_version.to_string(),
        catalog_version,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("W/\"{hex}\"")
}

/// Whether an `If-None-Match` header value matches `etag` (weak comparison, lists, `*`).
pub fn if_none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let ours = bare(etag);
    header
        .split(',')
        .any(|t| t.trim() == "*" || bare(t) == ours)
}

/// Whether the client accepts gzip (`Accept-Encoding`, RFC 9110 §12.5.3): an explicit
/// `gzip` entry decides by its `q` (`q=0` refuses, whatever `*` says); otherwise `*` with
/// `q > 0` accepts. Codings and the `q` name are case-insensitive.
pub fn accepts_gzip(header: &str) -> bool {
    let mut wildcard = None;
    for part in header.split(',') {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim();
        let q = it.find_map(quality).unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            return q > 0.0;
        }
        if coding == "*" {
            wildcard = Some(q > 0.0);
        }
    }
    wildcard.unwrap_or(false)
}

/// The weight of one `;`-separated parameter when it is `q=…` (any case); an unparsable
/// weight counts as 0, refusing rather than guessing.
fn quality(param: &str) -> Option<f32> {
    let (name, value) = param.split_once('=')?;
    if !name.trim().eq_ignore_ascii_case("q") {
        return None;
    }
    Some(
        value
            .trim()
            .parse::<f32>()
            .ok()
            .filter(|q| (0.0..=1.0).contains(q))
            .unwrap_or(0.0),
    )
}

/// The bundle's JSON text, assembled around the already-rendered parts.
pub fn render(generated_at: &str, session_json: &[u8], catalog_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(session_json.len() + catalog_json.len() + 96);
    out.extend_from_slice(b"{\"schema_version\":");
    out.extend_from_slice(SCHEMA_VERSION.to_string().as_bytes());
    out.extend_from_slice(b",\"generated_at\":\"");
    out.extend_from_slice(generated_at.as_bytes());
    out.extend_from_slice(b"\",\"session\":");
    out.extend_from_slice(session_json);
    out.extend_from_slice(b",\"catalog\":");
    out.extend_from_slice(catalog_json);
    out.push(b'}');
    out
}

pub fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(5),
    );
    enc.write_all(body)?;
    Ok(Bytes::from(enc.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_changes_with_either_version_and_matches_weakly() {
        let a = etag("org:a", "S1", 3, "v1");
        assert_ne!(a, etag("org:a", "S1", 4, "v1"));
        assert_ne!(a, etag("org:a", "S1", 3, "v2"));
        assert_ne!(a, etag("org:b", "S1", 3, "v1"));
        assert!(if_none_match(&a, &a));
        assert!(if_none_match(
            &format!("\"x\", {}", a.trim_start_matches("W/")),
            &a
        ));
        assert!(if_none_match("*", &a));
        assert!(!if_none_match("\"other\"", &a));
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("br, deflate"));
        assert!(!accepts_gzip("gzip;Q=0"));
        assert!(!accepts_gzip("gzip; q=0.000"));
        assert!(!accepts_gzip("gzip;q=0, *"));
        assert!(!accepts_gzip("*, gzip;q=0"));
        assert!(!accepts_gzip("*;q=0"));
        assert!(accepts_gzip("*"));
        assert!(accepts_gzip("br, *;q=0.1"));
        assert!(accepts_gzip("GZIP;Q=1"));
        assert!(!accepts_gzip("gzip;q=nonsense"));
    }

    #[test]
    fn rendered_bundle_is_json() {
        let body = render(
            "2026-01-01T00:00:00Z",
            br#"{"session_id":"S","document":{},"vector_clock":{}}"#,
            br#"{"version":"v","items":[]}"#,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["catalog"]["version"], "v");
        assert_eq!(v["session"]["session_id"], "S");
    }
}
