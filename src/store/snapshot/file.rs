//! The snapshot file: one applied state as a run of checksummed frames, written and read front to
//! back, so that no step (build, send, receive, install) ever holds the whole image in memory.
//!
//! ```text
//! MAGIC (8 bytes)
//! frame*           kind: u8 | len: u32 LE | crc: u32 LE | payload (len bytes)
//! ```
//! The crc is CRC-32 over kind, len and payload. The first frame is `META` (the snapshot metadata's
//! record), then any number of `PAIRS` frames (each pair: key length u32 LE, key, value length u32
//! LE, value; the value is `sm_data`'s stored bytes), then `END` (the number of pairs, u64 LE).
//! Between `META` and the first `PAIRS` may come one `RETIRED` frame: the ids membership changes
//! have removed (encoded with `codec`), which are state like the pairs (ids are never reused, and a
//! node that caught up by snapshot must refuse them too). It is written only when there are any, so
//! a cluster that never removed a member writes the files an older version reads. Likewise, before
//! the first `PAIRS`, any number of `LEASES` frames: the granted leases (id and `LeaseRecord` each,
//! encoded with `codec` as a list), only when there are any. Every pair whose value names a lease
//! must name one of them.
//! Nothing may follow `END`, and a file without it is no snapshot: a torn write or a cut transfer is
//! refused instead of installed as a smaller state. Keys are strictly increasing across the file,
//! as sled iterates them, so a reader can also reject duplicates.
//!
//! The same bytes are the stored snapshot, the stream a leader sends, and what a follower writes to
//! disk as it receives them: one format, checked in one place ([`verify`]).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::codec::CodecError;
use crate::limits::MAX_KEY_BYTES;
use crate::store::leases::LeaseRecord;
use crate::store::record::Record;
use crate::store::state_machine::StoredValue;
use crate::types::{NodeId, SnapshotMeta};

pub const MAGIC: &[u8; 8] = b"RKVSNAP1";

const META: u8 = 1;
const PAIRS: u8 = 2;
const END: u8 = 3;
const RETIRED: u8 = 4;
const LEASES: u8 = 5;
/// Leases per `LEASES` frame: each takes well under 64 bytes, so a frame stays far below the limit.
const LEASES_PER_FRAME: usize = 4096;
/// The most leases a file may hold: far above any `--max-leases`, and a bound on what a reader
/// collects before the pairs.
pub const MAX_LEASES: usize = 10_000_000;
const FRAME_HEADER: usize = 9;

/// A `PAIRS` frame is closed once it holds this much; one pair may take it past.
const PAIRS_TARGET: usize = 1 << 20;

/// The largest frame a reader accepts: what bounds a reader's buffer. One pair must fit, so it is
/// above the largest entry a node accepts.
pub const MAX_FRAME: usize = crate::limits::MAX_PEER_MESSAGE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not a snapshot file; from this disk that is corruption, from a peer a bad request.
    #[error("not a snapshot file: {0}")]
    Malformed(String),
}

impl From<CodecError> for FileError {
    fn from(e: CodecError) -> Self {
        FileError::Malformed(e.to_string())
    }
}

impl From<FileError> for io::Error {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Io(e) => e,
            FileError::Malformed(what) => io::Error::new(io::ErrorKind::InvalidData, what),
        }
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, FileError> {
    Err(FileError::Malformed(what.into()))
}

