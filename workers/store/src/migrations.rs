//! The schema, as numbered migrations. Both backends apply the same list in order, each in
//! the transaction that also records it in `firemode_schema`.

/// (version, SQL). Append only; never edit a migration that has shipped.
pub const MIGRATIONS: &[(i64, &str)] = &[(
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
)];

/// Creates the bookkeeping table; run before reading which migrations are applied.
pub const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS firemode_schema (
    version    BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";
