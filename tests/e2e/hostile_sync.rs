//! Hostile clients of the sync worker (issue #11: items 3, 11, 12, 13 and parts of 14), through
//! the real front with real tokens, on SQLite and on PostgreSQL where the store matters.

use firemode_tests::{eventually, pg_database, request, token, Reply, SystemOptions, TestSystem};
use http::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

async fn post_raw(
    front: SocketAddr,
    tok: &str,
    session: &str,
    key: &str,
    body: impl Into<bytes::Bytes>,
) -> Reply {
    let auth = format!("Bearer {tok}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", key),
    ];
    let path = format!("/v1/tests/sessions/{session}/results");
    request(front, Method::POST, &path, &headers, body)
        .await
        .expect("the front answers")
}

pub(crate) async fn post(
    front: SocketAddr,
    tok: &str,
    session: &str,
    key: &str,
    body: &Value,
) -> Reply {
    post_raw(front, tok, session, key, body.to_string()).await
}

pub(crate) async fn call(
    front: SocketAddr,
    method: Method,
    tok: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let auth = format!("Bearer {tok}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    request(front, method, path, &headers, "")
        .await
        .expect("the front answers")
}

pub(crate) fn batch(replica: &str, clock: Value, changes: Vec<Value>) -> Value {
    json!({"changes": changes, "_sync_meta": {"vector_clock": clock, "replica_id": replica}})
}

pub(crate) fn set(path: &str, value: Value) -> Value {
    json!({"op": "set", "path": path, "value": value})
}

pub(crate) fn ok(reply: &Reply) -> Value {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()
}

pub(crate) async fn start(
    database_url: Option<String>,
    set: Vec<(&'static str, toml::Value)>,
) -> TestSystem {
    TestSystem::start(SystemOptions {
        database_url,
        set,
        ..SystemOptions::default()
    })
    .await
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("worker status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub(crate) async fn sync_pid(sys: &TestSystem) -> u32 {
    let instances = sys.instances("sync").await;
    instances[0]["pid"].as_u64().expect("a sync pid") as u32
}

async fn conflicts_metric(sys: &TestSystem) -> f64 {
    sys.metric_sum("crdt_conflicts_total").await
}

// ---- item 3: one request's work is bounded by its size ----

/// Batch A sets `/x/0`…`/x/999`; batch B (about 41 KB) writes `/x` a thousand times with an
/// old timestamp, so every write meets the thousand newer writes below it: a million
/// conflicts. The answer lists `sync.max_conflicts_reported` of them and counts them all.
async fn check_a_million_conflicts_stay_small(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let below = (0..1000)
        .map(|i| set(&format!("/x/{i}"), json!(i)))
        .collect();
    ok(&post(f, &t, "BIG", "a-1", &batch("A", json!({"A": 1}), below)).await);
    let over: Vec<Value> = (0..1000).map(|i| set("/x", json!(i))).collect();
    let mut b = batch("B", json!({"B": 1}), over);
    b["_sync_meta"]["timestamp"] = json!(0);
    let pid = sync_pid(sys).await;
    let rss_before = proc_kib(pid, "VmRSS");
    let metric_before = conflicts_metric(sys).await;

    let reply = post(f, &t, "BIG", "b-1", &b).await;
    let body = ok(&reply);
    assert!(
        reply.body.len() < 2 << 20,
        "answer of {} bytes",
        reply.body.len()
    );
    assert_eq!(body["conflicts"].as_array().map(Vec::len), Some(100));
    assert_eq!(body["conflicts_total"], 1_000_000);
    assert_eq!(body["applied"], 1000);
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(rss_before);
    assert!(
        growth_kib < 100 * 1024,
        "the worker's peak RSS grew by {growth_kib} KiB"
    );
    let metric = conflicts_metric(sys).await;
    assert_eq!(
        metric - metric_before,
        1_000_000.0,
        "crdt_conflicts_total counts every pair"
    );

    // The journal keeps every listed conflict and more, within its budget (8 × the answer's).
    let kept = journal(sys, &t, "BIG").await;
    assert!(
        (1_000..20_000).contains(&kept.len()),
        "{} journal entries",
        kept.len()
    );
    // Within its stated bound: 8 × the answer's budget (64 KiB here) as stored, without
    // the `seq` the store adds.
    let stored_bytes: usize = kept
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.as_object_mut().map(|o| o.remove("seq"));
            c.to_string().len()
        })
        .sum();
    assert!(stored_bytes <= 8 * 64 * 1024, "{stored_bytes} bytes kept");
    let sides = |c: &Value| (c["winner"]["path"].clone(), c["loser"]["value"].clone());
    assert_eq!(
        kept[..100].iter().map(sides).collect::<Vec<_>>(),
        body["conflicts"]
            .as_array()
            .map(|l| l.iter().map(sides).collect::<Vec<_>>())
            .unwrap_or_default(),
        "the answer lists the journal's first entries"
    );

    // The idempotency record is the small answer, replayed as is.
    let again = post(f, &t, "BIG", "b-1", &b).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, reply.body);
    // The newer writes below /x survive.
    let doc = ok(&call(f, Method::GET, &t, "/v1/tests/sessions/BIG", &[]).await);
    assert_eq!(
        doc["document"]["x"].as_object().map(|o| o.len()),
        Some(1000)
    );
}

