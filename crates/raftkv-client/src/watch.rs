//! A watch that outlives its connection: when the stream breaks (a node stops, restarts, loses the
//! network), it is opened again on the next node from the revision after the last one seen, so
//! the caller sees every event once and in order, and never a gap.
//!
//! Every response carries the revision the stream is complete through (`header.revision`), the
//! first one included, so the resume point is always known. The stream ends only on what a retry
//! cannot change: the revision is no longer in any node's history ([`WatchError::Compacted`]), or
//! the request is invalid.

use std::time::Duration;

use futures::Stream;
use tonic::transport::Channel;

use crate::pb::v1 as pb;
use crate::pb::v1::watch_client::WatchClient;
use crate::{COMPACT_REVISION_HEADER, Client};

/// The longest pause between attempts to open the stream again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What to watch: keys in `[start, end)` (`end` empty: no upper bound), from `start_revision`
/// (0: from now on). See [`WatchOptions::key`] and [`WatchOptions::prefix`].
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub start_revision: u64,
    pub prev_kv: bool,
    /// Ask for an empty response at least this often (0: off; the minimum is 10 ms).
    pub progress_notify_ms: u64,
}

impl WatchOptions {
    /// Exactly one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        let start = key.into();
        let mut end = start.clone();
        end.push(0);
        Self {
            start,
            end,
            ..Self::default()
        }
    }

    /// Every key that starts with `prefix` (every key, for an empty prefix).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let start = prefix.into();
        let end = prefix_end(&start);
        Self {
            start,
            end,
            ..Self::default()
        }
    }

    pub fn from_revision(mut self, revision: u64) -> Self {
        self.start_revision = revision;
        self
    }

    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    pub fn with_progress_notify(mut self, every: Duration) -> Self {
        self.progress_notify_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// The first key after every key that starts with `prefix` (empty: none, or the prefix is empty).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// No node still holds the revision the watch needs; `oldest` is the oldest one the last node
    /// asked can stream from. Read the current state, then watch from its revision + 1.
    #[error("revision {asked} is no longer in the nodes' watch history (the oldest is {oldest})")]
    Compacted { asked: u64, oldest: u64 },
    /// The request itself was refused (a retry would be refused the same way).
    #[error("watch refused: {0}")]
    Refused(tonic::Status),
}

/// A watch over a [`Client`]'s nodes. `next` yields responses; empty ones are progress reports.
pub struct Watch {
    nodes: Vec<Channel>,
    node: usize,
    options: WatchOptions,
    /// The revision to resume from: one after the last the stream was complete through.
    next: Option<u64>,
    stream: Option<tonic::Streaming<pb::WatchResponse>>,
    /// Nodes that said the revision is gone, in a row: when all have, the watch ends.
    compacted: Vec<u64>,
    failures: u32,
}

impl Client {
    /// Opens a watch (lazily: the first [`Watch::next`] connects). It resumes on its own across
    /// reconnects and node switches; see the module documentation.
    ///
    /// ```no_run
    /// # async fn demo(client: raftkv_client::Client) -> Result<(), raftkv_client::WatchError> {
    /// use raftkv_client::WatchOptions;
    /// let mut watch = client.watch(WatchOptions::prefix("config/").with_prev_kv());
    /// while let Some(response) = watch.next().await {
    ///     for event in response?.events {
    ///         println!("{:?}", event.kv.map(|kv| kv.key));
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch(&self, options: WatchOptions) -> Watch {
        let (preferred, nodes) = self.channels();
        Watch {
            nodes,
            node: preferred,
            next: (options.start_revision > 0).then_some(options.start_revision),
            options,
            stream: None,
            compacted: Vec::new(),
            failures: 0,
        }
    }
}

impl Watch {
    /// The next response, or `None` never (a watch ends only with an error).
    pub async fn next(&mut self) -> Option<Result<pb::WatchResponse, WatchError>> {
        loop {
            if self.stream.is_none()
                && let Err(e) = self.open().await
            {
                return Some(Err(e));
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    self.failures = 0;
                    self.compacted.clear();
                    if let Some(h) = &response.header {
                        self.next = Some(h.revision.saturating_add(1));
                    }
                    return Some(Ok(response));
                }
                Ok(None) => self.broke().await,
                Err(status) => {
                    if let Err(e) = self.failed(status).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// The revision this watch resumes from: one after the last it was complete through.
    pub fn resume_revision(&self) -> Option<u64> {
        self.next
    }

    /// As a [`Stream`], for combinators.
    pub fn into_stream(self) -> impl Stream<Item = Result<pb::WatchResponse, WatchError>> {
        futures::stream::unfold(Some(self), |watch| async move {
            let mut watch = watch?;
            match watch.next().await? {
                Ok(r) => Some((Ok(r), Some(watch))),
                // Ends after the error.
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    async fn open(&mut self) -> Result<(), WatchError> {
        let request = pb::WatchRequest {
            start: self.options.start.clone(),
            end: self.options.end.clone(),
            start_revision: self.next.unwrap_or(0),
            prev_kv: self.options.prev_kv,
            progress_notify_ms: self.options.progress_notify_ms,
        };
        let channel = self.nodes[self.node % self.nodes.len()].clone();
        let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
        match client.watch(request).await {
            Ok(response) => {
                self.stream = Some(response.into_inner());
                Ok(())
            }
            Err(status) => self.failed(status).await,
        }
    }

    /// The stream ended or failed: try again on the next node, unless the failure is final.
    async fn failed(&mut self, status: tonic::Status) -> Result<(), WatchError> {
        self.stream = None;
        match status.code() {
            tonic::Code::InvalidArgument => return Err(WatchError::Refused(status)),
            tonic::Code::OutOfRange => {
                let oldest = status
                    .metadata()
                    .get(COMPACT_REVISION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let Some(oldest) = oldest else {
                    return Err(WatchError::Refused(status));
                };
                self.compacted.push(oldest);
                if self.compacted.len() >= self.nodes.len() {
                    return Err(WatchError::Compacted {
                        asked: self.next.unwrap_or(0),
                        oldest: self.compacted.iter().copied().min().unwrap_or(oldest),
                    });
                }
            }
            _ => {}
        }
        self.broke().await;
        Ok(())
    }

    async fn broke(&mut self) {
        self.stream = None;
        self.node = self.node.wrapping_add(1);
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_millis(50) * self.failures.min(20);
        tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"ab"), b"ac");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
        assert_eq!(prefix_end(b""), b"");
        assert_eq!(WatchOptions::key("k").end, b"k\0");
    }
}
