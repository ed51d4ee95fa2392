//! Every decoder of bytes raftkv stores or receives, fed random and adversarial bytes: huge length
//! prefixes, truncations, flipped bytes and deep nesting. Each must return (an error or a value),
//! never panic or abort, and never allocate more than a small multiple of its input's length.
//! Allocation is measured by a counting global allocator, per thread, around each decode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest,
};
use openraft::{EntryPayload, Membership};
use proptest::prelude::*;
use raftkv::codec;
use raftkv::store::state_machine::StoredValue;
use raftkv::types::Applied;
use raftkv::types::{
    Command, Compare, CompareResult, CompareTarget, Entry, KeyValue, LogId, SnapshotMeta,
    StoredMembership, Txn, TxnOp, TypeConfig, Vote, VoteRequest, VoteResponse,
};

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(by: isize) {
    // `try_with`: a thread being torn down has no counters any more, and must still allocate.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + by;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        grew(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most a decode may allocate beyond what it started with, for `len` input bytes: bincode may
/// claim (and so preallocate) up to `codec::CLAIM_PER_INPUT_BYTE` bytes per input byte, and serde
/// preallocates at most 1 MiB for a sequence whatever its claimed length, once per level of nesting.
fn allowed(len: usize) -> isize {
    (len * codec::CLAIM_PER_INPUT_BYTE * 2 + 8 * 1024 * 1024) as isize
}

/// Runs `decode` and returns whether it succeeded and the most it had allocated at once.
fn measured(decode: Decoder, bytes: &[u8]) -> (bool, isize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let ok = decode(bytes);
    (ok, PEAK.with(Cell::get) - start)
}

macro_rules! decoders {
    ($($name:literal => $t:ty),* $(,)?) => {
        vec![$(($name, (|b: &[u8]| codec::decode::<$t>(b).is_ok()) as Decoder)),*]
    };
}

/// Decodes the bytes as one type; true if they were a value of it.
type Decoder = fn(&[u8]) -> bool;

/// Every type raftkv decodes from disk or from the network.
fn decoders() -> Vec<(&'static str, Decoder)> {
    let mut list = decoders![
        "Command" => Command,
        "Entry" => Entry,
        "Vote" => Vote,
        "LogId" => LogId,
        "Option<LogId>" => Option<LogId>,
        "node id" => u64,
        "AppendEntriesRequest" => AppendEntriesRequest<TypeConfig>,
        "AppendEntriesResponse" => AppendEntriesResponse<TypeConfig>,
        "StreamAppendResult" => StreamAppendResult<TypeConfig>,
        "VoteRequest" => VoteRequest,
        "VoteResponse" => VoteResponse,
        "TransferLeaderRequest" => TransferLeaderRequest<TypeConfig>,
        "SnapshotMeta" => SnapshotMeta,
        "snapshot header" => (Vote, SnapshotMeta),
        "SnapshotResponse" => SnapshotResponse<TypeConfig>,
        "StoredMembership" => StoredMembership,
        "StoredValue" => StoredValue,
        "KeyValue" => KeyValue,
        "Applied" => Applied,
        "nested" => Vec<Vec<Vec<u8>>>,
        "nested strings" => Vec<Vec<String>>,
    ];
    list.push(("snapshot file", |b| {
        raftkv::store::snapshot::file::verify(b).is_ok()
    }));
    list.push(("stored snapshot of formats 2 to 4", |b| {
        raftkv::store::snapshot::check_legacy(b)
    }));
    list
}

fn check_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    for (name, decode) in decoders() {
        let (_, peak) = measured(decode, bytes);
        prop_assert!(
            peak <= allowed(bytes.len()),
            "{name}: decoding {} bytes allocated {peak} bytes at once",
            bytes.len()
        );
    }
    Ok(())
}

