//! The session's merge state and the one operation that changes it, [`SessionState::apply`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::compaction::{Checkpoint, MustRefetch};
use crate::delta::{changes_since, check_since, DeltaIndex, SinceRefused};
use crate::document::{materialise, Document};
use crate::overlap::{Conflicts, ReportLimits, Winners};
use crate::register::Register;
use crate::stamps::Stamps;
use crate::stored::CorruptState;
use crate::{Batch, Change, Pointer, VectorClock};

/// Everything the merge remembers about one session.
///
/// A store keeps it as rows ([`crate::rows`]: a head, one row per register and per event), so a
/// merge loads and writes only what its batch touches. A session held whole also serializes to
/// one JSON value, `{"clock":{…},"stamps":{…},"registers":[…]}` (how releases before the rows
/// kept it); deserializing either checks the invariants below and refuses a state that breaks
/// them. [`Default`] is an empty session.
///
/// Invariants:
/// * `clock[r]` is the number of events of `r` applied (delivery is causal, so they are
///   `1..=clock[r]`), and `stamps[r][k-1]` is the largest effective timestamp of events
///   `1..=k` (for a named replica, the stamp of event `k`: its stamps grow). Replicas with no
///   event have no entry in either.
/// * `registers` holds, per path, the write with the largest order key, and only writes that no
///   write at an ancestor path with a larger key hides. Every register's dot is covered by
///   `clock` and its timestamp is its event's stamp.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(try_from = "crate::stored::StoredSession")]
pub struct SessionState {
    /// The pointwise max of the applied dots.
    pub(crate) clock: VectorClock,
    /// Per replica, the largest effective timestamp up to each applied event (all of them in a
    /// session held whole; in one loaded for a batch, the ones it can need: see [`crate::rows`]).
    #[serde(serialize_with = "serialize_stamps")]
    pub(crate) stamps: Stamps,
    /// The surviving writes, keyed by path (sorted by tokens, so descendants follow a path).
    #[serde(serialize_with = "serialize_registers")]
    pub(crate) registers: BTreeMap<Pointer, Register>,
    /// Per replica id, the user (`sub`) who first wrote with it in this session (design §3:
    /// anyone else's batch under it is refused). Not part of the merge: the caller checks and
    /// claims with [`SessionState::owner`] and [`SessionState::claim`]. States saved before
    /// owners existed load with none; their replicas go to the first user who writes next.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) owners: BTreeMap<String, String>,
    /// The compacted prefix of the replay: the document every register is replayed on
    /// (`{}` until the first compaction; see [`crate::compaction`]).
    #[serde(skip_serializing_if = "is_empty_object")]
    pub(crate) base: Value,
    /// What every batch and `since` must cover since the last compaction (empty before).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) horizon: VectorClock,
    /// Candidate horizons, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) checkpoints: Vec<Checkpoint>,
    /// The paths whose register [`SessionState::apply`] wrote, changed or dropped: the register
    /// rows [`SessionState::written_rows`] writes. Not part of the state's value.
    #[serde(skip)]
    pub(crate) touched: Touched,
}

/// The paths a merge touched (see [`SessionState::touched`]). Two states are equal whatever
/// they touched: this is bookkeeping for the rows to write, not part of the session.
#[derive(Clone, Debug, Default)]
pub(crate) struct Touched(pub(crate) BTreeSet<Pointer>);

impl PartialEq for Touched {
    fn eq(&self, _: &Touched) -> bool {
        true
    }
}

fn is_empty_object(value: &Value) -> bool {
    value.as_object().is_some_and(serde_json::Map::is_empty)
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            clock: VectorClock::new(),
            stamps: Stamps::default(),
            registers: BTreeMap::new(),
            owners: BTreeMap::new(),
            base: Value::Object(serde_json::Map::new()),
            horizon: VectorClock::new(),
            checkpoints: Vec::new(),
            touched: Touched::default(),
        }
    }
}

