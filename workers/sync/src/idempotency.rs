//! Idempotency: the `Idempotency-Key` header's rule (1-255 visible ASCII characters) and the
//! fingerprint that tells a retry of the same request (replayed) from another request under
//! the same key (422). The store keeps the record; this module only says what goes in it.

use firemode_store::IdempotencyKey;
use http::request::Parts;
use http::Method;
use sha2::{Digest, Sha256};

/// Why a request's `Idempotency-Key` is not usable (a 400, `problems`).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the Idempotency-Key header is required (a unique string per batch, reused on retries)"
    )]
    Missing,
    #[error("Idempotency-Key must be 1-255 visible ASCII characters")]
    Malformed,
}

/// The request's idempotency key: 1-255 visible ASCII characters.
pub fn key(req: &Parts) -> Result<String, KeyError> {
    let value = req
        .headers
        .get("idempotency-key")
        .ok_or(KeyError::Missing)?;
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::Malformed);
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// What the store keeps under `key` for this request: who sent it and its fingerprints
/// (`value` is `body` parsed).
pub fn record(
    subject: &str,
    key: String,
    method: &Method,
    session_id: &str,
    value: &serde_json::Value,
    body: &[u8],
) -> IdempotencyKey {
    IdempotencyKey {
        subject: subject.to_owned(),
        key,
        request_hash: fingerprint(method, session_id, value),
        legacy_request_hash: Some(legacy_fingerprint(method, session_id, body)),
    }
}

/// The same key with the same request replays; the fingerprint covers method, session and the
/// body's JSON value (design §3: key order and whitespace do not matter). The workspace's
/// `serde_json` maps are sorted (no `preserve_order`), so serialising the parsed value is a
/// canonical form: sorted keys, no whitespace, the last of duplicate keys (which is also the
/// one the merge reads).
pub fn fingerprint(method: &Method, session_id: &str, body: &serde_json::Value) -> String {
    let canonical = serde_json::to_vec(body).unwrap_or_default();
    hex_sha256(&[
        b"json\0",
        method.as_str().as_bytes(),
        b"\0",
        session_id.as_bytes(),
        b"\0",
        &canonical,
    ])
}

/// The fingerprint of releases that compared bytes: a retry of a request accepted just before
/// an upgrade, with the same bytes, still replays instead of answering 422.
pub fn legacy_fingerprint(method: &Method, session_id: &str, body: &[u8]) -> String {
    hex_sha256(&[
        method.as_str().as_bytes(),
        b"\0",
        session_id.as_bytes(),
        b"\0",
        body,
    ])
}

fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> serde_json::Value {
        serde_json::from_str(text).expect("test JSON")
    }

    #[test]
    fn the_fingerprint_is_the_json_value() {
        let post = Method::POST;
        let one = fingerprint(&post, "S", &value(r#"{"a":1,"b":[1,{"c":2,"d":3}]}"#));
        let same = value("{ \"b\" : [1, {\"d\":3, \"c\":2}],\n \"a\" : 1 }");
        assert_eq!(fingerprint(&post, "S", &same), one);
        assert_ne!(fingerprint(&post, "T", &same), one, "the session counts");
        let other = value(r#"{"a":1,"b":[{"c":2,"d":3},1]}"#);
        assert_ne!(fingerprint(&post, "S", &other), one, "list order counts");
        let big = |n: &str| fingerprint(&post, "S", &value(&format!(r#"{{"a":{n}}}"#)));
        assert_ne!(
            big("123456789012345678901234567890"),
            big("123456789012345678901234567891"),
            "numbers keep their digits"
        );
    }

    /// Records written by releases that hashed the bytes still match a retry with those bytes.
    #[test]
    fn the_legacy_fingerprint_is_the_old_one() {
        let body = br#"{"changes":[]}"#;
        let mut h = Sha256::new();
        h.update(b"POST");
        h.update([0]);
        h.update(b"S");
        h.update([0]);
        h.update(body);
        let old: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(legacy_fingerprint(&Method::POST, "S", body), old);
    }
}
