//! The clients of a fault test and what they record.
//!
//! Three workloads run side by side, with clients pinned to every node so followers see writes (and
//! forward them) too. The nodes they use follow the membership: a node the membership nemesis adds
//! becomes a target once it is a member, and one it removes stops being one once the removal is
//! done (what it answered until then stays in the history and is checked like everything else):
//!
//! * **register**: strong reads, writes and compare-and-swaps (a `Txn`) on one key at a time, checked for
//!   linearizability per key. Keys rotate every `ops_per_key` operations, because checking cost explodes
//!   with history length and pending ops (see `checker.rs`).
//! * **set**: every add is a put of a fresh key; at the end every acknowledged add must be there and
//!   nothing that was never attempted may be.
//! * **eventual reads**: reads of the register keys from any node, which may be stale but must only ever
//!   return values someone wrote, and with `min_revision` never anything older than that revision.
//!
//! Every written value is unique in the run, so a value read names exactly one write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use super::checker::{self, RegOp};
use super::history::{History, OpRecord, Outcome};
use raftkv_client::pb::v1 as pb;
use raftkv_client::pb::v1::kv_client::KvClient;
use raftkv_client::{NODE_ID_HEADER, certainly_not_proposed};

/// How long a client waits when there is no node to send to (never in practice: the membership
/// nemesis keeps the cluster at its size or more).
const NO_TARGET_WAIT: Duration = Duration::from_millis(50);

pub struct Settings {
    pub request_timeout: Duration,
    pub ops_per_key: u64,
    /// Sleep up to this long between a client's operations, so a healthy cluster does not flood the
    /// history with millions of operations.
    pub stagger: Duration,
    /// The deliberate bug for the harness self-test: register reads are sent as EVENTUAL but checked as
    /// if they were strong. A run with partitions must then be found non-linearizable.
    pub eventual_as_strong: bool,
}

/// Everything the clients share.
pub struct Shared {
    pub history: Arc<History>,
    pub settings: Settings,
    targets: Mutex<Targets>,
    stop: AtomicBool,
    next_value: AtomicU64,
    next_process: AtomicU64,
    register: Mutex<(u64, u64)>,
    /// Every value ever sent for a key (before it was sent), for the phantom check.
    attempted: Mutex<HashMap<String, HashSet<u64>>>,
    /// The highest revision at which a write to the key was acknowledged.
    acked_revision: Mutex<HashMap<String, u64>>,
    pub register_ops: Mutex<Vec<checker::Operation>>,
    pub set_attempted: Mutex<BTreeSet<u64>>,
    pub set_acked: Mutex<BTreeSet<u64>>,
    pub anomalies: Mutex<Vec<String>>,
    pub eventual_reads: AtomicU64,
    pub min_revision_reads: AtomicU64,
}

/// Where the clients send their requests.
struct Targets {
    /// A channel to every node that was ever a target (a removed node's too, for the nemesis's
    /// probes of it).
    clients: BTreeMap<u64, KvClient<Channel>>,
    /// The nodes clients use now, in id order.
    active: Vec<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// `clients`: the nodes to use at first, by id.
    pub fn new(
        history: Arc<History>,
        clients: Vec<(u64, KvClient<Channel>)>,
        settings: Settings,
    ) -> Shared {
        let active = clients.iter().map(|(id, _)| *id).collect();
        Shared {
            history,
            settings,
            targets: Mutex::new(Targets {
                clients: clients.into_iter().collect(),
                active,
            }),
            stop: AtomicBool::new(false),
            next_value: AtomicU64::new(1),
            next_process: AtomicU64::new(0),
            register: Mutex::new((0, 0)),
            attempted: Mutex::default(),
            acked_revision: Mutex::default(),
            register_ops: Mutex::default(),
            set_attempted: Mutex::default(),
            set_acked: Mutex::default(),
            anomalies: Mutex::default(),
            eventual_reads: AtomicU64::new(0),
            min_revision_reads: AtomicU64::new(0),
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::SeqCst)
    }

    fn value(&self) -> u64 {
        self.next_value.fetch_add(1, Ordering::SeqCst)
    }

    fn anomaly(&self, what: String) {
        tracing::error!("{what}");
        lock(&self.anomalies).push(what);
    }

