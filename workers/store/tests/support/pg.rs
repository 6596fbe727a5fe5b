//! One throwaway PostgreSQL database per test (as `tests/src/pg.rs` of the black-box
//! suite does), so tests run in parallel: `TEST_DATABASE_URL` names the server.

use tokio_postgres::NoTls;

const DEFAULT_SERVER: &str = "host=127.0.0.1 user=postgres dbname=postgres";

/// A database created for one test and dropped (with its connections) when this is dropped.
pub struct PgDatabase {
    pub name: String,
    /// Connection string for the new database (key=value form).
    pub url: String,
    server: String,
}

fn server() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_string())
}

/// Creates a fresh database, or `None` (after a loud message) when no server is reachable
/// outside CI. In CI (`CI` set) an unreachable server fails the test.
pub async fn pg_database() -> Option<PgDatabase> {
    let server = server();
    let client = match tokio_postgres::connect(&server, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL tests must run in CI, but {server:?} is unreachable: {e}");
            }
            eprintln!(
                "\n!!! SKIPPING PostgreSQL test: cannot connect to {server:?} ({e}).\n\
                 !!! Start PostgreSQL or set TEST_DATABASE_URL to a server where this user may CREATE DATABASE.\n"
            );
            return None;
        }
    };
    let name = format!("fm_watch_{}", super::unique());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE on {server:?}: {e}"));
    let url = replace_dbname(&server, &name);
    Some(PgDatabase { name, url, server })
}

fn replace_dbname(server: &str, name: &str) -> String {
    if server.contains("://") {
        let (base, query) = match server.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (server, None),
        };
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let base = match base[scheme_end..].find('/') {
            Some(i) => &base[..scheme_end + i],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{name}?{q}"),
            None => format!("{base}/{name}"),
        }
    } else {
        let mut parts: Vec<String> = server
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .map(str::to_string)
            .collect();
        parts.push(format!("dbname={name}"));
        parts.join(" ")
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs outside async: a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&server, NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
            .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join();
    }
}
