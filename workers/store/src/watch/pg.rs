//! The PostgreSQL side of session watching: the `NOTIFY` a merge sends, and the one
//! listening connection per process that turns notifications into kicks.
//!
//! The listener is its own connection (not from the pool: `LISTEN` belongs to a session),
//! opened on the first waiter and kept while the store is open. It also serves the
//! checkers' version reads, so a read is always made on a connection where `LISTEN` is in
//! force: a merge that the read missed has its notification coming. When the connection
//! fails (or does not answer a ping), it is opened again with backoff, and once `LISTEN`
//! is back every watched session re-reads, since notifications sent meanwhile are lost.

use super::{session_digest, Digest, Hub};
use crate::StoreError;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The channel every merge notifies and every listener listens on.
pub const CHANNEL: &str = "firemode_session_changed";

/// First wait before reconnecting; doubled per failure up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A listening connection is pinged this often, and dropped if a ping takes longer than
/// [`PING_TIMEOUT`] (a peer gone without a reset would otherwise hold it forever).
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// `sync_sessions.version` of one session, 0 when it has no applied batch.
const VERSION_SQL: &str = "SELECT version FROM sync_sessions
     WHERE tenant = $1 AND session_id = $2 AND version > 0";

/// Reads a session's version on `client` (typed: no prepare round trip).
pub(crate) async fn read_version(
    client: &Client,
    tenant: &str,
    session_id: &str,
) -> Result<i64, tokio_postgres::Error> {
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&tenant, Type::TEXT), (&session_id, Type::TEXT)];
    let row = client.query_typed_opt(VERSION_SQL, &params).await?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// The payload naming a session: its digest in hex (32 ASCII bytes, whatever the tenant).
