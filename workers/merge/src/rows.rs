//! A session as rows a store keeps, so that a merge reads and writes only what its batch
//! touches (design §3: its cost does not grow with the session).
//!
//! * **Head**, one small JSON value per session: the clock, each replica's latest stamp and
//!   owner, the horizon and the checkpoints. Rewritten by every merge.
//! * **Registers**, one row each, keyed by [`path_key`]: a path's subtree is one contiguous
//!   range of keys ([`KeyRange`]), and a key stays short whatever the document's keys.
//! * **Stamps**, one row per applied event: `(replica, sequence, stamp)`; compaction deletes
//!   the ones behind the horizon, which no merge can ask for any more.
//! * **Base**, the compacted prefix (design §3): written only by compaction.
//!
//! A merge of a batch asks for [`Batch::reads`]: the registers at the proper ancestors of
//! its paths and in their subtrees, and the stamps at the counts its clock names. A state
//! loaded from those rows ([`SessionState::from_rows`]) applies the batch exactly as the whole
//! session would (a write only meets registers at its path, above it and below it; the
//! effective timestamp only needs those stamps), and [`SessionState::changed_rows`] says
//! what to write back. Reads that show the whole session (the document, catching up,
//! compaction) load every register and no stamp rows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::compaction::Checkpoint;
use crate::register::Register;
use crate::stamps::Stamps;
use crate::state::Touched;
use crate::stored::{
    check_base, check_none_hidden, check_register_within, check_within_clock, CorruptState,
};
use crate::{Batch, Pointer, SessionState, VectorClock};

/// Tokens whose escaped bytes are longer than this are keyed by a digest instead.
const INLINE_TOKEN_BYTES: usize = 16;

/// The store key of a register at `pointer`: per token, its escaped bytes (`0x00` written
/// `0x01 0x01`, `0x01` written `0x01 0x02`) when they are at most 16 bytes, else `0x01 0x03`
/// and the first 16 bytes of the token's SHA-256; then a `0x00`.
///
/// Keys are self-delimiting and one-to-one (a digest collision aside), so the keys of a
/// path's subtree are exactly those that start with its key: one contiguous range. A key is
/// at most 19 bytes per token (1,216 for the deepest path), so with the tenant and session
/// id it fits a PostgreSQL btree entry (2,704 bytes) whatever the keys of the document, and
/// a batch's reads cost at most that per ancestor. Short tokens keep their order; the order
/// of keys otherwise means nothing.
pub fn path_key(pointer: &Pointer) -> Vec<u8> {
    key_with_ends(pointer).0
}

/// The row of `register`, held at `path`.
fn register_row(path: &Pointer, register: &Register) -> RegisterRow {
    RegisterRow {
        key: path_key(path),
        register: serde_json::to_string(register).unwrap_or_default(),
        dot: Dot {
            replica_id: register.replica_id.clone(),
            sequence: register.sequence,
        },
        made: register.parents_made.as_ref().map(|made| Dot {
            replica_id: made.replica_id.clone(),
            sequence: made.sequence,
        }),
    }
}

/// [`path_key`], and the length of the key of each ancestor and of the path itself (the end
/// of each token's encoding).
fn key_with_ends(pointer: &Pointer) -> (Vec<u8>, Vec<usize>) {
    use sha2::{Digest, Sha256};
    let tokens = pointer.tokens();
    let mut key = Vec::with_capacity(tokens.len() * (INLINE_TOKEN_BYTES + 1));
    let mut ends = Vec::with_capacity(tokens.len());
    for token in tokens {
        let escaped: usize = token.bytes().map(|b| if b <= 0x01 { 2 } else { 1 }).sum();
        if escaped <= INLINE_TOKEN_BYTES {
            for byte in token.bytes() {
                match byte {
                    0x00 => key.extend_from_slice(&[0x01, 0x01]),
                    0x01 => key.extend_from_slice(&[0x01, 0x02]),
                    other => key.push(other),
                }
            }
        } else {
            key.extend_from_slice(&[0x01, 0x03]);
            key.extend_from_slice(&Sha256::digest(token.as_bytes())[..INLINE_TOKEN_BYTES]);
        }
        key.push(0x00);
        ends.push(key.len());
    }
    (key, ends)
}

