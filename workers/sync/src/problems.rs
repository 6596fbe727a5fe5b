//! Every problem+json answer the sync worker gives, in one place: the small error types of
//! the other modules ([`CallerError`], [`KeyError`], [`UnreadableState`], [`Refusal`],
//! [`BundleError`]) and the store's errors mapped to status, kind, title and detail. Store
//! failures are logged here, where they become answers.

use crate::bundle_http::BundleError;
use crate::caller::CallerError;
use crate::idempotency::KeyError;
use crate::merge::Refusal;
use crate::session::UnreadableState;
use crate::HttpResponse;
use firemode_store::StoreError;
use firemode_wire::{Problem, DATA_FAULT};
use http::{header, HeaderValue, StatusCode};

/// 405 with the `Allow` header RFC 9110 requires.
pub fn method_not_allowed(allowed: &'static str) -> HttpResponse {
    let mut response = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("use {allowed} on this route"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// 400 for a session id outside the rule of `firemode_wire::ids`.
pub fn invalid_session_id() -> Problem {
    Problem::bad_request("a session id is 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
}

/// 422: the key was used before for a different request.
pub fn key_reused() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency key reused",
        "this Idempotency-Key was already used for a different request; use a new key for a new batch",
    )
}

/// A merge that could not get its session's lock in time is a 409 "still in flight"; any
/// other busy store is a 503.
pub fn merge_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Busy(detail) => Problem::new(
            StatusCode::CONFLICT,
            "in-flight",
            "Still in flight",
            format!("{detail}; a request with this session (or this Idempotency-Key) is still being applied — retry shortly"),
        ),
        other => store_problem(other),
    }
}

/// A busy or unreachable store is a 503 (retry); anything else a 500.
pub fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Busy(detail) => {
            tracing::warn!(error = %detail, "store busy");
            Problem::unavailable("the store is busy; retry shortly")
        }
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "store unavailable");
            Problem::unavailable("the store is unavailable; retry shortly")
        }
        other => {
            tracing::error!(error = %other, "store error");
            Problem::internal("the store failed; the request was not applied")
        }
    }
}

impl From<CallerError> for Problem {
    fn from(e: CallerError) -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            e.to_string(),
        )
    }
}

impl From<KeyError> for Problem {
    fn from(e: KeyError) -> Problem {
        Problem::bad_request(e.to_string())
    }
}

/// On a read (the merge's own answer is [`Refusal::Unreadable`]).
impl From<UnreadableState> for Problem {
    fn from(_: UnreadableState) -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            SESSION_UNREADABLE,
            "Internal error",
            "the stored session is unreadable",
        )
    }
}

/// The problem kind of a session whose stored rows do not load: a 500 that needs an
/// operator (restore the session from a backup), marked [`DATA_FAULT`] for the front.
pub const SESSION_UNREADABLE: &str = "session-unreadable";

/// Marks an answer as caused by stored data ([`firemode_wire::DATA_FAULT`]): the front
/// does not hold it against the worker process.
pub fn mark_data_fault(response: &mut HttpResponse) {
    response
        .headers_mut()
        .insert(DATA_FAULT, HeaderValue::from_static("1"));
}

impl From<Refusal> for Problem {
    fn from(refusal: Refusal) -> Problem {
        let detail = refusal.to_string();
        match refusal {
            Refusal::Unreadable(_) => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                SESSION_UNREADABLE,
                "Internal error",
                detail,
            ),
            Refusal::ReplicaOwned { .. } => Problem::new(
                StatusCode::FORBIDDEN,
                "replica-owned",
                "Replica belongs to another user",
                detail,
            ),
            Refusal::MissingDependencies(missing) => Problem::new(
                StatusCode::CONFLICT,
                "missing-dependencies",
                "Sync first",
                detail,
            )
            .with(
                "vector_clock",
                serde_json::to_value(&missing.session_clock).unwrap_or_default(),
            ),
            Refusal::MustRefetch(refetch) => must_refetch(&refetch),
        }
    }
}

/// 410 `must-refetch`: the clock predates what the session keeps; fetch it whole.
pub fn must_refetch(refetch: &firemode_merge::MustRefetch) -> Problem {
    Problem::new(
        StatusCode::GONE,
        "must-refetch",
        "Fetch the whole session",
        refetch.to_string(),
    )
    .with(
        "horizon",
        serde_json::to_value(&refetch.horizon).unwrap_or_default(),
    )
}

impl From<BundleError> for Problem {
    fn from(e: BundleError) -> Problem {
        let detail = e.to_string();
        match e {
            BundleError::CatalogNotLoaded => Problem::unavailable(detail),
            BundleError::TooLarge { bytes, limit } => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bundle-too-large",
                "Offline bundle too large",
                detail,
            )
            .with("bundle_bytes", bytes)
            .with("max_bundle_bytes", limit),
            BundleError::Compressing(_) => Problem::internal(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn body(p: Problem) -> Value {
        serde_json::from_slice(&p.to_bytes()).expect("problem is JSON")
    }

    #[test]
    fn a_405_names_the_allowed_methods() {
        let r = method_not_allowed("GET, HEAD");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn errors_keep_their_answers() {
        let too_large = body(
            BundleError::TooLarge {
                bytes: 10,
                limit: 5,
            }
            .into(),
        );
        assert_eq!(too_large["status"], 422);
        assert_eq!(too_large["bundle_bytes"], 10);
        assert_eq!(too_large["max_bundle_bytes"], 5);
        assert_eq!(too_large["detail"], "the bundle for this session would be 10 bytes, over sync.max_bundle_bytes (5); split the session or raise the limit");
        let missing = body(CallerError::Missing.into());
        assert_eq!(missing["status"], 401);
        assert_eq!(
            body(KeyError::Malformed.into())["detail"],
            "Idempotency-Key must be 1-255 visible ASCII characters"
        );
        let busy = body(merge_problem(StoreError::Busy("lock timeout".into())));
        assert_eq!(
            (busy["status"].as_u64(), busy["title"].as_str()),
            (Some(409), Some("Still in flight"))
        );
        let down = body(merge_problem(StoreError::Unavailable("down".into())));
        assert_eq!(down["status"], 503);
    }
}
