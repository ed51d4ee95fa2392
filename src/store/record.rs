//! raftkv's own shapes for the openraft values it stores: log ids, the vote, log entries,
//! memberships and snapshot metadata.
//!
//! openraft's types derive serde, and storing them as they are would make the bytes on disk
//! whatever openraft's field layout happens to be: bincode is positional, so an upgrade that adds,
//! drops or reorders a field (as 0.10 did to `SnapshotMeta`) changes what a directory must contain
//! without any raftkv code changing. These records spell out every stored field, are converted to
//! and from openraft's types by hand, and are pinned byte for byte in the tests below: an openraft
//! upgrade can change the conversions, never the bytes. Conversions from disk are fallible (a
//! membership whose voter has no address is refused, not handed to openraft).
//!
//! Every value still goes through [`codec`], so it carries the codec's version byte. See
//! docs/storage-format.md for the format history.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::types::{self, Command, NodeId, TypeConfig};

type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
type CommittedLeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;

/// A value stored in raftkv's own shape.
pub(crate) trait Record: Sized {
    fn encode(&self) -> Result<Vec<u8>, CodecError>;
    fn decode(bytes: &[u8]) -> Result<Self, CodecError>;
}

/// A log entry's identity: the leader that proposed it and its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogId {
    pub term: u64,
    pub node_id: NodeId,
    pub index: u64,
}

/// The vote: the leader this node voted for (or is) and whether a quorum granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Vote {
    pub term: u64,
    pub node_id: NodeId,
    pub committed: bool,
}

/// A member's two addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    pub addr: String,
    pub peer_addr: String,
}

/// The voter sets (more than one during a joint change) and every member's addresses; a member in
/// `nodes` but in no set is a learner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Membership {
    pub configs: Vec<BTreeSet<NodeId>>,
    pub nodes: BTreeMap<NodeId, Member>,
}

/// A membership and the log entry that carried it (none for the empty initial one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredMembership {
    pub log_id: Option<LogId>,
    pub membership: Membership,
}

/// What a snapshot covers: the last log entry in it and the membership as of that entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotMeta {
    pub last_log_id: Option<LogId>,
    pub last_membership: StoredMembership,
}

/// A log entry. Generic over the command so that appends encode a borrowed `&Command` (no copy of
/// the value on the write path) and reads decode an owned one; both have the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry<C> {
    pub log_id: LogId,
    pub payload: Payload<C>,
}

/// What an entry carries. The command is [`Command`]'s own encoding, pinned in `types`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Payload<C> {
    /// What a new leader appends first.
    Blank,
    Normal(C),
    Membership(Membership),
}

impl From<&types::LogId> for LogId {
    fn from(id: &types::LogId) -> Self {
        LogId {
            term: id.leader_id.term,
            node_id: id.leader_id.node_id,
            index: id.index,
        }
    }
}

impl From<LogId> for types::LogId {
    fn from(id: LogId) -> Self {
        types::LogId::new(
            CommittedLeaderId {
                term: id.term,
                node_id: id.node_id,
            },
            id.index,
        )
    }
}

impl From<&types::Vote> for Vote {
    fn from(vote: &types::Vote) -> Self {
        Vote {
            term: vote.leader_id.term,
            node_id: vote.leader_id.node_id,
            committed: vote.committed,
        }
    }
}

impl From<Vote> for types::Vote {
    fn from(vote: Vote) -> Self {
        types::Vote {
            leader_id: LeaderId {
                term: vote.term,
                node_id: vote.node_id,
            },
            committed: vote.committed,
        }
    }
}

impl From<&openraft::Membership<NodeId, types::Member>> for Membership {
    fn from(m: &openraft::Membership<NodeId, types::Member>) -> Self {
        Membership {
            configs: m.get_joint_config().clone(),
            nodes: m
                .nodes()
                .map(|(id, node)| {
                    let member = Member {
                        addr: node.addr.clone(),
                        peer_addr: node.peer_addr.clone(),
                    };
                    (*id, member)
                })
                .collect(),
        }
    }
}

impl TryFrom<Membership> for openraft::Membership<NodeId, types::Member> {
    type Error = CodecError;

    /// Refuses a voter without an address or an empty voter set: openraft would not build either,
    /// and must not be handed one from disk. (No voter set at all is the empty initial membership.)
    fn try_from(m: Membership) -> Result<Self, CodecError> {
        let nodes: BTreeMap<NodeId, types::Member> = m
            .nodes
            .into_iter()
            .map(|(id, member)| (id, types::Member::new(member.addr, member.peer_addr)))
            .collect();
        openraft::Membership::new(m.configs, nodes)
            .map_err(|e| CodecError::Invalid(format!("membership: {e}")))
    }
}

