//! Membership changes under load, the way Jepsen's etcd membership nemesis makes them: the cluster
//! grows by a brand-new node (a fresh id, never one used before) and shrinks by removing a voter,
//! staying between the run's size and size + 2 voters.
//!
//! - **grow**: a new node joins with `--join`, or is added first with `MemberAdd` (as a learner and
//!   then promoted by the harness, or as a voter while it starts), in turn. The harness waits, within
//!   a bound, until it is a voter; it becomes a client target as soon as it is a member at all.
//! - **shrink**: `MemberRemove` of the leader or of a follower, in turn. The removed node stays a
//!   target a moment longer and gets a few strong reads of its own (all recorded and checked: it may
//!   refuse them, never answer them from a stale state), and is then stopped for good.
//!
//! A change is sometimes made while another member is killed or cut off, which is what makes the
//! server refuse a removal that would leave no live quorum. Refusals (`FAILED_PRECONDITION`: the
//! quorum rule, one change at a time) and changes that do not finish within their bound are outcomes
//! of the fault, noted in the nemesis log (`history.jsonl`) and counted in the summary, not failures:
//! the checks decide whether the store stayed correct.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use raftkv_client::pb::v1 as pb;
use raftkv_client::pb::v1::cluster_client::ClusterClient;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use super::super::net::{Grudge, Net};
use super::super::nodes::Nodes;
use super::super::workload::{self, Shared};
use super::{Fault, Strike};

/// How long a new node may take to become a voter (discovery, a snapshot, catching up, the
/// promotion) before the harness stops waiting for it.
const GROW_WAIT: Duration = Duration::from_secs(25);
/// How long a removal may take, hand-over of the leadership included.
const REMOVE_WAIT: Duration = Duration::from_secs(15);
/// The deadline of each membership call. Short, because the first attempt may go to a leader that a
/// companion partition has just cut off, which holds the call until its deadline; every call is
/// asked again after one (a voter added with `MemberAdd` that has not caught up in time is simply
/// added again, which waits on).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Between two looks at the membership, or two attempts of a call.
const POLL: Duration = Duration::from_millis(200);
/// How long a removed node stays a client target after its removal is committed.
const LINGER: Duration = Duration::from_millis(500);
/// Strong reads sent to a node right after its removal.
const PROBE_READS: usize = 4;
/// How long a removed node may take to stop on SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the final phase waits for every node the harness runs to be a member, and for every
/// removal it asked for to be settled.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// What the membership nemesis remembers from one change to the next.
pub struct State {
    /// The run's size: the fewest voters the nemesis keeps (and size + 2 the most).
    size: u64,
    /// The next fresh id; ids are never reused.
    next_id: u64,
    grows: u64,
    shrinks: u64,
    /// Whether the last change grew the cluster.
    last_grew: Option<bool>,
    /// Nodes whose removal was asked for but not seen done; the final phase settles them.
    removing: BTreeSet<u64>,
    /// Another member killed, or cut off, while a change is made: only with those fault kinds.
    with_kill: bool,
    with_partition: bool,
    pub stats: BTreeMap<String, u64>,
}