fn payload(digest: &Digest) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_payload(payload: &str) -> Option<Digest> {
    let bytes = payload.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut digest = [0u8; 16];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        digest[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(digest)
}

/// Sends the session's notification in the merge's transaction: one per committed merge,
/// whatever the number of waiters on any host. Run it beside the merge's writes (pipelined);
/// it is delivered at commit and dropped with a rollback.
pub(crate) async fn notify_changed(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    session_id: &str,
) -> Result<(), tokio_postgres::Error> {
    let payload = payload(&session_digest(tenant, session_id));
    tx.query_typed(
        "SELECT 1 FROM pg_notify($1, $2)",
        &[(&CHANNEL, Type::TEXT), (&payload, Type::TEXT)],
    )
    .await
    .map(drop)
}

/// The state of the listening connection.
#[derive(Clone)]
enum ListenState {
    /// Not started, or an attempt is under way.
    Connecting,
    /// `LISTEN` is in force on this client.
    Up(Arc<Client>),
    /// The last attempt failed or the connection dropped; another comes after a backoff.
    Down(Arc<str>),
}

/// The listening connection of one store (one per process in production).
pub(crate) struct Listener {
    config: tokio_postgres::Config,
    state: watch::Sender<ListenState>,
    task: Mutex<Option<JoinHandle<()>>>,
    connects: Arc<AtomicU64>,
}

impl Listener {
    /// Nothing connects until [`Listener::ensure_started`].
    pub(crate) fn new(url: &str, connect_timeout: Duration) -> Result<Listener, StoreError> {
        let mut config: tokio_postgres::Config = url.trim().parse().map_err(|e| {
            StoreError::Config(format!(
                "database.url is not a valid PostgreSQL connection string: {e}"
            ))
        })?;
        config.application_name("firemode-watch");
        config.connect_timeout(connect_timeout);
        Ok(Listener {
            config,
            state: watch::Sender::new(ListenState::Connecting),
            task: Mutex::new(None),
            connects: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Starts the listening task unless it runs (it stops only with the store, or with the
    /// runtime it was started on, after which the next waiter starts it again).
    pub(crate) fn ensure_started(&self, hub: &Arc<Hub>) {
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.state.send_replace(ListenState::Connecting);
        *task = Some(tokio::spawn(listen(
            Arc::downgrade(hub),
            self.config.clone(),
            self.connects.clone(),
        )));
    }

    /// Reads a session's version on the listening connection, waiting for it to be up; an
    /// attempt that fails meanwhile is the error.
    pub(crate) async fn read_version(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<i64, StoreError> {
        let mut state = self.state.subscribe();
        let mut first = true;
        let client = loop {
            match &*state.borrow_and_update() {
                ListenState::Up(client) => break client.clone(),
                ListenState::Down(e) if !first => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot listen for session changes: {e}"
                    )))
                }
                _ => {}
            }
            first = false;
            if state.changed().await.is_err() {
                return Err(StoreError::Unavailable("the store is closing".into()));
            }
        };
        read_version(&client, tenant, session_id)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    fn publish(&self, state: ListenState) {
        self.state.send_replace(state);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// Aborts a task when dropped (the connection driver dies with its listener).
struct AbortOnDrop(JoinHandle<String>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The listening task: connects, listens until the connection fails, waits, again. Ends
/// when the store is gone.
async fn listen(hub: Weak<Hub>, config: tokio_postgres::Config, connects: Arc<AtomicU64>) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let (was_up, why) = connection(&hub, &config, &connects).await;
        let Some(h) = hub.upgrade() else { return };
        tracing::warn!(error = %why, "the session-change listener lost PostgreSQL; reconnecting");
        if let Some(listener) = h.listener() {
            listener.publish(ListenState::Down(why.into()));
        }
        drop(h);
        if was_up {
            backoff = RECONNECT_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
        let Some(h) = hub.upgrade() else { return };
        if let Some(listener) = h.listener() {
            listener.publish(ListenState::Connecting);
        }
    }
}

/// One listening connection, from connect to failure: returns whether `LISTEN` was ever in
/// force on it, and why it ended.
async fn connection(
    hub: &Weak<Hub>,
    config: &tokio_postgres::Config,
    connects: &AtomicU64,
) -> (bool, String) {
    let (client, conn) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => return (false, e.to_string()),
    };
    let client = Arc::new(client);
    let mut driver = AbortOnDrop(tokio::spawn(drive(conn, hub.clone())));
    let was_up = AtomicBool::new(false);
    let why = tokio::select! {
        ended = &mut driver.0 => ended.unwrap_or_else(|e| e.to_string()),
        served = serve(hub, &client, connects, &was_up) => match served {
            Err(why) => why,
            Ok(never) => match never {},
        },
    };
    (was_up.load(Ordering::Relaxed), why)
}

/// On a fresh connection (driven elsewhere): `LISTEN`, publish it, make every watched
/// session re-read, then ping until a ping fails.
async fn serve(
    hub: &Weak<Hub>,
    client: &Arc<Client>,
    connects: &AtomicU64,
    was_up: &AtomicBool,
) -> Result<Infallible, String> {
    let listen = format!("LISTEN {CHANNEL}");
    tokio::time::timeout(PING_TIMEOUT, client.batch_execute(&listen))
        .await
        .map_err(|_| "LISTEN timed out".to_string())?
        .map_err(|e| e.to_string())?;
    connects.fetch_add(1, Ordering::Relaxed);
    was_up.store(true, Ordering::Relaxed);
    {
        let h = hub.upgrade().ok_or("the store is closed")?;
        if let Some(listener) = h.listener() {
            listener.publish(ListenState::Up(client.clone()));
        }
        // Notifications sent while no listener was up are lost: everyone re-reads.
        h.kick_all();
    }
    loop {
        tokio::time::sleep(PING_EVERY).await;
        tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1"))
            .await
            .map_err(|_| "no answer to a ping".to_string())?
            .map_err(|e| e.to_string())?;
    }
}

/// Drives the connection and hands each notification to the hub; returns why it ended.
async fn drive(
    mut conn: tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    hub: Weak<Hub>,
) -> String {
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                let Some(hub) = hub.upgrade() else {
                    return "the store is closed".into();
                };
                match parse_payload(n.payload()) {
                    Some(digest) => hub.kick_digest(&digest),
                    // Not ours to read (another release?): waking everyone is safe.
                    None => hub.kick_all(),
                }
            }
            Some(Ok(_notice)) => {}
            Some(Err(e)) => return e.to_string(),
            None => return "the server closed the connection".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_is_short_whatever_the_tenant() {
        let tenant = "org:ü日本".repeat(100);
        let digest = session_digest(&tenant, "s-1");
        let text = payload(&digest);
        assert_eq!(text.len(), 32);
        assert_eq!(parse_payload(&text), Some(digest));
        assert_ne!(digest, session_digest(&tenant, "s-2"));
        assert_eq!(parse_payload("not a digest"), None);
        assert_eq!(parse_payload(&"zz".repeat(16)), None);
    }
}
