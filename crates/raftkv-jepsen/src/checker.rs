//! A linearizability checker for raftkv's per-key register, in the style of Knossos and Porcupine.
//!
//! A Jepsen-style test records what clients asked for and what they were told, with the time each call
//! started and ended. The history is linearizable if every operation can be given a single instant between
//! its invocation and its completion such that, taken in that order, the operations are legal for a plain
//! register. Raft is supposed to give exactly that; this module is how a test proves it did (or shows the
//! exact place where it did not).
//!
//! The check is NP-complete in general, so the module does three things to keep it tractable:
//!
//! * **P-compositionality.** Linearizability is local: a history is linearizable iff each key's
//!   sub-history is. Every key is checked on its own, which turns one huge search into many small ones.
//! * **Wing & Gong's search with Lowe's memoisation**, as Porcupine implements it. The operations of a
//!   key become call and return entries in a doubly linked list sorted by time. The search repeatedly
//!   picks a call that comes before the first pending return (an op that could be next), checks it
//!   against the model, and lifts it out of the list; on a dead end it pops the last choice and tries the
//!   next candidate. A cache of (set of linearized ops, register state) pairs prunes every configuration
//!   that was already explored, because the future of the search depends on nothing else.
//! * **A time budget.** When the budget runs out the answer is `Unknown`, which a test must treat as a
//!   failure to prove anything, never as a pass.
//!
//! Indeterminate (`Info`) operations follow Jepsen's rules: they may have taken effect at any point after
//! their invocation, or never. They are given a return entry at +infinity and the search succeeds once
//! every `Ok` op is linearized, so an `Info` op is linearized only if that helps.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// What the client learned about an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The operation took effect at some instant between its invocation and its completion, and its
    /// result is what the server said.
    Ok,
    /// The operation definitely did not take effect (for example, rejected before it reached the log).
    /// The checker drops it: it can neither explain nor contradict anything.
    Fail,
    /// The client does not know (a timeout, a dropped connection). It may take effect at any point after
    /// its invocation, or never, and its result is unknown.
    Info,
}

/// An operation on one key's register, together with the result the client observed.
///
/// The results live inside the operation (rather than in a separate field) so that an operation and what
/// it claims to have seen cannot drift apart; for `Info` operations the result fields are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegOp {
    /// A read that observed this value (`None`: the key was absent).
    Read(Option<u64>),
    /// Set the register to this value.
    Write(u64),
    /// Compare-and-swap: if the register equals `expected` (`None`: "create if absent"), set it to `new`.
    /// `swapped` is what the server reported. A CAS with `swapped == false` is still an ordinary completed
    /// operation: it claims the register did not equal `expected` at its linearization point.
    Cas {
        expected: Option<u64>,
        new: u64,
        swapped: bool,
    },
    /// Remove the key (the register becomes `None`).
    Delete,
}

/// One entry of a history, as a Jepsen client records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The logical client that issued the operation. The checker does not rely on it (real-time order
    /// comes from the timestamps alone); it is carried so that failures can name who saw what.
    pub process: u64,
    pub key: String,
    pub op: RegOp,
    /// When the call was made, in monotonic nanoseconds.
    pub invoke: u64,
    /// When the response arrived. Ignored for `Info` ops (they are treated as never completing). An `Ok`
    /// op without one is treated as completing at +infinity: it happened, but nothing is known about when.
    pub complete: Option<u64>,
    pub outcome: Outcome,
}

/// The verdict for a single key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    NotLinearizable {
        explanation: String,
    },
    /// The search ran out of budget, or the sub-history was malformed. Not a pass.
    Unknown {
        reason: String,
    },
}

/// The verdict for a whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// At least one key is not linearizable; `key` is the first such key in key order.
    NotLinearizable {
        key: String,
        explanation: String,
    },
    /// No key is known to be wrong, but at least one could not be decided. This is never a pass: a
    /// checker that gives up has proven nothing.
    Unknown {
        key: String,
        reason: String,
    },
}

impl Verdict {
    /// Only a full proof counts; `Unknown` is deliberately a failure here.
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => write!(f, "linearizable"),
            Verdict::NotLinearizable { key, explanation } => {
                write!(f, "NOT linearizable (key {key:?}):\n{explanation}")
            }
            Verdict::Unknown { key, reason } => write!(f, "unknown (key {key:?}): {reason}"),
        }
    }
}

/// Everything the checker found, per key and overall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// One entry per key that appears in the history, in key order (so reports are reproducible).
    pub per_key: Vec<(String, KeyVerdict)>,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

