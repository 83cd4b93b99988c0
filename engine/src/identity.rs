//! Content identities of a run's inputs (store, calibration, index), for keys that must never match a
//! run over other inputs: checkpoints, manifests.

use crate::AnnSet;
use crate::fusion::Calibration;
use crate::store::Snapshot;
use serde::{Deserialize, Serialize};

/// What a run's output was derived from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// Store generation, commit, rows, and a checksum of every subject ID, the tombstones and a seeded
    /// sample of template rows (`crc32:rows:…`).
    pub store: String,
    /// Checksum of the calibration's serialised models.
    pub calibration: String,
    /// Checksum of the saved index's centroids (`none` without an index).
    pub index: String,
}

/// Rows of each modality whose bytes enter the store fingerprint.
const FINGERPRINT_ROWS: usize = 4096;

/// The identity of `snap`, `cal` and `ann`.
pub fn run_identity(snap: &Snapshot, cal: &Calibration, ann: Option<&AnnSet>) -> RunIdentity {
    let mut h = crc32fast::Hasher::new();
    h.update(&snap.generation().to_le_bytes());
    h.update(&snap.commit_seq().to_le_bytes());
    h.update(&(snap.rows() as u64).to_le_bytes());
    for r in 0..snap.rows() {
        h.update(snap.subject_id(r).as_bytes());
        h.update(&[0]);
    }
    for w in snap.deleted_words() {
        h.update(&w.to_le_bytes());
    }
    let step = (snap.rows() / FINGERPRINT_ROWS).max(1);
    for spec in &snap.schema().modalities {
        h.update(spec.modality.key().as_bytes());
        for r in (0..snap.rows()).step_by(step) {
            if let Some(t) = snap.template(spec.modality, r) {
                h.update(bytemuck::cast_slice(t));
            }
        }
    }
    let store = format!("crc32:{:08x}:rows:{}", h.finalize(), snap.rows());
    let calibration = match serde_json::to_vec(cal) {
        Ok(b) => format!("crc32:{:08x}", crc32fast::hash(&b)),
        Err(_) => "unserialisable".into(),
    };
    let index = match ann {
        Some(a) => {
            let mut h = crc32fast::Hasher::new();
            h.update(&(a.rows() as u64).to_le_bytes());
            for mi in 0..snap.schema().modalities.len() {
                if let Some(ivf) = a.ivf(mi) {
                    h.update(bytemuck::cast_slice(ivf.centroids()));
                }
            }
            format!("crc32:{:08x}:rows:{}", h.finalize(), a.rows())
        }
        None => "none".into(),
    };
    RunIdentity {
        store,
        calibration,
        index,
    }
}