#[tokio::test]
async fn a_million_conflicts_stay_small_sqlite() {
    let sys = start(None, vec![]).await;
    check_a_million_conflicts_stay_small(&sys).await;
}

#[tokio::test]
async fn a_million_conflicts_stay_small_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_a_million_conflicts_stay_small(&sys).await;
}

/// Every journal entry of a session, page by page.
async fn journal(sys: &TestSystem, t: &str, session: &str) -> Vec<Value> {
    let (mut entries, mut after) = (Vec::new(), 0);
    loop {
        let path = format!("/v1/tests/sessions/{session}/conflicts?after={after}&limit=1000");
        let page = ok(&call(sys.front, Method::GET, t, &path, &[]).await);
        let list = page["conflicts"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return entries;
        }
        after = page["next"].as_u64().expect("next");
        entries.extend(list);
    }
}

/// Two tablets fill in the same 300 fields offline: the second push lists 100 conflicts
/// (`sync.max_conflicts_reported`) and the journal keeps all 300, so the tablet whose writes
/// lost learns of each.
async fn check_every_conflict_is_journaled(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let fields = |value: &str| {
        (0..300)
            .map(|i| set(&format!("/item-{i}/result"), json!(value)))
            .collect()
    };
    ok(&post(
        f,
        &t,
        "FIELDS",
        "a-1",
        &batch("A", json!({"A": 1}), fields("pass")),
    )
    .await);
    let body = ok(&post(
        f,
        &t,
        "FIELDS",
        "b-1",
        &batch("B", json!({"B": 1}), fields("fail")),
    )
    .await);
    assert_eq!(body["conflicts_total"], 300);
    assert_eq!(body["conflicts"].as_array().map(Vec::len), Some(100));
    let kept = journal(sys, &t, "FIELDS").await;
    assert_eq!(kept.len(), 300);
    let mut paths: Vec<&str> = kept.iter().filter_map(|c| c["path"].as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), 300, "one entry per field");
}

#[tokio::test]
async fn every_conflict_is_journaled_sqlite() {
    let sys = start(None, vec![]).await;
    check_every_conflict_is_journaled(&sys).await;
}

#[tokio::test]
async fn every_conflict_is_journaled_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_every_conflict_is_journaled(&sys).await;
}

/// A thousand writes 64 levels deep (a 166 KB batch, a 389 KB document of 63,000 one-key
/// objects): merging it, reading the document and catching up from nothing. The worker's
/// peak RSS grew by ~105 MiB when every object was a `serde_json::Map` (a B-tree node each),
/// 38–60 MiB since (heap peak ~11 MB; the rest is the allocator's per-thread pages: the merge
/// takes 35–42 MiB, and the whole read after it adds 0–19 MiB depending on which threads run
/// it; beside the rest of the suite it once passed 64 MiB). The bound catches the old cost.
async fn check_deep_paths_stay_small(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let deep = "/k".repeat(63);
    let changes = (0..1000)
        .map(|i| set(&format!("/p{i}{deep}"), json!(i)))
        .collect();
    let pid = sync_pid(sys).await;
    let rss_before = proc_kib(pid, "VmRSS");
    ok(&post(f, &t, "DEEP", "a-1", &batch("A", json!({"A": 1}), changes)).await);
    let reply = call(f, Method::GET, &t, "/v1/tests/sessions/DEEP", &[]).await;
    let doc = ok(&reply);
    assert_eq!(doc["document"].as_object().map(|o| o.len()), Some(1000));
    let since = "/v1/tests/sessions/DEEP/changes?since=%7B%7D";
    let changes = ok(&call(f, Method::GET, &t, since, &[]).await);
    assert_eq!(changes["changes"].as_array().map(Vec::len), Some(1000));
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(rss_before);
    eprintln!("1,000 writes 64 deep: peak RSS +{growth_kib} KiB");
    assert!(
        growth_kib < 80 * 1024,
        "the worker's peak RSS grew by {growth_kib} KiB for a {} byte document",
        reply.body.len()
    );
}

