//! JWT bearer authentication for `/v1/*`: the algorithm is pinned by config (the token's
//! header never chooses, `none` never passes), `exp` and `sub` are required, `nbf` is
//! honoured, `iss`/`aud` are checked when configured, and `sub`/`org` must be non-empty
//! strings without control characters (any other Unicode is kept exactly). Also mints tokens for `firemode token`.
//!
//! Without a configured key, a random secret is generated into `data_dir/jwt_secret`
//! (mode 0600) on first use and read from there afterwards.

use crate::token_cache::VerifiedTokens;
use anyhow::{bail, Context as _};
use firemode_config::{Algorithm, Config};
use http::HeaderValue;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The claims FireMode reads. `iss` and `aud` are checked by jsonwebtoken on the raw claims
/// (so a list `aud` never fails deserialisation here); `exp` and `nbf` are kept as JSON and
/// checked by `check_times` (a fractional NumericDate is valid).
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub org: Option<String>,
    /// Checked by `check_times`; also how long a verified token may be served from
    /// [`VerifiedTokens`].
    #[serde(default)]
    exp: Option<serde_json::Value>,
    /// Checked by `check_times` when present.
    #[serde(default)]
    nbf: Option<serde_json::Value>,
}

/// The claims `firemode token` signs.
#[derive(Debug, Serialize)]
struct MintedClaims {
    sub: String,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// The verified caller, as the [`firemode_wire::IDENTITY`] header value the upstream request
/// carries (every byte of `sub` and `org` survives the hop; see `firemode_wire::identity`).
#[derive(Clone, Debug)]
pub struct Identity {
    pub header: HeaderValue,
}

impl Identity {
    /// Checks the claims (design §3: no control characters, not empty) and encodes them.
    pub fn from_claims(sub: &str, org: Option<&str>) -> Result<Self, AuthError> {
        let identity = firemode_wire::Identity::new(sub.to_owned(), org.map(str::to_owned))
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let header = HeaderValue::from_str(&identity.encode())
            .map_err(|_| AuthError::Invalid("the token's claims cannot be encoded".into()))?;
        Ok(Self { header })
    }

    /// The claims back from the header (for checks and tests; the request path never needs
    /// them).
    pub fn claims(&self) -> Option<firemode_wire::Identity> {
        firemode_wire::Identity::decode(self.header.as_bytes()).ok()
    }
}

/// Why a request was not authenticated. The text goes to the client's problem `detail`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("invalid token: {0}")]
    Invalid(String),
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    verified: VerifiedTokens,
}

fn jwt_algorithm(a: Algorithm) -> jsonwebtoken::Algorithm {
    match a {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::HS384 => jsonwebtoken::Algorithm::HS384,
        Algorithm::HS512 => jsonwebtoken::Algorithm::HS512,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
    }
}

impl Verifier {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let a = &config.auth;
        let key = if a.algorithm.is_symmetric() {
            DecodingKey::from_secret(&hs_secret(config)?)
        } else {
            let pem = std::fs::read(&a.public_key_file)
                .with_context(|| format!("auth.public_key_file: reading {}", a.public_key_file))?;
            let parsed = match a.algorithm {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                _ => DecodingKey::from_ed_pem(&pem),
            };
            parsed.with_context(|| {
                format!(
                    "auth.public_key_file: {} is not a PEM public key for {:?}",
                    a.public_key_file, a.algorithm
                )
            })?
        };
        let mut validation = Validation::new(jwt_algorithm(a.algorithm));
        // `exp` and `nbf` are checked here (`check_times`), not by jsonwebtoken: JSON numbers
        // keep their digits in this workspace (serde_json `arbitrary_precision`), and
        // jsonwebtoken then cannot read a fractional NumericDate.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["sub"]);
        if !a.issuer.is_empty() {
            validation.set_issuer(&[&a.issuer]);
            validation.set_required_spec_claims(&["sub", "iss"]);
        }
        if a.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&a.audience]);
        }
        Ok(Self {
            key,
            validation,
            verified: VerifiedTokens::default(),
        })
    }

    /// Checks an `Authorization` header value: served from the table of verified tokens
    /// when this very token passed before and has not expired, else checked in full.
    pub fn verify(&self, authorization: Option<&HeaderValue>) -> Result<Identity, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let now = unix_now();
        if let Some(identity) = self.verified.get(value, now) {
            return Ok(identity);
        }
        let text = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        check_times(&data.claims, unix_now_f64())?;
        let identity = Identity::from_claims(&data.claims.sub, data.claims.org.as_deref())?;
        if let Some(exp) = data.claims.exp.as_ref().and_then(serde_json::Value::as_u64) {
            self.verified.insert(value, &identity, exp);
        }
        Ok(identity)
    }
}

