//! Approximate nearest-neighbour search behind a small trait, and exact rescoring of its candidates.
//!
//! The trait [`AnnIndex`] is what the engine holds (as `Box<dyn AnnIndex>`); [`AnnBuild`] adds the
//! constructors. The first implementation is `HnswIndex` over `hnsw_rs` (cargo feature `hnsw`, off by default); an in-house graph can
//! replace it by implementing the same two traits. Ids are row numbers (`u32`) of the base view the
//! index was built from; the index never decides final scores: [`search_rescored`] oversamples
//! (`k' ≥ k`) and rescores every candidate exactly with the f32 rows through [`crate::dot_many`].

use std::path::Path;

use crate::exact::{Neighbour, sort_neighbours};
use crate::{Bitset, IndexError, RowsF32, kernels};

/// An approximate nearest-neighbour index over row numbers of a borrowed f32 base.
pub trait AnnIndex: Send + Sync {
    /// Vector dimension.
    fn dim(&self) -> usize;
    /// Number of indexed rows (ids `0..len`).
    fn len(&self) -> usize;
    /// True if nothing is indexed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Indexes rows `self.len()..upto` of `base` (appends only: ids stay row numbers and unique).
    fn insert(&mut self, base: RowsF32<'_>, upto: usize) -> Result<(), IndexError>;
    /// Up to `k_prime` approximate neighbours of `query` (ids in `exclude` never appear), best first.
    /// Returns `min(k_prime, live rows)` results unless the graph cannot reach them. Scores are
    /// approximate (e.g. from i8 codes): rescore before deciding anything.
    fn search(
        &self,
        query: &[f32],
        k_prime: usize,
        ef: usize,
        exclude: Option<&Bitset>,
    ) -> Result<Vec<Neighbour>, IndexError>;
    /// Persists the index into directory `dir` (created if missing).
    fn save(&self, dir: &Path) -> Result<(), IndexError>;
}

/// Constructors of an [`AnnIndex`] implementation.
pub trait AnnBuild: AnnIndex + Sized {
    /// Build parameters.
    type Params;
    /// Builds an index over all rows of `base` (ids = row numbers).
    fn build(base: RowsF32<'_>, params: &Self::Params) -> Result<Self, IndexError>;
    /// Loads an index saved by [`AnnIndex::save`], validating the files before use.
    fn load(dir: &Path) -> Result<Self, IndexError>;
}

/// Checks that `v` has length `dim`, only finite values and a non-zero norm; `id` names it in errors.
pub fn validate_vector(v: &[f32], dim: usize, id: usize) -> Result<(), IndexError> {
    if v.len() != dim {
        return Err(IndexError::Dim {
            expected: dim,
            got: v.len(),
        });
    }
    if let Some(p) = v.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::InvalidVector {
            id,
            problem: format!("non-finite value at {p}"),
        });
    }
    if v.iter().all(|&x| x == 0.0) {
        return Err(IndexError::InvalidVector {
            id,
            problem: "zero norm".into(),
        });
    }
    Ok(())
}

/// Approximate search followed by exact rescoring: asks `index` for `max(k, k_prime)` candidates, scores
/// every one with [`kernels::dot_many`] against `base` (bit-for-bit [`crate::dot_f32`]), and returns the
/// best `k` by (score desc, id asc).
pub fn search_rescored(
    index: &dyn AnnIndex,
    query: &[f32],
    base: RowsF32<'_>,
    k: usize,
    k_prime: usize,
    ef: usize,
    exclude: Option<&Bitset>,
) -> Result<Vec<Neighbour>, IndexError> {
    if base.dim() != index.dim() {
        return Err(IndexError::Dim {
            expected: index.dim(),
            got: base.dim(),
        });
    }
    validate_vector(query, base.dim(), 0)?;
    if k == 0 {
        return Ok(Vec::new());
    }
    let mut cands = index.search(query, k_prime.max(k), ef, exclude)?;
    let ids: Vec<u32> = cands.iter().map(|n| n.id).collect();
    let mut scores = vec![0.0f32; ids.len()];
    kernels::dot_many(query, base, &ids, &mut scores)?;
    for (c, s) in cands.iter_mut().zip(scores) {
        c.score = s;
    }
    sort_neighbours(&mut cands);
    cands.truncate(k);
    Ok(cands)
}