/// The end of each token's encoding in a [`path_key`] (as [`key_with_ends`] gives them):
/// after the `0x00` that closes it, reading `0x01 x` as one escaped byte and `0x01 0x03` as
/// the start of a 16-byte digest (which may hold any byte, `0x00` included).
fn token_ends(key: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while at < key.len() {
        match (key[at], key.get(at + 1)) {
            (0x00, _) => {
                at += 1;
                ends.push(at);
            }
            (0x01, Some(0x03)) => at += 2 + INLINE_TOKEN_BYTES,
            (0x01, _) => at += 2,
            _ => at += 1,
        }
    }
    ends
}

/// The register keys `start <= key < end`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRange {
    /// The first key in the range.
    pub start: Vec<u8>,
    /// The first key past the range.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The register at exactly `pointer`.
    pub fn at(pointer: &Pointer) -> KeyRange {
        KeyRange::exactly(path_key(pointer))
    }

    /// The register at `pointer` and every one below it.
    pub fn subtree(pointer: &Pointer) -> KeyRange {
        KeyRange::below(path_key(pointer))
    }

    /// The one key `key`.
    fn exactly(key: Vec<u8>) -> KeyRange {
        let mut end = key.clone();
        end.push(0x00);
        KeyRange { start: key, end }
    }

    /// `key` and the keys that extend it (`key` ends a token, with `0x00`).
    fn below(key: Vec<u8>) -> KeyRange {
        let mut end = key.clone();
        // Every key is terminated by 0x00: the subtree's keys extend it, and the smallest key
        // that does not is the same with that last byte raised to 0x01.
        if let Some(last) = end.last_mut() {
            *last = 0x01;
        }
        KeyRange { start: key, end }
    }

    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && key < self.end.as_slice()
    }
}

/// What a merge reads besides the head (see [`Batch::reads`], [`Reads::of`]).
///
/// Linear in the batch, whatever the depth of its paths: the ancestors are named as prefixes
/// of the paths' keys (`(key index, length)`), not as keys of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// Disjoint key ranges, sorted: the subtrees of the batch's paths.
    pub registers: Vec<KeyRange>,
    /// The keys of the batch's paths, each once.
    pub keys: Vec<Vec<u8>>,
    /// The registers at exactly `keys[i][..end]` for each `(i, end)`: the proper ancestors of
    /// the paths, each once, none inside `registers` (so no register is read twice).
    pub ancestors: Vec<(u32, u32)>,
    /// `(replica, sequence)` whose stamp rows the merge may need.
    pub stamps: Vec<(String, u64)>,
}

impl Batch {
    /// The rows a merge of this batch needs: for each change, the registers at the proper
    /// ancestors of its path and in its subtree; the stamps at every count its clock names
    /// (and, for a named replica, its previous event). The head is always read.
    pub fn reads(&self) -> Reads {
        Reads::of([self])
    }

    /// The stamps a merge of this batch may read.
    fn stamp_reads(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let named = self
            .clock
            .iter()
            .filter(|(_, &count)| count > 0)
            .map(|(replica, &count)| (replica.clone(), count));
        let own_previous = self
            .clock
            .get(&self.replica_id)
            .filter(|&&own| self.replica_named && own > 1)
            .map(|&own| (self.replica_id.clone(), own - 1));
        named.chain(own_previous)
    }
}