impl State {
    pub fn new(size: u64, faults: &[Fault]) -> State {
        State {
            size,
            next_id: size + 1,
            grows: 0,
            shrinks: 0,
            last_grew: None,
            removing: BTreeSet::new(),
            with_kill: faults.contains(&Fault::Kill),
            with_partition: faults.iter().any(|f| f.name().starts_with("partition-")),
            stats: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &str) {
        *self.stats.entry(what.to_string()).or_default() += 1;
    }
}

/// The membership as the leader sees it.
struct View {
    leader: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
}

impl View {
    fn has(&self, id: u64) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

async fn view(nodes: &tokio::sync::Mutex<Nodes>) -> Option<View> {
    let nodes = nodes.lock().await;
    let leader = nodes.current_leader().await?;
    let s = nodes.status(leader).await?;
    let ids = |m: &[pb::Member]| -> Vec<u64> { m.iter().map(|m| m.id).collect() };
    Some(View {
        leader,
        voters: ids(&s.voters),
        learners: ids(&s.learners),
    })
}

/// The membership once some member leads, or `None` after `deadline`.
async fn view_by(nodes: &tokio::sync::Mutex<Nodes>, deadline: Instant) -> Option<View> {
    loop {
        if let Some(v) = view(nodes).await {
            return Some(v);
        }
        if Instant::now() + POLL >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What came of a membership call.
enum Answer {
    Done,
    /// The server refused it as the cluster stands (`FAILED_PRECONDITION`, `INVALID_ARGUMENT`).
    Refused(String),
    /// No definite answer before the deadline; it may have been made.
    Unknown(String),
}

/// The harness's view of one call: which member it goes to, and the call.
type Call = fn(
    ClusterClient<Channel>,
    u64,
) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>>;

fn with_deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

fn add_call(
    learner: bool,
    addr: String,
    peer: String,
) -> impl Fn(ClusterClient<Channel>, u64) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>>
{
    move |mut c, id| {
        let req = pb::MemberAddRequest {
            id,
            address: addr.clone(),
            learner,
            peer_address: peer.clone(),
        };
        Box::pin(async move { c.member_add(with_deadline(req)).await.map(|_| ()) })
    }
}

const PROMOTE: Call = |mut c, id| {
    Box::pin(async move {
        c.member_promote(with_deadline(pb::MemberPromoteRequest { id }))
            .await
            .map(|_| ())
    })
};

const REMOVE: Call = |mut c, id| {
    Box::pin(async move {
        c.member_remove(with_deadline(pb::MemberRemoveRequest { id }))
            .await
            .map(|_| ())
    })
};

/// Makes a membership call about node `id` through the leader (any member when none is known,
/// never `avoid`), again after every answer that says to retry, until `deadline`. Each change is
/// safe to repeat: an add at the same addresses, a promotion of a voter and a removal of a removed
/// node are no change. `retry_refusal` says which refusals are worth asking again (a learner that is
/// not caught up yet).
async fn change<F>(
    nodes: &tokio::sync::Mutex<Nodes>,
    id: u64,
    avoid: Option<u64>,
    deadline: Instant,
    retry_refusal: fn(&str) -> bool,
    call: F,
) -> Answer
where
    F: Fn(
        ClusterClient<Channel>,
        u64,
    ) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>>,
{
    let mut last = String::from("no member to ask");
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let client = {
            let nodes = nodes.lock().await;
            let members: Vec<u64> = nodes
                .members()
                .into_iter()
                .filter(|m| Some(*m) != avoid)
                .collect();
            let via = match nodes.current_leader().await {
                Some(l) if Some(l) != avoid => Some(l),
                _ if members.is_empty() => None,
                _ => Some(members[(attempt as usize) % members.len()]),
            };
            via.map(|v| nodes.cluster_client(v))
        };
        if let Some(client) = client {
            let answer =
                tokio::time::timeout(CALL_TIMEOUT + Duration::from_millis(500), call(client, id))
                    .await;
            match answer {
                Ok(Ok(())) => return Answer::Done,
                Ok(Err(s)) => {
                    let why = format!("{:?}: {}", s.code(), s.message());
                    match s.code() {
                        Code::FailedPrecondition | Code::InvalidArgument
                            if !retry_refusal(s.message()) =>
                        {
                            return Answer::Refused(why);
                        }
                        _ => last = why,
                    }
                }
                Err(_) => last = "no answer within the call's deadline".into(),
            }
        }
        if Instant::now() + POLL >= deadline {
            return Answer::Unknown(last);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn never(_: &str) -> bool {
    false
}

/// A promotion refused because the learner has not caught up, or because another change is still
/// in progress (the joining node's own), is asked again.
fn not_yet(why: &str) -> bool {
    why.contains("not caught up") || why.contains("in progress")
}

/// Another member killed or cut off while the change is made.
enum Companion {
    None,
    Kill(u64),
    Isolate(u64),
}

impl Companion {
    fn note(&self) -> String {
        match self {
            Companion::None => String::new(),
            Companion::Kill(v) => format!(", while node {v} is killed"),
            Companion::Isolate(v) => format!(", while node {v} is cut off"),
        }
    }

    async fn install(
        &self,
        net: &Net,
        nodes: &tokio::sync::Mutex<Nodes>,
        members: &[u64],
    ) -> anyhow::Result<()> {
        match *self {
            Companion::None => {}
            Companion::Kill(v) => nodes.lock().await.kill(v)?,
            Companion::Isolate(v) => {
                let mut g = Grudge::new();
                for &o in members.iter().filter(|&&o| o != v) {
                    g.insert((o, v));
                    g.insert((v, o));
                }
                net.cut(&g).await?;
            }
        }
        Ok(())
    }

    async fn remove(&self, net: &Net, nodes: &tokio::sync::Mutex<Nodes>) -> anyhow::Result<()> {
        match *self {
            Companion::None => {}
            Companion::Kill(v) => {
                let mut nodes = nodes.lock().await;
                if nodes.is_member(v) && !nodes.is_running(v) {
                    nodes.start(v)?;
                }
            }
            Companion::Isolate(_) => net.heal().await?,
        }
        Ok(())
    }
}

pub(super) async fn inject(s: &Strike<'_>, st: &mut State, rng: &mut StdRng) -> anyhow::Result<()> {
    let history = s.history();
    settle_removals(s.nodes, s.shared, st).await?;
    let Some(v) = view_by(s.nodes, Instant::now() + Duration::from_secs(10)).await else {
        let ix = history.fault_started(s.fault.name(), "look at the membership".into());
        history.fault_ended_with(ix, "skipped: no leader answered within 10 s".into());
        st.count("skipped");
        return Ok(());
    };
    let k = v.voters.len() as u64;
    let fresh_left = st.next_id <= s.net.max_id();
    let grow = if k <= st.size {
        true
    } else if k >= st.size + 2 {
        false
    } else {
        // Mostly back and forth, sometimes on in the same direction, so both ends are reached.
        match st.last_grew {
            Some(last) if rng.random_bool(0.25) => last,
            Some(last) => !last,
            None => true,
        }
    };
    if grow && !fresh_left {
        let ix = history.fault_started(s.fault.name(), "add a node".into());
        history.fault_ended_with(
            ix,
            format!(
                "skipped: the network has no place for id {} (at most {})",
                st.next_id,
                s.net.max_id()
            ),
        );
        st.count("skipped");
        return Ok(());
    }
    // The companion: never the node being removed, and only among the members the harness runs.
    let target = if grow {
        None
    } else if st.shrinks.is_multiple_of(2) {
        Some(v.leader)
    } else {
        let followers: Vec<u64> = v
            .voters
            .iter()
            .copied()
            .filter(|&x| x != v.leader)
            .collect();
        followers
            .get(rng.random_range(0..followers.len().max(1)))
            .copied()
    };
    let members = s.nodes.lock().await.members();
    let others: Vec<u64> = members
        .iter()
        .copied()
        .filter(|&m| Some(m) != target)
        .collect();
    let roll = rng.random_range(0..3);
    let victim = others
        .get(rng.random_range(0..others.len().max(1)))
        .copied();
    let companion = match (roll, victim) {
        (1, Some(x)) if st.with_kill => Companion::Kill(x),
        (2, Some(x)) if st.with_partition => Companion::Isolate(x),
        _ => Companion::None,
    };
    st.last_grew = Some(grow);
    if grow {
        grow_by_one(s, st, &v, companion, &members).await
    } else {
        match target {
            Some(t) => shrink_by_one(s, st, &v, t, companion, &members).await,
            None => Ok(()),
        }
    }
}

async fn grow_by_one(
    s: &Strike<'_>,
    st: &mut State,
    v: &View,
    companion: Companion,
    members: &[u64],
) -> anyhow::Result<()> {
    let history = s.history();
    let id = st.next_id;
    st.next_id += 1;
    let way = st.grows % 3;
    st.grows += 1;
    let how = match way {
        0 => "joins with --join",
        1 => "MemberAdd as a learner, started with --join, MemberPromote",
        _ => "MemberAdd as a voter while it starts with --join",
    };
    let detail = format!(
        "add node {id} ({how}): {} voters -> {}{}",
        v.voters.len(),
        v.voters.len() + 1,
        companion.note()
    );
    let ix = history.fault_started(s.fault.name(), detail.clone());
    tracing::info!(%detail, "nemesis: membership");
    let started = Instant::now();
    let deadline = started + GROW_WAIT;
    s.net.prepare(id).await?;
    let mut spec = s.net.node(id);
    let join: Vec<String> = {
        let nodes = s.nodes.lock().await;
        v.voters
            .iter()
            .filter(|x| nodes.is_member(**x))
            .map(|x| nodes.addr(*x))
            .collect()
    };
    spec.args.push(format!("--join={}", join.join(",")));
    let (addr, peer) = (spec.addr.clone(), spec.peer_addr.clone());
    // Cut off from every node, the one that joins included: a partial cut (the victim still hears
    // the newcomer) leaves the newcomer asking through a member that cannot reach the leader.
    let everyone: Vec<u64> = members.iter().copied().chain([id]).collect();
    companion.install(s.net, s.nodes, &everyone).await?;

    let mut outcome: Option<String> = None;
    if way == 1 {
        match change(
            s.nodes,
            id,
            None,
            deadline,
            never,
            add_call(true, addr.clone(), peer.clone()),
        )
        .await
        {
            Answer::Refused(why) => outcome = Some(format!("refused: MemberAdd: {why}")),
            // Perhaps added; the node adds itself anyway once it runs.
            Answer::Unknown(_) | Answer::Done => {}
        }
    }
    if outcome.is_none() {
        {
            let mut nodes = s.nodes.lock().await;
            nodes.add_member(spec)?;
            nodes.start(id)?;
        }
        let asked = match way {
            1 => Some(change(s.nodes, id, None, deadline, not_yet, PROMOTE).await),
            2 => Some(
                change(
                    s.nodes,
                    id,
                    None,
                    deadline,
                    not_yet,
                    add_call(false, addr, peer),
                )
                .await,
            ),
            _ => None,
        };
        let asked_note = match asked {
            Some(Answer::Refused(why)) => format!(" (the harness's call was refused: {why})"),
            Some(Answer::Unknown(why)) => format!(" (the harness's call had no answer: {why})"),
            _ => String::new(),
        };
        outcome = Some(match wait_voter(s.nodes, s.shared, id, deadline).await {
            Some(v) => format!(
                "done: node {id} is a voter after {:.1} s ({} voters){asked_note}",
                started.elapsed().as_secs_f64(),
                v.voters.len()
            ),
            None => format!(
                "timed out: node {id} was not a voter within {} s{asked_note}",
                GROW_WAIT.as_secs()
            ),
        });
    }
    companion.remove(s.net, s.nodes).await?;
    let outcome = outcome.unwrap_or_default();
    st.count(if outcome.starts_with("done") {
        match way {
            0 => "grown (--join)",
            1 => "grown (MemberAdd learner, MemberPromote)",
            _ => "grown (MemberAdd voter)",
        }
    } else if outcome.starts_with("refused") {
        "refused"
    } else {
        "timed out"
    });
    tracing::info!(%outcome, "nemesis: membership");
    history.fault_ended_with(ix, outcome);
    Ok(())
}

/// Waits until node `id` is a voter, making it a client target as soon as it is a member at all.
async fn wait_voter(
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: &Shared,
    id: u64,
    deadline: Instant,
) -> Option<View> {
    let mut target = false;
    loop {
        if let Some(v) = view(nodes).await {
            if v.has(id) && !target {
                target = true;
                shared.add_target(id, nodes.lock().await.kv(id));
            }
            if v.voters.contains(&id) {
                return Some(v);
            }
        }
        if Instant::now() + POLL >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn shrink_by_one(
    s: &Strike<'_>,
    st: &mut State,
    v: &View,
    target: u64,
    companion: Companion,
    members: &[u64],
) -> anyhow::Result<()> {
    let history = s.history();
    let leader = target == v.leader;
    st.shrinks += 1;
    let detail = format!(
        "remove {} {target}: {} voters -> {}{}",
        if leader { "leader" } else { "follower" },
        v.voters.len(),
        v.voters.len() - 1,
        companion.note()
    );
    let ix = history.fault_started(s.fault.name(), detail.clone());
    tracing::info!(%detail, "nemesis: membership");
    if !s.nodes.lock().await.is_member(target) {
        history.fault_ended_with(
            ix,
            format!("skipped: node {target} is not one the harness runs"),
        );
        st.count("skipped");
        return Ok(());
    }
    companion.install(s.net, s.nodes, members).await?;
    let started = Instant::now();
    let deadline = started + REMOVE_WAIT;
    st.removing.insert(target);
    let answer = change(s.nodes, target, None, deadline, never, REMOVE).await;
    let outcome = match answer {
        Answer::Refused(why) => {
            st.removing.remove(&target);
            st.count("refused");
            format!("refused: {why}")
        }
        Answer::Done | Answer::Unknown(_) => {
            let gone = wait_gone(s.nodes, target, deadline).await;
            match (gone, answer) {
                (true, _) => {
                    let probe = retire(s.nodes, s.shared, target).await?;
                    st.removing.remove(&target);
                    st.count(if leader {
                        "shrunk (leader removed)"
                    } else {
                        "shrunk (follower removed)"
                    });
                    format!(
                        "done after {:.1} s; {probe}",
                        started.elapsed().as_secs_f64()
                    )
                }
                (false, Answer::Unknown(why)) => {
                    st.count("timed out");
                    format!("timed out (settled later): {why}")
                }
                (false, _) => {
                    st.count("timed out");
                    format!(
                        "timed out: MemberRemove succeeded, yet node {target} was still a member \
                         {} s later (settled later)",
                        REMOVE_WAIT.as_secs()
                    )
                }
            }
        }
    };
    companion.remove(s.net, s.nodes).await?;
    tracing::info!(%outcome, "nemesis: membership");
    history.fault_ended_with(ix, outcome);
    Ok(())
}

/// Waits until a leader other than `id` no longer lists it.
async fn wait_gone(nodes: &tokio::sync::Mutex<Nodes>, id: u64, deadline: Instant) -> bool {
    loop {
        if let Some(v) = view(nodes).await
            && v.leader != id
            && !v.has(id)
        {
            return true;
        }
        if Instant::now() + POLL >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A node whose removal is committed: strong reads of its own (which it must refuse, or answer
/// linearizably: they are checked with the rest), a moment more as a client target, then it stops
/// for good. Returns what the probe reads got.
async fn retire(
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: &std::sync::Arc<Shared>,
    id: u64,
) -> anyhow::Result<String> {
    let reads = workload::queued_reads(shared.clone(), id, PROBE_READS);
    tokio::time::sleep(LINGER).await;
    shared.remove_target(id);
    let mut answered = 0;
    for r in reads {
        if matches!(r.await, Ok(super::super::history::Outcome::Ok)) {
            answered += 1;
        }
    }
    let mut nodes = nodes.lock().await;
    nodes.retire(id);
    let stopped = match nodes.stop(id, STOP_WAIT).await {
        Ok(status) => format!("stopped ({status})"),
        Err(e) => format!("stop: {e}"),
    };
    Ok(format!(
        "{answered} of {PROBE_READS} strong reads sent to it afterwards were answered (checked), \
         the rest refused; {stopped}"
    ))
}

/// Removals asked for earlier that went through after all: those nodes are retired now.
async fn settle_removals(
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: &std::sync::Arc<Shared>,
    st: &mut State,
) -> anyhow::Result<()> {
    if st.removing.is_empty() {
        return Ok(());
    }
    let Some(v) = view(nodes).await else {
        return Ok(());
    };
    for id in st.removing.clone() {
        if v.leader != id && !v.has(id) {
            let probe = retire(nodes, shared, id).await?;
            tracing::info!(id, %probe, "nemesis: a removal that timed out went through");
            st.removing.remove(&id);
        }
    }
    Ok(())
}

/// The final phase's membership, after the heal: removals still open are settled, and every node
/// the harness runs must be a member (a node that joined but was never added would fail the
/// checks). Returns what is still not as it should be.
pub async fn settle(
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: &std::sync::Arc<Shared>,
    st: &mut State,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        settle_removals(nodes, shared, st).await?;
        let v = view(nodes).await;
        let members = nodes.lock().await.members();
        let missing: Vec<u64> = match &v {
            Some(v) => members.iter().copied().filter(|m| !v.has(*m)).collect(),
            None => members.clone(),
        };
        if let Some(v) = &v {
            for &m in &members {
                if v.has(m) && !shared.targets().contains(&m) {
                    shared.add_target(m, nodes.lock().await.kv(m));
                }
            }
        }
        if missing.is_empty() && v.is_some() {
            return Ok(Vec::new());
        }
        if Instant::now() + POLL >= deadline {
            return Ok(match v {
                None => vec!["no leader to ask for the membership".into()],
                Some(_) => missing
                    .iter()
                    .map(|m| format!("node {m} runs but is not a member"))
                    .collect(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
