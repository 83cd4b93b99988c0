//! Exact comparison of two enrolments: per-modality f32 cosines over the modalities both have, fused into one
//! calibrated score (see [`crate::fusion`]).

use crate::EngineError;
use crate::fusion::{Calibration, FusedScore};
use crate::store::{Schema, Snapshot, Template};
use pacha_datasets::Modality;
use pacha_index::kernels::dot_f32;
use serde::{Deserialize, Serialize};

/// One modality's exact cosine in a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModalityScore {
    /// The modality compared.
    pub modality: Modality,
    /// Exact f32 cosine of the two (L2-normalised) templates.
    pub cosine: f32,
    /// Its log-likelihood ratio under the calibration, in nats.
    pub llr: f64,
}

/// The full evidence of one comparison: per-modality scores (adjudicators see which fingers matched) and the
/// fused score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Scores of every modality both sides have, in schema order.
    pub modalities: Vec<ModalityScore>,
    /// The fused score.
    pub fused: FusedScore,
}

/// A probe's templates validated against a schema and L2-normalised: `templates[i]` belongs to the schema's
/// i-th modality.
#[derive(Clone, Debug)]
pub struct Probe {
    /// A name for error messages (the probe's subject ID, or "probe").
    pub name: String,
    /// Normalised templates by schema position.
    pub templates: Vec<Option<Vec<f32>>>,
    /// Capture quality of each template by schema position (0 where absent): picks quality bands.
    pub qualities: Vec<f32>,
}

impl Probe {
    /// Validates `templates` against `schema` (known modality, dimension, finite, non-zero, no modality twice)
    /// and normalises them. An empty probe is an error.
    pub fn new(name: &str, templates: &[Template], schema: &Schema) -> Result<Probe, EngineError> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; schema.modalities.len()];
        let mut qualities = vec![0.0f32; schema.modalities.len()];
        for t in templates {
            let pos = schema
                .modalities
                .iter()
                .position(|s| s.modality == t.modality)
                .ok_or_else(|| EngineError::InvalidProbe {
                    probe: name.to_string(),
                    problem: format!("modality {} is not in the store's schema", t.modality),
                })?;
            let dim = schema.modalities[pos].dim;
            let bad = |problem: String| EngineError::InvalidProbe {
                probe: name.to_string(),
                problem: format!("{}: {problem}", t.modality),
            };
            if t.vector.len() != dim {
                return Err(bad(format!(
                    "dimension {} but the schema says {dim}",
                    t.vector.len()
                )));
            }
            if out[pos].is_some() {
                return Err(bad("given twice".into()));
            }
            if !(0.0..=1.0).contains(&t.quality) {
                return Err(bad(format!("quality {} is outside [0, 1]", t.quality)));
            }
            qualities[pos] = t.quality;
            if let Some(i) = t.vector.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!(
                    "value {} at position {i} is not finite",
                    t.vector[i]
                )));
            }
            let norm = t
                .vector
                .iter()
                .map(|x| f64::from(*x) * f64::from(*x))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 || !norm.is_finite() {
                return Err(bad("zero vector".into()));
            }
            out[pos] = Some(
                t.vector
                    .iter()
                    .map(|x| (f64::from(*x) / norm) as f32)
                    .collect(),
            );
        }
        if out.iter().all(Option::is_none) {
            return Err(EngineError::InvalidProbe {
                probe: name.to_string(),
                problem: "no templates".into(),
            });
        }
        Ok(Probe {
            name: name.to_string(),
            templates: out,
            qualities,
        })
    }

    /// A probe made of a stored enrolment's templates.
    pub fn from_row(snap: &Snapshot, row: usize) -> Probe {
        let templates = snap
            .schema()
            .modalities
            .iter()
            .map(|s| snap.template(s.modality, row).map(<[f32]>::to_vec))
            .collect();
        let qualities = snap
            .schema()
            .modalities
            .iter()
            .map(|s| snap.quality(s.modality, row))
            .collect();
        Probe {
            name: snap.subject_id(row).to_string(),
            templates,
            qualities,
        }
    }
}

/// Compares a probe with stored row `row`: exact cosines over shared modalities, fused.
pub fn compare_probe(snap: &Snapshot, cal: &Calibration, probe: &Probe, row: usize) -> Comparison {
    let schema = snap.schema();
    let mut modalities = Vec::with_capacity(schema.modalities.len());
    let mut idx = Vec::with_capacity(schema.modalities.len());
    for (i, spec) in schema.modalities.iter().enumerate() {
        if let (Some(p), Some(g)) = (&probe.templates[i], snap.template(spec.modality, row)) {
            let q = probe.qualities[i].min(snap.quality(spec.modality, row));
            push_score(
                cal,
                spec.modality,
                dot_f32(p, g),
                q,
                &mut modalities,
                &mut idx,
            );
        }
    }
    Comparison {
        fused: cal.fuse_q(&idx),
        modalities,
    }
}

/// Compares two stored rows: exact cosines over shared modalities, fused.
pub fn compare_rows(snap: &Snapshot, cal: &Calibration, a: usize, b: usize) -> Comparison {
    let schema = snap.schema();
    let mut modalities = Vec::with_capacity(schema.modalities.len());
    let mut idx = Vec::with_capacity(schema.modalities.len());
    for spec in &schema.modalities {
        if let (Some(x), Some(y)) = (
            snap.template(spec.modality, a),
            snap.template(spec.modality, b),
        ) {
            let q = pair_quality(snap, spec.modality, a, b);
            push_score(
                cal,
                spec.modality,
                dot_f32(x, y),
                q,
                &mut modalities,
                &mut idx,
            );
        }
    }
    Comparison {
        fused: cal.fuse_q(&idx),
        modalities,
    }
}

/// The fused score of two stored rows without building a [`Comparison`] (no allocation): the hot path of
/// dedup, which builds the full evidence only for pairs that pass.
pub fn fused_rows(snap: &Snapshot, cal: &Calibration, a: usize, b: usize) -> FusedScore {
    let mut idx = [(0usize, 0f32, None); crate::fusion::MAX_MODALITIES];
    let mut n = 0;
    for spec in snap
        .schema()
        .modalities
        .iter()
        .take(crate::fusion::MAX_MODALITIES)
    {
        if let (Some(x), Some(y), Some(pos)) = (
            snap.template(spec.modality, a),
            snap.template(spec.modality, b),
            cal.position(spec.modality),
        ) {
            // Qualities are read only for a banded modality: the pooled models ignore them.
            let q = cal
                .bands(pos)
                .map(|_| pair_quality(snap, spec.modality, a, b));
            idx[n] = (pos, dot_f32(x, y), q);
            n += 1;
        }
    }
    cal.fuse_q(&idx[..n])
}

/// The quality of a pair of stored templates: the lower of the two (see [`crate::fusion::QualityBands`]).
pub fn pair_quality(snap: &Snapshot, m: Modality, a: usize, b: usize) -> f32 {
    snap.quality(m, a).min(snap.quality(m, b))
}

fn push_score(
    cal: &Calibration,
    m: Modality,
    cosine: f32,
    quality: f32,
    modalities: &mut Vec<ModalityScore>,
    idx: &mut Vec<(usize, f32, Option<f32>)>,
) {
    let (pos, llr) = match cal.position(m) {
        Some(pos) => (pos, cal.models[pos].1.llr(f64::from(cosine))),
        None => return,
    };
    idx.push((pos, cosine, Some(quality)));
    modalities.push(ModalityScore {
        modality: m,
        cosine,
        llr,
    });
}
