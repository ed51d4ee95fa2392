//! The backup file: a header that says what the copy is, then the image.
//!
//! ```text
//! MAGIC "RKVBACK1"  (8 bytes)
//! header length     u32 LE, at most MAX_HEADER_BYTES
//! header            JSON (see [`Header`])
//! image             a snapshot file (`store::snapshot::file`), `image_bytes` long, SHA-256 `sha256`
//! ```
//! The header is JSON so that a person can read it with `head -c` and a later format can add fields
//! an older reader skips. The image is the format a leader already sends followers, checksummed frame
//! by frame and ending in a pair count, so a file cut short or altered anywhere is refused twice over:
//! by the SHA-256 and by the frames.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::snapshot::file;
use crate::types::SnapshotMeta;

pub const MAGIC: &[u8; 8] = b"RKVBACK1";
/// The format this build writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// A header is a few hundred bytes per member; this bounds what a reader allocates for a bad one.
const MAX_HEADER_BYTES: u32 = 1 << 20;

/// What a backup file is a copy of, written before the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    /// The cluster it was taken from (hex, as `raftkv status` and the metrics show it).
    pub cluster_id: String,
    /// The applied index (revision) the copy holds every write up to.
    pub revision: u64,
    /// The term and leader of the log entry at `revision`.
    pub term: u64,
    pub leader_id: u64,
    pub members: Vec<MemberRecord>,
    pub keys: u64,
    pub image_bytes: u64,
    /// SHA-256 of the image, hex.
    pub sha256: String,
    /// The node that took the copy, when (Unix seconds), and its raftkv version.
    pub taken_on: u64,
    pub taken_at_unix: u64,
    pub raftkv_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: u64,
    pub address: String,
    pub peer_address: String,
    pub learner: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a raftkv backup file: {0}")]
    NotBackup(String),
    #[error("backup format version {0} is not one this raftkv reads (it reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("the backup is corrupt or truncated: {0}")]
    Corrupt(String),
}

/// The members a snapshot's metadata records, as the header lists them.
pub fn members_of(meta: &SnapshotMeta) -> Vec<MemberRecord> {
    let membership = meta.last_membership.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, m)| MemberRecord {
            id: *id,
            address: m.addr.clone(),
            peer_address: m.peer_addr.clone(),
            learner: !voters.contains(id),
        })
        .collect()
}

/// The bytes that go before the image: magic, length and the header.
pub fn encode_header(header: &Header) -> Result<Vec<u8>, BackupError> {
    let json = serde_json::to_vec(header).map_err(|e| BackupError::Io(io::Error::other(e)))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| *l <= MAX_HEADER_BYTES)
        .ok_or_else(|| BackupError::Io(io::Error::other("the backup header is too large")))?;
    let mut out = Vec::with_capacity(12 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Reads the header, leaving `input` at the first byte of the image.
pub fn read_header(input: &mut impl Read) -> Result<Header, BackupError> {
    let mut magic = [0u8; 8];
    read_exact(input, &mut magic, "the magic number")?;
    if &magic != MAGIC {
        return Err(BackupError::NotBackup(
            "it does not start with RKVBACK1".into(),
        ));
    }
    let mut len = [0u8; 4];
    read_exact(input, &mut len, "the header length")?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(BackupError::Corrupt(format!(
            "a header of {len} bytes (at most {MAX_HEADER_BYTES})"
        )));
    }
    let mut json = vec![0u8; len as usize];
    read_exact(input, &mut json, "the header")?;
    // The version first, so a newer file says what it is rather than failing on a field it added.
    let version: serde_json::Value = serde_json::from_slice(&json)
        .map_err(|e| BackupError::Corrupt(format!("the header is not JSON: {e}")))?;
    match version.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => return Err(BackupError::Version(u32::try_from(v).unwrap_or(u32::MAX))),
        None => {
            return Err(BackupError::Corrupt(
                "the header has no format_version".into(),
            ));
        }
    }
    serde_json::from_value(version)
        .map_err(|e| BackupError::Corrupt(format!("the header does not read: {e}")))
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), BackupError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BackupError::Corrupt(format!("it ends inside {what}")),
        _ => BackupError::Io(e),
    })
}