#[tokio::test]
async fn deep_paths_stay_small_sqlite() {
    let sys = start(None, vec![]).await;
    check_deep_paths_stay_small(&sys).await;
}

#[tokio::test]
async fn deep_paths_stay_small_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_deep_paths_stay_small(&sys).await;
}

/// The changes of session `SITE` since `since` (a clock as JSON), and by how much they grew
/// the sync worker `pid`'s peak RSS (`clear_refs` 5 resets VmHWM to the current RSS).
async fn catch_up_growth(sys: &TestSystem, pid: u32, since: Value, what: &str) -> (Reply, u64) {
    let t = token("tab-a", Some("acme"));
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let before = proc_kib(pid, "VmRSS");
    let since: String = form_urlencoded::byte_serialize(since.to_string().as_bytes()).collect();
    let path = format!("/v1/tests/sessions/SITE/changes?since={since}");
    let started = std::time::Instant::now();
    let reply = call(sys.front, Method::GET, &t, &path, &[]).await;
    let elapsed = started.elapsed();
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("{what} on 20,000 paths: peak RSS +{growth_kib} KiB in {elapsed:?}");
    (reply, growth_kib)
}

/// A tablet one change behind on a 20,000-path session pays for what it missed: the catch-up
/// reads the registers around the new one (found by their dots), not the session, whose
/// whole read grew the worker's peak RSS by ~32 MiB (attack round 3: 37 → 69 MiB). So does
/// one that missed a `set` and its removal, or new paths 64 deep.
async fn check_one_change_behind_costs_what_it_missed(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let batches = 20;
    for i in 1..=batches {
        let changes = (0..1000)
            .map(|n| set(&format!("/item-{i}-{n}/result"), json!(n)))
            .collect();
        let key = format!("a-{i}");
        ok(&post(f, &t, "SITE", &key, &batch("A", json!({"A": i}), changes)).await);
    }
    let last = batch(
        "B",
        json!({"B": 1}),
        vec![set("/item-7-7/result", json!("fail"))],
    );
    ok(&post(f, &t, "SITE", "b-1", &last).await);
    let pid = sync_pid(sys).await;
    let what = "one change behind";
    let (reply, growth_kib) = catch_up_growth(sys, pid, json!({"A": batches}), what).await;
    assert_eq!(
        ok(&reply)["changes"],
        json!([{"op": "set", "path": "/item-7-7/result", "value": "fail"}])
    );
    assert!(reply.body.len() < 4096, "{} bytes", reply.body.len());
    assert!(growth_kib < 8 * 1024, "{what}: +{growth_kib} KiB");

    // A draft written and discarded while the tablet was away (attack round 4, F3: this read
    // the whole session, +32 MiB, to learn that the draft's parent still exists; the
    // tombstone the removal leaves says so itself).
    let draft = vec![set("/item-3-3/notes/draft", json!("x"))];
    ok(&post(f, &t, "SITE", "b-2", &batch("B", json!({"B": 2}), draft)).await);
    let discard = vec![json!({"op": "remove", "path": "/item-3-3/notes/draft"})];
    ok(&post(f, &t, "SITE", "b-3", &batch("B", json!({"B": 3}), discard)).await);
    let what = "a missed set and remove";
    let since = json!({"A": batches, "B": 1});
    let (reply, growth_kib) = catch_up_growth(sys, pid, since, what).await;
    assert_eq!(
        ok(&reply)["changes"],
        json!([
            {"op": "set", "path": "/item-3-3/notes/draft", "value": null},
            {"op": "remove", "path": "/item-3-3/notes/draft"}
        ])
    );
    assert!(growth_kib < 8 * 1024, "{what}: +{growth_kib} KiB");

    // The same draft, then the whole item removed: one removal answers it all.
    let draft = vec![set("/item-5-5/notes/draft", json!("x"))];
    ok(&post(f, &t, "SITE", "b-4", &batch("B", json!({"B": 4}), draft)).await);
    let discard = vec![json!({"op": "remove", "path": "/item-5-5/notes/draft"})];
    ok(&post(f, &t, "SITE", "b-5", &batch("B", json!({"B": 5}), discard)).await);
    let gone = vec![json!({"op": "remove", "path": "/item-5-5"})];
    ok(&post(f, &t, "SITE", "b-6", &batch("B", json!({"B": 6}), gone)).await);
    let what = "a missed set and remove, then its item removed";
    let since = json!({"A": batches, "B": 3});
    let (reply, growth_kib) = catch_up_growth(sys, pid, since, what).await;
    assert_eq!(
        ok(&reply)["changes"],
        json!([{"op": "remove", "path": "/item-5-5"}])
    );
    assert!(growth_kib < 8 * 1024, "{what}: +{growth_kib} KiB");

    // 66 new paths 64 deep: 4,158 parents to look up (attack round 4, F3: past 4,096
    // lookups this read the whole session, +45 MiB).
    let mut deep: Vec<Value> = (0..66)
        .map(|i| set(&format!("/deep-{i}{}/leaf", "/d".repeat(62)), json!(i)))
        .collect();
    ok(&post(
        f,
        &t,
        "SITE",
        "b-7",
        &batch("B", json!({"B": 7}), deep.clone()),
    )
    .await);
    let what = "66 new paths 64 deep";
    let since = json!({"A": batches, "B": 6});
    let (reply, growth_kib) = catch_up_growth(sys, pid, since, what).await;
    let mut answered = ok(&reply)["changes"].as_array().expect("changes").clone();
    answered.sort_by_key(|c| c["path"].as_str().map(str::to_owned));
    deep.sort_by_key(|c| c["path"].as_str().map(str::to_owned));
    assert_eq!(answered, deep);
    assert!(growth_kib < 8 * 1024, "{what}: +{growth_kib} KiB");

    // A hundred tablets at a hundred clocks catch up on those deep paths at once (attack round
    // 5: +115 MiB, ~1 MiB per catch-up in flight, most of it mimalloc keeping what each thread
    // had freed; with the system allocator +8 MiB in a release build, +2-3 MiB here against
    // +21-30 with mimalloc).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let before = proc_kib(pid, "VmRSS");
    let mut catch_ups = tokio::task::JoinSet::new();
    for k in 0..100 {
        let (front, t) = (f, t.clone());
        let since = json!({"A": batches, "B": 6, format!("tab-{k}"): 0}).to_string();
        let since: String = form_urlencoded::byte_serialize(since.as_bytes()).collect();
        let path = format!("/v1/tests/sessions/SITE/changes?since={since}");
        catch_ups.spawn(async move { call(front, Method::GET, &t, &path, &[]).await });
    }
    while let Some(reply) = catch_ups.join_next().await {
        let reply = reply.expect("a catch-up task");
        assert_eq!(ok(&reply)["changes"].as_array().map(Vec::len), Some(66));
    }
    let growth_kib = proc_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("100 catch-ups at once of 66 paths 64 deep: peak RSS +{growth_kib} KiB");
    assert!(
        growth_kib < 16 * 1024,
        "100 deep catch-ups: +{growth_kib} KiB"
    );
}