impl Reads {
    /// What the batches read together (a group of merges in one transaction).
    pub fn of<'a>(batches: impl IntoIterator<Item = &'a Batch>) -> Reads {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut ends: Vec<Vec<usize>> = Vec::new();
        let mut known = std::collections::HashSet::new();
        let mut stamps = Vec::new();
        for batch in batches {
            for change in &batch.changes {
                let (key, key_ends) = key_with_ends(change.path());
                if known.insert(key.clone()) {
                    keys.push(key);
                    ends.push(key_ends);
                }
            }
            stamps.extend(batch.stamp_reads());
        }
        stamps.sort();
        stamps.dedup();
        Reads::around(keys, &ends, stamps)
    }

    /// The registers a catch-up reads around the registers at `keys` (path keys, each once):
    /// each one's subtree and the registers at its proper ancestors, so the document at each
    /// of those paths is the session's ([`crate::delta`]). No stamps.
    pub fn around_keys(keys: Vec<Vec<u8>>) -> Reads {
        let ends: Vec<Vec<usize>> = keys.iter().map(|key| token_ends(key)).collect();
        Reads::around(keys, &ends, Vec::new())
    }

    /// The subtrees of `keys` and their proper ancestors outside those subtrees, each once;
    /// `ends[i]` holds the end of each token's encoding in `keys[i]`.
    fn around(keys: Vec<Vec<u8>>, ends: &[Vec<usize>], stamps: Vec<(String, u64)>) -> Reads {
        let registers = merge_ranges(keys.iter().cloned().map(KeyRange::below).collect());
        let inside = |key: &[u8]| {
            let after = registers.partition_point(|range| range.start.as_slice() <= key);
            after > 0 && registers[after - 1].contains(key)
        };
        let mut named: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        let mut ancestors = Vec::new();
        for (index, key_ends) in ends.iter().enumerate() {
            let Some((_, above)) = key_ends.split_last() else {
                continue;
            };
            for &end in above {
                let prefix = &keys[index][..end];
                if !inside(prefix) && named.insert(prefix) {
                    let index = u32::try_from(index).unwrap_or(u32::MAX);
                    ancestors.push((index, u32::try_from(end).unwrap_or(u32::MAX)));
                }
            }
        }
        Reads {
            registers,
            keys,
            ancestors,
            stamps,
        }
    }

    /// The ancestor keys, `keys[i][..end]` for each `(i, end)` of `ancestors`.
    pub fn ancestor_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.ancestors.iter().filter_map(|&(index, end)| {
            let key = self.keys.get(usize::try_from(index).ok()?)?;
            key.get(..usize::try_from(end).ok()?)
        })
    }

    /// Whether a register at `key` is read (in a range or as an ancestor).
    pub fn covers(&self, key: &[u8]) -> bool {
        self.registers.iter().any(|range| range.contains(key))
            || self.ancestor_keys().any(|ancestor| ancestor == key)
    }
}

/// Sorts `ranges` and joins the ones that overlap or touch.
fn merge_ranges(mut ranges: Vec<KeyRange>) -> Vec<KeyRange> {
    ranges.sort();
    let mut merged: Vec<KeyRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => {
                if range.end > last.end {
                    last.end = range.end;
                }
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// One applied event's stamp row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StampRow {
    /// The writer.
    pub replica_id: String,
    /// Its sequence number.
    pub sequence: u64,
    /// The largest effective timestamp of the replica's events up to this one.
    pub stamp: u64,
}

/// One register row: its key ([`path_key`]), the register as JSON, and the dots a catch-up
/// finds it by ([`crate::delta`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterRow {
    /// [`path_key`] of the register's path.
    pub key: Vec<u8>,
    /// The register, as JSON (its path included).
    pub register: String,
    /// The register's own dot.
    pub dot: Dot,
    /// Tombstones only: the dot of the hidden `set` it remembers (`Register::parents_made`).
    pub made: Option<Dot>,
}

/// An event: a replica and its sequence number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dot {
    /// The writer.
    pub replica_id: String,
    /// Its sequence number.
    pub sequence: u64,
}