/// What [`SessionState::apply`] did with a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Applied: the batch's dot, its effective timestamp, how many changes took effect, the
    /// conflicts.
    Applied(Applied),
    /// The dot was already covered: nothing changed (the answer is `applied: 0`).
    Duplicate,
}

/// The result of applying a new batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The batch's event: its replica and sequence number.
    pub dot: (String, u64),
    /// The timestamp every write of the batch carries.
    pub effective_timestamp: u64,
    /// How many changes took effect: were stored, rather than hidden on arrival by a write
    /// with a larger key at the same or an ancestor path (a later change of the same batch
    /// may still replace an earlier one; both count).
    pub applied: usize,
    /// Concurrent writes met, one entry per (change, overlapping concurrent write) pair: the
    /// first ones, within the [`ReportLimits`] given to [`SessionState::apply_reporting`].
    pub conflicts: Vec<Conflict>,
    /// How many such pairs there were in all (`conflicts` may hold fewer).
    pub conflicts_total: u64,
}

/// A concurrent write met on the same, an ancestor or a descendant path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conflict {
    /// The path of the batch's change.
    pub path: String,
    /// The write with the larger order key.
    pub winner: ConflictSide,
    /// The write with the smaller order key.
    pub loser: ConflictSide,
}

/// One side of a [`Conflict`].
///
/// Serializes as `{"replica_id","path","op":"set","value"}` or
/// `{"replica_id","path","op":"remove"}`, so a `null` value and a removal stay distinct.
#[derive(Clone, Debug, PartialEq)]
pub struct ConflictSide {
    /// The writer.
    pub replica_id: String,
    /// Where this side wrote (differs from [`Conflict::path`] for ancestor/descendant conflicts).
    pub path: String,
    /// The value written; `None` means removed.
    pub value: Option<Value>,
    /// The write's effective timestamp (ms): not in a merge answer, kept in the journal.
    pub timestamp: u64,
}

impl Serialize for ConflictSide {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("replica_id", &self.replica_id)?;
        map.serialize_entry("path", &self.path)?;
        match &self.value {
            Some(value) => {
                map.serialize_entry("op", "set")?;
                map.serialize_entry("value", value)?;
            }
            None => map.serialize_entry("op", "remove")?,
        }
        map.end()
    }
}

impl From<&Register> for ConflictSide {
    fn from(register: &Register) -> Self {
        ConflictSide {
            replica_id: register.replica_id.clone(),
            path: register.path.as_str().to_owned(),
            value: register.value.clone(),
            timestamp: register.timestamp,
        }
    }
}

/// Refused because the batch depends on events the session has not seen (HTTP 409 with the
/// session clock): the client should fetch the session, then retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the batch depends on events this session has not seen yet; sync with the session clock and retry")]
pub struct MissingDependencies {
    /// The session's clock, for the client to compare with its own.
    pub session_clock: VectorClock,
}