/// A tablet that missed both a `set` and the removal of what it set gets the parents the
/// `set` made (design §3: `set /a/b 1`, `remove /a/b` reads `{"a":{}}`), whether the answer
/// comes from the registers around the new ones or (here: which parents still exist depends
/// on their children) from the whole session.
async fn check_missed_set_and_remove(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let first = batch("A", json!({"A": 1}), vec![set("/keep", json!(1))]);
    ok(&post(f, &t, "GONE", "g-1", &first).await);
    let made = batch("A", json!({"A": 2}), vec![set("/a/b/c", json!(1))]);
    ok(&post(f, &t, "GONE", "g-2", &made).await);
    let removed = batch(
        "A",
        json!({"A": 3}),
        vec![json!({"op": "remove", "path": "/a/b/c"})],
    );
    ok(&post(f, &t, "GONE", "g-3", &removed).await);
    let since: String =
        form_urlencoded::byte_serialize(json!({"A": 1}).to_string().as_bytes()).collect();
    let path = format!("/v1/tests/sessions/GONE/changes?since={since}");
    let body = ok(&call(f, Method::GET, &t, &path, &[]).await);
    let mut document = json!({"keep": 1});
    for change in body["changes"].as_array().expect("changes") {
        let tokens: Vec<&str> = change["path"].as_str().expect("path")[1..]
            .split('/')
            .collect();
        let (last, parents) = tokens.split_last().expect("a token");
        let mut node = &mut document;
        for token in parents {
            if !node[*token].is_object() {
                node[*token] = json!({});
            }
            node = &mut node[*token];
        }
        if change["op"] == "set" {
            node[*last] = change["value"].clone();
        } else if let Some(object) = node.as_object_mut() {
            object.remove(*last);
        }
    }
    let whole = ok(&call(f, Method::GET, &t, "/v1/tests/sessions/GONE", &[]).await);
    assert_eq!(whole["document"], json!({"keep": 1, "a": {"b": {}}}));
    assert_eq!(document, whole["document"], "changes {}", body["changes"]);
}

