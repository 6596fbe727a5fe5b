//! The schema, as numbered migrations. Both backends apply the same list in order, each in
//! the transaction that also records it in `firemode_schema`.

/// (version, SQL). Append only; never edit a migration that has shipped.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE catalog_versions (
             version   TEXT PRIMARY KEY,
             body      TEXT NOT NULL,
             loaded_at BIGINT NOT NULL
         );
         CREATE TABLE catalog_current (
             id      INTEGER PRIMARY KEY CHECK (id = 1),
             version TEXT NOT NULL REFERENCES catalog_versions (version)
         );",
    ),
    (
        2,
        // One row per session: the merge state as JSON and a counter bumped by every
        // applied batch (the offline bundle's ETag). Idempotency records live beside it and
        // are written in the same transaction as the merge.
        "CREATE TABLE sync_sessions (
             tenant     TEXT NOT NULL,
             session_id TEXT NOT NULL,
             state      TEXT NOT NULL,
             version    BIGINT NOT NULL,
             updated_at BIGINT NOT NULL,
             PRIMARY KEY (tenant, session_id)
         );
         CREATE TABLE sync_idempotency (
             tenant       TEXT NOT NULL,
             subject      TEXT NOT NULL,
             idem_key     TEXT NOT NULL,
             request_hash TEXT NOT NULL,
             status       INTEGER NOT NULL,
             body         TEXT NOT NULL,
             created_at   BIGINT NOT NULL,
             PRIMARY KEY (tenant, subject, idem_key)
         );
         CREATE INDEX sync_idempotency_created ON sync_idempotency (created_at);",
    ),
    (
        3,
        // Merges on PostgreSQL used to lock a session through a placeholder row (version 0),
        // left behind by every refused first request; they lock an advisory key now.
        "DELETE FROM sync_sessions WHERE version = 0;",
    ),
    (
        4,
        // The conflict journal (design §3 "conflicts kept"): every conflict a merge reported,
        // written in the merge's transaction, numbered per session by `conflicts_seq` (kept
        // on the session row, so numbers never repeat after old rows are purged).
        "ALTER TABLE sync_sessions ADD COLUMN conflicts_seq BIGINT NOT NULL DEFAULT 0;
         CREATE TABLE sync_conflicts (
             tenant     TEXT NOT NULL,
             session_id TEXT NOT NULL,
             seq        BIGINT NOT NULL,
             entry      TEXT NOT NULL,
             at         BIGINT NOT NULL,
             PRIMARY KEY (tenant, session_id, seq)
         );
         CREATE INDEX sync_conflicts_at ON sync_conflicts (at);",
    ),
    (
        ROWS_LAYOUT,
        // A session as rows (`firemode_merge::rows`), so a merge reads and writes only what its
        // batch touches: `sync_sessions.state` becomes the small head, the compacted base gets
        // its own column, one row per register (keyed by its path's sortable key) and one per
        // applied event's stamp. The sessions kept as one value move over in the same
        // transaction ([`crate::legacy`]). Keys and replica ids are bytes: a JSON key may hold
        // any character, NUL included, which PostgreSQL's TEXT refuses.
        "ALTER TABLE sync_sessions ADD COLUMN base TEXT;
         CREATE TABLE sync_registers (
             tenant     TEXT NOT NULL,
             session_id TEXT NOT NULL,
             path_key   BYTEA NOT NULL,
             register   TEXT NOT NULL,
             PRIMARY KEY (tenant, session_id, path_key)
         );
         CREATE TABLE sync_stamps (
             tenant     TEXT NOT NULL,
             session_id TEXT NOT NULL,
             replica_id BYTEA NOT NULL,
             seq        BIGINT NOT NULL,
             stamp      BIGINT NOT NULL,
             PRIMARY KEY (tenant, session_id, replica_id, seq)
         );",
    ),
    (
        REGISTER_DOTS,
        // Each register row carries its dot and the dot of the hidden `set` a tombstone
        // remembers, indexed, so catching up reads only the registers new to a clock (and
        // what lies around them), not the whole session ([`crate::dots`] fills the rows an
        // older release wrote, in the same transaction, then builds the indexes
        // ([`REGISTER_DOTS_INDEXES`]) and refuses rows without dots).
        "ALTER TABLE sync_registers ADD COLUMN replica_id BYTEA;
         ALTER TABLE sync_registers ADD COLUMN seq BIGINT;
         ALTER TABLE sync_registers ADD COLUMN made_replica BYTEA;
         ALTER TABLE sync_registers ADD COLUMN made_seq BIGINT;",
    ),
];

/// The migration that gave register rows their dots: after it, each backend fills the dots of
/// the rows an older release wrote ([`crate::dots`]).
pub const REGISTER_DOTS: i64 = 6;

/// The indexes of [`REGISTER_DOTS`], built once its rows are filled (filling indexed rows
/// maintained both indexes row by row). The replica leads each index: an index starting
/// (tenant, session_id) was chosen by PostgreSQL, on a table not analysed yet, for the
/// merges' path-key ranges too (scanning the whole session for each: a 1,000-path merge
/// into a 5,000-path session took 8 s).
pub const REGISTER_DOTS_INDEXES: &str =
    "CREATE INDEX sync_registers_dot ON sync_registers (replica_id, tenant, session_id, seq);
     CREATE INDEX sync_registers_made ON sync_registers (made_replica, tenant, session_id, made_seq)
         WHERE made_replica IS NOT NULL;";

/// After [`REGISTER_DOTS`] filled every row: PostgreSQL refuses register rows without dots
/// (as a process of the release before writes them), so that process's merge fails and rolls
/// back instead of writing rows a catch-up by dots cannot find.
pub const REGISTER_DOTS_GUARD_POSTGRES: &str = "ALTER TABLE sync_registers
    ALTER COLUMN replica_id SET NOT NULL, ALTER COLUMN seq SET NOT NULL";

/// [`REGISTER_DOTS_GUARD_POSTGRES`] for SQLite, which cannot alter a column: a trigger.
pub const REGISTER_DOTS_GUARD_SQLITE: &str = "CREATE TRIGGER sync_registers_need_dots
    BEFORE INSERT ON sync_registers
    WHEN NEW.seq IS NULL OR NEW.replica_id IS NULL
    BEGIN
        SELECT RAISE(ABORT, 'register rows need their dots: this process runs a release older than the database schema');
    END";

/// The migration that moved sessions to rows: after it, each backend converts the sessions an
/// older release kept as one value ([`crate::legacy`]).
pub const ROWS_LAYOUT: i64 = 5;

/// Creates the bookkeeping table; run before reading which migrations are applied.
pub const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS firemode_schema (
    version    BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";

/// The newest schema version this binary knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Refuses a database that a newer release has migrated past [`latest_version`].
pub fn refuse_newer(applied: Option<i64>) -> Result<(), crate::StoreError> {
    match applied {
        Some(found) if found > latest_version() => Err(crate::StoreError::SchemaTooNew {
            found,
            known: latest_version(),
        }),
        _ => Ok(()),
    }
}
