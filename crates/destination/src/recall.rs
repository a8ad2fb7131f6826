//! Recall: one source's entries ranked by their words, by their embedding's
//! cosine similarity to a query vector, or by both fused with reciprocal rank
//! fusion (RRF). The destinations produce each signal's ranked candidates; this
//! module scores vectors, keeps the best, and fuses.

use crate::query::{MAX_TIME_US, MIN_TIME_US};
use crate::{DestinationError, StoredEntry};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use uuid::Uuid;

/// Hits a search answers when it does not say.
pub const DEFAULT_K: u32 = 10;
/// Most hits a search may ask for.
pub const MAX_K: u32 = 100;
/// RRF's constant: a hit's fused score is the sum over the signals that found
/// it of `1 / (RRF_K + rank)`, ranks from 1.
pub const RRF_K: f64 = 60.0;

/// A search of one source's entries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Search {
    /// Source searched (sources never see each other's data).
    pub source: String,
    /// Text: entries whose payload string values hold every word.
    pub q: Option<String>,
    /// A query vector: entries ranked by cosine similarity of their embedding.
    pub embedding: Option<Vec<f32>>,
    /// Only entries with this subject.
    pub subject: Option<String>,
    /// Accepted at or after (µs since the epoch).
    pub since_us: Option<i64>,
    /// Accepted before (µs since the epoch).
    pub until_us: Option<i64>,
    /// Hits wanted (1..=[`MAX_K`]).
    pub k: u32,
}

impl Search {
    /// The query's words, if it has text that has any.
    pub(crate) fn words(&self) -> Option<Vec<String>> {
        let w = crate::words::query_words(self.q.as_deref()?);
        (!w.is_empty()).then_some(w)
    }

    /// Check what the client sent: at least one signal, finite vector values,
    /// k and time bounds in range.
    pub fn check(&self) -> Result<(), DestinationError> {
        let bad = |m: String| Err(DestinationError::InvalidQuery(m));
        if self.q.as_deref().is_none_or(|q| q.trim().is_empty()) && self.embedding.is_none() {
            return bad("a search needs `q` (text), `embedding` (a vector) or both".into());
        }
        if !(1..=MAX_K).contains(&self.k) {
            return bad(format!("k must be between 1 and {MAX_K}"));
        }
        if let Some(v) = &self.embedding {
            if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
                return bad("embedding must be a non-empty array of finite numbers".into());
            }
            let n = norm(v);
            if n == 0.0 || !n.is_finite() {
                return bad("embedding must have a non-zero norm within a 32-bit float".into());
            }
        }
        for t in [self.since_us, self.until_us].into_iter().flatten() {
            if !(MIN_TIME_US..=MAX_TIME_US).contains(&t) {
                return bad("since/until must lie in the years 1 to 9999".into());
            }
        }
        Ok(())
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The entry.
    pub entry: StoredEntry,
    /// Fused score (RRF over the signals that found it); higher is better.
    pub score: f64,
    /// Rank among the text matches (1 = best), if the words matched.
    pub text_rank: Option<u32>,
    /// Rank by vector similarity (1 = best), if it has an embedding of the query's length.
    pub vector_rank: Option<u32>,
    /// Cosine similarity of its embedding to the query vector.
    pub similarity: Option<f32>,
}

/// Candidates each signal contributes to the fusion.
pub(crate) fn candidates(k: u32) -> usize {
    (k as usize * 5).max(50)
}

/// Euclidean norm.
pub(crate) fn norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

/// Dot product, in eight independent lanes so the compiler vectorises it.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// f32s as little-endian bytes.
pub(crate) fn to_le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[derive(PartialEq)]
struct Scored(f32, Uuid);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    // Reversed: the heap's top is the worst kept.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

/// The `n` most similar of the vectors offered, best first.
pub(crate) struct TopK {
    query: Vec<f32>,
    query_norm: f32,
    n: usize,
    heap: BinaryHeap<Scored>,
}

impl TopK {
    pub fn new(query: &[f32], n: usize) -> TopK {
        TopK {
            query_norm: norm(query),
            query: query.to_vec(),
            n,
            heap: BinaryHeap::with_capacity(n + 1),
        }
    }

    /// Offer one stored vector; ones of another length or zero norm are skipped.
    pub fn offer(&mut self, id: Uuid, v: &[f32]) {
        if v.len() == self.query.len() {
            self.offer_normed(id, v, norm(v));
        }
    }

