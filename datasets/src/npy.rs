//! NumPy `.npy` matrices: a memory-mapped streaming reader (f32 `<f4` and f16 `<f2`, C order, 2-D) and a
//! streaming f32/f16 writer that patches the row count into its header on [`NpyWriter::finish`].
//!
//! Format: magic `\x93NUMPY`, version byte pair (1.0, 2.0 or 3.0), a little-endian header length (u16 for
//! 1.0, u32 for 2.0/3.0), then a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 512), }` padded with spaces and ending in `\n`,
//! then the row-major data. The reader checks every part and that the file size equals header + data exactly.

use crate::error::{DatasetError, Result};
use half::f16;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element type of an `.npy` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dtype {
    /// Little-endian IEEE f32 (`<f4`).
    F32,
    /// Little-endian IEEE f16 (`<f2`).
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
    /// The numpy `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F16 => "<f2",
        }
    }
}

/// A parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: Dtype,
    /// Number of rows.
    pub rows: u64,
    /// Row dimension.
    pub dim: usize,
    /// Byte offset where the data starts.
    pub data_offset: u64,
}

/// Parse and validate an `.npy` header from the first bytes of a file of `file_len` bytes.
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<NpyHeader> {
    let p = || path.to_path_buf();
    if bytes.len() < 10 {
        return Err(DatasetError::Truncated {
            path: p(),
            what: "npy preamble",
            offset: 0,
            expected: 10,
            available: bytes.len() as u64,
        });
    }
    if &bytes[..6] != MAGIC {
        return Err(DatasetError::BadHeader {
            path: p(),
            offset: 0,
            reason: "missing \\x93NUMPY magic".into(),
        });
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_size, utf8) = match (major, minor) {
        (1, 0) => (2usize, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => {
            return Err(DatasetError::BadHeader {
                path: p(),
                offset: 6,
                reason: format!("unsupported version {major}.{minor} (expected 1.0, 2.0 or 3.0)"),
            });
        }
    };
    let pre = 8 + len_size;
    if bytes.len() < pre {
        return Err(DatasetError::Truncated {
            path: p(),
            what: "npy header length",
            offset: 8,
            expected: len_size as u64,
            available: (bytes.len() - 8) as u64,
        });
    }
    let header_len = if len_size == 2 {
        u64::from(u16::from_le_bytes([bytes[8], bytes[9]]))
    } else {
        u64::from(u32::from_le_bytes([
            bytes[8], bytes[9], bytes[10], bytes[11],
        ]))
    };
    let data_offset = pre as u64 + header_len;
    if (bytes.len() as u64) < data_offset {
        return Err(DatasetError::Truncated {
            path: p(),
            what: "npy header",
            offset: pre as u64,
            expected: header_len,
            available: bytes.len() as u64 - pre as u64,
        });
    }
    let raw = &bytes[pre..data_offset as usize];
    let text = if utf8 {
        std::str::from_utf8(raw).map_err(|e| DatasetError::BadHeader {
            path: p(),
            offset: pre as u64 + e.valid_up_to() as u64,
            reason: "header is not valid UTF-8".into(),
        })?
    } else {
        if let Some(i) = raw.iter().position(|b| !b.is_ascii()) {
            return Err(DatasetError::BadHeader {
                path: p(),
                offset: (pre + i) as u64,
                reason: "non-ASCII byte in a version 1/2 header".into(),
            });
        }
        std::str::from_utf8(raw).map_err(|_| DatasetError::BadHeader {
            path: p(),
            offset: pre as u64,
            reason: "header is not ASCII".into(),
        })?
    };
    let dict = parse_dict(text).map_err(|(off, reason)| DatasetError::BadHeader {
        path: p(),
        offset: pre as u64 + off as u64,
        reason,
    })?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (k, v) in dict {
        match (k.as_str(), v) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            (key @ ("descr" | "fortran_order" | "shape"), _) => {
                return Err(DatasetError::BadHeader {
                    path: p(),
                    offset: pre as u64,
                    reason: format!("key {key:?} has the wrong type"),
                });
            }
            (other, _) => {
                return Err(DatasetError::BadHeader {
                    path: p(),
                    offset: pre as u64,
                    reason: format!("unexpected key {other:?}"),
                });
            }
        }
    }
    let missing = |k: &str| DatasetError::BadHeader {
        path: p(),
        offset: pre as u64,
        reason: format!("missing key {k:?}"),
    };
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran = fortran.ok_or_else(|| missing("fortran_order"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;
    let dtype = match descr.as_str() {
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        _ => return Err(DatasetError::UnsupportedDtype { path: p(), descr }),
    };
    if fortran {
        return Err(DatasetError::FortranOrder { path: p() });
    }
    if shape.len() != 2 || shape[1] == 0 || usize::try_from(shape[1]).is_err() {
        return Err(DatasetError::BadShape { path: p(), shape });
    }
    let (rows, dim) = (shape[0], shape[1] as usize);
    let data_len = rows
        .checked_mul(dim as u64)
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .ok_or_else(|| DatasetError::BadShape {
            path: p(),
            shape: shape.clone(),
        })?;
    let have = file_len.saturating_sub(data_offset);
    if have < data_len {
        return Err(DatasetError::Truncated {
            path: p(),
            what: "npy data",
            offset: data_offset,
            expected: data_len,
            available: have,
        });
    }
    if have > data_len {
        return Err(DatasetError::TrailingBytes {
            path: p(),
            offset: data_offset + data_len,
            extra: have - data_len,
        });
    }
    Ok(NpyHeader {
        dtype,
        rows,
        dim,
        data_offset,
    })
}

#[derive(Debug)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// Parse the header's dict literal; errors carry (byte offset in `text`, reason).
fn parse_dict(text: &str) -> std::result::Result<Vec<(String, PyValue)>, (usize, String)> {
    let b = text.as_bytes();
    let mut i = 0usize;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let expect = |i: &mut usize, c: u8| -> std::result::Result<(), (usize, String)> {
        if *i < b.len() && b[*i] == c {
            *i += 1;
            Ok(())
        } else {
            Err((*i, format!("expected {:?}", c as char)))
        }
    };
    let string = |i: &mut usize| -> std::result::Result<String, (usize, String)> {
        let q = match b.get(*i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err((*i, "expected a quoted string".into())),
        };
        let start = *i + 1;
        let end = b[start..]
            .iter()
            .position(|&c| c == q)
            .ok_or((*i, "unterminated string".to_string()))?
            + start;
        *i = end + 1;
        Ok(text[start..end].to_string())
    };
    let mut out = Vec::new();
    ws(&mut i);
    expect(&mut i, b'{')?;
    loop {
        ws(&mut i);
        if i < b.len() && b[i] == b'}' {
            i += 1;
            break;
        }
        let key = string(&mut i)?;
        ws(&mut i);
        expect(&mut i, b':')?;
        ws(&mut i);
        let value = match b.get(i) {
            Some(b'\'' | b'"') => PyValue::Str(string(&mut i)?),
            Some(b'T') if text[i..].starts_with("True") => {
                i += 4;
                PyValue::Bool(true)
            }
            Some(b'F') if text[i..].starts_with("False") => {
                i += 5;
                PyValue::Bool(false)
            }
            Some(b'(') => {
                i += 1;
                let mut dims = Vec::new();
                loop {
                    ws(&mut i);
                    if i < b.len() && b[i] == b')' {
                        i += 1;
                        break;
                    }
                    let start = i;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    if start == i {
                        return Err((i, "expected a non-negative integer in shape".into()));
                    }
                    let n: u64 = text[start..i]
                        .parse()
                        .map_err(|_| (start, "shape value too large".to_string()))?;
                    dims.push(n);
                    ws(&mut i);
                    if i < b.len() && b[i] == b',' {
                        i += 1;
                    } else if !(i < b.len() && b[i] == b')') {
                        return Err((i, "expected ',' or ')' in shape".into()));
                    }
                }
                PyValue::Tuple(dims)
            }
            _ => return Err((i, "expected a string, True, False or a tuple".into())),
        };
        if out.iter().any(|(k, _): &(String, PyValue)| *k == key) {
            return Err((i, format!("duplicate key {key:?}")));
        }
        out.push((key, value));
        ws(&mut i);
        if i < b.len() && b[i] == b',' {
            i += 1;
        } else if !(i < b.len() && b[i] == b'}') {
            return Err((i, "expected ',' or '}'".into()));
        }
    }
    ws(&mut i);
    if i != b.len() {
        return Err((i, "unexpected text after the dict".into()));
    }
    Ok(out)
}

/// Memory-map a whole file read-only (an empty file gives an empty map without calling mmap).
pub(crate) fn map_file(path: &Path) -> Result<(Option<Mmap>, u64)> {
    let file = File::open(path).map_err(|e| DatasetError::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| DatasetError::io(path, "stat", e))?
        .len();
    if len == 0 {
        return Ok((None, 0));
    }
    // SAFETY: the map is read-only and private to this process; like every mmap reader we rely on no other
    // process truncating or rewriting the file while it is mapped (documented on `NpyMatrix::open`).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DatasetError::io(path, "mmap", e))?;
    Ok((Some(map), len))
}

/// Append little-endian f32 bytes to `out` as f32.
pub(crate) fn extend_f32_le(bytes: &[u8], out: &mut Vec<f32>) {
    #[cfg(target_endian = "little")]
    if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
        out.extend_from_slice(v);
        return;
    }
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

/// Append little-endian f16 bytes to `out` as f32.
fn extend_f16_le(bytes: &[u8], out: &mut Vec<f32>) {
    #[cfg(target_endian = "little")]
    if let Ok(v) = bytemuck::try_cast_slice::<u8, f16>(bytes) {
        use half::slice::HalfFloatSliceExt;
        let start = out.len();
        out.resize(start + v.len(), 0.0);
        v.convert_to_f32_slice(&mut out[start..]);
        return;
    }
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
    );
}

/// A 2-D `.npy` matrix, memory-mapped: rows are converted to f32 on demand, the file is never loaded whole.
///
/// Like every memory-mapped reader, it assumes the file is not truncated or rewritten while open.
#[derive(Debug)]
pub struct NpyMatrix {
    path: PathBuf,
    map: Option<Mmap>,
    header: NpyHeader,
}

impl NpyMatrix {
    /// Open and validate an `.npy` file (header, dtype, order, shape and exact file size).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (map, len) = map_file(path)?;
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let header = parse_header(path, bytes, len)?;
        Ok(NpyMatrix {
            path: path.to_path_buf(),
            map,
            header,
        })
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of rows.
    pub fn rows(&self) -> u64 {
        self.header.rows
    }
    /// Row dimension.
    pub fn dim(&self) -> usize {
        self.header.dim
    }
    /// Element type on disk.
    pub fn dtype(&self) -> Dtype {
        self.header.dtype
    }
    /// The parsed header.
    pub fn header(&self) -> &NpyHeader {
        &self.header
    }
    fn check_range(&self, start: u64, count: usize) -> Result<()> {
        let end = start.saturating_add(count as u64);
        if end > self.rows() {
            return Err(DatasetError::RowsOutOfRange {
                path: self.path.clone(),
                start,
                end,
                rows: self.rows(),
            });
        }
        Ok(())
    }
    /// Append rows `start..start+count` (converted to f32) to `out`: `count * dim` values.
    pub fn read_rows(&self, start: u64, count: usize, out: &mut Vec<f32>) -> Result<()> {
        self.check_range(start, count)?;
        let row_bytes = self.dim() * self.dtype().size();
        let from = self.header.data_offset as usize + start as usize * row_bytes;
        let to = from + count * row_bytes;
        let bytes = match &self.map {
            Some(m) => &m[from..to],
            None => &[][..],
        };
        match self.dtype() {
            Dtype::F32 => extend_f32_le(bytes, out),
            Dtype::F16 => extend_f16_le(bytes, out),
        }
        Ok(())
    }
    /// Row `i` as a fresh vector.
    pub fn row(&self, i: u64) -> Result<Vec<f32>> {
        let mut v = Vec::with_capacity(self.dim());
        self.read_rows(i, 1, &mut v)?;
        Ok(v)
    }
    /// Iterate over the matrix in chunks of up to `batch_rows` rows: `(first row, row-major values)`.
    pub fn chunks(&self, batch_rows: usize) -> impl Iterator<Item = Result<(u64, Vec<f32>)>> + '_ {
        let step = batch_rows.max(1) as u64;
        (0..self.rows().div_ceil(step)).map(move |c| {
            let start = c * step;
            let n = step.min(self.rows() - start) as usize;
            let mut v = Vec::with_capacity(n * self.dim());
            self.read_rows(start, n, &mut v)?;
            Ok((start, v))
        })
    }
    /// Scan every row (streaming) and fail on the first NaN/infinity, naming the row.
    pub fn check_finite(&self) -> Result<()> {
        for chunk in self.chunks(4096) {
            let (start, v) = chunk?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(DatasetError::NonFiniteRow {
                    path: self.path.clone(),
                    row: start + (i / self.dim()) as u64,
                    column: i % self.dim(),
                });
            }
        }
        Ok(())
    }
}