    /// The key the register clients work on now, moving to a fresh one every `ops_per_key` ops.
    fn register_key(&self) -> String {
        let mut r = lock(&self.register);
        if r.1 >= self.settings.ops_per_key {
            *r = (r.0 + 1, 0);
        }
        r.1 += 1;
        format!("r/{}", r.0)
    }

    /// The keys an eventual reader picks from: the current one and the two before it.
    fn recent_register_key(&self, rng: &mut StdRng) -> String {
        let current = lock(&self.register).0;
        format!(
            "r/{}",
            rng.random_range(current.saturating_sub(2)..=current)
        )
    }

    pub fn register_keys_used(&self) -> u64 {
        lock(&self.register).0 + 1
    }

    fn attempt(&self, key: &str, v: u64) {
        lock(&self.attempted)
            .entry(key.to_string())
            .or_default()
            .insert(v);
    }

    fn acked(&self, key: &str, revision: u64) {
        let mut acked = lock(&self.acked_revision);
        let r = acked.entry(key.to_string()).or_default();
        *r = (*r).max(revision);
    }

    /// From now on clients use node `id` too.
    pub fn add_target(&self, id: u64, client: KvClient<Channel>) {
        let mut t = lock(&self.targets);
        t.clients.insert(id, client);
        if !t.active.contains(&id) {
            t.active.push(id);
            t.active.sort_unstable();
        }
    }

    /// From now on no client picks node `id`; requests already sent to it finish and are recorded.
    pub fn remove_target(&self, id: u64) {
        lock(&self.targets).active.retain(|&n| n != id);
    }

    pub fn targets(&self) -> Vec<u64> {
        lock(&self.targets).active.clone()
    }

    fn client(&self, node: u64) -> Option<KvClient<Channel>> {
        lock(&self.targets).clients.get(&node).cloned()
    }

    /// The node of the `slot`-th pinned client: slots are dealt round the current targets in id
    /// order, so every target has clients and a new node gets some at once.
    fn pinned(&self, slot: u64) -> Option<u64> {
        let t = lock(&self.targets);
        let n = t.active.len() as u64;
        (n > 0).then(|| t.active[(slot % n) as usize])
    }

    fn random_target(&self, rng: &mut StdRng) -> Option<u64> {
        let t = lock(&self.targets);
        (!t.active.is_empty()).then(|| t.active[rng.random_range(0..t.active.len())])
    }

    /// Sends one request with the run's deadline (as grpc-timeout, so the server gives up in time, and
    /// locally, in case the node is paused and never answers).
    async fn call<T, F, Fut>(&self, make: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let t = self.settings.request_timeout;
        match tokio::time::timeout(t + Duration::from_millis(500), make(t)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded("client-side timeout")),
        }
    }
}

/// A call's result with the times it was sent and answered.
struct Timed<T> {
    invoke: u64,
    complete: u64,
    result: Result<T, tonic::Status>,
}

impl Shared {
    async fn put(&self, node: u64, key: &str, value: u64) -> Timed<pb::PutResponse> {
        let req = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_string().into_bytes(),
            prev_kv: false,
            lease: 0,
        };
        self.timed(node, |mut c, t| async move { c.put(request(req, t)).await })
            .await
    }

    async fn get(
        &self,
        node: u64,
        key: &str,
        consistency: pb::Consistency,
        min_revision: u64,
    ) -> Timed<pb::GetResponse> {
        let req = pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: consistency as i32,
            min_revision,
        };
        self.timed(node, |mut c, t| async move { c.get(request(req, t)).await })
            .await
    }

    async fn timed<T, F, Fut>(&self, node: u64, make: F) -> Timed<T>
    where
        F: FnOnce(KvClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let invoke = self.history.now();
        let result = match self.client(node) {
            Some(client) => self.call(|t| make(client, t)).await,
            // Never sent, so certainly not applied (a harness bug if it ever happens).
            None => Err(tonic::Status::failed_precondition(format!(
                "harness: no channel to node {node}"
            ))),
        };
        Timed {
            invoke,
            complete: self.history.now(),
            result,
        }
    }
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// A mutation's outcome from its error: only a refusal that certainly happened before proposing is a
/// `fail`; anything else (timeouts, lost connections, UNKNOWN) may have been applied.
fn mutation_outcome(status: &tonic::Status, node: u64) -> Outcome {
    // A validation refusal counts only when a raftkv node gave it: HTTP/2 itself also answers
    // RESOURCE_EXHAUSTED (e.g. a GOAWAY after too many reset streams), about requests it may have run.
    let refused = matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
    ) && status.metadata().contains_key(NODE_ID_HEADER);
    // A removed node turns every request away before looking at it. Only its own refusal counts: one
    // passed on by a node that forwarded the write says nothing about what that node did first.
    let own = status
        .metadata()
        .get(NODE_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == node.to_string());
    let removed = status.code() == tonic::Code::FailedPrecondition
        && own
        && status.message().contains("was removed from the cluster");
    if certainly_not_proposed(status) || refused || removed {
        Outcome::Fail
    } else {
        Outcome::Info
    }
}