#[tokio::test]
async fn a_missed_set_and_remove_leave_their_parents_sqlite() {
    let sys = start(None, vec![]).await;
    check_missed_set_and_remove(&sys).await;
}

#[tokio::test]
async fn a_missed_set_and_remove_leave_their_parents_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_missed_set_and_remove(&sys).await;
}

#[tokio::test]
async fn one_change_behind_costs_what_it_missed_sqlite() {
    let sys = start(None, vec![]).await;
    check_one_change_behind_costs_what_it_missed(&sys).await;
}

#[tokio::test]
async fn one_change_behind_costs_what_it_missed_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_one_change_behind_costs_what_it_missed(&sys).await;
}

#[tokio::test]
async fn the_conflict_cap_is_configurable() {
    let sys = start(None, vec![("sync.max_conflicts_reported", 2.into())]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let below = (0..5).map(|i| set(&format!("/y/{i}"), json!(i))).collect();
    ok(&post(f, &t, "CAP", "a-1", &batch("A", json!({"A": 1}), below)).await);
    let mut b = batch("B", json!({"B": 1}), vec![set("/y", json!(0))]);
    b["_sync_meta"]["timestamp"] = json!(0);
    let body = ok(&post(f, &t, "CAP", "b-1", &b).await);
    assert_eq!(body["conflicts"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["conflicts_total"], 5);
}

/// A hundred conflicts against one large value would repeat it a hundred times: the listed
/// conflicts stay within a small multiple of the request, and all are counted.
#[tokio::test]
async fn a_large_value_is_not_repeated_in_conflicts() {
    let sys = start(None, vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let big = "v".repeat(500_000);
    ok(&post(
        f,
        &t,
        "LARGE",
        "a-1",
        &batch("A", json!({"A": 1}), vec![set("/x", json!(big))]),
    )
    .await);
    let over: Vec<Value> = (0..1000).map(|i| set("/x", json!(i))).collect();
    let mut b = batch("B", json!({"B": 1}), over);
    b["_sync_meta"]["timestamp"] = json!(0);
    let reply = post(f, &t, "LARGE", "b-1", &b).await;
    let body = ok(&reply);
    assert!(
        reply.body.len() < 256 << 10,
        "answer of {} bytes",
        reply.body.len()
    );
    assert_eq!(body["conflicts_total"], 1000);
    assert_eq!(
        body["applied"], 0,
        "every older write lost to the large one"
    );
}

// ---- item 11: a replica id belongs to the user who first wrote with it ----

async fn check_replicas_belong_to_their_first_user(sys: &TestSystem) {
    let f = sys.front;
    let (alice, mallory) = (token("alice", Some("acme")), token("mallory", Some("acme")));
    let first = batch("tab-A", json!({"tab-A": 1}), vec![set("/a", json!(1))]);
    ok(&post(f, &alice, "OWN", "alice-1", &first).await);

    // Mallory, a member of the same tenant, claims tablet A's next event: refused.
    let forged = batch(
        "tab-A",
        json!({"tab-A": 2}),
        vec![set("/a", json!("forged"))],
    );
    let problem = post(f, &mallory, "OWN", "mallory-1", &forged)
        .await
        .problem(403);
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("replica-owned")),
        "{problem}"
    );
    // Without a clock entry (the server assigns the sequence): refused too.
    let forged = batch("tab-A", json!({}), vec![set("/a", json!("forged"))]);
    post(f, &mallory, "OWN", "mallory-2", &forged)
        .await
        .problem(403);

    // Tablet A's real second batch is applied, not taken for a duplicate.
    let second = batch("tab-A", json!({"tab-A": 2}), vec![set("/a", json!(2))]);
    let reply = ok(&post(f, &alice, "OWN", "alice-2", &second).await);
    assert_eq!(reply["applied"], 1, "{reply}");
    // Mallory's own tablet may name tablet A in its causal past.
    let hers = batch(
        "tab-M",
        json!({"tab-A": 2, "tab-M": 1}),
        vec![set("/m", json!(1))],
    );
    ok(&post(f, &mallory, "OWN", "mallory-3", &hers).await);
    let doc = ok(&call(f, Method::GET, &alice, "/v1/tests/sessions/OWN", &[]).await);
    assert_eq!(doc["document"], json!({"a": 2, "m": 1}));
    assert_eq!(doc["vector_clock"], json!({"tab-A": 2, "tab-M": 1}));
    // Ownership is per session: Mallory may use "tab-A" in another session.
    ok(&post(f, &mallory, "OTHER", "mallory-4", &first).await);
}

#[tokio::test]
async fn replicas_belong_to_their_first_user_sqlite() {
    let sys = start(None, vec![]).await;
    check_replicas_belong_to_their_first_user(&sys).await;
}

#[tokio::test]
async fn replicas_belong_to_their_first_user_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_replicas_belong_to_their_first_user(&sys).await;
}