/// Checks a history against a per-key register model.
///
/// `budget` is a deadline for the whole call, not per key: a test wants to know how long checking can
/// take in total. Keys are checked in key order, so once the deadline passes every key still to be
/// searched is reported `Unknown` (a key that needs no search at all, e.g. one with only `Fail` ops, is
/// still decided).
pub fn check(history: &[Operation], budget: Duration) -> CheckReport {
    let start = Instant::now();
    // An absurdly large budget overflows `Instant`; that simply means "no deadline".
    let deadline = start.checked_add(budget);

    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }

    let per_key: Vec<(String, KeyVerdict)> = by_key
        .into_iter()
        .map(|(key, ops)| (key.to_string(), check_key(&ops, deadline, budget)))
        .collect();
    let verdict = overall(&per_key);
    CheckReport {
        per_key,
        verdict,
        elapsed: start.elapsed(),
    }
}

/// Folds the per-key verdicts: any violation wins over any uncertainty, because a definite bug is the
/// more useful thing to report, and uncertainty wins over success because it proves nothing.
fn overall(per_key: &[(String, KeyVerdict)]) -> Verdict {
    let mut bad = per_key.iter().filter_map(|(key, v)| match v {
        KeyVerdict::NotLinearizable { explanation } => Some((key, explanation)),
        _ => None,
    });
    if let Some((key, explanation)) = bad.next() {
        let others = bad.count();
        let mut explanation = explanation.clone();
        if others > 0 {
            explanation.push_str(&format!(
                "\n({others} other key(s) are not linearizable either; see per_key)"
            ));
        }
        return Verdict::NotLinearizable {
            key: key.clone(),
            explanation,
        };
    }
    for (key, v) in per_key {
        if let KeyVerdict::Unknown { reason } = v {
            return Verdict::Unknown {
                key: key.clone(),
                reason: reason.clone(),
            };
        }
    }
    Verdict::Linearizable
}

/// The register's transition function: the state after `op` runs in `state`, or `None` if the op's
/// observed result is impossible in that state.
///
/// `info` ops have no trustworthy result, so a CAS among them does whatever the state dictates instead
/// of being held to its reported `swapped`.
fn step(state: Option<u64>, op: &RegOp, info: bool) -> Option<Option<u64>> {
    match *op {
        RegOp::Read(seen) => (seen == state).then_some(state),
        RegOp::Write(v) => Some(Some(v)),
        RegOp::Delete => Some(None),
        RegOp::Cas { expected, new, .. } if info => {
            Some(if state == expected { Some(new) } else { state })
        }
        RegOp::Cas {
            expected,
            new,
            swapped,
        } => match (state == expected, swapped) {
            (true, true) => Some(Some(new)),
            (false, false) => Some(state),
            _ => None,
        },
    }
}

/// Why `step` rejects an op, in words, for failure reports.
fn rejection(state: Option<u64>, op: &RegOp) -> String {
    match *op {
        RegOp::Read(seen) => format!(
            "it observed {} but the register held {}",
            show(seen),
            show(state)
        ),
        RegOp::Cas {
            expected,
            swapped: true,
            ..
        } => format!(
            "it reported a swap but the register held {}, not the expected {}",
            show(state),
            show(expected)
        ),
        RegOp::Cas {
            expected,
            swapped: false,
            ..
        } => format!(
            "it reported no swap but the register held the expected {}",
            show(expected)
        ),
        // Writes and deletes are always legal; this arm exists only to keep the match total.
        RegOp::Write(_) | RegOp::Delete => "it is always legal".to_string(),
    }
}

fn show(v: Option<u64>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "absent".to_string(),
    }
}

fn describe_op(op: &Operation) -> String {
    let what = match op.op {
        RegOp::Read(v) => format!("read -> {}", show(v)),
        RegOp::Write(v) => format!("write {v}"),
        RegOp::Delete => "delete".to_string(),
        RegOp::Cas {
            expected,
            new,
            swapped,
        } => {
            let result = match op.outcome {
                Outcome::Info => "?",
                _ if swapped => "swapped",
                _ => "not swapped",
            };
            format!("cas {} -> {new} ({result})", show(expected))
        }
    };
    let when = match (op.outcome, op.complete) {
        (Outcome::Info, _) => format!("info, invoked {}, outcome unknown", op.invoke),
        (Outcome::Fail, _) => format!("fail, invoked {}", op.invoke),
        (Outcome::Ok, Some(c)) => format!("ok, {}..{}", op.invoke, c),
        (Outcome::Ok, None) => format!("ok, invoked {}, completion time unknown", op.invoke),
    };
    format!("process {} {what} [{when}]", op.process)
}

