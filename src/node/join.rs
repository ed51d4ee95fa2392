//! Joining a running cluster (`--join`): the new node is a client of the cluster's public API until
//! it is a member.
//!
//! Before Raft starts, the node asks any member for the cluster's id ([`discover`]): its peers refuse
//! traffic from any other cluster, and a node that was not among the initial voters cannot derive
//! it. Once it serves, it asks to be added as a learner and, when it has caught up, to be promoted
//! ([`become_member`]); the leader refuses the promotion until then, and this node asks again. Each
//! step is safe to repeat, so a node that restarts half way through just carries on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::Node;
use crate::config::ServerArgs;
use crate::network::identity::ClusterId;
use crate::pb::v1 as pb;
use crate::types::{Member, NodeId};

/// How long a new node keeps asking for the cluster before it gives up and exits.
const DISCOVER_FOR: Duration = Duration::from_secs(60);
/// Between attempts to reach the cluster, or to be promoted.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// The deadline of each call to the cluster: short, as every step is asked again, and a member
/// that is cut off from the leader would otherwise hold each attempt for the whole deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot reach the cluster to join at {addrs:?}: {last}")]
    Unreachable { addrs: Vec<String>, last: String },
    #[error("the cluster refused to add node {id}: {why}")]
    Refused { id: NodeId, why: String },
    #[error("--join: {0}")]
    Setup(String),
}

/// A client of the cluster's public port, with this node's TLS settings for it.
fn client(args: &ServerArgs) -> Result<raftkv_client::Client, JoinError> {
    let tls = match (&args.cert_file, &args.key_file) {
        (Some(cert), Some(key)) => {
            let ca = args.trusted_ca_file.as_deref().ok_or_else(|| {
                JoinError::Setup(
                    "with TLS, joining needs --trusted-ca-file to verify the cluster".into(),
                )
            })?;
            Some(
                crate::tls::client_config(ca, Some((cert, key)))
                    .map_err(|e| JoinError::Setup(e.to_string()))?,
            )
        }
        _ => None,
    };
    raftkv_client::Client::with_tls(&args.join, CALL_TIMEOUT, tls)
        .map_err(|e| JoinError::Setup(e.to_string()))
}

/// The cluster's id and its members' addresses, from the first member that answers.
pub async fn discover(
    args: &ServerArgs,
) -> Result<(ClusterId, BTreeMap<NodeId, Member>), JoinError> {
    let client = client(args)?;
    let give_up = tokio::time::Instant::now() + DISCOVER_FOR;
    loop {
        let mut last = String::from("no answer");
        for (addr, status) in client.statuses().await {
            match status {
                Ok(s) => match ClusterId::parse(&s.cluster_id) {
                    Some(cluster) => {
                        let members = s
                            .voters
                            .iter()
                            .chain(&s.learners)
                            .map(|m| (m.id, Member::new(&m.address, &m.peer_address)))
                            .collect();
                        return Ok((cluster, members));
                    }
                    None => last = format!("{addr} gave no cluster id"),
                },
                Err(e) => last = format!("{addr}: {}", e.message()),
            }
        }
        if tokio::time::Instant::now() + RETRY_EVERY > give_up {
            return Err(JoinError::Unreachable {
                addrs: args.join.clone(),
                last,
            });
        }
        tracing::info!(why = %last, "waiting for the cluster to join");
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Asks the cluster to add this node as a learner, then (unless `--learner`) to promote it, until
/// it is the member it should be. Returns an error only for a refusal that asking again cannot
/// change (the id was removed before, an address is taken).
pub async fn become_member(node: Arc<Node>, args: ServerArgs) -> Result<(), JoinError> {
    let client = client(&args)?;
    let id = node.id();
    let me = args.member();
    let want_voter = !args.learner;
    let mut added = false;
    loop {
        // What this node itself knows, once the leader's membership has reached it.
        if let Some(m) = node.members().into_iter().find(|m| m.id == id)
            && (!m.learner || !want_voter)
        {
            tracing::info!(id, learner = m.learner, "this node is a member");
            return Ok(());
        }
        let step = if !added {
            client
                .member_add(pb::MemberAddRequest {
                    id,
                    address: me.addr.clone(),
                    learner: true,
                    peer_address: me.peer_addr.clone(),
                })
                .await
                .map(|_| {
                    tracing::info!(id, "added to the cluster as a learner");
                    added = true;
                })
        } else if want_voter {
            client.member_promote(id).await.map(|_| {
                tracing::info!(id, "promoted to voter");
            })
        } else {
            Ok(())
        };
        match step {
            // Looked at again after a pause: the change reaches this node by replication.
            Ok(()) => {}
            // Not caught up yet (a promotion), or another change in progress: ask again.
            Err(s)
                if s.code() == Code::FailedPrecondition
                    && (added || s.message().contains("in progress")) =>
            {
                tracing::debug!(why = %s.message(), "not yet");
            }
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) => {
                return Err(JoinError::Refused {
                    id,
                    why: s.message().to_string(),
                });
            }
            Err(s) => tracing::info!(why = %s.message(), "asking the cluster again"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