fn parse_value(kv: &Option<pb::KeyValue>) -> Result<Option<u64>, String> {
    match kv {
        None => Ok(None),
        Some(kv) => std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{:?}", String::from_utf8_lossy(&kv.value))),
    }
}

fn error_text(s: &tonic::Status) -> Option<String> {
    Some(format!("{:?}: {}", s.code(), s.message()))
}

/// One register client, the `slot`-th pinned one (see `Shared::pinned`), until the run stops.
pub async fn register_client(shared: Arc<Shared>, slot: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = shared.process();
    // The last value this client saw for the key it is on: what its next CAS expects.
    let mut known: Option<(String, Option<u64>)> = None;
    while !shared.stopped() {
        let Some(node) = shared.pinned(slot) else {
            tokio::time::sleep(NO_TARGET_WAIT).await;
            continue;
        };
        let key = shared.register_key();
        let expected = match &known {
            Some((k, v)) if *k == key => *v,
            _ => None,
        };
        let roll = rng.random_range(0..100);
        let (outcome, learned) = if roll < 50 {
            register_read(&shared, process, node, &key).await
        } else if roll < 75 {
            register_write(&shared, process, node, &key).await
        } else {
            register_cas(&shared, process, node, &key, expected).await
        };
        match outcome {
            Outcome::Info => {
                process = shared.process();
                known = None;
            }
            Outcome::Ok => {
                if let Some(v) = learned {
                    known = Some((key, v));
                }
            }
            Outcome::Fail => {}
        }
        pause(&shared, &mut rng).await;
    }
}

/// `n` strong reads of the current register key sent to `node` at once, each as its own client, for
/// the pause-reads fault: sent to a stopped node, they wait in its sockets and are answered when it
/// wakes up. Recorded and checked like every other register read.
pub fn queued_reads(
    shared: Arc<Shared>,
    node: u64,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let key = lock(&shared.register).0;
    let key = format!("r/{key}");
    (0..n)
        .map(|_| {
            let shared = shared.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let process = shared.process();
                register_read(&shared, process, node, &key).await.0
            })
        })
        .collect()
}

async fn pause(shared: &Shared, rng: &mut StdRng) {
    let max = shared.settings.stagger.as_micros() as u64;
    if max > 0 {
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..max))).await;
    }
}

/// Returns the outcome and, when it was ok, the register value the client now knows.
async fn register_read(
    shared: &Shared,
    process: u64,
    node: u64,
    key: &str,
) -> (Outcome, Option<Option<u64>>) {
    let consistency = if shared.settings.eventual_as_strong {
        pb::Consistency::Eventual
    } else {
        pb::Consistency::Strong
    };
    let Timed {
        invoke,
        complete,
        result,
    } = shared.get(node, key, consistency, 0).await;
    let mut rec = OpRecord {
        process,
        f: "read",
        key: key.to_string(),
        value: serde_json::Value::Null,
        invoke_ns: invoke,
        complete_ns: Some(complete),
        outcome: Outcome::Fail,
        node,
        revision: None,
        error: None,
    };
    let learned = match result {
        Ok(r) => match parse_value(&r.kv) {
            Ok(v) => {
                rec.outcome = Outcome::Ok;
                rec.value = serde_json::json!(v);
                rec.revision = r.header.map(|h| h.revision);
                lock(&shared.register_ops).push(checker::Operation {
                    process,
                    key: key.to_string(),
                    op: RegOp::Read(v),
                    invoke,
                    complete: Some(complete),
                    outcome: checker::Outcome::Ok,
                });
                Some(v)
            }
            Err(text) => {
                shared.anomaly(format!(
                    "read of {key} on node {node} returned {text}, which no client wrote"
                ));
                None
            }
        },
        // A read has no effect, so a failed one is simply dropped from the check.
        Err(s) => {
            rec.error = error_text(&s);
            None
        }
    };
    let outcome = rec.outcome;
    shared.history.push(rec);
    (outcome, learned)
}