/// Writes a snapshot file front to back.
pub struct Writer<W: Write> {
    out: W,
    frame: Vec<u8>,
    pairs: u64,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, meta: &SnapshotMeta) -> Result<Self, FileError> {
        Self::with_state(out, meta, &BTreeSet::new(), &[])
    }

    /// A file whose state includes the `retired` member ids and the granted `leases`.
    pub fn with_state(
        mut out: W,
        meta: &SnapshotMeta,
        retired: &BTreeSet<NodeId>,
        leases: &[(u64, LeaseRecord)],
    ) -> Result<Self, FileError> {
        out.write_all(MAGIC)?;
        let mut writer = Writer {
            out,
            frame: Vec::new(),
            pairs: 0,
            written: MAGIC.len() as u64,
        };
        let meta = meta.encode()?;
        writer.write_frame(META, &meta)?;
        if !retired.is_empty() {
            writer.write_frame(RETIRED, &crate::codec::encode(retired)?)?;
        }
        for chunk in leases.chunks(LEASES_PER_FRAME) {
            writer.write_frame(LEASES, &crate::codec::encode(chunk)?)?;
        }
        Ok(writer)
    }

    /// Adds one pair; keys must come in strictly increasing order.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), FileError> {
        let (Ok(klen), Ok(vlen)) = (u32::try_from(key.len()), u32::try_from(value.len())) else {
            return malformed("a pair longer than 4 GiB");
        };
        self.frame.extend_from_slice(&klen.to_le_bytes());
        self.frame.extend_from_slice(key);
        self.frame.extend_from_slice(&vlen.to_le_bytes());
        self.frame.extend_from_slice(value);
        self.pairs += 1;
        if self.frame.len() >= PAIRS_TARGET {
            self.flush_pairs()?;
        }
        Ok(())
    }

    fn flush_pairs(&mut self) -> Result<(), FileError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        let frame = std::mem::take(&mut self.frame);
        self.write_frame(PAIRS, &frame)?;
        self.frame = frame;
        self.frame.clear();
        Ok(())
    }

    fn write_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), FileError> {
        let Ok(len) = u32::try_from(payload.len()) else {
            return malformed("a frame longer than 4 GiB");
        };
        let mut header = [0u8; FRAME_HEADER];
        header[0] = kind;
        header[1..5].copy_from_slice(&len.to_le_bytes());
        let crc = crc(kind, len, payload);
        header[5..9].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(payload)?;
        self.written += (FRAME_HEADER + payload.len()) as u64;
        Ok(())
    }

    /// Ends the file; returns the output, the number of pairs and of bytes written.
    pub fn finish(mut self) -> Result<(W, u64, u64), FileError> {
        self.flush_pairs()?;
        let pairs = self.pairs;
        self.write_frame(END, &pairs.to_le_bytes())?;
        self.out.flush()?;
        Ok((self.out, pairs, self.written))
    }
}

fn crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// A key and its stored value, borrowed from the frame being read.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// Reads a snapshot file front to back, checking every frame as it goes.
pub struct Reader<R: Read> {
    input: R,
    meta: SnapshotMeta,
    retired: BTreeSet<NodeId>,
    leases: std::collections::BTreeMap<u64, LeaseRecord>,
    frame: Vec<u8>,
    /// The kind of the frame already read into `frame` and not yet handed out.
    pending: Option<u8>,
    pairs: u64,
    last_key: Option<Vec<u8>>,
    ended: bool,
}

