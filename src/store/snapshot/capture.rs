//! A point-in-time copy of `sm_data` while applies keep running.
//!
//! sled 0.34's iterators are not point-in-time, so a snapshot of one applied state once meant
//! stopping applies for as long as the copy took, which grows with the data set. Instead, while a
//! build runs, every apply first records the value each key it changes had when the build began (its
//! pre-image, or "absent"), once per key, and only then writes the tree. The builder walks the live
//! tree and, for each key, emits the pre-image when one is recorded and the tree's value otherwise;
//! pre-images of keys deleted since the build began are emitted in key order as the walk passes them.
//!
//! Why that yields exactly the state at the start: a key that no apply touched is read from the tree
//! as it was. A key that an apply touched has its first pre-image recorded before the tree changed,
//! so whenever the walk reaches it (or the place it was), the pre-image is already there. Changes to
//! keys the walk has passed do not matter: what was emitted for them was read before they changed.
//!
//! The recorded pre-images grow with the writes made during one build. Past [`Capture::LIMIT`] bytes
//! the builder takes the apply lock for the rest of its walk: applies wait, and the capture stops
//! growing (see `build` in the parent module).

use std::collections::BTreeMap;
use std::ops::Bound;

use sled::IVec;

#[derive(Default)]
pub struct Capture {
    pre: BTreeMap<Vec<u8>, Option<IVec>>,
    bytes: usize,
}

impl Capture {
    /// Past this many recorded bytes the builder stops applies until it is done.
    pub const LIMIT: usize = 64 << 20;

    /// Records `key`'s value as it is now, unless an earlier change already recorded it.
    pub fn note(
        &mut self,
        key: &[u8],
        read: impl FnOnce() -> sled::Result<Option<IVec>>,
    ) -> sled::Result<()> {
        if self.pre.contains_key(key) {
            return Ok(());
        }
        let value = read()?;
        self.bytes += key.len() + value.as_ref().map_or(0, |v| v.len()) + 32;
        self.pre.insert(key.to_vec(), value);
        Ok(())
    }

    pub fn over_limit(&self) -> bool {
        self.bytes > Self::LIMIT
    }

    /// What to emit for `key`, read from the tree as `live`: its pre-image if one is recorded.
    pub fn resolve<'a>(&'a self, key: &[u8], live: &'a [u8]) -> Option<&'a [u8]> {
        match self.pre.get(key) {
            Some(pre) => pre.as_deref(),
            None => Some(live),
        }
    }

    /// The pre-images of keys strictly between `after` and `before` (unbounded when `None`) that
    /// existed when the build began: keys deleted since, which the walk over the tree cannot see.
    pub fn gone_between<'a>(
        &'a self,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let lower = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_vec()));
        let upper = before.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_vec()));
        // `range` panics on an empty excluded range; the walk's keys only increase, but this is
        // the store, so check rather than trust.
        let ordered = match (after, before) {
            (Some(a), Some(b)) => a < b,
            _ => true,
        };
        ordered
            .then(|| self.pre.range((lower, upper)))
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k.as_slice(), v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    /// A change landing before step `.0` of the walk: put `.2` at `.1`, or delete it.
    type Change = (usize, Vec<u8>, Option<Vec<u8>>);

    /// One walk over a tree that changes under it, as the builder does it, with the changes landing
    /// between any two steps of the walk; the result must be the tree as it was at the start.
    fn walk_with_changes(
        start: &Model<Vec<u8>, Vec<u8>>,
        changes: &[Change],
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        for (k, v) in start {
            tree.insert(k, v.as_slice()).unwrap();
        }
        let mut capture = Capture::default();
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut pending = changes.iter().peekable();
        let mut step = 0usize;
        let mut apply_due = |capture: &mut Capture, step: usize| {
            while let Some((at, k, v)) = pending.next_if(|(at, _, _)| *at <= step) {
                let _ = at;
                capture.note(k, || tree.get(k)).unwrap();
                match v {
                    Some(v) => tree.insert(k, v.as_slice()).unwrap(),
                    None => tree.remove(k).unwrap(),
                };
            }
        };
        apply_due(&mut capture, 0);
        let mut iter = tree.iter();
        loop {
            step += 1;
            apply_due(&mut capture, step);
            let Some(item) = iter.next() else { break };
            let (k, v) = item.unwrap();
            for (gk, gv) in capture.gone_between(last.as_deref(), Some(&k)) {
                out.push((gk.to_vec(), gv.to_vec()));
            }
            if let Some(v) = capture.resolve(&k, &v) {
                out.push((k.to_vec(), v.to_vec()));
            }
            last = Some(k.to_vec());
        }
        for (gk, gv) in capture.gone_between(last.as_deref(), None) {
            out.push((gk.to_vec(), gv.to_vec()));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn the_walk_emits_the_state_at_the_start(
            start in proptest::collection::btree_map(proptest::collection::vec(0u8..6, 1..3), proptest::collection::vec(any::<u8>(), 0..4), 0..20),
            changes in proptest::collection::vec((0usize..25, proptest::collection::vec(0u8..6, 1..3), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4))), 0..30),
        ) {
            let mut changes = changes;
            changes.sort_by_key(|(at, _, _)| *at);
            let expected: Vec<(Vec<u8>, Vec<u8>)> = start.clone().into_iter().collect();
            prop_assert_eq!(walk_with_changes(&start, &changes), expected);
        }
    }
}
