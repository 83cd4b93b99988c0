//! Biometric modalities: the face, and fingers by ISO/IEC 19794 position (1–10).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One biometric modality: a face, or a finger at an ISO/IEC 19794 position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Modality {
    /// The face.
    Face,
    /// A finger, ISO/IEC 19794 position 1..=10 (1 right thumb, 2 right index, … 6 left thumb, 7 left index, …).
    Finger(u8),
}

/// ISO/IEC 19794 finger position names, index 0 = position 1.
const FINGER_NAMES: [&str; 10] = [
    "right thumb",
    "right index",
    "right middle",
    "right ring",
    "right little",
    "left thumb",
    "left index",
    "left middle",
    "left ring",
    "left little",
];

impl Modality {
    /// A finger modality, checking the position is 1..=10.
    pub fn finger(position: u8) -> Result<Self, ModalityParseError> {
        if (1..=10).contains(&position) {
            Ok(Modality::Finger(position))
        } else {
            Err(ModalityParseError(format!(
                "finger position {position} is not in 1..=10"
            )))
        }
    }

    /// Short stable name used in file names and CSV headers: `face`, `finger1` … `finger10`.
    pub fn key(&self) -> String {
        match self {
            Modality::Face => "face".to_string(),
            Modality::Finger(p) => format!("finger{p}"),
        }
    }

    /// Human-readable name for reports: `face`, `right index`, ….
    pub fn human(&self) -> &'static str {
        match self {
            Modality::Face => "face",
            Modality::Finger(p) => FINGER_NAMES
                .get(usize::from(*p).wrapping_sub(1))
                .copied()
                .unwrap_or("finger"),
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A modality name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid modality: {0} (expected `face`, `fingerN` or a finger position 1..=10)")]
pub struct ModalityParseError(pub String);

impl FromStr for Modality {
    type Err = ModalityParseError;
    /// Accepts `face`, `finger7`, or a bare position `7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "face" {
            return Ok(Modality::Face);
        }
        let digits = t.strip_prefix("finger").unwrap_or(&t);
        match digits.parse::<u8>() {
            Ok(p) => Modality::finger(p),
            Err(_) => Err(ModalityParseError(s.to_string())),
        }
    }
}

/// A column of one modality's templates for the records of a [`RecordBatch`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModalityBlock {
    /// Which modality this block holds.
    pub modality: Modality,
    /// Vector dimension.
    pub dim: usize,
    /// `rows * dim` values, row-major; a missing template is a row of zeros with `present[i] == false`.
    pub data: Vec<f32>,
    /// Whether record `i` has this template.
    pub present: Vec<bool>,
    /// Capture quality of record `i`'s template in [0, 1] (0 where absent).
    pub quality: Vec<f32>,
}

impl ModalityBlock {
    /// Row `i` of the block.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// A columnar batch of enrolments: the unit that flows from generators and readers into the store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecordBatch {
    /// External subject IDs, one per record.
    pub ids: Vec<String>,
    /// One block per modality, each with `ids.len()` rows.
    pub blocks: Vec<ModalityBlock>,
}

impl RecordBatch {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when the batch holds no records.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The block for `m`, if the batch has one.
    pub fn block(&self, m: Modality) -> Option<&ModalityBlock> {
        self.blocks.iter().find(|b| b.modality == m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for m in [
            Modality::Face,
            Modality::Finger(1),
            Modality::Finger(7),
            Modality::Finger(10),
        ] {
            assert_eq!(m.key().parse::<Modality>().unwrap(), m);
        }
        assert_eq!("7".parse::<Modality>().unwrap(), Modality::Finger(7));
        assert!("finger11".parse::<Modality>().is_err());
        assert!("0".parse::<Modality>().is_err());
        assert!("nose".parse::<Modality>().is_err());
        assert_eq!(Modality::Finger(7).human(), "left index");
    }
}