impl<R: Read> Reader<R> {
    /// Reads the magic and every frame before the pairs, so the state beside the pairs (removed
    /// ids, leases) is known from here on.
    pub fn new(mut input: R) -> Result<Self, FileError> {
        let mut magic = [0u8; 8];
        read_exact_or(&mut input, &mut magic, "shorter than its magic")?;
        if &magic != MAGIC {
            return malformed("wrong magic");
        }
        let mut frame = Vec::new();
        let kind = read_frame(&mut input, &mut frame)?;
        if kind != META {
            return malformed(format!("first frame is of kind {kind}, not the metadata"));
        }
        let meta = SnapshotMeta::decode(&frame)?;
        let mut retired = BTreeSet::new();
        let mut leases = std::collections::BTreeMap::new();
        let mut kind = read_frame(&mut input, &mut frame)?;
        if kind == RETIRED {
            retired = crate::codec::decode(&frame)?;
            kind = read_frame(&mut input, &mut frame)?;
        }
        while kind == LEASES {
            let granted: Vec<(u64, LeaseRecord)> = crate::codec::decode(&frame)?;
            for (id, record) in granted {
                let valid = id != 0
                    && (1..=crate::limits::MAX_LEASE_TTL_MS).contains(&record.granted_ms)
                    && record.checkpoint_ms.is_none_or(|c| c < record.granted_ms);
                if !valid || leases.insert(id, record).is_some() {
                    return malformed(format!("lease {id} is not a valid, distinct lease"));
                }
                if leases.len() > MAX_LEASES {
                    return malformed(format!("more than {MAX_LEASES} leases"));
                }
            }
            kind = read_frame(&mut input, &mut frame)?;
        }
        Ok(Reader {
            input,
            meta,
            retired,
            leases,
            frame,
            pending: Some(kind),
            pairs: 0,
            last_key: None,
            ended: false,
        })
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// The removed member ids the file holds.
    pub fn retired(&self) -> &BTreeSet<NodeId> {
        &self.retired
    }

    /// The granted leases the file holds.
    pub fn leases(&self) -> Vec<(u64, LeaseRecord)> {
        self.leases.iter().map(|(id, r)| (*id, *r)).collect()
    }

    /// The next run of pairs (key, stored value), or `None` after the end frame. Every key is checked
    /// to be larger than the one before it and every value to decode as a stored value whose lease,
    /// if any, the file holds.
    pub fn next_pairs(&mut self) -> Result<Option<Vec<Pair<'_>>>, FileError> {
        if self.ended {
            return Ok(None);
        }
        let kind = match self.pending.take() {
            Some(kind) => kind,
            None => read_frame(&mut self.input, &mut self.frame)?,
        };
        match kind {
            PAIRS => {}
            END => {
                let count = <[u8; 8]>::try_from(self.frame.as_slice())
                    .map(u64::from_le_bytes)
                    .or_else(|_| malformed("end frame of the wrong size"))?;
                if count != self.pairs {
                    return malformed(format!(
                        "end frame counts {count} pairs, the file holds {}",
                        self.pairs
                    ));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return malformed("bytes after the end frame");
                }
                self.ended = true;
                return Ok(None);
            }
            kind => return malformed(format!("unexpected frame kind {kind}")),
        }
        let mut pairs = Vec::new();
        let mut rest = self.frame.as_slice();
        while !rest.is_empty() {
            let (key, after) = take_field(rest)?;
            let (value, after) = take_field(after)?;
            rest = after;
            if key.len() > MAX_KEY_BYTES {
                return malformed(format!("a key of {} bytes", key.len()));
            }
            if self.last_key.as_deref().is_some_and(|last| last >= key) {
                return malformed("keys out of order");
            }
            let lease = StoredValue::decode(value)?.lease;
            if lease != 0 && !self.leases.contains_key(&lease) {
                return malformed(format!("a key names lease {lease}, which the file lacks"));
            }
            self.last_key = Some(key.to_vec());
            pairs.push((key, value));
        }
        self.pairs += pairs.len() as u64;
        Ok(Some(pairs))
    }
}

fn take_field(bytes: &[u8]) -> Result<(&[u8], &[u8]), FileError> {
    let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
        return malformed("a pair cut short");
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len > rest.len() {
        return malformed("a pair cut short");
    }
    Ok(rest.split_at(len))
}

fn read_exact_or(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), FileError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => malformed(what),
        Err(e) => Err(e.into()),
    }
}

/// Reads one frame into `buf`, checking its length bound and its crc; returns its kind.
fn read_frame(input: &mut impl Read, buf: &mut Vec<u8>) -> Result<u8, FileError> {
    let mut header = [0u8; FRAME_HEADER];
    read_exact_or(input, &mut header, "ends without its end frame")?;
    let kind = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let expected = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    if len as usize > MAX_FRAME {
        return malformed(format!("a frame of {len} bytes"));
    }
    buf.clear();
    // Grown as bytes arrive, not to the claimed length: a short file cannot make it allocate more.
    input.take(u64::from(len)).read_to_end(buf)?;
    if buf.len() != len as usize {
        return malformed("ends inside a frame");
    }
    if crc(kind, len, buf) != expected {
        return malformed("a frame's checksum does not match");
    }
    Ok(kind)
}

