//! RFC 9457 problem details: `{"type","title","status","detail", ...extensions}`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Map, Value};

/// A problem response body. `kind` becomes the `type` URI `tag:firemode,2026:problem/<kind>`,
/// a stable identifier clients can match on.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub extensions: Map<String, Value>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(flatten)]
    extensions: &'a Map<String, Value>,
}

/// Prefix of every problem `type` FireMode sends.
pub const TYPE_PREFIX: &str = "tag:firemode,2026:problem/";

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            extensions: Map::new(),
        }
    }

    /// Adds a member beside the standard ones (e.g. `allowed_conditions`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.into(), value.into());
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
    }

    pub fn to_bytes(&self) -> Bytes {
        let body = Body {
            type_: format!("{TYPE_PREFIX}{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            extensions: &self.extensions,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The full response, `Content-Type: application/problem+json`; a 503 says
    /// `Retry-After: 1` (a busy or unreachable store: worth trying again shortly; the front
    /// sets its own figure on the 503s it makes).
    pub fn into_response<B: From<Full<Bytes>>>(self) -> Response<B> {
        let mut resp = Response::new(B::from(Full::new(self.to_bytes())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::PROBLEM_JSON),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_says_when_to_retry() {
        let resp: Response<Full<Bytes>> = Problem::unavailable("busy").into_response();
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        let resp: Response<Full<Bytes>> = Problem::bad_request("no").into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn body_has_the_standard_members_and_extensions() {
        let p = Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown-condition",
            "Unknown condition",
            "x",
        )
        .with("allowed_conditions", vec!["a", "b"]);
        let v: Value = serde_json::from_slice(&p.to_bytes()).unwrap();
        assert_eq!(v["type"], "tag:firemode,2026:problem/unknown-condition");
        assert_eq!(v["status"], 422);
        assert_eq!(v["title"], "Unknown condition");
        assert_eq!(v["detail"], "x");
        assert_eq!(v["allowed_conditions"][1], "b");
    }
}