/// A bincode length prefix (varint) claiming `n`.
fn claim(n: u64) -> Vec<u8> {
    let mut out = vec![0xfd];
    out.extend_from_slice(&n.to_le_bytes());
    out
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn command() -> impl Strategy<Value = Command> {
    let op = prop_oneof![
        (bytes(8), bytes(16), any::<bool>()).prop_map(|(key, value, prev_kv)| TxnOp::Put {
            key,
            value,
            prev_kv
        }),
        (bytes(8), any::<bool>()).prop_map(|(key, prev_kv)| TxnOp::Delete { key, prev_kv }),
        bytes(8).prop_map(|key| TxnOp::Get { key }),
    ];
    let compare = (bytes(8), bytes(8), any::<u64>()).prop_map(|(key, v, n)| Compare {
        key,
        result: CompareResult::Equal,
        target: if n % 2 == 0 {
            CompareTarget::Value(v)
        } else {
            CompareTarget::Version(n)
        },
    });
    prop_oneof![
        (bytes(16), bytes(64), any::<bool>()).prop_map(|(key, value, prev_kv)| Command::Put {
            key,
            value,
            prev_kv
        }),
        (bytes(16), any::<bool>()).prop_map(|(key, prev_kv)| Command::Delete { key, prev_kv }),
        (
            proptest::collection::vec(compare, 0..3),
            proptest::collection::vec(op.clone(), 0..3),
            proptest::collection::vec(op, 0..3)
        )
            .prop_map(|(compare, success, failure)| Command::Txn(Txn {
                compare,
                success,
                failure
            })),
    ]
}

fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(term, 1, index)
}