/// What a store read for a session: its head, the register rows asked for (every one, for
/// a whole-session read), the stamp rows asked for, and the base when it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionRows {
    /// The head value ([`SessionState::head_row`]).
    pub head: String,
    /// The base document's JSON, `None` before the first compaction.
    pub base: Option<String>,
    /// Register JSON values, in any order.
    pub registers: Vec<String>,
    /// Stamp rows, in any order.
    pub stamps: Vec<StampRow>,
}

/// What to write back after changing a state loaded from rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChanges {
    /// The new head.
    pub head: String,
    /// The new base, when it changed (compaction).
    pub base: Option<String>,
    /// Registers to insert or replace.
    pub upserts: Vec<RegisterRow>,
    /// Keys of registers to delete.
    pub deletes: Vec<Vec<u8>>,
    /// Stamp rows to insert.
    pub stamps: Vec<StampRow>,
    /// Stamp rows no merge can need any more, to delete: per replica `r`, every `(r, k)`
    /// with `k < stamps_below[r]` (compaction moved the horizon there; a batch or `since`
    /// behind it is refused before any stamp is read). Empty unless the horizon moved.
    pub stamps_below: VectorClock,
}

/// The head row's shape.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    #[serde(default)]
    clock: VectorClock,
    /// Per replica, its stamp at `clock[replica]`.
    #[serde(default)]
    latest: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    owners: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    horizon: VectorClock,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    checkpoints: Vec<Checkpoint>,
    /// Every register row of the session carries its dots (schema 6). Always written: a
    /// release before it parses heads with `deny_unknown_fields`, so it cannot load, and so
    /// never writes, a session whose head has it (it answers "unreadable" until upgraded).
    /// Absent from a head that release wrote.
    #[serde(default)]
    dots: bool,
}

/// The session clock a head row holds (a cheap read: no register is loaded).
pub fn clock_of_head(head: &str) -> Result<VectorClock, CorruptState> {
    serde_json::from_str::<Head>(head)
        .map(|head| head.clock)
        .map_err(|e| CorruptState(format!("the session head does not parse: {e}")))
}

/// The session clock of a head whose register rows can be found by their dots, `None` when
/// the head does not say so (a release before the dots wrote it) or does not parse: then
/// only a whole-session read is sure to see every register.
pub fn clock_if_dotted(head: &str) -> Option<VectorClock> {
    serde_json::from_str::<Head>(head)
        .ok()
        .filter(|head| head.dots)
        .map(|head| head.clock)
}

/// `head` marked as a session whose register rows all carry their dots (what the migration
/// that fills them does to every head), `None` when it does not parse (left alone).
pub fn mark_dotted(head: &str) -> Option<String> {
    let mut head = serde_json::from_str::<Head>(head).ok()?;
    head.dots = true;
    serde_json::to_string(&head).ok()
}

/// The registers by path, refusing two at one path. Built in one go rather than by insertion:
/// a `BTreeMap` filled in key order splits its nodes half full, and with a `Register` in each
/// slot that was 8.3 of a 20,000-path session's 21.7 MB on a whole read.
fn register_map(
    mut registers: Vec<(Pointer, Register)>,
) -> Result<BTreeMap<Pointer, Register>, CorruptState> {
    registers.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = registers.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(CorruptState(format!("two registers at {}", pair[0].0)));
    }
    Ok(registers.into_iter().collect())
}

impl SessionState {
    /// The session (or the part of it a batch needs) from its rows, refusing rows that break
    /// the state's invariants. Register rows must include, with each register, every register
    /// at its ancestors (both [`Batch::reads`] and a whole-session read do).
    pub fn from_rows(rows: &SessionRows) -> Result<SessionState, CorruptState> {
        let parts = (
            rows.head.as_str(),
            rows.stamps.as_slice(),
            rows.base.as_deref(),
        );
        Self::from_row_parts(parts, rows.registers.iter())
    }

