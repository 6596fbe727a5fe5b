//! Rules for ids that arrive from clients.

/// Session ids: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_session_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A client's `x-request-id` is kept when it is 1–128 characters of `[A-Za-z0-9._:-]`;
/// anything else is replaced by a fresh id (it would end up in logs and trace attributes).
pub fn is_sane_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(is_valid_session_id("S-2026_11"));
        assert!(is_valid_session_id(&"a".repeat(64)));
        assert!(!is_valid_session_id(&"a".repeat(65)));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id("a/b"));
        assert!(!is_valid_session_id("é"));
    }

    #[test]
    fn request_ids() {
        assert!(is_sane_request_id(b"req-1:2.3_4"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"has space"));
        assert!(!is_sane_request_id(&[b'a'; 129]));
    }
}