/// Reads a whole backup and checks it: the header, the image's length and SHA-256 against it, every
/// frame of the image, and that the image's own metadata agrees with the header. Returns the header
/// and the image's metadata. Reads front to back once, holding one frame at a time.
pub fn verify(mut input: impl Read) -> Result<(Header, SnapshotMeta), BackupError> {
    let header = read_header(&mut input)?;
    let mut image = Hashing {
        input: input.take(header.image_bytes.saturating_add(1)),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let checked = file::verify(&mut image);
    let (meta, pairs) = match checked {
        Ok(found) => found,
        Err(file::FileError::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => {
            return Err(BackupError::Io(e));
        }
        Err(e) => {
            return Err(BackupError::Corrupt(format!(
                "the image after {} of {} bytes: {e}",
                image.bytes, header.image_bytes
            )));
        }
    };
    if image.bytes != header.image_bytes {
        return Err(BackupError::Corrupt(format!(
            "the image is {} bytes, the header says {}",
            image.bytes, header.image_bytes
        )));
    }
    let sha = hex::encode(image.hasher.finalize());
    if sha != header.sha256 {
        return Err(BackupError::Corrupt(format!(
            "the image's SHA-256 is {sha}, the header says {}",
            header.sha256
        )));
    }
    let revision = meta.last_log_id.as_ref().map_or(0, |l| l.index);
    let term = meta.last_log_id.as_ref().map_or(0, |l| l.leader_id.term);
    if revision != header.revision || term != header.term || pairs != header.keys {
        return Err(BackupError::Corrupt(format!(
            "the image holds {pairs} keys at revision {revision} (term {term}), the header says \
             {} keys at {} (term {})",
            header.keys, header.revision, header.term
        )));
    }
    // A restored cluster counts terms and indexes up from these; a file that checks can still be made
    // by anyone (the SHA-256 is no signature), so values no cluster reaches are refused.
    if revision > LARGEST || term > LARGEST {
        return Err(BackupError::Corrupt(format!(
            "revision {revision} or term {term} is past what a cluster reaches"
        )));
    }
    Ok((header, meta))
}

/// The largest revision or term a backup may hold.
const LARGEST: u64 = 1 << 62;

/// SHA-256 of an image read front to back, and its length.
pub fn hash_image(mut input: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut input, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), bytes))
}

/// Passes reads through, hashing and counting them.
struct Hashing<R> {
    input: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes a whole backup file: header, then the image copied from `image`. Returns the bytes written.
pub fn write(out: &mut impl Write, header_bytes: &[u8], mut image: impl Read) -> io::Result<u64> {
    out.write_all(header_bytes)?;
    let copied = io::copy(&mut image, out)?;
    Ok(header_bytes.len() as u64 + copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format_version: FORMAT_VERSION,
            cluster_id: "00ff".into(),
            revision: 0,
            term: 0,
            leader_id: 0,
            members: vec![],
            keys: 0,
            image_bytes: 0,
            sha256: String::new(),
            taken_on: 1,
            taken_at_unix: 0,
            raftkv_version: "test".into(),
        }
    }

    #[test]
    fn a_header_reads_back_and_leaves_the_reader_at_the_image() {
        let mut bytes = encode_header(&header()).unwrap();
        bytes.extend_from_slice(b"IMAGE");
        let mut input = &bytes[..];
        assert_eq!(read_header(&mut input).unwrap(), header());
        assert_eq!(input, b"IMAGE");
    }

    #[test]
    fn bad_headers_are_refused_with_what_is_wrong() {
        let good = encode_header(&header()).unwrap();
        let not = read_header(&mut &b"PK\x03\x04 a zip file"[..]).unwrap_err();
        assert!(matches!(not, BackupError::NotBackup(_)), "{not}");
        let cut = read_header(&mut &good[..good.len() - 3]).unwrap_err();
        assert!(cut.to_string().contains("ends inside the header"), "{cut}");
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let huge = read_header(&mut &huge[..]).unwrap_err();
        assert!(matches!(huge, BackupError::Corrupt(_)), "{huge}");
        let newer = encode_header(&Header {
            format_version: 9,
            ..header()
        })
        .unwrap();
        let newer = read_header(&mut &newer[..]).unwrap_err();
        assert!(matches!(newer, BackupError::Version(9)), "{newer}");
    }
}