/// How many search steps pass between looks at the clock. `Instant::now` is cheap but not free, and a
/// step is well under a microsecond, so this bounds the overshoot to a few milliseconds.
const CLOCK_CHECK_INTERVAL: u64 = 4096;

/// How much of a failing search to print: enough context to see the problem, not a wall of text.
const PREFIX_TAIL_SHOWN: usize = 8;
const CANDIDATES_SHOWN: usize = 12;

/// An operation of one key that takes part in the search (`Fail` ops and `Info` reads never do).
struct Event<'a> {
    op: &'a Operation,
    /// `Info` ops may be left out of the linearization, and their results are not trusted.
    info: bool,
    /// Return time; `None` is +infinity (an `Info` op, or an `Ok` op with no recorded completion).
    ret: Option<u64>,
}

impl Event<'_> {
    fn step(&self, state: Option<u64>) -> Option<Option<u64>> {
        step(state, &self.op.op, self.info)
    }
}

/// Marks the end of the entry list.
const NIL: usize = usize::MAX;
/// Index of the sentinel that heads the entry list; real entries start at 1.
const HEAD: usize = 0;

/// A call or return entry in the dancing-links list.
///
/// A `Vec` with index links (rather than pointers) keeps the list safe and cache friendly, and lets a
/// lifted entry remember its neighbours so that undoing a choice is O(1): entries are lifted and
/// restored strictly in stack order, which is exactly what makes Knuth's dancing-links trick valid.
#[derive(Clone, Copy)]
struct Node {
    event: usize,
    is_call: bool,
    /// For a call, its return entry; unused for returns.
    matching: usize,
    prev: usize,
    next: usize,
}

struct EntryList {
    nodes: Vec<Node>,
    /// `call_node[event]` is the call entry of that event.
    call_node: Vec<usize>,
}