    /// [`SessionState::from_rows`], dropping each register row once it is parsed: on a whole
    /// read of 20,000 paths the rows' text (~6.7 MB) no longer sits beside the registers
    /// built from it.
    pub fn from_owned_rows(rows: SessionRows) -> Result<SessionState, CorruptState> {
        let SessionRows {
            head,
            base,
            registers,
            stamps,
        } = rows;
        let parts = (head.as_str(), stamps.as_slice(), base.as_deref());
        Self::from_row_parts(parts, registers.into_iter())
    }

    /// The head, stamps and base rows, and the register rows one by one.
    fn from_row_parts<S: AsRef<str>>(
        (head, stamp_rows, base): (&str, &[StampRow], Option<&str>),
        register_rows: impl ExactSizeIterator<Item = S>,
    ) -> Result<SessionState, CorruptState> {
        let head: Head = serde_json::from_str(head)
            .map_err(|e| CorruptState(format!("the session head does not parse: {e}")))?;
        let stamps = head_stamps(&head, stamp_rows)?;
        let mut registers: Vec<(Pointer, Register)> = Vec::with_capacity(register_rows.len());
        for text in register_rows {
            let register: Register = serde_json::from_str(text.as_ref())
                .map_err(|e| CorruptState(format!("a register does not parse: {e}")))?;
            check_register_within(&register, |replica, sequence, timestamp| {
                let applied =
                    (1..=head.clock.get(replica).copied().unwrap_or(0)).contains(&sequence);
                let below_latest = head.latest.get(replica).is_some_and(|&l| timestamp <= l);
                applied && below_latest
            })?;
            registers.push((register.path.clone(), register));
        }
        let registers = register_map(registers)?;
        check_none_hidden(&registers)?;
        let base = base
            .map(serde_json::from_str::<Value>)
            .transpose()
            .map_err(|e| CorruptState(format!("the base document does not parse: {e}")))?;
        let base = check_base(base)?;
        check_within_clock(&head.clock, &head.horizon, &head.checkpoints)?;
        Ok(SessionState {
            clock: head.clock,
            stamps,
            registers,
            owners: head.owners,
            base,
            horizon: head.horizon,
            checkpoints: head.checkpoints,
            touched: Touched::default(),
        })
    }

    /// The head row of this state.
    pub fn head_row(&self) -> String {
        let latest = self
            .clock
            .iter()
            .filter_map(|(replica, &count)| {
                Some((replica.clone(), self.stamps.get(replica, count)?))
            })
            .collect();
        let head = Head {
            clock: self.clock.clone(),
            latest,
            owners: self.owners.clone(),
            horizon: self.horizon.clone(),
            checkpoints: self.checkpoints.clone(),
            dots: true,
        };
        serde_json::to_string(&head).unwrap_or_default()
    }

    /// The base row, `None` while the base is `{}`.
    pub fn base_row(&self) -> Option<String> {
        let empty = self.base.as_object().is_some_and(serde_json::Map::is_empty);
        (!empty).then(|| self.base.to_string())
    }

    /// Every row of this state, as [`RowChanges`] against an empty session: how a session
    /// kept as one value (an older release's layout) moves to rows.
    pub fn all_rows(&self) -> RowChanges {
        self.changed_rows(&SessionState::default())
    }

    /// The rows to write to turn `before` into this state, where this state is `before` (as
    /// loaded by [`SessionState::from_rows`]) after [`SessionState::apply`], a checkpoint or a
    /// compaction: every register compared with `before`'s (a compaction's way; a merge
    /// writes [`SessionState::written_rows`] without a copy of the session).
    pub fn changed_rows(&self, before: &SessionState) -> RowChanges {
        let deletes = before
            .registers
            .keys()
            .filter(|path| !self.registers.contains_key(*path))
            .map(path_key)
            .collect();
        let upserts = self
            .registers
            .iter()
            .filter(|(path, register)| before.registers.get(*path) != Some(*register))
            .map(|(path, register)| register_row(path, register))
            .collect();
        self.rows_besides_registers(before, upserts, deletes)
    }

