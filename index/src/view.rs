//! Borrowed, strided row-major views over vectors owned elsewhere (usually a store's memory map).
//!
//! The index never owns a second f32 copy of the gallery: every search and rescoring step reads rows
//! through these views.

use crate::IndexError;

/// Paging hints a pass that streams a base once (in ascending row batches) gives the owner of the base's
/// memory, e.g. a file mapping larger than RAM: what it will read next, and what it will not read again.
/// Both default to doing nothing (`()` is the no-op pager).
pub trait RowPager: Sync {
    /// Rows `rows` will be read soon, in ascending order.
    fn will_read(&self, _rows: std::ops::Range<usize>) {}
    /// Rows `rows` will not be read again by this pass.
    fn release(&self, _rows: std::ops::Range<usize>) {}
}

impl RowPager for () {}

/// Runs `work(batch index, batch)` over `rows` (ascending row ids, `row` maps one to its index) in batches of
/// `batch`, telling `pager` about each batch one batch ahead ([`RowPager::will_read`]) and releasing it once
/// `work` is done with it: the paging pattern of a pass that streams a base once.
pub fn stream_batches<T: Copy, E>(
    rows: &[T],
    batch: usize,
    row: impl Fn(T) -> usize,
    pager: &dyn RowPager,
    mut work: impl FnMut(usize, &[T]) -> Result<(), E>,
) -> Result<(), E> {
    let span = |b: &[T]| match (b.first(), b.last()) {
        (Some(&a), Some(&z)) => row(a)..row(z) + 1,
        _ => 0..0,
    };
    let batches: Vec<&[T]> = rows.chunks(batch.max(1)).collect();
    if let Some(b) = batches.first() {
        pager.will_read(span(b));
    }
    for (bi, b) in batches.iter().enumerate() {
        if let Some(next) = batches.get(bi + 1) {
            pager.will_read(span(next));
        }
        work(bi, b)?;
        pager.release(span(b));
    }
    Ok(())
}

/// Bytes every row starts on: rows are padded so each begins on a 64-byte (cache-line) boundary.
pub const ROW_ALIGN: usize = 64;

/// Row stride in elements of `elem_size` bytes for a vector of `dim` elements, padded to [`ROW_ALIGN`].
pub fn padded_stride(dim: usize, elem_size: usize) -> usize {
    let bytes = dim * elem_size;
    bytes.div_ceil(ROW_ALIGN) * ROW_ALIGN / elem_size
}

/// A borrowed view of `rows` f32 vectors of length `dim`, row `i` starting at `data[i * stride]`.
#[derive(Clone, Copy, Debug)]
pub struct RowsF32<'a> {
    data: &'a [f32],
    rows: usize,
    dim: usize,
    stride: usize,
}

impl<'a> RowsF32<'a> {
    /// Wraps `data` as `rows` rows of `dim` values spaced `stride` apart; checks the slice is long enough.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        dim: usize,
        stride: usize,
    ) -> Result<Self, IndexError> {
        check_shape(data.len(), rows, dim, stride)?;
        Ok(Self {
            data,
            rows,
            dim,
            stride,
        })
    }

    /// Wraps a dense (unpadded) row-major matrix.
    pub fn dense(data: &'a [f32], dim: usize) -> Result<Self, IndexError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(IndexError::Shape(format!(
                "dense matrix of {} values is not a whole number of rows of dim {dim}",
                data.len()
            )));
        }
        Self::new(data, data.len() / dim, dim, dim)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Distance in elements between the starts of consecutive rows.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// The underlying slice (including padding).
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }
    /// Row `i` (exactly `dim` values). Panics if `i >= rows` (an internal invariant, not input).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        let start = i * self.stride;
        &self.data[start..start + self.dim]
    }
    /// Rows `start..end` as a view of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> RowsF32<'a> {
        let (start, end, lo, hi) = row_span(start, end, self.rows, self.dim, self.stride);
        RowsF32 {
            data: &self.data[lo..hi],
            rows: end - start,
            dim: self.dim,
            stride: self.stride,
        }
    }
}

/// A borrowed view of i8-quantised rows, each with its own scale: `v ≈ scale[i] * q[i]`.
#[derive(Clone, Copy, Debug)]
pub struct RowsI8<'a> {
    data: &'a [i8],
    scales: &'a [f32],
    rows: usize,
    dim: usize,
    stride: usize,
}