async fn register_write(
    shared: &Shared,
    process: u64,
    node: u64,
    key: &str,
) -> (Outcome, Option<Option<u64>>) {
    let v = shared.value();
    shared.attempt(key, v);
    let Timed {
        invoke,
        complete,
        result,
    } = shared.put(node, key, v).await;
    let (outcome, revision, error) = match &result {
        Ok(r) => {
            let revision = r.header.as_ref().map_or(0, |h| h.revision);
            shared.acked(key, revision);
            (Outcome::Ok, Some(revision), None)
        }
        Err(s) => (mutation_outcome(s, node), None, error_text(s)),
    };
    record_mutation(
        shared,
        OpRecord {
            process,
            f: "write",
            key: key.to_string(),
            value: serde_json::json!(v),
            invoke_ns: invoke,
            complete_ns: Some(complete),
            outcome,
            node,
            revision,
            error,
        },
        RegOp::Write(v),
    );
    (outcome, Some(Some(v)))
}

async fn register_cas(
    shared: &Shared,
    process: u64,
    node: u64,
    key: &str,
    expected: Option<u64>,
) -> (Outcome, Option<Option<u64>>) {
    let new = shared.value();
    shared.attempt(key, new);
    let target = match expected {
        Some(e) => pb::compare::Target::Value(e.to_string().into_bytes()),
        // Version 0 is "absent": a create-if-absent.
        None => pb::compare::Target::Version(0),
    };
    let txn = pb::TxnRequest {
        compare: vec![pb::Compare {
            key: key.as_bytes().to_vec(),
            result: pb::CompareResult::Equal as i32,
            target: Some(target),
        }],
        success: vec![pb::Op {
            op: Some(pb::op::Op::Put(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: new.to_string().into_bytes(),
                prev_kv: false,
                lease: 0,
            })),
        }],
        failure: vec![],
    };
    let Timed {
        invoke,
        complete,
        result,
    } = shared
        .timed(node, |mut c, t| async move { c.txn(request(txn, t)).await })
        .await;
    let (outcome, swapped, revision, error) = match &result {
        Ok(r) => {
            let revision = r.header.as_ref().map_or(0, |h| h.revision);
            if r.succeeded {
                shared.acked(key, revision);
            }
            (Outcome::Ok, r.succeeded, Some(revision), None)
        }
        Err(s) => (mutation_outcome(s, node), false, None, error_text(s)),
    };
    record_mutation(
        shared,
        OpRecord {
            process,
            f: "cas",
            key: key.to_string(),
            value: serde_json::json!({"expected": expected, "new": new, "swapped": swapped}),
            invoke_ns: invoke,
            complete_ns: Some(complete),
            outcome,
            node,
            revision,
            error,
        },
        RegOp::Cas {
            expected,
            new,
            swapped,
        },
    );
    let learned = (outcome == Outcome::Ok && swapped).then_some(Some(new));
    (outcome, learned)
}

fn record_mutation(shared: &Shared, rec: OpRecord, op: RegOp) {
    let outcome = match rec.outcome {
        Outcome::Ok => checker::Outcome::Ok,
        Outcome::Fail => checker::Outcome::Fail,
        Outcome::Info => checker::Outcome::Info,
    };
    lock(&shared.register_ops).push(checker::Operation {
        process: rec.process,
        key: rec.key.clone(),
        op,
        invoke: rec.invoke_ns,
        complete: rec.complete_ns,
        outcome,
    });
    shared.history.push(rec);
}

/// One set client: adds fresh elements through random nodes until the run stops.
pub async fn set_client(shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = shared.process();
    while !shared.stopped() {
        let Some(node) = shared.random_target(&mut rng) else {
            tokio::time::sleep(NO_TARGET_WAIT).await;
            continue;
        };
        let e = shared.value();
        lock(&shared.set_attempted).insert(e);
        let key = set_key(e);
        let Timed {
            invoke,
            complete,
            result,
        } = shared.put(node, &key, e).await;
        let (outcome, revision, error) = match &result {
            Ok(r) => {
                lock(&shared.set_acked).insert(e);
                (Outcome::Ok, r.header.as_ref().map(|h| h.revision), None)
            }
            Err(s) => (mutation_outcome(s, node), None, error_text(s)),
        };
        shared.history.push(OpRecord {
            process,
            f: "add",
            key,
            value: serde_json::json!(e),
            invoke_ns: invoke,
            complete_ns: Some(complete),
            outcome,
            node,
            revision,
            error,
        });
        if outcome == Outcome::Info {
            process = shared.process();
        }
        pause(&shared, &mut rng).await;
    }
}