impl From<&types::StoredMembership> for StoredMembership {
    fn from(m: &types::StoredMembership) -> Self {
        StoredMembership {
            log_id: m.log_id().as_ref().map(LogId::from),
            membership: m.membership().into(),
        }
    }
}

impl TryFrom<StoredMembership> for types::StoredMembership {
    type Error = CodecError;

    fn try_from(m: StoredMembership) -> Result<Self, CodecError> {
        Ok(types::StoredMembership::new(
            m.log_id.map(Into::into),
            m.membership.try_into()?,
        ))
    }
}

impl From<&types::SnapshotMeta> for SnapshotMeta {
    fn from(meta: &types::SnapshotMeta) -> Self {
        SnapshotMeta {
            last_log_id: meta.last_log_id.as_ref().map(LogId::from),
            last_membership: (&meta.last_membership).into(),
        }
    }
}

impl TryFrom<SnapshotMeta> for types::SnapshotMeta {
    type Error = CodecError;

    fn try_from(meta: SnapshotMeta) -> Result<Self, CodecError> {
        Ok(types::SnapshotMeta {
            last_log_id: meta.last_log_id.map(Into::into),
            last_membership: meta.last_membership.try_into()?,
        })
    }
}

impl<'a> From<&'a types::Entry> for Entry<&'a Command> {
    fn from(entry: &'a types::Entry) -> Self {
        let payload = match &entry.payload {
            openraft::EntryPayload::Blank => Payload::Blank,
            openraft::EntryPayload::Normal(cmd) => Payload::Normal(cmd),
            openraft::EntryPayload::Membership(m) => Payload::Membership(m.into()),
        };
        Entry {
            log_id: (&entry.log_id).into(),
            payload,
        }
    }
}

impl Entry<Command> {
    /// A `TryFrom` impl would overlap core's blanket one for the generic record.
    fn into_entry(self) -> Result<types::Entry, CodecError> {
        let entry = self;
        let payload = match entry.payload {
            Payload::Blank => openraft::EntryPayload::Blank,
            Payload::Normal(cmd) => openraft::EntryPayload::Normal(cmd),
            Payload::Membership(m) => openraft::EntryPayload::Membership(m.try_into()?),
        };
        Ok(types::Entry {
            log_id: entry.log_id.into(),
            payload,
        })
    }
}

impl Record for types::LogId {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&LogId::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(codec::decode::<LogId>(bytes)?.into())
    }
}

/// The saved commit point and the clean-shutdown marker, which may name no entry.
impl Record for Option<types::LogId> {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&self.as_ref().map(LogId::from))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(codec::decode::<Option<LogId>>(bytes)?.map(Into::into))
    }
}

impl Record for types::Vote {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&Vote::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(codec::decode::<Vote>(bytes)?.into())
    }
}

impl Record for types::Entry {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&Entry::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode::<Entry<Command>>(bytes)?.into_entry()
    }
}

impl Record for types::StoredMembership {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&StoredMembership::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode::<StoredMembership>(bytes)?.try_into()
    }
}

impl Record for types::SnapshotMeta {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&SnapshotMeta::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode::<SnapshotMeta>(bytes)?.try_into()
    }
}

/// The node id this directory belongs to (and any other plain id): a bare integer.
impl Record for NodeId {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::types::Member as TypesMember;

    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn log_id(term: u64, node_id: u64, index: u64) -> types::LogId {
        LogId {
            term,
            node_id,
            index,
        }
        .into()
    }

    fn membership() -> openraft::Membership<NodeId, TypesMember> {
        let nodes: BTreeMap<NodeId, TypesMember> = [
            (1, TypesMember::new("a:1", "a:2")),
            (2, TypesMember::new("b:1", "b:2")),
            (3, TypesMember::new("c:1", "c:2")),
        ]
        .into();
        openraft::Membership::new(vec![[1, 2].into(), [1, 3].into()], nodes).unwrap()
    }

    /// Encodes `value`, checks the bytes against `expected` (hex) and that they decode back to it.
    fn pinned<T: Record + PartialEq + std::fmt::Debug>(value: &T, expected: &str) {
        let bytes = value.encode().unwrap();
        assert_eq!(hex(&bytes), expected, "{value:?}");
        assert_eq!(&T::decode(&bytes).unwrap(), value);
    }