/// Why [`SessionState::apply`] changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotApplied {
    /// The batch names events the session has not seen (HTTP 409).
    #[error(transparent)]
    MissingDependencies(#[from] MissingDependencies),
    /// The batch's clock predates the compaction horizon (HTTP 410).
    #[error(transparent)]
    MustRefetch(#[from] MustRefetch),
    /// The stored session lacks what applying the batch must read (HTTP 500).
    #[error(transparent)]
    Corrupt(#[from] CorruptState),
}

impl SessionState {
    /// How many registers this state holds (all of a session held whole; a slice's otherwise).
    pub fn register_count(&self) -> usize {
        self.registers.len()
    }

    /// The session clock: per replica, the number of its events applied.
    pub fn clock(&self) -> &VectorClock {
        &self.clock
    }

    /// The merged document as plain JSON: `set /a/b 1` reads back as `{"a":{"b":1}}`; an empty
    /// session is `{}`. See [`crate::document`] for the replay rules.
    pub fn document(&self) -> Value {
        self.materialised().to_value()
    }

    /// [`SessionState::document`] as a [`Document`]: what answers serialize (it takes a
    /// fraction of the memory of the `Value`, and serializes to the same JSON).
    pub fn materialised(&self) -> Document {
        materialise(&self.base, self.registers.values())
    }

    /// The changes that take the document of exactly the batches `since` covers to this
    /// session's document (design §3, `GET …/changes`): applied in order (`set` writes the value,
    /// creating missing parents and replacing non-object ones; `remove` deletes the key if
    /// present), they give [`SessionState::document`]. Empty when `since` covers the clock;
    /// `since = {}` rebuilds the document from nothing. Refused when `since` names events the
    /// session has not applied. See [`crate::delta`].
    pub fn changes_since(&self, since: &VectorClock) -> Result<Vec<Change>, SinceRefused> {
        self.changes_since_with(since, &self.materialised())
    }

    /// [`SessionState::changes_since`] with the document already materialised
    /// (`document` must be [`SessionState::materialised`]): many clients catching up on one
    /// session share one document.
    pub fn changes_since_with(
        &self,
        since: &VectorClock,
        document: &Document,
    ) -> Result<Vec<Change>, SinceRefused> {
        check_since(since, &self.clock)?;
        self.check_horizon(since, None)?;
        Ok(changes_since(self.registers.values(), document, since))
    }

    /// [`SessionState::changes_since_with`] visiting only the registers new to `since`, found
    /// with `index` (a [`DeltaIndex::new`] of this state as it is): the same answer in
    /// `O(replicas · log n + new · log n)` instead of `O(n)` for `n` registers, so many
    /// clients catching up on one session each pay for what they have not seen. An index
    /// that does not describe this state (another clock or number of registers, a path this
    /// state lacks) is not used: the answer is then the walk over every register.
    pub fn changes_since_indexed(
        &self,
        since: &VectorClock,
        document: &Document,
        index: &DeltaIndex,
    ) -> Result<Vec<Change>, SinceRefused> {
        check_since(since, &self.clock)?;
        self.check_horizon(since, None)?;
        if index.describes(self) {
            let new: Option<Vec<&Register>> = index
                .new_paths(since)
                .map(|path| self.registers.get(path))
                .collect();
            if let Some(new) = new {
                return Ok(changes_since(new, document, since));
            }
        }
        Ok(changes_since(self.registers.values(), document, since))
    }

    /// Applies one batch with the rules of design §3; on `Err` nothing changed.
    ///
    /// * `c = batch.clock[r]`, or `session_clock[r] + 1` when the entry is missing.
    /// * `c <= session_clock[r]` is a duplicate: [`Outcome::Duplicate`]. This includes `c = 0`,
    ///   which is not a valid sequence number: callers reject it first with
    ///   [`Batch::validate`], and an unvalidated one changes nothing.
    /// * `c > session_clock[r] + 1`, or `clock[q] > session_clock[q]` for another replica `q`:
    ///   [`MissingDependencies`].
    /// * Otherwise every change becomes a write stamped `max(timestamp_ms, 1 + the largest stamp
    ///   the batch covers)` and ordered by (stamp, replica, sequence, list index).
    pub fn apply(&mut self, batch: &Batch) -> Result<Outcome, NotApplied> {
        self.apply_reporting(batch, ReportLimits::UNLIMITED)
    }

    /// [`SessionState::apply`], listing only the first conflicts that fit `limits` (all of them
    /// are still counted in [`Applied::conflicts_total`]). The state it leaves is the same.
    pub fn apply_reporting(
        &mut self,
        batch: &Batch,
        limits: ReportLimits,
    ) -> Result<Outcome, NotApplied> {
        let replica = batch.replica_id.as_str();
        let seen = self.clock.get(replica).copied().unwrap_or(0);
        let sequence = batch.sequence(&self.clock);
        if sequence <= seen {
            return Ok(Outcome::Duplicate);
        }
        // Every clock entry must name applied events; a named replica's own entry is its dot,
        // checked against `seen + 1` instead.
        let unseen = batch.clock.iter().any(|(other, &count)| {
            (other != replica || !batch.replica_named) && count > self.seen(other)
        });
        if sequence > seen.saturating_add(1) || unseen {
            return Err(MissingDependencies {
                session_clock: self.clock.clone(),
            }
            .into());
        }
        let own = batch.replica_named.then_some((replica, sequence));
        self.check_horizon(&batch.clock, own)?;

        let effective_timestamp = self.effective_timestamp(batch, sequence)?;
        // Concurrent: a write from an event the batch does not cover, other than the batch's
        // own earlier changes. A named replica covers its own earlier events.
        let is_concurrent = |existing: &Register| {
            let same_batch =
                existing.replica_id == batch.replica_id && existing.sequence == sequence;
            !same_batch && !batch.covers(sequence, &existing.replica_id, existing.sequence)
        };
        let event = (effective_timestamp, replica, sequence);
        let beats_batch = |existing: &Register| {
            (
                existing.timestamp,
                existing.replica_id.as_str(),
                existing.sequence,
            ) > event
        };
        let mut winners = Winners::set_aside(&mut self.registers, beats_batch, is_concurrent);
        let mut conflicts = Conflicts::new(limits);
        let mut applied = 0;
        for (index, change) in batch.changes.iter().enumerate() {
            let write = Register {
                path: change.path().clone(),
                value: change.value().cloned(),
                replica_id: batch.replica_id.clone(),
                sequence,
                timestamp: effective_timestamp,
                index,
                parents_made: None,
            };
            if self.put(write, &mut winners, is_concurrent, &mut conflicts) {
                applied += 1;
            }
        }
        winners.restore(&mut self.registers);
        let largest = self
            .stamp(replica, seen)
            .unwrap_or(0)
            .max(effective_timestamp);
        self.stamps.insert(replica, sequence, largest);
        self.clock.insert(batch.replica_id.clone(), sequence);
        Ok(Outcome::Applied(Applied {
            dot: (batch.replica_id.clone(), sequence),
            effective_timestamp,
            applied,
            conflicts: conflicts.list,
            conflicts_total: conflicts.total,
        }))
    }

    /// The user who owns `replica_id` in this session, if anyone does yet.
    pub fn owner(&self, replica_id: &str) -> Option<&str> {
        self.owners.get(replica_id).map(String::as_str)
    }

    /// Makes `subject` the owner of `replica_id` unless someone already is; returns the owner.
    pub fn claim(&mut self, replica_id: &str, subject: &str) -> &str {
        self.owners
            .entry(replica_id.to_owned())
            .or_insert_with(|| subject.to_owned())
    }

    /// How many events of `replica` the session has applied.
    fn seen(&self, replica: &str) -> u64 {
        self.clock.get(replica).copied().unwrap_or(0)
    }

    /// The largest stamp of events `(replica, 1..=sequence)`, if applied.
    fn stamp(&self, replica: &str, sequence: u64) -> Option<u64> {
        self.stamps.get(replica, sequence)
    }

    /// `max(timestamp_ms, 1 + the largest stamp of any event the batch covers)`; `stamps` keeps
    /// per replica the largest stamp up to each event (a named replica's stamps grow with its
    /// sequence numbers; an unnamed one's two devices need not).
    ///
    /// Every stamp it reads is of an applied event, so a missing one means the stored session
    /// lost it (a state loaded from rows that are not whole): refused, never guessed lower.
    fn effective_timestamp(&self, batch: &Batch, sequence: u64) -> Result<u64, CorruptState> {
        let named = batch
            .clock
            .iter()
            .filter(|(other, _)| !batch.replica_named || *other != &batch.replica_id)
            .map(|(other, &count)| (other.as_str(), count));
        let own_previous = batch
            .replica_named
            .then(|| (batch.replica_id.as_str(), sequence.saturating_sub(1)));
        let mut floor = None;
        for (replica, count) in named.chain(own_previous).filter(|(_, count)| *count > 0) {
            let stamp = self.stamp(replica, count).ok_or_else(|| {
                CorruptState(format!(
                    "no stamp is stored for the applied event ({replica:?}, {count})"
                ))
            })?;
            floor = floor.max(Some(stamp));
        }
        Ok(match floor {
            Some(floor) => batch.timestamp_ms.max(floor.saturating_add(1)),
            None => batch.timestamp_ms,
        })
    }

    /// Stores `write` unless a larger-keyed write at its path or an ancestor hides it, drops the
    /// writes it hides (same path or below, smaller key), and records a conflict for every
    /// overlapping write `is_concurrent` accepts. Returns whether `write` was stored.
    ///
    /// A `set` that is hidden or dropped still made its parents objects at its key: the
    /// tombstone that hides or drops it remembers that key (`Register::parents_made`).
    ///
    /// `winners` holds the registers set aside for the batch (see [`crate::overlap`]); every
    /// register left in the map has a smaller key than `write`.
    fn put(
        &mut self,
        mut write: Register,
        winners: &mut Winners,
        is_concurrent: impl Fn(&Register) -> bool,
        conflicts: &mut Conflicts,
    ) -> bool {
        let tokens = write.path.tokens().to_vec();
        // The deepest write at an ancestor or the path itself with a larger key, if any. Such
        // writes are winners: everything left in the map has a smaller key.
        let mut hider = None;
        // Ancestors, outermost first, then the path itself.
        for depth in 1..=tokens.len() {
            let prefix = &tokens[..depth];
            for existing in [self.registers.get(prefix), winners.get(prefix)]
                .into_iter()
                .flatten()
            {
                if is_concurrent(existing) {
                    conflicts.record(&write, existing);
                }
                if existing.cmp_order(&write).is_gt() {
                    hider = Some(depth);
                }
            }
        }
        // Descendants among the winners: counted by range, never replaced.
        winners.record_descendants(&write, conflicts);
        if let Some(depth) = hider {
            // Whatever `write` would hide, the larger write above it already hid (there is
            // nothing of the map below it). A hidden set still made the parents objects.
            if let Some(hiding) = winners.get_mut(&tokens[..depth]) {
                hiding.remember_parents_made(write.parents_made_key());
                self.touched.0.insert(hiding.path.clone());
            }
            return false;
        }
        // Descendants in the map: the entries right after the path that extend its tokens,
        // and the entry at the path itself. Each has a smaller key and leaves the map now.
        let below = (Bound::Included(tokens.as_slice()), Bound::Unbounded);
        let mut beaten = Vec::new();
        for (path, existing) in self
            .registers
            .range::<[String], _>(below)
            .take_while(|(path, _)| path.tokens().starts_with(&tokens))
        {
            if path.tokens().len() > tokens.len() && is_concurrent(existing) {
                conflicts.record(&write, existing);
            }
            beaten.push(path.clone());
        }
        for path in beaten {
            if let Some(gone) = self.registers.remove(&path) {
                write.remember_parents_made(gone.parents_made_key());
            }
            self.touched.0.insert(path);
        }
        self.touched.0.insert(write.path.clone());
        self.registers.insert(write.path.clone(), write);
        true
    }
}

/// Stamps are stored per replica as the list of events `1..=clock[r]`; only a session held
/// whole has them all (a state loaded for one batch is saved as rows, [`crate::rows`]).
fn serialize_stamps<S: Serializer>(stamps: &Stamps, serializer: S) -> Result<S::Ok, S::Error> {
    let dense = stamps.to_dense().ok_or_else(|| {
        serde::ser::Error::custom(
            "a session loaded for one batch is saved as rows, not as one value",
        )
    })?;
    dense.serialize(serializer)
}

/// Registers are stored as a list sorted by path (map keys would have to be strings).
fn serialize_registers<S: Serializer>(
    registers: &BTreeMap<Pointer, Register>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(registers.values())
}