fn membership() -> Membership<u64, raftkv::types::Member> {
    let member = |n: u64| raftkv::types::Member::new(format!("h:{n}"), format!("h:{}", n + 100));
    Membership::new(
        vec![[1u64, 2, 3].into_iter().collect()],
        [1u64, 2, 3]
            .into_iter()
            .map(|n| (n, member(n)))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .expect("a valid membership")
}

/// Valid encodings of the types above, to be mangled.
fn valid() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(command(), 0..4),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(|(cmds, term, which)| {
            let entries: Vec<Entry> = cmds
                .iter()
                .enumerate()
                .map(|(i, c)| Entry {
                    log_id: log_id(term % 1000, i as u64 + 1),
                    payload: EntryPayload::Normal(c.clone()),
                })
                .chain(std::iter::once(Entry {
                    log_id: log_id(1, 100),
                    payload: EntryPayload::Membership(membership()),
                }))
                .collect();
            match which % 6 {
                0 => codec::encode(&cmds.first().cloned().unwrap_or(Command::Delete {
                    key: b"k".to_vec(),
                    prev_kv: false,
                }))
                .unwrap(),
                1 => codec::encode(&AppendEntriesRequest::<TypeConfig> {
                    vote: Vote::new_committed(term, 1),
                    prev_log_id: Some(log_id(term, 3)),
                    entries,
                    leader_commit: Some(log_id(term, 2)),
                })
                .unwrap(),
                2 => codec::encode(&entries).unwrap(),
                3 => codec::encode(&VoteRequest {
                    vote: Vote::new(term, 2),
                    last_log_id: Some(log_id(term, 9)),
                    leadership_transfer: false,
                })
                .unwrap(),
                4 => codec::encode(&(
                    Vote::new_committed(term, 1),
                    SnapshotMeta {
                        last_log_id: Some(log_id(term, 5)),
                        last_membership: StoredMembership::new(Some(log_id(1, 1)), membership()),
                    },
                ))
                .unwrap(),
                _ => codec::encode(&vec![vec![vec![1u8; 3]; 2]; 2]).unwrap(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_errors_not_crashes(mut body in bytes(512), version in prop_oneof![Just(1u8), any::<u8>()]) {
        body.insert(0, version);
        check_all(&body)?;
    }

    /// A huge length claim spliced in at any point of a valid message.
    #[test]
    fn huge_claims_anywhere_in_a_valid_message(
        msg in valid(),
        at in any::<prop::sample::Index>(),
        n in prop_oneof![Just(1u64 << 62), Just(u64::MAX), Just(1u64 << 32), 1u64 << 20..1u64 << 40],
        replace in any::<bool>(),
    ) {
        let at = 1 + at.index(msg.len().max(2) - 1);
        let mut bomb = msg[..at.min(msg.len())].to_vec();
        bomb.extend_from_slice(&claim(n));
        let rest = if replace { at + 1 } else { at };
        bomb.extend_from_slice(msg.get(rest..).unwrap_or_default());
        check_all(&bomb)?;
    }

    #[test]
    fn truncated_and_flipped_messages(
        msg in valid(),
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = msg.clone();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b;
        }
        check_all(&bytes)?;
        bytes.truncate(cut.index(msg.len()));
        check_all(&bytes)?;
    }

    /// Claims nested in claims: each level says it holds a huge number of the next.
    #[test]
    fn nested_claims(depth in 1usize..12, n in 1u64 << 20..u64::MAX) {
        let mut bytes = vec![1u8];
        for _ in 0..depth {
            bytes.extend_from_slice(&claim(n));
        }
        check_all(&bytes)?;
    }
}

/// The finding itself: 13 bytes claiming 2^62 are an error for every decoder, at once and without
/// allocating anything near the claim.
#[test]
fn the_13_byte_bomb_is_refused_everywhere() {
    // The measurement itself works: a decoder that allocates 1 MiB is seen to.
    let (_, peak) = measured(
        |b| std::hint::black_box(vec![0u8; 1 << 20]).len() > b.len(),
        &[],
    );
    assert!(peak >= 1 << 20, "the counting allocator saw {peak} bytes");
    let mut bomb = vec![1u8];
    bomb.extend_from_slice(&claim(1 << 62));
    bomb.extend_from_slice(&[0, 0, 0]);
    assert_eq!(bomb.len(), 13);
    // For the types that start with a length the bytes are a claim; for the others they may well be
    // a legal value (a log id whose term is 2^62), and only the allocation bound applies.
    let starts_with_a_length = [
        "StoredValue",
        "KeyValue",
        "nested",
        "nested strings",
        "snapshot image",
    ];
    for (name, decode) in decoders() {
        let (ok, peak) = measured(decode, &bomb);
        if starts_with_a_length.contains(&name) {
            assert!(!ok, "{name} accepted the bomb");
        }
        assert!(peak <= allowed(bomb.len()), "{name} allocated {peak} bytes");
    }
    let mut command_bomb = vec![1u8, 0];
    command_bomb.extend_from_slice(&claim(1 << 62));
    command_bomb.extend_from_slice(&[0, 0]);
    assert_eq!(command_bomb.len(), 13);
    let (ok, peak) = measured(|b| codec::decode::<Command>(b).is_ok(), &command_bomb);
    assert!(!ok, "the put bomb decoded");
    assert!(
        peak <= allowed(command_bomb.len()),
        "allocated {peak} bytes"
    );
    // Inside a real message: the key of a put in an AppendEntries entry.
    let rpc = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Normal(Command::Put {
                key: b"MARKMARK".to_vec(),
                value: b"v".to_vec(),
                prev_kv: false,
            }),
        }],
        leader_commit: None,
    };
    let bytes = codec::encode(&rpc).unwrap();
    let at = bytes.windows(9).position(|w| w == b"\x08MARKMARK").unwrap();
    let mut bomb = bytes[..at].to_vec();
    bomb.extend_from_slice(&claim(1 << 62));
    bomb.extend_from_slice(&bytes[at + 1..]);
    let (ok, peak) = measured(
        |b| codec::decode::<AppendEntriesRequest<TypeConfig>>(b).is_ok(),
        &bomb,
    );
    assert!(!ok);
    assert!(peak <= allowed(bomb.len()), "allocated {peak} bytes");
}

/// Legal values of every size still decode: the limit is never below what a real message claims.
#[test]
fn legal_values_decode() {
    let big = Command::Put {
        key: vec![7; 4096],
        value: vec![9; 4 << 20],
        prev_kv: true,
    };
    assert_eq!(
        codec::decode::<Command>(&codec::encode(&big).unwrap()).unwrap(),
        big
    );
    let many: Vec<u64> = (0..100_000).map(|i| i % 100).collect();
    assert_eq!(
        codec::decode::<Vec<u64>>(&codec::encode(&many).unwrap()).unwrap(),
        many
    );
}