/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: f64 = 30.0;

/// `exp` is required and a token is refused from `exp + leeway` on; with `nbf`, it is
/// refused before `nbf - leeway` (RFC 7519 §4.1.4-5; NumericDates may be fractional).
fn check_times(claims: &Claims, now: f64) -> Result<(), AuthError> {
    let date = |name: &str, v: &serde_json::Value| {
        v.as_f64().filter(|d| d.is_finite()).ok_or_else(|| {
            AuthError::Invalid(format!(
                "claim `{name}` must be a NumericDate (seconds since 1970)"
            ))
        })
    };
    let exp = claims
        .exp
        .as_ref()
        .ok_or_else(|| AuthError::Invalid("the token has no `exp` claim".into()))?;
    if now >= date("exp", exp)? + LEEWAY_SECS {
        return Err(AuthError::Invalid("the token has expired".into()));
    }
    if let Some(nbf) = &claims.nbf {
        if now < date("nbf", nbf)? - LEEWAY_SECS {
            return Err(AuthError::Invalid("the token is not valid yet".into()));
        }
    }
    Ok(())
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::InvalidSignature => "the signature does not match the configured key".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "the token's algorithm is not the one this server accepts".into()
        }
        K::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
        K::InvalidIssuer => "the token's issuer is not accepted".into(),
        K::InvalidAudience => "the token's audience is not accepted".into(),
        K::ImmatureSignature => "the token is not valid yet".into(),
        _ => "the token is malformed".into(),
    }
}

/// The HS* secret: `auth.jwt_secret`, else `data_dir/jwt_secret`, generated on first use.
pub fn hs_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if !config.auth.jwt_secret.is_empty() {
        return Ok(config.auth.jwt_secret.as_bytes().to_vec());
    }
    load_or_generate_secret(&secret_path(config))
}

pub fn secret_path(config: &Config) -> PathBuf {
    config.data_dir.join("jwt_secret")
}

fn load_or_generate_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("data_dir: cannot create {}", dir.display()))?;
    }
    let random: [u8; 32] = rand::random();
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(hex.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a JWT secret");
            Ok(hex.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_secret(path),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let secret = text.trim();
    if secret.len() < 32 {
        bail!(
            "{} holds a secret shorter than 32 bytes; delete it to have a new one generated",
            path.display()
        );
    }
    Ok(secret.as_bytes().to_vec())
}

/// The HS* secret for minting: `auth.jwt_secret`, else the file the running system
/// generated. Never creates one: a token signed with a secret the server does not hold
/// would only ever get 401.
fn signing_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if !config.auth.jwt_secret.is_empty() {
        return Ok(config.auth.jwt_secret.as_bytes().to_vec());
    }
    let path = secret_path(config);
    if !path.exists() {
        bail!(
            "no signing key: auth.jwt_secret is empty and {} does not exist. Start firemode once with this config to generate it, or check that --config names the running system's file",
            path.display()
        );
    }
    read_secret(&path)
}

/// The latest `exp` `firemode token` writes: 2^53 - 1, the largest integer a JSON number
/// carries exactly in every client (JavaScript reads numbers as doubles).
const MAX_EXP: u64 = (1 << 53) - 1;

