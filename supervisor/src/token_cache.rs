//! Bearer tokens already verified, so a client that sends the same token with every request
//! pays for the signature check once per token rather than once per request (base64, HMAC and
//! the claims' JSON were ~6 % of the front's CPU in the profile; BENCHMARKS.md).
//!
//! A small direct-mapped table: a token's slot comes from its last bytes (the signature), a
//! hit needs the whole `Authorization` value byte for byte, and an entry serves only before
//! the token's `exp`. Only tokens that passed full verification are stored, so the table makes
//! a check cheaper, never weaker. It lives in the [`Verifier`](crate::auth::Verifier), which
//! is rebuilt on every config reload: a new key never meets an old entry.

use crate::auth::Identity;
use arc_swap::ArcSwapOption;
use http::HeaderValue;
use std::sync::Arc;

const SLOTS: usize = 256;

pub struct VerifiedTokens {
    slots: Box<[ArcSwapOption<Entry>]>,
}

struct Entry {
    authorization: Box<[u8]>,
    identity: Identity,
    /// Unix seconds: the token's `exp`. Unusable from then on (jsonwebtoken's leeway is
    /// left to the full check).
    expires_at: u64,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| ArcSwapOption::empty()).collect(),
        }
    }
}

impl VerifiedTokens {
    fn slot(&self, authorization: &[u8]) -> &ArcSwapOption<Entry> {
        let tail = &authorization[authorization.len().saturating_sub(8)..];
        let hash = tail.iter().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(*b))
        });
        &self.slots[hash % SLOTS]
    }

    /// The identity of `authorization` if it was verified before and `now` (Unix seconds)
    /// is before its `exp`.
    pub fn get(&self, authorization: &HeaderValue, now: u64) -> Option<Identity> {
        let bytes = authorization.as_bytes();
        let guard = self.slot(bytes).load();
        let entry = guard.as_ref()?;
        (now < entry.expires_at && *entry.authorization == *bytes).then(|| entry.identity.clone())
    }

    /// Remembers a verified token (replacing whatever shared its slot).
    pub fn insert(&self, authorization: &HeaderValue, identity: &Identity, expires_at: u64) {
        let bytes = authorization.as_bytes();
        self.slot(bytes).store(Some(Arc::new(Entry {
            authorization: bytes.into(),
            identity: identity.clone(),
            expires_at,
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &'static str) -> Identity {
        Identity::from_claims(sub, Some("acme")).unwrap()
    }

    #[test]
    fn a_verified_token_is_served_until_its_exp() {
        let cache = VerifiedTokens::default();
        let token = HeaderValue::from_static("Bearer aaa.bbb.signature1");
        assert!(
            cache.get(&token, 100).is_none(),
            "nothing before a full check"
        );
        cache.insert(&token, &identity("tech-1"), 200);
        let hit = cache.get(&token, 199).expect("a hit before exp");
        let hit = firemode_wire::Identity::decode(hit.header.as_bytes()).unwrap();
        assert_eq!(hit.sub, "tech-1");
        assert_eq!(hit.org.as_deref(), Some("acme"));
        assert!(cache.get(&token, 200).is_none(), "expired at exp");
    }

    #[test]
    fn only_the_very_same_token_hits() {
        let cache = VerifiedTokens::default();
        let token = HeaderValue::from_static("Bearer aaa.bbb.signature1");
        cache.insert(&token, &identity("tech-1"), 200);
        // Same signature (same slot), other payload: a forgery must not ride on the entry.
        let forged = HeaderValue::from_static("Bearer aaa.ccc.signature1");
        assert!(cache.get(&forged, 100).is_none());
        // Another token in the same slot replaces the entry.
        cache.insert(&forged, &identity("tech-2"), 300);
        assert!(cache.get(&token, 100).is_none());
        assert_eq!(
            cache.get(&forged, 100).map(|i| i.header),
            Some(identity("tech-2").header)
        );
    }
}
