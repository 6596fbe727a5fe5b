//! The paths of the sessions API (`/v1/tests/sessions/{id}[/resource]`), parsed in one
//! place for the front (which names a request by its template) and the sync worker (which
//! serves it). Pure: a path in, the session id and the resource out. The id is not checked
//! here (`ids::is_valid_session_id` is the worker's 400); the query string is not part of
//! the path.
//!
//! A new resource under a session is one [`SessionResource`] variant, its suffix in
//! [`SessionResource::from_suffix`] and its template in [`SessionResource::template`].

/// Every sessions-API path starts with this.
pub const SESSIONS_PREFIX: &str = "/v1/tests/sessions/";

/// What a path under one session names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionResource {
    /// `/v1/tests/sessions/{id}`: the merged document and its clock.
    Document,
    /// `/v1/tests/sessions/{id}/results`: where batches are posted.
    Results,
    /// `/v1/tests/sessions/{id}/offline_bundle`: session + catalog for offline work.
    OfflineBundle,
    /// `/v1/tests/sessions/{id}/changes`: what changed since a clock (long-poll).
    Changes,
    /// `/v1/tests/sessions/{id}/conflicts`: the conflict journal.
    Conflicts,
}

impl SessionResource {
    /// The resource a path's part after `{id}` names (`None`: nothing after the id).
    fn from_suffix(suffix: Option<&str>) -> Option<SessionResource> {
        match suffix {
            None => Some(SessionResource::Document),
            Some("results") => Some(SessionResource::Results),
            Some("offline_bundle") => Some(SessionResource::OfflineBundle),
            Some("changes") => Some(SessionResource::Changes),
            Some("conflicts") => Some(SessionResource::Conflicts),
            Some(_) => None,
        }
    }

    /// The route template logs and metrics name a request by (never the raw path).
    pub fn template(self) -> &'static str {
        match self {
            SessionResource::Document => "/v1/tests/sessions/{id}",
            SessionResource::Results => "/v1/tests/sessions/{id}/results",
            SessionResource::OfflineBundle => "/v1/tests/sessions/{id}/offline_bundle",
            SessionResource::Changes => "/v1/tests/sessions/{id}/changes",
            SessionResource::Conflicts => "/v1/tests/sessions/{id}/conflicts",
        }
    }
}

/// A parsed sessions-API path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionPath<'a> {
    /// The session id as it appears in the path (possibly empty or invalid).
    pub id: &'a str,
    pub resource: SessionResource,
}

impl<'a> SessionPath<'a> {
    /// The session and resource a path names; `None` when the path is not under
    /// [`SESSIONS_PREFIX`] or names no known resource there (both are 404s).
    pub fn parse(path: &'a str) -> Option<SessionPath<'a>> {
        let rest = path.strip_prefix(SESSIONS_PREFIX)?;
        let (id, suffix) = match rest.split_once('/') {
            None => (rest, None),
            Some((id, suffix)) => (id, Some(suffix)),
        };
        Some(SessionPath {
            id,
            resource: SessionResource::from_suffix(suffix)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Option<(&str, SessionResource)> {
        SessionPath::parse(path).map(|p| (p.id, p.resource))
    }

    #[test]
    fn session_paths() {
        use SessionResource::*;
        assert_eq!(parse("/v1/tests/sessions/S1"), Some(("S1", Document)));
        assert_eq!(
            parse("/v1/tests/sessions/S1/results"),
            Some(("S1", Results))
        );
        assert_eq!(
            parse("/v1/tests/sessions/S1/offline_bundle"),
            Some(("S1", OfflineBundle))
        );
        assert_eq!(parse("/v1/tests/sessions/"), Some(("", Document)));
        assert_eq!(parse("/v1/tests/sessions//results"), Some(("", Results)));
        assert_eq!(parse("/v1/tests/sessions/S1/other"), None);
        assert_eq!(parse("/v1/tests/sessions/S1/results/x"), None);
        assert_eq!(parse("/v1/tests/sessions/S1/"), None);
        assert_eq!(parse("/v1/tests/sessions"), None);
        assert_eq!(parse("/v1/classify"), None);
    }

    #[test]
    fn templates() {
        assert_eq!(
            SessionResource::Results.template(),
            "/v1/tests/sessions/{id}/results"
        );
        assert_eq!(
            SessionResource::Document.template(),
            "/v1/tests/sessions/{id}"
        );
    }
}
