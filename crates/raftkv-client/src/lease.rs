//! Leases: grant, revoke, inspect, and a background keep-alive that says when the lease is lost.
//!
//! A lease lives while keep-alives reach the leader in time. [`Client::keep_alive`] renews it every
//! third of its TTL, as etcd's clients do, so two renewals in a row can be lost without losing the
//! lease. It reports the lease lost as soon as the cluster says it is gone, or once a full TTL has
//! passed since the last renewal the cluster acknowledged: from then on the lease may have expired
//! and whatever it guards (a lock, a registration) must be treated as gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::Client;
use crate::client::with_timeout;
use crate::pb::v1 as pb;

impl Client {
    /// Grants a lease of `ttl` (rounded to milliseconds; raised to the cluster's minimum, which the
    /// response's `ttl_ms` shows). `id` 0 lets the cluster pick one.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// let lease = client.lease_grant(std::time::Duration::from_secs(10), 0).await?;
    /// client.put_with_lease(b"service/a".to_vec(), b"10.0.0.1:80".to_vec(), lease.id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn lease_grant(
        &self,
        ttl: Duration,
        id: u64,
    ) -> Result<pb::LeaseGrantResponse, tonic::Status> {
        let req = pb::LeaseGrantRequest {
            ttl_ms: ttl.as_millis() as u64,
            id,
        };
        self.call_lease(|mut c, t| {
            let r = with_timeout(req, t);
            async move { c.grant(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Ends a lease now and deletes its keys (NOT_FOUND for a lease that does not exist).
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// client.lease_revoke(7).await?;
    /// # Ok(()) }
    /// ```
    pub async fn lease_revoke(&self, id: u64) -> Result<pb::LeaseRevokeResponse, tonic::Status> {
        let req = pb::LeaseRevokeRequest { id };
        self.call_lease(|mut c, t| {
            let r = with_timeout(req, t);
            async move { c.revoke(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Renews a lease once; NOT_FOUND for one that has expired or never existed.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// let renewed = client.lease_keep_alive_once(7).await?;
    /// println!("lease 7 has {} ms", renewed.ttl_ms);
    /// # Ok(()) }
    /// ```
    pub async fn lease_keep_alive_once(
        &self,
        id: u64,
    ) -> Result<pb::LeaseKeepAliveResponse, tonic::Status> {
        let req = pb::LeaseKeepAliveRequest { id };
        self.call_lease(|mut c, t| {
            let r = with_timeout(req, t);
            async move { c.keep_alive_once(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A lease's remaining and granted TTL, and with `keys` the keys attached to it.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// let ttl = client.lease_time_to_live(7, true).await?;
    /// println!("{} of {} ms left, {} keys", ttl.ttl_ms, ttl.granted_ttl_ms, ttl.keys.len());
    /// # Ok(()) }
    /// ```
    pub async fn lease_time_to_live(
        &self,
        id: u64,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, tonic::Status> {
        let req = pb::LeaseTimeToLiveRequest { id, keys };
        self.call_lease(|mut c, t| {
            let r = with_timeout(req, t);
            async move { c.time_to_live(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The ids of every lease that exists.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// let ids = client.lease_list().await?.ids;
    /// # Ok(()) }
    /// ```
    pub async fn lease_list(&self) -> Result<pb::LeaseLeasesResponse, tonic::Status> {
        self.call_lease(|mut c, t| {
            let r = with_timeout(pb::LeaseLeasesRequest {}, t);
            async move { c.leases(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Puts `key` attached to lease `lease`: the key is deleted when the lease ends.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), tonic::Status> {
    /// client.put_with_lease(b"service/a".to_vec(), b"up".to_vec(), 7).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put_with_lease(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: u64,
    ) -> Result<pb::PutResponse, tonic::Status> {
        self.put_request(pb::PutRequest {
            key,
            value,
            prev_kv: false,
            lease,
        })
        .await
    }

    /// Keeps lease `id` (of `ttl`) alive in the background until the returned handle is dropped.
    ///
    /// ```no_run
    /// # async fn demo(client: std::sync::Arc<raftkv_client::Client>) -> Result<(), tonic::Status> {
    /// use std::time::Duration;
    /// let lease = client.lease_grant(Duration::from_secs(5), 0).await?;
    /// let mut alive = client.keep_alive(lease.id, Duration::from_millis(lease.ttl_ms));
    /// let why = alive.lost().await;
    /// eprintln!("lease {} lost: {why}", lease.id);
    /// # Ok(()) }
    /// ```
    pub fn keep_alive(self: &Arc<Self>, id: u64, ttl: Duration) -> KeepAlive {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(renew(self.clone(), id, ttl, tx));
        KeepAlive { id, rx, task }
    }
}

/// A running keep-alive. Dropping it stops renewing (the lease then expires; revoke it to end it
/// at once).
pub struct KeepAlive {
    id: u64,
    rx: watch::Receiver<Option<LeaseLost>>,
    task: tokio::task::JoinHandle<()>,
}

/// Why a lease can no longer be counted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    /// The cluster says the lease does not exist (it expired or was revoked).
    #[error("the lease expired or was revoked")]
    Gone,
    /// No renewal was acknowledged for a whole TTL: it may have expired.
    #[error("no keep-alive acknowledged for a whole TTL (last error: {0})")]
    Unconfirmed(String),
}

impl KeepAlive {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits until the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        loop {
            if let Some(lost) = self.rx.borrow().clone() {
                return lost;
            }
            if self.rx.changed().await.is_err() {
                return LeaseLost::Unconfirmed("the keep-alive task ended".into());
            }
        }
    }

    /// Whether the lease has been lost, without waiting.
    pub fn is_lost(&self) -> bool {
        self.rx.borrow().is_some()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn renew(
    client: Arc<Client>,
    id: u64,
    ttl: Duration,
    lost: watch::Sender<Option<LeaseLost>>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(10));
    // The lease is certain until a TTL after the last renewal that was sent and acknowledged.
    let mut valid_until = Instant::now() + ttl;
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        match client.lease_keep_alive_once(id).await {
            Ok(r) if r.ttl_ms > 0 => {
                valid_until = sent + Duration::from_millis(r.ttl_ms);
                next = sent + interval;
            }
            Ok(_) => {
                let _ = lost.send(Some(LeaseLost::Gone));
                return;
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                let _ = lost.send(Some(LeaseLost::Gone));
                return;
            }
            Err(s) => {
                if Instant::now() >= valid_until {
                    let _ = lost.send(Some(LeaseLost::Unconfirmed(s.message().to_string())));
                    return;
                }
                // Soon again, but not in a tight loop.
                next = Instant::now() + (interval / 4).max(Duration::from_millis(10));
            }
        }
        if Instant::now() >= valid_until {
            let _ = lost.send(Some(LeaseLost::Unconfirmed("renewed too late".into())));
            return;
        }
    }
}