/// Reads a whole snapshot file, checking everything a reader checks; returns its metadata and the
/// number of pairs. Run on a received file before it reaches openraft, which treats a failed
/// install as a storage error and stops.
pub fn verify(input: impl Read) -> Result<(SnapshotMeta, u64), FileError> {
    let mut reader = Reader::new(input)?;
    let mut pairs = 0u64;
    while let Some(run) = reader.next_pairs()? {
        pairs += run.len() as u64;
    }
    Ok((reader.meta, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::snapshot::test_meta as meta;

    fn value(v: &[u8]) -> Vec<u8> {
        StoredValue {
            value: v.to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 1,
            lease: 0,
        }
        .encode()
        .unwrap()
    }

    fn file(pairs: usize, value_len: usize) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &meta(7)).unwrap();
        for i in 0..pairs {
            w.push(
                format!("k{i:06}").as_bytes(),
                &value(&vec![b'v'; value_len]),
            )
            .unwrap();
        }
        w.finish().unwrap().0
    }

    #[test]
    fn round_trip_across_frames() {
        let bytes = file(5000, 300);
        let mut r = Reader::new(bytes.as_slice()).unwrap();
        assert_eq!(r.meta(), &meta(7));
        let mut seen = 0;
        let mut runs = 0;
        while let Some(run) = r.next_pairs().unwrap() {
            for (k, v) in run {
                assert_eq!(k, format!("k{seen:06}").as_bytes());
                assert_eq!(StoredValue::decode(v).unwrap().value.len(), 300);
                seen += 1;
            }
            runs += 1;
        }
        assert_eq!(seen, 5000);
        assert!(runs > 1, "the pairs span several frames");
        assert_eq!(verify(bytes.as_slice()).unwrap(), (meta(7), 5000));
        assert_eq!(verify(file(0, 0).as_slice()).unwrap(), (meta(7), 0));
    }

    /// A transfer cut anywhere, or any byte changed, is refused and never read as a smaller state.
    #[test]
    fn every_cut_and_every_flipped_byte_is_refused() {
        let bytes = file(40, 20);
        for cut in 0..bytes.len() {
            assert!(verify(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(verify(bad.as_slice()).is_err(), "flip at {at} accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(verify(longer.as_slice()).is_err(), "trailing byte accepted");
    }

    #[test]
    fn keys_out_of_order_or_repeated_are_refused() {
        for keys in [[&b"b"[..], b"a"], [b"a", b"a"]] {
            let mut w = Writer::new(Vec::new(), &meta(1)).unwrap();
            for k in keys {
                w.push(k, &value(b"x")).unwrap();
            }
            let bytes = w.finish().unwrap().0;
            let e = verify(bytes.as_slice()).unwrap_err();
            assert!(e.to_string().contains("out of order"), "{e}");
        }
    }

    /// A frame header may claim any length; the reader allocates only what actually arrives.
    #[test]
    fn a_huge_length_claim_is_refused_without_allocating_it() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(META);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        assert!(verify(bytes.as_slice()).is_err());
        let mut bytes = MAGIC.to_vec();
        bytes.push(META);
        bytes.extend_from_slice(&((MAX_FRAME - 1) as u32).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(b"short");
        assert!(verify(bytes.as_slice()).is_err());
    }

    #[test]
    fn removed_ids_travel_before_the_pairs_and_only_there() {
        let retired = BTreeSet::from([2u64, 5]);
        let mut w = Writer::with_state(Vec::new(), &meta(3), &retired, &[]).unwrap();
        w.push(b"a", &value(b"x")).unwrap();
        let bytes = w.finish().unwrap().0;
        let mut r = Reader::new(bytes.as_slice()).unwrap();
        assert_eq!(r.next_pairs().unwrap().map(|run| run.len()), Some(1));
        assert_eq!(r.retired(), &retired);
        assert!(r.next_pairs().unwrap().is_none());
        assert_eq!(verify(bytes.as_slice()).unwrap(), (meta(3), 1));
        // None removed: no frame, the bytes an older version writes and reads.
        let plain = Writer::with_state(Vec::new(), &meta(3), &BTreeSet::new(), &[])
            .unwrap()
            .finish()
            .unwrap()
            .0;
        assert_eq!(
            plain,
            Writer::new(Vec::new(), &meta(3))
                .unwrap()
                .finish()
                .unwrap()
                .0
        );
        let mut r = Reader::new(plain.as_slice()).unwrap();
        assert!(r.next_pairs().unwrap().is_none());
        assert!(r.retired().is_empty());
        // After the pairs it is no snapshot.
        let mut late = Writer::new(Vec::new(), &meta(3)).unwrap();
        late.push(b"a", &value(b"x")).unwrap();
        late.flush_pairs().unwrap();
        late.write_frame(RETIRED, &crate::codec::encode(&retired).unwrap())
            .unwrap();
        let late = late.finish().unwrap().0;
        let e = verify(late.as_slice()).unwrap_err();
        assert!(e.to_string().contains("unexpected frame kind 4"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a peer sends, reading it is an answer, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&tail);
            let _ = verify(bytes.as_slice());
            let _ = verify(tail.as_slice());
        }
    }
}