impl EntryList {
    /// Builds the time-ordered list of call and return entries.
    ///
    /// Tie-break: at equal timestamps calls sort before returns. That makes an op completing at `t` and
    /// an op invoked at `t` concurrent, so the checker never insists on an order that equal timestamps
    /// cannot witness (two threads reading a nanosecond clock can get the same value in either order).
    /// The price is that a violation hidden entirely inside one clock tick goes unreported; the
    /// alternative would be false alarms, which are worse for a test suite people must trust.
    ///
    /// Returns at +infinity (every `Info` op, and `Ok` ops with no completion) come after every call, so
    /// they never order anything: the walk reaches one only when no remaining op can go next at all,
    /// and then backtracking is right whichever op it belongs to. `Info` ops never need to reach their
    /// return because the search stops as soon as every `Ok` op is linearized. `Ok` returns are still
    /// put first so that the walk stops at an op that is actually required.
    fn new(events: &[Event<'_>]) -> EntryList {
        // (time, rank, event, is_call): rank orders calls < Ok returns < Info returns at equal times.
        let mut order: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(events.len() * 2);
        for (i, e) in events.iter().enumerate() {
            order.push((e.op.invoke, 0, i, true));
            let ret = match (e.info, e.ret) {
                (true, _) => (u64::MAX, 2),
                (false, Some(t)) => (t, 1),
                (false, None) => (u64::MAX, 1),
            };
            order.push((ret.0, ret.1, i, false));
        }
        order.sort_unstable();

        let mut nodes = Vec::with_capacity(order.len() + 1);
        nodes.push(Node {
            event: NIL,
            is_call: false,
            matching: NIL,
            prev: NIL,
            next: NIL,
        });
        let mut call_node = vec![NIL; events.len()];
        let mut ret_node = vec![NIL; events.len()];
        for (pos, &(_, _, event, is_call)) in order.iter().enumerate() {
            let idx = pos + 1;
            nodes.push(Node {
                event,
                is_call,
                matching: NIL,
                prev: idx - 1,
                next: if pos + 1 < order.len() { idx + 1 } else { NIL },
            });
            if is_call {
                call_node[event] = idx;
            } else {
                ret_node[event] = idx;
            }
        }
        nodes[HEAD].next = if order.is_empty() { NIL } else { 1 };
        for (event, &call) in call_node.iter().enumerate() {
            nodes[call].matching = ret_node[event];
        }
        EntryList { nodes, call_node }
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn unlink(&mut self, idx: usize) {
        let Node { prev, next, .. } = self.nodes[idx];
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, idx: usize) {
        let Node { prev, next, .. } = self.nodes[idx];
        self.nodes[prev].next = idx;
        if next != NIL {
            self.nodes[next].prev = idx;
        }
    }

    /// Removes an op (its call and its return) once it has been linearized.
    fn lift(&mut self, call: usize) {
        let ret = self.nodes[call].matching;
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes `lift`, in the reverse order, so the links the entries remember are valid again.
    fn unlift(&mut self, call: usize) {
        let ret = self.nodes[call].matching;
        self.relink(ret);
        self.relink(call);
    }
}

/// A `Hasher` for keys that are already well-mixed `u64`s, so the cache does not pay for SipHash on
/// top of the Zobrist hash it already has.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by the cache; this keeps the hasher correct for anything else.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// SplitMix64's finaliser: cheap, and good enough that Zobrist keys built from it rarely collide.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-op Zobrist key: the hash of a set of linearized ops is the XOR of its members' keys, so it is
/// updated in O(1) when one op is added or removed instead of rehashing the whole bitset each step.
fn op_key(event: usize) -> u64 {
    mix64(event as u64 ^ 0x2545_F491_4F6C_DD1D)
}

fn state_key(state: Option<u64>) -> u64 {
    match state {
        None => 0x6A09_E667_F3BC_C908,
        Some(v) => mix64(v ^ 0xBB67_AE85_84CA_A73B),
    }
}

/// Lowe's memo: every (linearized set, state) configuration already explored. Two searches that reach
/// the same configuration have identical futures, so the second one can be pruned. Buckets hold the full
/// keys so that a hash collision costs a comparison, never a wrong answer.
type Cache = HashMap<u64, Vec<(Box<[u64]>, Option<u64>)>, BuildHasherDefault<PreHashed>>;

/// Records a configuration; `false` if it had been seen before.
fn remember(cache: &mut Cache, hash: u64, bits: &[u64], state: Option<u64>) -> bool {
    let bucket = cache.entry(hash).or_default();
    if bucket.iter().any(|(b, s)| *s == state && **b == *bits) {
        return false;
    }
    bucket.push((bits.into(), state));
    true
}

fn set_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

fn clear_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] &= !(1 << (i % 64));
}

/// Checks one key's sub-history.
fn check_key(ops: &[&Operation], deadline: Option<Instant>, budget: Duration) -> KeyVerdict {
    let mut events = Vec::with_capacity(ops.len());
    for &op in ops {
        match op.outcome {
            Outcome::Fail => {}
            // An unacknowledged read changes nothing and its value is unknown: it constrains nothing.
            Outcome::Info if matches!(op.op, RegOp::Read(_)) => {}
            Outcome::Info => events.push(Event {
                op,
                info: true,
                ret: None,
            }),
            Outcome::Ok => {
                if op.complete.is_some_and(|c| c < op.invoke) {
                    // A response before its request means the recorder is broken; no verdict about the
                    // system under test can be trusted, so refuse to give one.
                    return KeyVerdict::Unknown {
                        reason: format!(
                            "malformed history: operation completes before it is invoked: {}",
                            describe_op(op)
                        ),
                    };
                }
                events.push(Event {
                    op,
                    info: false,
                    ret: op.complete,
                });
            }
        }
    }

    let ok_total = events.iter().filter(|e| !e.info).count();
    // With no Ok ops, leaving every Info op out is a valid (empty) linearization.
    if ok_total == 0 {
        return KeyVerdict::Linearizable;
    }

    let mut list = EntryList::new(&events);
    let mut linearized = vec![0u64; events.len().div_ceil(64)];
    let mut linearized_hash = 0u64;
    let mut cache = Cache::default();
    // The linearization so far: each op with the state before it, so backtracking can restore it.
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut ok_linearized = 0usize;
    let mut best: Vec<usize> = Vec::new();
    let mut best_state: Option<u64> = None;
    let mut steps: u64 = 0;
    let mut entry = list.first();

    loop {
        // Checked on the very first step too, so a spent budget is honoured even for easy keys.
        if steps.is_multiple_of(CLOCK_CHECK_INTERVAL)
            && deadline.is_some_and(|d| Instant::now() >= d)
        {
            return KeyVerdict::Unknown {
                reason: format!(
                    "time budget of {budget:?} exhausted after {steps} search steps; the longest \
                     linearizable prefix found covered {} of {} operations",
                    best.len(),
                    events.len()
                ),
            };
        }
        steps += 1;

        // Invariant: while an Ok op is unlinearized its return entry is still in the list, so the walk
        // below always meets a return before running off the end. Guard anyway rather than panic.
        let Some(&node) = list.nodes.get(entry) else {
            return KeyVerdict::Unknown {
                reason: "internal error: linearizability search ran off the end of the history"
                    .to_string(),
            };
        };

        if node.is_call {
            let event = &events[node.event];
            if let Some(next_state) = event.step(state) {
                set_bit(&mut linearized, node.event);
                let hash = linearized_hash ^ op_key(node.event);
                if remember(
                    &mut cache,
                    hash ^ state_key(next_state),
                    &linearized,
                    next_state,
                ) {
                    stack.push((node.event, state));
                    state = next_state;
                    linearized_hash = hash;
                    if !event.info {
                        ok_linearized += 1;
                        if ok_linearized == ok_total {
                            return KeyVerdict::Linearizable;
                        }
                    }
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(e, _)| e).collect();
                        best_state = state;
                    }
                    list.lift(entry);
                    entry = list.first();
                    continue;
                }
                clear_bit(&mut linearized, node.event);
            }
            entry = node.next;
        } else {
            // A pending return: its op had to be linearized before anything later, and no choice of
            // the ops before it worked from here. Undo the most recent choice and try its successor.
            let Some((event, prev_state)) = stack.pop() else {
                return KeyVerdict::NotLinearizable {
                    explanation: explain(&events, &best, best_state),
                };
            };
            state = prev_state;
            clear_bit(&mut linearized, event);
            linearized_hash ^= op_key(event);
            if !events[event].info {
                ok_linearized -= 1;
            }
            let call = list.call_node[event];
            list.unlift(call);
            entry = list.nodes[call].next;
        }
    }
}

