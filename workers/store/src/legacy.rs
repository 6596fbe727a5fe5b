//! Sessions an older release kept as one JSON value (`sync_sessions.state` held the whole
//! merge state), moved to rows by the migration that introduced them
//! ([`crate::migrations::ROWS_LAYOUT`]), inside that migration's transaction.
//!
//! A value that does not load is left as it is and logged: its session keeps answering
//! "unreadable" (HTTP 500) as it did before the upgrade, and every other session moves on.

use firemode_merge::{RowChanges, SessionState};

/// The rows of a session kept as one value, or why it does not load.
pub(crate) fn to_rows(state: &str) -> Result<RowChanges, String> {
    serde_json::from_str::<SessionState>(state)
        .map(|session| session.all_rows())
        .map_err(|e| e.to_string())
}

/// Logs a session left as it was.
pub(crate) fn left_unconverted(tenant: &str, session_id: &str, why: &str) {
    tracing::error!(
        tenant,
        session_id,
        error = why,
        "a stored session does not load and was left in the older layout; it answers 500 until restored from a backup"
    );
}
