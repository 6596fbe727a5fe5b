//! Who is asking: the verified caller from the identity header the front set, and the
//! tenant their sessions belong to (`org:<org>`, or `sub:<sub>` for a token without an org;
//! `firemode_wire::Identity::tenant`). A request without the header, or with one that does
//! not decode, is refused: there is no fallback tenant.

use firemode_wire::identity::IdentityError;
use firemode_wire::{Identity, IDENTITY};
use http::request::Parts;

/// The verified caller.
pub struct Caller {
    /// The token's `sub`: who owns the replicas they write with.
    pub subject: String,
    /// Whose sessions these are (the store's key with the session id).
    pub tenant: String,
}

/// Why a request has no usable caller (a 401, `problems`).
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("no verified identity on the request (it must come through the front)")]
    Missing,
    #[error("the verified identity is unreadable: {0}")]
    Unreadable(#[from] IdentityError),
}

/// The caller from the front's identity header.
pub fn caller(req: &Parts) -> Result<Caller, CallerError> {
    let header = req.headers.get(IDENTITY).ok_or(CallerError::Missing)?;
    let identity = Identity::decode(header.as_bytes())?;
    Ok(Caller {
        tenant: identity.tenant(),
        subject: identity.sub,
    })
}
