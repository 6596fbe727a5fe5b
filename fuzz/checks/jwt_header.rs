// Fuzz check `jwt_header`: the front's `Authorization` header handling
// (`firemode::auth::Verifier::verify`), configured for HS256 with a fixed 40-byte secret.
//
// Invariants: `verify` never panics on any header value (bytes `http::HeaderValue` refuses are
// skipped, as hyper would refuse them first); it never answers "missing" for a present header;
// and it accepts a header only when it is `Bearer <token>` where `<token>` is an HS256 JWT whose
// signature jsonwebtoken itself verifies with the secret, whose `sub` is the identity returned
// and which carries an `exp`. The same header is refused by a verifier holding another secret.
// Random inputs cannot forge a signature, so the committed corpus holds one validly signed token
// (exp in 2100) to exercise the accepting path.
//
// Shared by `fuzz/fuzz_targets/jwt_header.rs` and `tests/e2e/fuzz_corpus.rs` (through
// `include!`).

use firemode::auth::{AuthError, Verifier};
use firemode_config::Config;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// The secret the corpus's valid token is signed with (40 bytes).
pub const SECRET: &str = "firemode-fuzz-secret-0123456789abcdefghi";
/// Another valid secret, which must accept nothing the first one signed.
const OTHER_SECRET: &str = "another-secret-that-signed-nothing-here!";

pub fn verifier(secret: &str) -> Verifier {
    let mut config = Config::default();
    config.auth.jwt_secret = secret.to_owned();
    if let Err(e) = config.validate() {
        panic!("the fuzz config is valid: {e}");
    }
    Verifier::new(&config).unwrap_or_else(|e| panic!("a verifier builds from a secret: {e}"))
}

/// Checks one fuzz input; panics when an invariant breaks.
pub fn check(data: &[u8]) {
    let Ok(header) = HeaderValue::from_bytes(data) else {
        return;
    };
    let identity = match verifier(SECRET).verify(Some(&header)) {
        Ok(identity) => identity,
        Err(AuthError::Missing) => panic!("a present header was reported missing"),
        Err(AuthError::NotBearer | AuthError::Invalid(_)) => return,
    };

    // Accepted: it must be a bearer token that really is signed with the secret.
    let text = header
        .to_str()
        .unwrap_or_else(|_| panic!("accepted a header that is not visible ASCII: {data:?}"));
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .unwrap_or_else(|| panic!("accepted a header that is not `Bearer <token>`: {text:?}"))
        .trim();
    let mut signature_only = Validation::new(Algorithm::HS256);
    signature_only.validate_exp = false;
    signature_only.validate_aud = false;
    signature_only.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &signature_only,
    )
    .unwrap_or_else(|e| panic!("accepted a token not signed with the secret ({e}): {text:?}"))
    .claims;
    let identity = identity
        .claims()
        .unwrap_or_else(|| panic!("an accepted identity does not decode: {identity:?}"));
    assert_eq!(
        claims.get("sub").and_then(serde_json::Value::as_str),
        Some(identity.sub.as_str()),
        "the identity is not the token's subject"
    );
    assert!(claims.get("exp").is_some(), "accepted a token without exp");
    assert_eq!(
        claims.get("org").and_then(serde_json::Value::as_str),
        identity.org.as_deref(),
        "the identity is not the token's org"
    );
    assert!(
        verifier(OTHER_SECRET).verify(Some(&header)).is_err(),
        "a token signed with one secret passed a verifier holding another"
    );
}