/// Width reserved for the row count in headers we write, so any u64 fits when patched.
const ROWS_WIDTH: usize = 20;

fn header_bytes(dtype: Dtype, rows: u64, dim: usize) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({:<width$}, {}), }}",
        dtype.descr(),
        format!("{rows}"),
        dim,
        width = ROWS_WIDTH
    );
    // Padding must not depend on the row count: the text length is fixed by ROWS_WIDTH.
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let header_len = (total - 10) as u16;
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Streaming `.npy` writer: rows are appended, and the row count is patched into the header by
/// [`finish`](Self::finish). A writer dropped without `finish` leaves a file the reader rejects.
#[derive(Debug)]
pub struct NpyWriter {
    path: PathBuf,
    out: BufWriter<File>,
    dtype: Dtype,
    dim: usize,
    rows: u64,
    scratch: Vec<u8>,
}

impl NpyWriter {
    /// Create (truncate) an f32 `.npy` file with rows of `dim` values.
    pub fn create(path: impl AsRef<Path>, dim: usize) -> Result<Self> {
        Self::create_with_dtype(path, dim, Dtype::F32)
    }
    /// Create (truncate) an `.npy` file of the given element type.
    pub fn create_with_dtype(path: impl AsRef<Path>, dim: usize, dtype: Dtype) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if dim == 0 {
            return Err(DatasetError::BadShape {
                path,
                shape: vec![0, 0],
            });
        }
        let file = crate::private::create_private(&path)
            .map_err(|e| DatasetError::io(&path, "create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header_bytes(dtype, 0, dim))
            .map_err(|e| DatasetError::io(&path, "write", e))?;
        Ok(NpyWriter {
            path,
            out,
            dtype,
            dim,
            rows: 0,
            scratch: Vec::new(),
        })
    }
    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }
    /// Append whole rows (`data.len()` must be a multiple of `dim`; values must be finite).
    pub fn write_rows(&mut self, data: &[f32]) -> Result<()> {
        if !data.len().is_multiple_of(self.dim) {
            return Err(DatasetError::BadRowData {
                path: self.path.clone(),
                len: data.len(),
                dim: self.dim,
                reason: "not a whole number of rows",
            });
        }
        if data.iter().any(|x| !x.is_finite()) {
            return Err(DatasetError::BadRowData {
                path: self.path.clone(),
                len: data.len(),
                dim: self.dim,
                reason: "contains NaN or infinity",
            });
        }
        self.scratch.clear();
        match self.dtype {
            Dtype::F32 => {
                for x in data {
                    self.scratch.extend_from_slice(&x.to_le_bytes());
                }
            }
            Dtype::F16 => {
                for x in data {
                    self.scratch
                        .extend_from_slice(&f16::from_f32(*x).to_le_bytes());
                }
            }
        }
        self.out
            .write_all(&self.scratch)
            .map_err(|e| DatasetError::io(&self.path, "write", e))?;
        self.rows += (data.len() / self.dim) as u64;
        Ok(())
    }
    /// Flush, patch the row count into the header, and return the number of rows written.
    pub fn finish(self) -> Result<u64> {
        let NpyWriter {
            path,
            out,
            dtype,
            dim,
            rows,
            ..
        } = self;
        let mut file = out
            .into_inner()
            .map_err(|e| DatasetError::io(&path, "flush", e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| DatasetError::io(&path, "seek", e))?;
        file.write_all(&header_bytes(dtype, rows, dim))
            .map_err(|e| DatasetError::io(&path, "write", e))?;
        file.flush()
            .map_err(|e| DatasetError::io(&path, "flush", e))?;
        Ok(rows)
    }
}

/// Write a whole f32 matrix of `rows × dim` values to `path`.
pub fn write_npy_f32(path: impl AsRef<Path>, rows: u64, dim: usize, data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    if rows.checked_mul(dim as u64) != Some(data.len() as u64) {
        return Err(DatasetError::BadRowData {
            path: path.to_path_buf(),
            len: data.len(),
            dim,
            reason: "length is not rows × dim",
        });
    }
    let mut w = NpyWriter::create(path, dim)?;
    w.write_rows(data)?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_aligned_and_fixed_length() {
        let a = header_bytes(Dtype::F32, 0, 512);
        let b = header_bytes(Dtype::F32, u64::MAX, 512);
        assert_eq!(a.len() % 64, 0);
        assert_eq!(a.len(), b.len());
        assert_eq!(*a.last().unwrap(), b'\n');
    }

    #[test]
    fn parses_numpy_style_headers() {
        let d =
            parse_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }   ").unwrap();
        assert_eq!(d.len(), 3);
        assert!(parse_dict("{'descr': '<f4', 'shape': (3,4)").is_err());
        assert!(parse_dict("{'shape': (3, x)}").is_err());
        assert!(parse_dict("{'a': 1, 'a': 2}").is_err());
    }
}