    /// [`TopK::offer`] of a vector of the query's length whose norm is known.
    pub fn offer_normed(&mut self, id: Uuid, v: &[f32], nv: f32) {
        if nv == 0.0 || !nv.is_finite() {
            return;
        }
        let sim = dot(&self.query, v) / (self.query_norm * nv);
        if self.heap.len() < self.n {
            self.heap.push(Scored(sim, id));
        } else if self.heap.peek().is_some_and(|w| sim > w.0) {
            self.heap.pop();
            self.heap.push(Scored(sim, id));
        }
    }

    /// (id, similarity), best first.
    pub fn into_sorted(self) -> Vec<(Uuid, f32)> {
        let mut v: Vec<(Uuid, f32)> = self.heap.into_iter().map(|s| (s.1, s.0)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        v
    }
}

/// One fused result before its entry is read: (id, score, text rank, vector rank, similarity).
pub(crate) type Fused = (Uuid, f64, Option<u32>, Option<u32>, Option<f32>);

/// Reciprocal rank fusion of the text ranking (best first) and the vector
/// ranking (best first, with similarities): the best `k`, best first.
pub(crate) fn fuse(text: &[Uuid], vector: &[(Uuid, f32)], k: u32) -> Vec<Fused> {
    let mut by_id: HashMap<Uuid, Fused> = HashMap::new();
    for (i, id) in text.iter().enumerate() {
        let rank = i as u32 + 1;
        let f = by_id.entry(*id).or_insert((*id, 0.0, None, None, None));
        f.1 += 1.0 / (RRF_K + rank as f64);
        f.2 = Some(rank);
    }
    for (i, (id, sim)) in vector.iter().enumerate() {
        let rank = i as u32 + 1;
        let f = by_id.entry(*id).or_insert((*id, 0.0, None, None, None));
        f.1 += 1.0 / (RRF_K + rank as f64);
        f.3 = Some(rank);
        f.4 = Some(*sim);
    }
    let mut all: Vec<Fused> = by_id.into_values().collect();
    all.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| b.4.unwrap_or(-2.0).total_cmp(&a.4.unwrap_or(-2.0)))
            .then_with(|| b.0.cmp(&a.0))
    });
    all.truncate(k as usize);
    all
}

/// Put the entries read by id in the fused order (an entry deleted meanwhile is left out).
pub(crate) fn hits(fused: Vec<Fused>, entries: Vec<StoredEntry>) -> Vec<Hit> {
    let mut by_id: HashMap<Uuid, StoredEntry> =
        entries.into_iter().map(|e| (e.entry.id, e)).collect();
    fused
        .into_iter()
        .filter_map(|(id, score, text_rank, vector_rank, similarity)| {
            Some(Hit {
                entry: by_id.remove(&id)?,
                score,
                text_rank,
                vector_rank,
                similarity,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_most_similar_best_first() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut t = TopK::new(&[1.0, 0.0], 2);
        t.offer(ids[0], &[0.0, 1.0]); // 0
        t.offer(ids[1], &[1.0, 1.0]); // 0.707
        t.offer(ids[2], &[2.0, 0.0]); // 1
        t.offer(ids[3], &[-1.0, 0.0]); // -1
        t.offer(ids[4], &[1.0, 0.0, 0.0]); // another length: skipped
        let got = t.into_sorted();
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![ids[2], ids[1]]
        );
        assert!((got[0].1 - 1.0).abs() < 1e-6 && (got[1].1 - 0.70710677).abs() < 1e-6);
    }

    #[test]
    fn dot_matches_the_naive_sum_at_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 1.0)).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "length {n}");
        }
    }

    #[test]
    fn fusion_ranks_what_both_signals_found_first() {
        let [a, b, c] = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        // a: text 1st; b: text 2nd and vector 2nd; c: vector 1st.
        let f = fuse(&[a, b], &[(c, 0.9), (b, 0.8)], 10);
        assert_eq!(f.iter().map(|x| x.0).collect::<Vec<_>>(), vec![b, c, a]);
        assert_eq!((f[0].2, f[0].3), (Some(2), Some(2)));
        assert!((f[0].1 - 2.0 / 62.0).abs() < 1e-12);
        assert_eq!(fuse(&[a, b], &[], 1).len(), 1);
    }
}
