//! The verified caller as it crosses the process hop, and the tenant it belongs to.
//!
//! The front verifies a JWT and sends the worker one header, [`IDENTITY`], whose value is
//! `b64(sub)` or `b64(sub).b64(org)` with base64url without padding. Any bytes of a claim
//! survive (`café`, a leading space, a `.`), and a header that is missing or does not decode
//! is refused by the worker: it never falls back to another tenant.
//!
//! Tenants are exact (design §3): `org:<org>` byte for byte, or `sub:<sub>` when the token has
//! no `org`. Nothing is trimmed, folded or normalised.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The header that carries the verified identity from the front to a worker.
pub const IDENTITY: &str = "x-firemode-identity";

/// Longest accepted `sub` or `org`, in characters.
pub const MAX_CLAIM_CHARS: usize = 256;

/// A verified caller: the token's `sub`, and its `org` when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub sub: String,
    pub org: Option<String>,
}

/// Why an identity claim or header was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("claim `{0}` must not be empty")]
    Empty(&'static str),
    #[error("claim `{0}` must be at most {MAX_CLAIM_CHARS} characters")]
    TooLong(&'static str),
    #[error("claim `{0}` must not contain control characters")]
    Control(&'static str),
    #[error("the identity header does not decode")]
    Undecodable,
}

/// Checks one identity claim: 1 to [`MAX_CLAIM_CHARS`] characters, none of them a control
/// character (C0, DEL or C1). Whitespace and any other Unicode are kept as they are.
pub fn check_claim(name: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::Empty(name));
    }
    if value.chars().count() > MAX_CLAIM_CHARS {
        return Err(IdentityError::TooLong(name));
    }
    if value.chars().any(char::is_control) {
        return Err(IdentityError::Control(name));
    }
    Ok(())
}

impl Identity {
    /// A checked identity: both claims pass [`check_claim`].
    pub fn new(sub: String, org: Option<String>) -> Result<Self, IdentityError> {
        check_claim("sub", &sub)?;
        if let Some(org) = &org {
            check_claim("org", org)?;
        }
        Ok(Self { sub, org })
    }

    /// The tenant whose sessions this caller reads and writes.
    pub fn tenant(&self) -> String {
        match &self.org {
            Some(org) => format!("org:{org}"),
            None => format!("sub:{}", self.sub),
        }
    }

    /// The [`IDENTITY`] header value: visible ASCII whatever the claims hold.
    pub fn encode(&self) -> String {
        let mut out = URL_SAFE_NO_PAD.encode(self.sub.as_bytes());
        if let Some(org) = &self.org {
            out.push('.');
            URL_SAFE_NO_PAD.encode_string(org.as_bytes(), &mut out);
        }
        out
    }

    /// Reads an [`IDENTITY`] header value; anything [`Identity::encode`] did not produce from
    /// valid claims is an error.
    pub fn decode(value: &[u8]) -> Result<Self, IdentityError> {
        let text = std::str::from_utf8(value).map_err(|_| IdentityError::Undecodable)?;
        let mut parts = text.split('.');
        let sub = parts.next().map(decode_part).transpose()?;
        let org = parts.next().map(decode_part).transpose()?;
        if parts.next().is_some() {
            return Err(IdentityError::Undecodable);
        }
        Self::new(sub.ok_or(IdentityError::Undecodable)?, org)
    }
}

fn decode_part(part: &str) -> Result<String, IdentityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| IdentityError::Undecodable)?;
    String::from_utf8(bytes).map_err(|_| IdentityError::Undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sub: &str, org: Option<&str>) -> Identity {
        Identity::new(sub.into(), org.map(Into::into)).unwrap()
    }

    #[test]
    fn any_claim_survives_the_hop() {
        for (sub, org) in [
            ("tech-1", Some("acme")),
            ("tech-1", None),
            ("café", Some("crème")),
            ("a.b", Some(" acme")),
            ("x", Some("acme ")),
            ("🔥", Some("org.with.dots")),
            ("=", Some("%41")),
        ] {
            let identity = id(sub, org);
            let header = identity.encode();
            assert!(header.bytes().all(|b| b.is_ascii_graphic()), "{header}");
            assert_eq!(Identity::decode(header.as_bytes()).unwrap(), identity);
        }
    }

    #[test]
    fn tenants_are_exact() {
        let tenants = [
            id("u", Some("café")).tenant(),
            id("u", Some("crème")).tenant(),
            id("café", None).tenant(),
            id("u", Some("acme")).tenant(),
            id("u", Some(" acme")).tenant(),
            id("u", Some("acme ")).tenant(),
            id("u", Some("Acme")).tenant(),
            id("acme", None).tenant(),
        ];
        let distinct: std::collections::BTreeSet<_> = tenants.iter().collect();
        assert_eq!(distinct.len(), tenants.len(), "{tenants:?}");
        assert_eq!(id("u", Some("acme")).tenant(), "org:acme");
        assert_eq!(id("u", None).tenant(), "sub:u");
    }

    #[test]
    fn odd_claims_are_refused() {
        assert_eq!(
            Identity::new(String::new(), None),
            Err(IdentityError::Empty("sub"))
        );
        assert_eq!(
            Identity::new("u".into(), Some(String::new())),
            Err(IdentityError::Empty("org"))
        );
        for bad in ["acme\t", "a\nb", "\u{0}", "x\u{7f}", "x\u{85}"] {
            assert_eq!(
                Identity::new("u".into(), Some(bad.into())),
                Err(IdentityError::Control("org")),
                "{bad:?}"
            );
        }
        assert_eq!(
            Identity::new("x".repeat(MAX_CLAIM_CHARS + 1), None),
            Err(IdentityError::TooLong("sub"))
        );
        assert!(Identity::new("é".repeat(MAX_CLAIM_CHARS), None).is_ok());
    }

    #[test]
    fn headers_that_do_not_decode_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"dGVjaA.",
            b"dGVjaA.YWNtZQ.YWNtZQ",
            b"dGVjaA==",
            b"not base64!",
            b"\xff",
            b"gA", // one byte 0x80: not UTF-8
            b"CQ", // a tab: a control character
        ] {
            assert!(
                Identity::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