// ---- item 12: idempotency compares JSON values, not bytes ----

async fn check_idempotency_compares_values(sys: &TestSystem) {
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let sent = r#"{"changes":[{"op":"set","path":"/a","value":{"k":1,"j":[1,2]}}],"_sync_meta":{"vector_clock":{},"replica_id":"r1"}}"#;
    let same = r#"{
        "_sync_meta": {"replica_id": "r1", "vector_clock": {}},
        "changes": [ {"value": {"j": [1, 2], "k": 1}, "path": "/a", "op": "set"} ]
    }"#;
    let first = post_raw(f, &t, "IDEM", "k1", sent).await;
    let answer = ok(&first);
    let again = post_raw(f, &t, "IDEM", "k1", same).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), answer);
    // Another value under the same key is still refused.
    let other = sent.replace(r#""k":1"#, r#""k":2"#);
    post_raw(f, &t, "IDEM", "k1", other).await.problem(422);
}

#[tokio::test]
async fn idempotency_compares_json_values_sqlite() {
    let sys = start(None, vec![]).await;
    check_idempotency_compares_values(&sys).await;
}

#[tokio::test]
async fn idempotency_compares_json_values_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    check_idempotency_compares_values(&sys).await;
}

/// A key recorded by a release that fingerprinted the bytes (SHA-256 of method, session and
/// body, NUL-separated) still replays for a retry of the same bytes after the upgrade.
#[tokio::test]
async fn a_record_from_before_the_upgrade_still_replays_postgres() {
    use sha2::Digest;
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    ok(&post(
        f,
        &t,
        "REAL",
        "k0",
        &batch("r", json!({}), vec![set("/a", json!(1))]),
    )
    .await);
    let client = pg_client(&db.url).await;
    let tenant: String = client
        .query_one(
            "SELECT tenant FROM sync_sessions WHERE session_id = 'REAL'",
            &[],
        )
        .await
        .expect("the real row")
        .get(0);
    let body =
        r#"{"changes":[{"op":"set","path":"/b","value":2}],"_sync_meta":{"vector_clock":{}}}"#;
    let mut h = sha2::Sha256::new();
    for part in [&b"POST"[..], b"\0", b"UPG", b"\0", body.as_bytes()] {
        h.update(part);
    }
    let old_hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let recorded = r#"{"session_id":"UPG","vector_clock":{"tab-a":1},"applied":1,"conflicts":[]}"#;
    client
        .execute(
            "INSERT INTO sync_idempotency
             (tenant, subject, idem_key, request_hash, status, body, created_at)
             VALUES ($1, 'tab-a', 'old-key', $2, 200, $3,
                     (extract(epoch from now()) * 1000)::bigint)",
            &[&tenant, &old_hash, &recorded],
        )
        .await
        .expect("a record of the old release");
    let reply = post_raw(f, &t, "UPG", "old-key", body).await;
    assert_eq!(reply.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        ok(&reply),
        serde_json::from_str::<Value>(recorded).expect("json")
    );
}

// ---- item 13: PostgreSQL locking ----

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