    /// The bytes of every stored record, pinned: a change here changes what a data directory holds
    /// and needs a new storage format (`store::FORMAT`) with a migration. Values above 250 show
    /// bincode's wider varints.
    #[test]
    fn the_encoding_of_stored_records_is_unchanged() {
        pinned(&log_id(3, 2, 300), "010302fb2c01");
        pinned(&Some(log_id(3, 2, 300)), "01010302fb2c01");
        pinned(&None::<types::LogId>, "0100");
        pinned(&types::Vote::new(7, 2), "01070200");
        pinned(&types::Vote::new_committed(7, 2), "01070201");
        pinned(&(5 as NodeId), "0105");

        // Two voter sets {1, 2} and {1, 3}, then three members with their two addresses each.
        let members = [
            "02", "020102", "020103", // configs
            "03",     // nodes
            "01", "03613a31", "03613a32", // 1: "a:1", "a:2"
            "02", "03623a31", "03623a32", // 2
            "03", "03633a31", "03633a32", // 3
        ]
        .concat();
        let stored_membership = types::StoredMembership::new(Some(log_id(1, 1, 4)), membership());
        pinned(&stored_membership, &format!("01{}{members}", "01010104"));
        pinned(&types::StoredMembership::default(), "01000000");
        let meta = types::SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 9)),
            last_membership: stored_membership,
        };
        pinned(&meta, &format!("01{}{}{members}", "01020109", "01010104"));
        pinned(&types::SnapshotMeta::default(), "0100000000");

        let entry = |payload| types::Entry {
            log_id: log_id(2, 1, 9),
            payload,
        };
        pinned(&entry(openraft::EntryPayload::Blank), "0102010900");
        pinned(
            &entry(openraft::EntryPayload::Normal(Command::Delete {
                key: b"k".to_vec(),
                prev_kv: true,
            })),
            // Normal, then `Command`'s own encoding: Delete, the key, prev_kv.
            &("0102010901".to_owned() + "01016b01"),
        );
        pinned(
            &entry(openraft::EntryPayload::Membership(membership())),
            &format!("0102010902{members}"),
        );
    }

    /// What openraft would refuse to build is refused from disk too, as a decode error (so it is
    /// reported as corruption), never handed on.
    #[test]
    fn an_invalid_membership_does_not_decode() {
        let voter_without_address = StoredMembership {
            log_id: None,
            membership: Membership {
                configs: vec![[1, 2].into()],
                nodes: [(
                    1,
                    Member {
                        addr: "a".into(),
                        peer_addr: "b".into(),
                    },
                )]
                .into(),
            },
        };
        let bytes = codec::encode(&voter_without_address).unwrap();
        assert!(matches!(
            types::StoredMembership::decode(&bytes),
            Err(CodecError::Invalid(_))
        ));
        let empty_set = StoredMembership {
            log_id: None,
            membership: Membership {
                configs: vec![BTreeSet::new()],
                nodes: BTreeMap::new(),
            },
        };
        let bytes = codec::encode(&empty_set).unwrap();
        assert!(types::StoredMembership::decode(&bytes).is_err());
    }

    /// Format 2 stored openraft's own serde shapes. These records were laid out to give the same
    /// bytes for everything but snapshot metadata (which dropped openraft's reserved `snapshot_id`),
    /// so the migration rewrites only that. True of the openraft this build uses; if an upgrade
    /// breaks this test, the records are what keeps the disk format, and this test goes.
    #[test]
    fn format_2_bytes_are_the_records_bytes_except_snapshot_meta() {
        let entry = types::Entry {
            log_id: log_id(2, 1, 9),
            payload: openraft::EntryPayload::Membership(membership()),
        };
        assert_eq!(codec::encode(&entry).unwrap(), entry.encode().unwrap());
        let vote = types::Vote::new_committed(4, 3);
        assert_eq!(codec::encode(&vote).unwrap(), vote.encode().unwrap());
        let id = Some(log_id(1, 2, 3));
        assert_eq!(codec::encode(&id).unwrap(), id.encode().unwrap());
        let m = types::StoredMembership::new(Some(log_id(1, 1, 4)), membership());
        assert_eq!(codec::encode(&m).unwrap(), m.encode().unwrap());
        let meta = types::SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 9)),
            last_membership: m,
        };
        let mut format_2 = meta.encode().unwrap();
        format_2.push(0); // The empty `snapshot_id` string.
        assert_eq!(codec::encode(&meta).unwrap(), format_2);
    }
}