impl<'a> RowsI8<'a> {
    /// Wraps quantised rows and their per-row scales; checks both slices are long enough.
    pub fn new(
        data: &'a [i8],
        scales: &'a [f32],
        rows: usize,
        dim: usize,
        stride: usize,
    ) -> Result<Self, IndexError> {
        check_shape(data.len(), rows, dim, stride)?;
        if scales.len() < rows {
            return Err(IndexError::Shape(format!(
                "{} scales for {rows} rows",
                scales.len()
            )));
        }
        Ok(Self {
            data,
            scales,
            rows,
            dim,
            stride,
        })
    }
    /// Builds a view whose shape the caller has already established (crate-internal).
    pub(crate) fn from_parts_unchecked(
        data: &'a [i8],
        scales: &'a [f32],
        rows: usize,
        dim: usize,
        stride: usize,
    ) -> Self {
        debug_assert!(check_shape(data.len(), rows, dim, stride).is_ok() && scales.len() >= rows);
        Self {
            data,
            scales,
            rows,
            dim,
            stride,
        }
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Distance in elements between the starts of consecutive rows.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Quantised row `i` (exactly `dim` values).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [i8] {
        let start = i * self.stride;
        &self.data[start..start + self.dim]
    }
    /// Scale of row `i`.
    #[inline]
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i]
    }
    /// Rows `start..end` (with their scales) as a view of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> RowsI8<'a> {
        let (start, end, lo, hi) = row_span(start, end, self.rows, self.dim, self.stride);
        RowsI8 {
            data: &self.data[lo..hi],
            scales: &self.scales[start..end],
            rows: end - start,
            dim: self.dim,
            stride: self.stride,
        }
    }
}

/// Rows `start..end` clamped to `0..rows`, and the element range `lo..hi` they occupy (the last row ends
/// after `dim` values, not at its padded stride).
fn row_span(
    start: usize,
    end: usize,
    rows: usize,
    dim: usize,
    stride: usize,
) -> (usize, usize, usize, usize) {
    let end = end.min(rows);
    let start = start.min(end);
    let lo = start * stride;
    let hi = if end > start {
        (end - 1) * stride + dim
    } else {
        lo
    };
    (start, end, lo, hi)
}

fn check_shape(len: usize, rows: usize, dim: usize, stride: usize) -> Result<(), IndexError> {
    if dim == 0 {
        return Err(IndexError::Shape("dimension 0".into()));
    }
    if stride < dim {
        return Err(IndexError::Shape(format!("stride {stride} < dim {dim}")));
    }
    let need = if rows == 0 {
        0
    } else {
        (rows - 1) * stride + dim
    };
    if len < need {
        return Err(IndexError::Shape(format!(
            "{len} values cannot hold {rows} rows of dim {dim} at stride {stride} (need {need})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_stride_rounds_to_cache_lines() {
        assert_eq!(padded_stride(512, 4), 512);
        assert_eq!(padded_stride(100, 4), 112);
        assert_eq!(padded_stride(100, 1), 128);
        assert_eq!(padded_stride(1, 4), 16);
    }

    #[test]
    fn views_check_shape_and_slice_rows() {
        let data: Vec<f32> = (0..3 * 8).map(|x| x as f32).collect();
        assert!(RowsF32::new(&data, 4, 5, 8).is_err());
        let v = RowsF32::new(&data, 3, 5, 8).unwrap();
        assert_eq!(v.row(2), &[16.0, 17.0, 18.0, 19.0, 20.0]);
        let s = v.slice_rows(1, 3);
        assert_eq!(s.rows(), 2);
        assert_eq!(s.row(0), v.row(1));
        assert_eq!(s.row(1), v.row(2));
        assert!(RowsF32::dense(&data[..7], 2).is_err());
        let codes: Vec<i8> = (0..3 * 8).map(|x| x as i8).collect();
        let scales = [0.5f32, 1.0, 2.0];
        let q = RowsI8::new(&codes, &scales, 3, 5, 8).unwrap();
        let qs = q.slice_rows(1, 9);
        assert_eq!((qs.rows(), qs.row(1), qs.scale(1)), (2, q.row(2), 2.0));
        assert_eq!(q.slice_rows(2, 1).rows(), 0);
    }
}