/// A token signed with the configured HS* secret, for `firemode token`.
pub fn mint(
    config: &Config,
    sub: &str,
    org: Option<&str>,
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    firemode_wire::Identity::new(sub.to_owned(), org.map(str::to_owned))
        .map_err(|e| anyhow::anyhow!("{e}: pass a --sub (and --org) the server would accept"))?;
    let a = &config.auth;
    if !a.algorithm.is_symmetric() {
        bail!(
            "firemode token signs with the HS* secret, but auth.algorithm is {:?}; mint tokens with the private key that matches auth.public_key_file",
            a.algorithm
        );
    }
    let now = unix_now();
    let exp = now
        .checked_add(ttl.as_secs().max(1))
        .filter(|exp| *exp <= MAX_EXP)
        .with_context(|| {
            format!(
                "--ttl {}: too long; the token would expire after the largest time every JWT library reads exactly (2^53 - 1 seconds after 1970); choose a shorter lifetime",
                humantime::format_duration(ttl)
            )
        })?;
    let claims = MintedClaims {
        sub: sub.to_string(),
        exp,
        iat: now,
        org: org.map(str::to_string),
        iss: (!a.issuer.is_empty()).then(|| a.issuer.clone()),
        aud: (!a.audience.is_empty()).then(|| a.audience.clone()),
    };
    let key = EncodingKey::from_secret(&signing_secret(config)?);
    Ok(jsonwebtoken::encode(
        &Header::new(jwt_algorithm(a.algorithm)),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        }
    }

    #[test]
    fn generated_secret_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fm-auth-{}", std::process::id()));
        let c = config(&dir);
        let first = hs_secret(&c).unwrap();
        assert_eq!(first, hs_secret(&c).unwrap());
        let mode = std::fs::metadata(secret_path(&c))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = mint(
            &c,
            "tech-1",
            Some("acme"),
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let id = Verifier::new(&c)
            .unwrap()
            .verify(Some(
                &HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            ))
            .unwrap();
        let id = firemode_wire::Identity::decode(id.header.as_bytes()).unwrap();
        assert_eq!(id.sub, "tech-1");
        assert_eq!(id.org.as_deref(), Some("acme"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn exp_and_nbf_are_numeric_dates_with_leeway() {
        let claims = |v: serde_json::Value| serde_json::from_value::<Claims>(v).unwrap();
        let now = 1_800_000_000.0;
        let ok = |c: serde_json::Value| check_times(&claims(c), now).is_ok();
        assert!(ok(serde_json::json!({"sub": "u", "exp": now + 60.0})));
        assert!(ok(serde_json::json!({"sub": "u", "exp": 1_800_000_000.5})));
        assert!(
            ok(serde_json::json!({"sub": "u", "exp": now - 10.0})),
            "within leeway"
        );
        assert!(!ok(serde_json::json!({"sub": "u", "exp": now - 31.0})));
        assert!(!ok(serde_json::json!({"sub": "u"})));
        assert!(!ok(serde_json::json!({"sub": "u", "exp": "tomorrow"})));
        assert!(!ok(
            serde_json::json!({"sub": "u", "exp": now + 7200.0, "nbf": now + 3600.0})
        ));
        assert!(ok(
            serde_json::json!({"sub": "u", "exp": now + 7200.0, "nbf": now + 10.0})
        ));
        assert!(ok(
            serde_json::json!({"sub": "u", "exp": now + 7200.0, "nbf": now - 3600.5})
        ));
        assert!(!ok(
            serde_json::json!({"sub": "u", "exp": now + 7200.0, "nbf": [1]})
        ));
    }

    #[test]
    fn minting_never_creates_a_secret() {
        let dir = std::env::temp_dir().join(format!("fm-auth-mint-{}", std::process::id()));
        let c = config(&dir);
        let err = mint(&c, "tech-1", None, std::time::Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("no signing key"), "{err}");
        assert!(!secret_path(&c).exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_forged_payload_under_a_cached_tokens_signature_is_refused() {
        let dir = std::env::temp_dir().join(format!("fm-auth-forge-{}", std::process::id()));
        let c = config(&dir);
        let verifier = Verifier::new(&c).unwrap();
        let token = mint(
            &c,
            "tech-1",
            Some("acme"),
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        let bearer = |t: &str| HeaderValue::from_str(&format!("Bearer {t}")).unwrap();
        for _ in 0..2 {
            // Twice: the second answer comes from the table of verified tokens.
            let id = verifier.verify(Some(&bearer(&token))).unwrap();
            let id = firemode_wire::Identity::decode(id.header.as_bytes()).unwrap();
            assert_eq!(id.sub, "tech-1");
        }
        // Another subject and org under the cached token's signature: the same table slot,
        // other bytes.
        let other = Config {
            auth: firemode_config::Auth {
                jwt_secret: "another-secret-another-secret-another-secret".into(),
                ..c.auth.clone()
            },
            ..c.clone()
        };
        let admin = mint(
            &other,
            "admin",
            Some("other"),
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        let signature = token.rsplit('.').next().unwrap();
        let unsigned = admin.rsplit_once('.').unwrap().0;
        let forged = format!("{unsigned}.{signature}");
        assert!(matches!(
            verifier.verify(Some(&bearer(&forged))),
            Err(AuthError::Invalid(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