/// Refused requests (409 "sync first", 422 key reused, 403 replica owned) on new session ids
/// leave no rows behind.
#[tokio::test]
async fn refused_posts_leave_no_session_rows_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    ok(&post(
        f,
        &t,
        "REAL",
        "used",
        &batch("r", json!({}), vec![set("/a", json!(1))]),
    )
    .await);
    for i in 0..20 {
        let ahead = batch("r", json!({"someone-else": 5}), vec![]);
        post(f, &t, &format!("NEW-{i}"), &format!("k-{i}"), &ahead)
            .await
            .problem(409);
        let reused = batch("r", json!({}), vec![set("/b", json!(i))]);
        post(f, &t, &format!("NEW-R-{i}"), "used", &reused)
            .await
            .problem(422);
    }
    let client = pg_client(&db.url).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM sync_sessions", &[])
        .await
        .expect("count sessions")
        .get(0);
    assert_eq!(rows, 1, "only the session that was written has a row");
}

/// Placeholder rows (`version = 0`) that older releases left behind read as new sessions, take
/// a first batch, and are purged by the migration that retired them.
#[tokio::test]
async fn legacy_placeholder_rows_are_harmless_and_purged_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    // The tenant of this token, as the worker keys it: learn it from a real row.
    ok(&post(
        f,
        &t,
        "REAL",
        "k0",
        &batch("r", json!({}), vec![set("/a", json!(1))]),
    )
    .await);
    let client = pg_client(&db.url).await;
    let tenant: String = client
        .query_one(
            "SELECT tenant FROM sync_sessions WHERE session_id = 'REAL'",
            &[],
        )
        .await
        .expect("the real row")
        .get(0);
    let placeholder = "INSERT INTO sync_sessions (tenant, session_id, state, version, updated_at)
                       VALUES ($1, $2, '', 0, 0)";
    for id in ["OLD", "LEFT"] {
        client
            .execute(placeholder, &[&tenant, &id])
            .await
            .expect("placeholder");
    }
    let empty = ok(&call(f, Method::GET, &t, "/v1/tests/sessions/OLD", &[]).await);
    assert_eq!(empty["document"], json!({}));
    let applied = ok(&post(
        f,
        &t,
        "OLD",
        "k1",
        &batch("r", json!({}), vec![set("/b", json!(2))]),
    )
    .await);
    assert_eq!(applied["applied"], 1);
    let doc = ok(&call(f, Method::GET, &t, "/v1/tests/sessions/OLD", &[]).await);
    assert_eq!(doc["document"], json!({"b": 2}));
    drop(sys);

    // A start that applies the purge migration removes the one left.
    client
        .execute("DELETE FROM firemode_schema WHERE version = 3", &[])
        .await
        .expect("forget migration 3");
    let _again = start(Some(db.url.clone()), vec![]).await;
    let left: i64 = client
        .query_one("SELECT count(*) FROM sync_sessions WHERE version = 0", &[])
        .await
        .expect("count placeholders")
        .get(0);
    assert_eq!(left, 0);
}

/// How many backends of the test database wait for a lock.
async fn lock_waiters(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// A request that cannot get at its session within the lock timeout (here the table is locked
/// from outside, as a long merge would hold it) is 409 "in flight", never 503 "store
/// unavailable", and nothing of it is remembered: the retry is merged.
#[tokio::test]
async fn a_merge_that_cannot_wait_is_in_flight_not_unavailable_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    // The harness's request_timeout is 10 s: the merge waits 8 s (0.8 of it) for the lock.
    let sys = start(Some(db.url.clone()), vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let body = batch("r", json!({}), vec![set("/a", json!(1))]);
    let mut blocker = pg_client(&db.url).await;
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE sync_sessions IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let problem = post(f, &t, "WAIT", "k", &body).await.problem(409);
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("in-flight")),
        "{problem}"
    );
    tx.rollback().await.expect("rollback");
    let retry = post(f, &t, "WAIT", "k", &body).await;
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(ok(&retry)["applied"], 1);
}