/// Describes a failed search the way Knossos does: the longest prefix that could be linearized, and why
/// each op that could have come next after it could not.
///
/// The longest prefix is a heuristic (the real culprit may be earlier), but in practice it lands right
/// at the anomaly: the ops listed after it are the ones a human should look at first.
fn explain(events: &[Event<'_>], best: &[usize], state: Option<u64>) -> String {
    let ok_total = events.iter().filter(|e| !e.info).count();
    let mut out = format!(
        "no linearization exists for the {} operations on this key ({ok_total} ok, {} info).\n",
        events.len(),
        events.len() - ok_total
    );

    if best.is_empty() {
        out.push_str("not even the first operation could be linearized (initial state: absent).\n");
    } else {
        out.push_str(&format!(
            "longest linearizable prefix: {} operations, leaving the register at {}:\n",
            best.len(),
            show(state)
        ));
        let skip = best.len().saturating_sub(PREFIX_TAIL_SHOWN);
        if skip > 0 {
            out.push_str(&format!("  ... {skip} earlier operations\n"));
        }
        for (i, &e) in best.iter().enumerate().skip(skip) {
            out.push_str(&format!("  {}. {}\n", i + 1, describe_op(events[e].op)));
        }
    }

    let mut in_prefix = vec![false; events.len()];
    for &e in best {
        in_prefix[e] = true;
    }
    // The first pending return bounds what can come next: every op invoked no later than it (calls
    // sort before returns at equal times) is a candidate, exactly as in the search's entry list.
    let blocker = events
        .iter()
        .enumerate()
        .filter(|&(i, e)| !in_prefix[i] && !e.info)
        .min_by_key(|&(i, e)| (e.ret.unwrap_or(u64::MAX), i));
    let Some((_, blocker)) = blocker else {
        return out;
    };
    let horizon = blocker.ret.unwrap_or(u64::MAX);
    out.push_str(&format!(
        "none of these could be linearized next (each was invoked before {} completed):\n",
        describe_op(blocker.op)
    ));
    let candidates: Vec<&Event<'_>> = events
        .iter()
        .enumerate()
        .filter(|&(i, e)| !in_prefix[i] && e.op.invoke <= horizon)
        .map(|(_, e)| e)
        .collect();
    for e in candidates.iter().take(CANDIDATES_SHOWN) {
        let why = match e.step(state) {
            None => rejection(state, &e.op.op),
            Some(_) => "legal here, but no linearization of the remaining operations follows it"
                .to_string(),
        };
        out.push_str(&format!("  - {}: {why}\n", describe_op(e.op)));
    }
    if candidates.len() > CANDIDATES_SHOWN {
        out.push_str(&format!(
            "  ... {} more\n",
            candidates.len() - CANDIDATES_SHOWN
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_secs(10);

    fn op(process: u64, key: &str, op: RegOp, invoke: u64, complete: u64) -> Operation {
        Operation {
            process,
            key: key.to_string(),
            op,
            invoke,
            complete: Some(complete),
            outcome: Outcome::Ok,
        }
    }

    fn ok(process: u64, op_: RegOp, invoke: u64, complete: u64) -> Operation {
        op(process, "k", op_, invoke, complete)
    }

    fn info(process: u64, op_: RegOp, invoke: u64) -> Operation {
        Operation {
            complete: None,
            outcome: Outcome::Info,
            ..ok(process, op_, invoke, invoke)
        }
    }

    fn fail(process: u64, op_: RegOp, invoke: u64, complete: u64) -> Operation {
        Operation {
            outcome: Outcome::Fail,
            ..ok(process, op_, invoke, complete)
        }
    }

    fn cas(expected: Option<u64>, new: u64, swapped: bool) -> RegOp {
        RegOp::Cas {
            expected,
            new,
            swapped,
        }
    }

    use RegOp::{Delete, Read, Write};

    fn verdict(history: &[Operation]) -> Verdict {
        check(history, BUDGET).verdict
    }

    #[track_caller]
    fn assert_linearizable(history: &[Operation]) {
        let v = verdict(history);
        assert_eq!(v, Verdict::Linearizable, "{v}");
    }

    #[track_caller]
    fn assert_not_linearizable(history: &[Operation]) -> String {
        match verdict(history) {
            Verdict::NotLinearizable { explanation, .. } => explanation,
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        let report = check(&[], BUDGET);
        assert_eq!(report.verdict, Verdict::Linearizable);
        assert!(report.per_key.is_empty());
    }

    #[test]
    fn single_write_then_read() {
        assert_linearizable(&[ok(1, Write(1), 0, 10), ok(2, Read(Some(1)), 20, 30)]);
    }

    #[test]
    fn read_of_absent_key_sees_none() {
        assert_linearizable(&[ok(1, Read(None), 0, 10)]);
        assert_not_linearizable(&[ok(1, Read(Some(0)), 0, 10)]);
    }

    #[test]
    fn sequential_reads_and_writes() {
        assert_linearizable(&[
            ok(1, Read(None), 0, 5),
            ok(1, Write(1), 10, 20),
            ok(2, Read(Some(1)), 30, 40),
            ok(3, Write(2), 50, 60),
            ok(1, Read(Some(2)), 70, 80),
            ok(2, Delete, 90, 100),
            ok(3, Read(None), 110, 120),
            ok(1, cas(None, 7, true), 130, 140),
            ok(2, cas(Some(1), 8, false), 150, 160),
            ok(3, Read(Some(7)), 170, 180),
        ]);
    }

    #[test]
    fn stale_read_is_not_linearizable() {
        let explanation = assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(1, Write(2), 20, 30),
            ok(2, Read(Some(1)), 40, 50),
        ]);
        // The explanation must point at the offending read and say what the register held.
        assert!(explanation.contains("process 2 read -> 1"), "{explanation}");
        assert!(explanation.contains("held 2"), "{explanation}");
    }

    #[test]
    fn concurrent_read_may_see_old_value() {
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(1, Write(2), 20, 60),
            ok(2, Read(Some(1)), 30, 40),
        ]);
    }

    #[test]
    fn concurrent_read_may_see_new_value() {
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(1, Write(2), 20, 60),
            ok(2, Read(Some(2)), 30, 40),
        ]);
    }

    #[test]
    fn concurrent_reads_cannot_disagree_on_order() {
        // Once a read has seen the new value, a read that starts after it ends cannot see the old one.
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(1, Write(2), 20, 100),
            ok(2, Read(Some(2)), 30, 40),
            ok(3, Read(Some(1)), 50, 60),
        ]);
    }

    #[test]
    fn read_of_never_written_value_is_not_linearizable() {
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(2, Write(2), 5, 15),
            ok(3, Read(Some(3)), 0, 20),
        ]);
    }

    #[test]
    fn equal_timestamps_count_as_concurrent() {
        // The write completes at 10 and the read is invoked at 10: calls sort before returns, so they are
        // concurrent and the read may still see the old value.
        assert_linearizable(&[
            ok(1, Write(1), 0, 5),
            ok(1, Write(2), 6, 10),
            ok(2, Read(Some(1)), 10, 20),
        ]);
        // One nanosecond later the order is real and the stale read is caught.
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 5),
            ok(1, Write(2), 6, 10),
            ok(2, Read(Some(1)), 11, 20),
        ]);
    }

    #[test]
    fn concurrent_cas_both_swapped_is_not_linearizable() {
        assert_not_linearizable(&[
            ok(1, Write(0), 0, 10),
            ok(1, cas(Some(0), 1, true), 20, 50),
            ok(2, cas(Some(0), 2, true), 25, 55),
        ]);
    }

    #[test]
    fn concurrent_cas_one_swapped_is_linearizable() {
        assert_linearizable(&[
            ok(1, Write(0), 0, 10),
            ok(1, cas(Some(0), 1, true), 20, 50),
            ok(2, cas(Some(0), 2, false), 25, 55),
            ok(3, Read(Some(1)), 60, 70),
        ]);
    }

    #[test]
    fn failed_cas_must_not_see_expected_value() {
        // Nothing else runs, so the register certainly held 0: a CAS(0 -> 1) reporting no swap is a lie.
        assert_not_linearizable(&[
            ok(1, Write(0), 0, 10),
            ok(1, cas(Some(0), 1, false), 20, 30),
        ]);
        // Create-if-absent on an absent key must succeed.
        assert_not_linearizable(&[ok(1, cas(None, 1, false), 0, 10)]);
        assert_linearizable(&[
            ok(1, cas(None, 1, true), 0, 10),
            ok(2, Read(Some(1)), 20, 30),
        ]);
    }

    #[test]
    fn delete_makes_key_absent() {
        assert_linearizable(&[
            ok(1, Write(3), 0, 10),
            ok(1, Delete, 20, 30),
            ok(2, Read(None), 40, 50),
        ]);
        assert_not_linearizable(&[
            ok(1, Write(3), 0, 10),
            ok(1, Delete, 20, 30),
            ok(2, Read(Some(3)), 40, 50),
        ]);
    }

    #[test]
    fn info_write_observed_later_is_linearizable() {
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            info(2, Write(2), 20),
            ok(3, Read(Some(2)), 1_000, 1_010),
        ]);
    }

    #[test]
    fn info_write_never_observed_is_linearizable() {
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            info(2, Write(2), 20),
            ok(3, Read(Some(1)), 1_000, 1_010),
            ok(3, Read(Some(1)), 2_000, 2_010),
        ]);
    }

    #[test]
    fn info_write_cannot_take_effect_before_invocation() {
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            ok(3, Read(Some(2)), 20, 30),
            info(2, Write(2), 40),
        ]);
    }

    #[test]
    fn info_write_observed_then_unobserved_is_not_linearizable() {
        // An info op takes effect at most once: after a read saw 2, nothing can bring back 1.
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            info(2, Write(2), 20),
            ok(3, Read(Some(2)), 1_000, 1_010),
            ok(3, Read(Some(1)), 2_000, 2_010),
        ]);
    }

    #[test]
    fn info_cas_applies_only_if_compare_holds() {
        // The info CAS may have swapped 1 -> 5 ...
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            info(2, cas(Some(1), 5, false), 20),
            ok(3, Read(Some(5)), 100, 110),
        ]);
        // ... but not from a state it does not match.
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            info(2, cas(Some(9), 5, true), 20),
            ok(3, Read(Some(5)), 100, 110),
        ]);
    }

    #[test]
    fn info_read_is_ignored() {
        assert_linearizable(&[ok(1, Write(1), 0, 10), info(2, Read(Some(42)), 20)]);
    }

    #[test]
    fn ok_without_completion_happened_at_some_point() {
        let mut write = ok(2, Write(2), 20, 0);
        write.complete = None;
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            write.clone(),
            ok(3, Read(Some(1)), 30, 40),
        ]);
        // Unlike an info op, it must take effect: a swap it claims but that could never have happened
        // is a violation, whereas the same CAS as an info op may simply never have run.
        let mut impossible = ok(2, cas(Some(9), 5, true), 20, 0);
        impossible.complete = None;
        assert_not_linearizable(&[ok(1, Write(1), 0, 10), impossible.clone()]);
        impossible.outcome = Outcome::Info;
        assert_linearizable(&[ok(1, Write(1), 0, 10), impossible]);
    }

    #[test]
    fn failed_ops_are_ignored() {
        assert_not_linearizable(&[
            ok(1, Write(1), 0, 10),
            fail(2, Write(2), 20, 30),
            ok(3, Read(Some(2)), 40, 50),
        ]);
        assert_linearizable(&[
            ok(1, Write(1), 0, 10),
            fail(2, Write(2), 20, 30),
            ok(3, Read(Some(1)), 40, 50),
        ]);
    }

    #[test]
    fn malformed_history_is_unknown() {
        let report = check(&[ok(1, Write(1), 10, 5)], BUDGET);
        assert!(
            matches!(report.verdict, Verdict::Unknown { .. }),
            "{:?}",
            report.verdict
        );
    }

    #[test]
    fn multiple_keys_bad_key_is_named() {
        let history = [
            op(1, "a", Write(1), 0, 10),
            op(2, "b", Write(1), 0, 10),
            op(1, "a", Read(Some(1)), 20, 30),
            op(2, "b", Write(2), 20, 30),
            op(3, "b", Read(Some(1)), 40, 50),
            op(3, "c", Read(None), 40, 50),
        ];
        let report = check(&history, BUDGET);
        match &report.verdict {
            Verdict::NotLinearizable { key, .. } => assert_eq!(key, "b"),
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
        let keys: Vec<&str> = report.per_key.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(report.per_key[0].1, KeyVerdict::Linearizable);
        assert!(matches!(
            report.per_key[1].1,
            KeyVerdict::NotLinearizable { .. }
        ));
        assert_eq!(report.per_key[2].1, KeyVerdict::Linearizable);
        assert!(!report.verdict.is_linearizable());
    }

    #[test]
    fn zero_budget_is_unknown() {
        let history = generate(7, 300, 8, 5);
        let report = check(&history, Duration::ZERO);
        assert!(
            matches!(report.verdict, Verdict::Unknown { ref key, .. } if key == "k"),
            "{:?}",
            report.verdict
        );
        assert!(!report.verdict.is_linearizable());
        // The same history does check out given time, so Unknown above really is the budget.
        assert_eq!(check(&history, BUDGET).verdict, Verdict::Linearizable);
    }

    #[test]
    fn generated_history_150_ops_5_processes() {
        for seed in 1..=5 {
            let history = generate(seed, 150, 5, 0);
            let report = check(&history, BUDGET);
            assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}");
            assert!(report.elapsed < BUDGET);
        }
    }

    #[test]
    fn generated_history_with_info_ops() {
        for seed in 1..=5 {
            let history = generate(seed, 150, 5, 10);
            assert!(history.iter().any(|o| o.outcome == Outcome::Info));
            let report = check(&history, BUDGET);
            assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}");
        }
    }

    #[test]
    fn generated_history_with_corruption_is_caught() {
        // Change one read that observed a value to observe a value nobody ever wrote: the checker must
        // notice, proving the perf tests above are not passing vacuously.
        let mut history = generate(3, 150, 5, 0);
        let victim = history
            .iter_mut()
            .find(|o| matches!(o.op, Read(Some(_))))
            .expect("generator produces reads of written values");
        victim.op = Read(Some(1_000));
        assert_not_linearizable(&history);
    }

    /// A deterministic 64-bit LCG (Knuth's MMIX constants); the high bits are decent enough here.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Simulates `n_procs` clients hammering one real register, so the result is linearizable by
    /// construction. Each op gets a random interval and a random linearization point inside it; the ops
    /// are applied in linearization-point order to compute what each one observed. `info_pct` percent of
    /// the writes, CASes and deletes become `Info`, and of those half never take effect.
    fn generate(seed: u64, n_ops: usize, n_procs: usize, info_pct: u64) -> Vec<Operation> {
        let mut rng = Lcg(seed);
        let mut free_at = vec![0u64; n_procs];
        // (linearization point, takes effect, operation)
        let mut planned: Vec<(u64, bool, Operation)> = Vec::with_capacity(n_ops);
        for _ in 0..n_ops {
            // The process that became idle first goes next, which keeps about n_procs ops in flight.
            let p = (0..n_procs).min_by_key(|&p| free_at[p]).unwrap_or(0);
            let invoke = free_at[p] + rng.below(20);
            let duration = 1 + rng.below(100);
            let complete = invoke + duration;
            let lin = invoke + rng.below(duration + 1);
            free_at[p] = complete + 1;
            let value = rng.below(5);
            let op_ = match rng.below(10) {
                0..=3 => Read(None),
                4..=6 => Write(value),
                7 | 8 => {
                    let expected = rng.below(6);
                    cas((expected < 5).then_some(expected), value, false)
                }
                _ => Delete,
            };
            let mut o = op(p as u64, "k", op_, invoke, complete);
            let mut effective = true;
            if !matches!(op_, Read(_)) && rng.below(100) < info_pct {
                o.outcome = Outcome::Info;
                o.complete = None;
                effective = rng.below(2) == 0;
            }
            planned.push((lin, effective, o));
        }
        planned.sort_by_key(|(lin, _, _)| *lin);

        let mut state: Option<u64> = None;
        let mut history = Vec::with_capacity(n_ops);
        for (_, effective, mut o) in planned {
            if effective {
                match &mut o.op {
                    Read(seen) => *seen = state,
                    Write(v) => state = Some(*v),
                    Delete => state = None,
                    RegOp::Cas {
                        expected,
                        new,
                        swapped,
                    } => {
                        *swapped = state == *expected;
                        if *swapped {
                            state = Some(*new);
                        }
                    }
                }
            }
            history.push(o);
        }
        history.sort_by_key(|o| o.invoke);
        history
    }
}
