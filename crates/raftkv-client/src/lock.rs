//! A distributed lock from a lease, a Txn and a watch.
//!
//! The lock is a key. To take it, a client grants itself a lease and creates the key attached to
//! it, in a Txn that succeeds only if the key does not exist (`create_revision == 0`). If someone
//! else holds it, the client watches the key and tries again once it is deleted: when its holder
//! unlocks (revokes its lease), or when the holder's lease expires because it stopped renewing it.
//!
//! Two holders at once are impossible as far as the store is concerned: the key exists once. A
//! holder that loses its lease (a pause, a partition) may not know it yet, so a holder must stop
//! acting when [`Lock::lost`] fires, and work guarded by the lock should carry the lock's
//! [`Lock::revision`] as a fencing token that the protected resource checks (a later holder always
//! has a higher one).

use std::sync::Arc;
use std::time::Duration;

use crate::pb::v1 as pb;
use crate::{Client, KeepAlive, LeaseLost, WatchOptions};

/// Why a lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the lock's lease was lost while waiting: {0}")]
    Lost(LeaseLost),
    #[error("watching the lock: {0}")]
    Watch(#[from] crate::WatchError),
}

/// A held lock. Dropping it stops renewing its lease, so the lock frees itself within the TTL;
/// [`Lock::unlock`] frees it at once.
pub struct Lock {
    client: Arc<Client>,
    key: Vec<u8>,
    revision: u64,
    alive: KeepAlive,
}

impl Lock {
    /// The revision at which this holder took the lock: a fencing token, larger for every later
    /// holder.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    pub fn lease(&self) -> u64 {
        self.alive.id()
    }

    /// Waits until the lock can no longer be counted on (its lease was lost).
    pub async fn lost(&mut self) -> LeaseLost {
        self.alive.lost().await
    }

    /// Frees the lock now: revokes its lease, which deletes the key.
    pub async fn unlock(self) -> Result<(), tonic::Status> {
        match self.client.lease_revoke(self.alive.id()).await {
            Ok(_) => Ok(()),
            // Expired already: the lock is free either way.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }
}

impl Client {
    /// Takes the lock `key`, waiting for as long as another holder has it, with a lease of `ttl`
    /// kept alive until the lock is dropped or unlocked.
    ///
    /// ```no_run
    /// # async fn demo(client: std::sync::Arc<raftkv_client::Client>) -> Result<(), raftkv_client::LockError> {
    /// let lock = client.lock(b"locks/report".to_vec(), std::time::Duration::from_secs(10)).await?;
    /// println!("holding it since revision {}", lock.revision());
    /// lock.unlock().await?;
    /// # Ok(()) }
    /// ```
    pub async fn lock(self: &Arc<Self>, key: Vec<u8>, ttl: Duration) -> Result<Lock, LockError> {
        let lease = self.lease_grant(ttl, 0).await?;
        let mut alive = self.keep_alive(lease.id, Duration::from_millis(lease.ttl_ms));
        loop {
            let seen = match self.try_lock(&key, lease.id).await? {
                Attempt::Taken(revision) => {
                    return Ok(Lock {
                        client: self.clone(),
                        key,
                        revision,
                        alive,
                    });
                }
                Attempt::Held(seen) => seen,
                Attempt::Free => continue,
            };
            // Held by someone else at `seen`: wait for its key to go, or for our lease to.
            let mut watch = self.watch(WatchOptions::key(key.clone()).from_revision(seen + 1));
            tokio::select! {
                lost = alive.lost() => return Err(LockError::Lost(lost)),
                freed = deleted(&mut watch) => freed?,
            }
        }
    }

    /// One attempt to create the key.
    async fn try_lock(&self, key: &[u8], lease: u64) -> Result<Attempt, tonic::Status> {
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: key.to_vec(),
                result: pb::CompareResult::Equal as i32,
                target: Some(pb::compare::Target::CreateRevision(0)),
            }],
            success: vec![pb::Op {
                op: Some(pb::op::Op::Put(pb::PutRequest {
                    key: key.to_vec(),
                    value: lease.to_string().into_bytes(),
                    prev_kv: false,
                    lease,
                })),
            }],
            failure: vec![],
        };
        let revision = |h: Option<pb::ResponseHeader>| h.map_or(0, |h| h.revision);
        match self.txn(txn).await {
            Ok(r) if r.succeeded => Ok(Attempt::Taken(revision(r.header))),
            // The key existed at the txn's revision.
            Ok(r) => Ok(Attempt::Held(revision(r.header))),
            // The outcome is unknown: the key says whether it was ours.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                ) =>
            {
                let r = self.get(key.to_vec(), pb::Consistency::Strong, 0).await?;
                Ok(match r.kv {
                    Some(kv) if kv.lease == lease => Attempt::Taken(kv.create_revision),
                    Some(_) => Attempt::Held(revision(r.header)),
                    None => Attempt::Free,
                })
            }
            Err(s) => Err(s),
        }
    }
}

enum Attempt {
    /// Taken at this revision.
    Taken(u64),
    /// Another lease held the key at this revision.
    Held(u64),
    /// Not ours, and free now: try again.
    Free,
}

/// Waits for a DELETE of the watched key.
async fn deleted(watch: &mut crate::Watch) -> Result<(), LockError> {
    while let Some(response) = watch.next().await {
        if response?
            .events
            .iter()
            .any(|e| e.r#type == pb::EventType::Delete as i32)
        {
            return Ok(());
        }
    }
    Ok(())
}
