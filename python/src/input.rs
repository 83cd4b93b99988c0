//! numpy input: template matrices (float32 or float16, any memory layout: C, Fortran, strided, reversed —
//! each row is copied into the engine's row-major batches) and per-record presence and quality columns.

use crate::errors::Fail;
use numpy::ndarray::ArrayView2;
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pacha_datasets::Modality;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A borrowed numpy matrix of templates.
pub enum Held<'py> {
    /// float32.
    F32(PyReadonlyArray2<'py, f32>),
    /// float16.
    F16(PyReadonlyArray2<'py, half::f16>),
}

/// A view of a template matrix that can cross to a worker thread.
#[derive(Clone, Copy)]
pub enum Matrix<'a> {
    /// float32 rows.
    F32(ArrayView2<'a, f32>),
    /// float16 rows (widened to f32 on copy).
    F16(ArrayView2<'a, half::f16>),
}

impl<'py> Held<'py> {
    /// Borrows `obj` as a 2-D float32/float16 array; anything else is a ValueError naming `what`, its dtype
    /// or shape, and the fix.
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Held<'py>> {
        let Ok(arr) = obj.cast::<PyUntypedArray>() else {
            return Err(PyTypeError::new_err(format!(
                "{what}: expected a numpy array, got {}",
                obj.get_type().name()?
            )));
        };
        if arr.ndim() != 2 {
            return Err(PyValueError::new_err(format!(
                "{what}: expected a 2-D array (records, dim), got shape {:?}",
                arr.shape()
            )));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(Held::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, half::f16>>() {
            return Ok(Held::F16(a));
        }
        let dtype = arr.dtype().str()?.to_string();
        Err(PyValueError::new_err(format!(
            "{what}: dtype {dtype} is not accepted: templates must be float32 or float16 (float64 is refused rather than silently narrowed: pass X.astype(numpy.float32))"
        )))
    }

    /// A view for the worker thread.
    pub fn view(&self) -> Matrix<'_> {
        match self {
            Held::F32(a) => Matrix::F32(a.as_array()),
            Held::F16(a) => Matrix::F16(a.as_array()),
        }
    }
}

impl Matrix<'_> {
    /// Rows.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32(a) => a.nrows(),
            Matrix::F16(a) => a.nrows(),
        }
    }

    /// Columns (the template dimension).
    pub fn dim(&self) -> usize {
        match self {
            Matrix::F32(a) => a.ncols(),
            Matrix::F16(a) => a.ncols(),
        }
    }

    /// Appends row `i` as f32 to `out`.
    pub fn push_row(&self, i: usize, out: &mut Vec<f32>) {
        match self {
            Matrix::F32(a) => {
                let r = a.row(i);
                match r.as_slice() {
                    Some(s) => out.extend_from_slice(s),
                    None => out.extend(r.iter().copied()),
                }
            }
            Matrix::F16(a) => out.extend(a.row(i).iter().map(|x| x.to_f32())),
        }
    }
}

/// One modality's input as given by the caller.
pub struct Block<'a> {
    /// The modality.
    pub modality: Modality,
    /// Its templates.
    pub matrix: Matrix<'a>,
    /// Declared presence per record (`None`: an all-zero row is absent).
    pub present: Option<numpy::ndarray::ArrayView1<'a, bool>>,
    /// Quality per record (`None`: 1.0 for every present template).
    pub quality: Option<numpy::ndarray::ArrayView1<'a, f32>>,
}

/// Borrowed presence and quality columns of one block.
pub struct HeldColumns<'py> {
    /// Presence.
    pub present: Option<PyReadonlyArray1<'py, bool>>,
    /// Quality.
    pub quality: Option<PyReadonlyArray1<'py, f32>>,
}

/// Parses a modality key: `face`, `finger2` or a finger position `2`.
pub fn modality(key: &str) -> PyResult<Modality> {
    key.parse::<Modality>()
        .map_err(|e| PyValueError::new_err(format!("modality {key:?}: {e}")))
}

/// Checks that every block has `n` rows (and presence/quality columns of `n`) and returns the dims.
pub fn check_shapes(blocks: &[Block<'_>], n: usize, what: &str) -> Result<(), Fail> {
    for b in blocks {
        if b.matrix.rows() != n {
            return Err(Fail::Value(format!(
                "{}: {} rows but {n} {what}",
                b.modality.key(),
                b.matrix.rows()
            )));
        }
        if let Some(p) = &b.present
            && p.len() != n
        {
            return Err(Fail::Value(format!(
                "present[{}]: {} values but {n} {what}",
                b.modality.key(),
                p.len()
            )));
        }
        if let Some(q) = &b.quality
            && q.len() != n
        {
            return Err(Fail::Value(format!(
                "quality[{}]: {} values but {n} {what}",
                b.modality.key(),
                q.len()
            )));
        }
    }
    Ok(())
}