/// A duplicate that arrives while the first request is still being applied waits for it and
/// gets its answer replayed.
#[tokio::test]
async fn a_duplicate_in_flight_gets_the_replay_postgres() {
    let Some(db) = pg_database().await else {
        return;
    };
    let sys = start(Some(db.url.clone()), vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let body = batch("r", json!({}), vec![set("/a", json!(1))]);
    let mut blocker = pg_client(&db.url).await;
    let watcher = pg_client(&db.url).await;
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE sync_sessions IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let send = |t: String| {
        let body = body.clone();
        tokio::spawn(async move { post(f, &t, "DUP", "k", &body).await })
    };
    let first = send(t.clone());
    eventually(
        "the first request waits for the session",
        Duration::from_secs(10),
        || async { (lock_waiters(&watcher).await >= 1).then_some(()) },
    )
    .await;
    // The duplicate leaves once the first is inside its merge. It waits behind it: for the
    // lock (on the other sync instance), or in the queue of the first one's.
    let second = send(t.clone());
    eventually(
        "the duplicate waits for the session",
        Duration::from_secs(10),
        || async {
            let queued = sys.metric_sum("sync_merges_waiting").await >= 1.0;
            (queued || lock_waiters(&watcher).await >= 2).then_some(())
        },
    )
    .await;
    tx.commit().await.expect("commit");
    let (first, second) = (first.await.expect("first"), second.await.expect("second"));
    let answer = ok(&first);
    assert_eq!(answer["applied"], 1);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(ok(&second), answer);
}

// ---- item 14 (parts): content negotiation, HEAD, Allow ----

#[tokio::test]
async fn gzip_refusals_head_and_allow_are_honoured() {
    let sys = start(None, vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    ok(&post(
        f,
        &t,
        "NEG",
        "k",
        &batch("r", json!({}), vec![set("/a", json!(1))]),
    )
    .await);
    let bundle = "/v1/tests/sessions/NEG/offline_bundle";
    for refusal in ["gzip;Q=0", "gzip;q=0, *", "*, gzip; q=0.0", "*;q=0"] {
        let r = call(f, Method::GET, &t, bundle, &[("accept-encoding", refusal)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-encoding"),
            None,
            "Accept-Encoding: {refusal}"
        );
        ok(&r);
    }
    for accepted in ["*", "br;q=1, gzip;Q=0.5"] {
        let r = call(f, Method::GET, &t, bundle, &[("accept-encoding", accepted)]).await;
        assert_eq!(
            r.header("content-encoding"),
            Some("gzip"),
            "Accept-Encoding: {accepted}"
        );
    }

    // HEAD works like GET without a body.
    for path in ["/v1/tests/sessions/NEG", bundle] {
        let get = call(f, Method::GET, &t, path, &[]).await;
        let head = call(f, Method::HEAD, &t, path, &[]).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
        assert_eq!(head.header("content-type"), get.header("content-type"));
        assert_eq!(head.header("etag"), get.header("etag"));
    }

    // Every 405 names what is allowed.
    for (method, path, allowed) in [
        (Method::PUT, "/v1/tests/sessions/NEG", "GET, HEAD"),
        (Method::DELETE, bundle, "GET, HEAD"),
        (Method::GET, "/v1/tests/sessions/NEG/results", "POST"),
        (Method::GET, "/v1/classify", "POST"),
    ] {
        let r = call(f, method.clone(), &t, path, &[]).await;
        r.problem(405);
        assert_eq!(r.header("allow"), Some(allowed), "{method} {path}");
    }
}

// ---- item 14 (parts): values are kept as sent ----

/// Numbers beyond 64 bits (and decimals that are not f64 round trips) read back with the same
/// digits, in the session, the bundle and a conflict.
#[tokio::test]
async fn numbers_keep_their_digits() {
    let sys = start(None, vec![]).await;
    let (f, t) = (sys.front, token("tab-a", Some("acme")));
    let numbers = [
        "123456789012345678901234567890",
        "-98765432109876543210987654321",
        "0.1000000000000000000000000001",
        "18446744073709551616",
    ];
    let body = format!(
        r#"{{"changes":[{{"op":"set","path":"/n","value":[{}]}}],"_sync_meta":{{"vector_clock":{{"A":1}},"replica_id":"A","timestamp":5000}}}}"#,
        numbers.join(",")
    );
    ok(&post_raw(f, &t, "NUM", "k1", body).await);
    for path in [
        "/v1/tests/sessions/NUM",
        "/v1/tests/sessions/NUM/offline_bundle",
    ] {
        let text =
            String::from_utf8_lossy(&call(f, Method::GET, &t, path, &[]).await.body).into_owned();
        let expected = format!("[{}]", numbers.join(","));
        assert!(text.contains(&expected), "GET {path}: {text}");
    }
    // A concurrent, older write at the same path: the conflict shows the winner as sent.
    let loser = r#"{"changes":[{"op":"set","path":"/n","value":1}],"_sync_meta":{"vector_clock":{"B":1},"replica_id":"B","timestamp":1}}"#;
    let reply = post_raw(f, &t, "NUM", "k2", loser).await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(text.contains(numbers[0]), "{text}");
}