pub const SET_PREFIX: &str = "s/";

pub fn set_key(e: u64) -> String {
    format!("{SET_PREFIX}{e:012}")
}

/// One eventual reader: reads recent register keys from random nodes, half of them with the revision of
/// the latest acknowledged write as `min_revision`.
pub async fn eventual_client(shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let process = shared.process();
    while !shared.stopped() {
        let Some(node) = shared.random_target(&mut rng) else {
            tokio::time::sleep(NO_TARGET_WAIT).await;
            continue;
        };
        let key = shared.recent_register_key(&mut rng);
        let min_revision = if rng.random_bool(0.5) {
            lock(&shared.acked_revision).get(&key).copied().unwrap_or(0)
        } else {
            0
        };
        let Timed {
            invoke,
            complete,
            result,
        } = shared
            .get(node, &key, pb::Consistency::Eventual, min_revision)
            .await;
        let mut rec = OpRecord {
            process,
            f: "eventual-read",
            key: key.clone(),
            value: serde_json::json!({"min_revision": min_revision}),
            invoke_ns: invoke,
            complete_ns: Some(complete),
            outcome: Outcome::Fail,
            node,
            revision: None,
            error: None,
        };
        match result {
            Ok(r) => {
                shared.eventual_reads.fetch_add(1, Ordering::Relaxed);
                rec.outcome = Outcome::Ok;
                rec.revision = r.header.map(|h| h.revision);
                let value = parse_value(&r.kv);
                rec.value =
                    serde_json::json!({"min_revision": min_revision, "read": value.as_ref().ok()});
                check_eventual(&shared, &key, node, value, r.kv.as_ref(), min_revision);
            }
            Err(s) => rec.error = error_text(&s),
        }
        shared.history.push(rec);
        pause(&shared, &mut rng).await;
    }
}

fn check_eventual(
    shared: &Shared,
    key: &str,
    node: u64,
    value: Result<Option<u64>, String>,
    kv: Option<&pb::KeyValue>,
    min_revision: u64,
) {
    match value {
        Err(text) => shared.anomaly(format!(
            "eventual read of {key} on node {node} returned {text}, which no client wrote"
        )),
        Ok(Some(v)) => {
            let written = lock(&shared.attempted)
                .get(key)
                .is_some_and(|vals| vals.contains(&v));
            if !written {
                shared.anomaly(format!(
                    "phantom: eventual read of {key} on node {node} returned {v}, never written to it"
                ));
            }
        }
        Ok(None) => {}
    }
    if min_revision > 0 {
        shared.min_revision_reads.fetch_add(1, Ordering::Relaxed);
        let seen = kv.map_or(0, |kv| kv.mod_revision);
        if seen < min_revision {
            shared.anomaly(format!(
                "eventual read of {key} on node {node} with min_revision {min_revision} returned data \
                 from revision {seen}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: tonic::Code, from: u64, message: &str) -> tonic::Status {
        let mut s = tonic::Status::new(code, message);
        s.metadata_mut().insert(
            NODE_ID_HEADER,
            from.to_string().parse().expect("a header value"),
        );
        s
    }

    #[test]
    fn only_a_removed_nodes_own_refusal_is_a_certain_failure() {
        let msg = "node 4 was removed from the cluster and no longer serves";
        let own = refusal(tonic::Code::FailedPrecondition, 4, msg);
        assert_eq!(mutation_outcome(&own, 4), Outcome::Fail);
        // Passed on by the node the client asked, which may have done something first.
        let passed_on = refusal(tonic::Code::FailedPrecondition, 4, msg);
        assert_eq!(mutation_outcome(&passed_on, 2), Outcome::Info);
        let other = refusal(tonic::Code::FailedPrecondition, 4, "something else");
        assert_eq!(mutation_outcome(&other, 4), Outcome::Info);
    }
}