    /// This state without its registers: all [`SessionState::written_rows`] needs of it before
    /// a merge (a copy of the whole session doubled a merge's memory: a `set` over 100,000
    /// registers took ~1.8 KB a register).
    pub fn head_snapshot(&self) -> SessionState {
        SessionState {
            clock: self.clock.clone(),
            stamps: self.stamps.clone(),
            registers: BTreeMap::new(),
            owners: self.owners.clone(),
            base: self.base.clone(),
            horizon: self.horizon.clone(),
            checkpoints: self.checkpoints.clone(),
            touched: Touched::default(),
        }
    }

    /// The rows to write after merges on this state, where `before` is its
    /// [`SessionState::head_snapshot`] taken before them: the registers at the paths the merges
    /// touched (written where one is held, deleted where none is), and the rest as
    /// [`SessionState::changed_rows`] has it.
    pub fn written_rows(&self, before: &SessionState) -> RowChanges {
        let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
        for path in &self.touched.0 {
            match self.registers.get(path) {
                Some(register) => upserts.push(register_row(path, register)),
                None => deletes.push(path_key(path)),
            }
        }
        self.rows_besides_registers(before, upserts, deletes)
    }

    /// [`RowChanges`] with these register rows, and the head, base and stamps as they changed
    /// since `before`.
    fn rows_besides_registers(
        &self,
        before: &SessionState,
        upserts: Vec<RegisterRow>,
        deletes: Vec<Vec<u8>>,
    ) -> RowChanges {
        let stamps: Vec<StampRow> = self
            .stamps
            .added_since(&before.stamps)
            .map(|(replica_id, sequence, stamp)| StampRow {
                replica_id: replica_id.to_owned(),
                sequence,
                stamp,
            })
            .collect();
        let stamps_below = if self.horizon == before.horizon {
            VectorClock::new()
        } else {
            self.horizon.clone()
        };
        RowChanges {
            head: self.head_row(),
            base: (self.base != before.base)
                .then(|| self.base_row().unwrap_or_else(|| "{}".to_owned())),
            upserts,
            deletes,
            stamps: stamps
                .into_iter()
                .filter(|row: &StampRow| {
                    row.sequence >= stamps_below.get(&row.replica_id).copied().unwrap_or(0)
                })
                .collect(),
            stamps_below,
        }
    }

    /// Whether a checkpoint at or before `cutoff_ms` is waiting to become the horizon: then
    /// the whole session should be loaded and [`SessionState::compact_before`] run.
    pub fn compaction_due(&self, cutoff_ms: u64) -> bool {
        self.checkpoints
            .first()
            .is_some_and(|c| c.at_ms <= cutoff_ms)
    }
}

/// The stamps of the head (each replica's latest) and of the stamp rows, checked: every row
/// names an applied event, and no stamp exceeds its replica's latest (stamps are running
/// maxima).
fn head_stamps(head: &Head, rows: &[StampRow]) -> Result<Stamps, CorruptState> {
    let names_same = head.clock.len() == head.latest.len()
        && head.clock.keys().eq(head.latest.keys())
        && head.clock.values().all(|&count| count > 0);
    if !names_same {
        return Err(CorruptState(
            "the head's clock and latest stamps name different replicas".to_owned(),
        ));
    }
    let mut stamps = Stamps::default();
    for (replica, &count) in &head.clock {
        stamps.insert(
            replica,
            count,
            head.latest.get(replica).copied().unwrap_or(0),
        );
    }
    for row in rows {
        let count = head.clock.get(&row.replica_id).copied().unwrap_or(0);
        let latest = head.latest.get(&row.replica_id).copied().unwrap_or(0);
        let consistent = (1..=count).contains(&row.sequence)
            && row.stamp <= latest
            && (row.sequence < count || row.stamp == latest);
        if !consistent {
            return Err(CorruptState(format!(
                "the stamp row ({:?}, {}) does not match the session clock",
                row.replica_id, row.sequence
            )));
        }
        stamps.insert(&row.replica_id, row.sequence, row.stamp);
    }
    Ok(stamps)
}
