//! `.fvecs` matrices (the TEXMEX/ANN-benchmark format): each row is a little-endian i32 dimension followed
//! by that many little-endian f32 values. Every row must have the same dimension. Read through a memory map.

use crate::error::{DatasetError, Result};
use crate::npy::{extend_f32_le, map_file};
use memmap2::Mmap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A memory-mapped `.fvecs` file.
#[derive(Debug)]
pub struct FvecsMatrix {
    path: PathBuf,
    map: Option<Mmap>,
    dim: usize,
    rows: u64,
}

impl FvecsMatrix {
    /// Open an `.fvecs` file: reads the first row's dimension and checks the file is a whole number of rows.
    /// Each row's own dimension prefix is checked when it is read (and by [`validate`](Self::validate)).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (map, len) = map_file(path)?;
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        if len == 0 {
            // An empty file is an empty matrix of unknown dimension: reject, a dimension is needed.
            return Err(DatasetError::Truncated {
                path: path.to_path_buf(),
                what: "fvecs dimension",
                offset: 0,
                expected: 4,
                available: 0,
            });
        }
        if bytes.len() < 4 {
            return Err(DatasetError::Truncated {
                path: path.to_path_buf(),
                what: "fvecs dimension",
                offset: 0,
                expected: 4,
                available: len,
            });
        }
        let d = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if d <= 0 {
            return Err(DatasetError::BadHeader {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("row 0 has dimension {d}; must be positive"),
            });
        }
        let dim = d as usize;
        let stride = 4 + 4 * dim as u64;
        let rows = len / stride;
        let rem = len % stride;
        if rem != 0 {
            return Err(DatasetError::Truncated {
                path: path.to_path_buf(),
                what: "fvecs row",
                offset: rows * stride,
                expected: stride,
                available: rem,
            });
        }
        Ok(FvecsMatrix {
            path: path.to_path_buf(),
            map,
            dim,
            rows,
        })
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of rows.
    pub fn rows(&self) -> u64 {
        self.rows
    }
    /// Row dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Append rows `start..start+count` to `out` (`count * dim` values), checking each row's dimension prefix.
    pub fn read_rows(&self, start: u64, count: usize, out: &mut Vec<f32>) -> Result<()> {
        let end = start.saturating_add(count as u64);
        if end > self.rows {
            return Err(DatasetError::RowsOutOfRange {
                path: self.path.clone(),
                start,
                end,
                rows: self.rows,
            });
        }
        let bytes: &[u8] = self.map.as_deref().unwrap_or(&[]);
        let stride = 4 + 4 * self.dim;
        out.reserve(count * self.dim);
        for r in start..end {
            let off = r as usize * stride;
            let row = &bytes[off..off + stride];
            let d = i32::from_le_bytes([row[0], row[1], row[2], row[3]]);
            if i64::from(d) != self.dim as i64 {
                return Err(DatasetError::DimMismatch {
                    path: self.path.clone(),
                    row: r,
                    offset: off as u64,
                    expected: self.dim,
                    found: i64::from(d),
                });
            }
            extend_f32_le(&row[4..], out);
        }
        Ok(())
    }
    /// Scan every row (streaming): dimension prefixes and finite values.
    pub fn validate(&self) -> Result<()> {
        let mut buf = Vec::new();
        let step = 4096u64;
        let mut start = 0;
        while start < self.rows {
            let n = step.min(self.rows - start) as usize;
            buf.clear();
            self.read_rows(start, n, &mut buf)?;
            if let Some(i) = buf.iter().position(|x| !x.is_finite()) {
                return Err(DatasetError::NonFiniteRow {
                    path: self.path.clone(),
                    row: start + (i / self.dim) as u64,
                    column: i % self.dim,
                });
            }
            start += n as u64;
        }
        Ok(())
    }
}

/// Write `data` (rows of `dim` values) as an `.fvecs` file.
pub fn write_fvecs(path: impl AsRef<Path>, dim: usize, data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    if dim == 0 || !data.len().is_multiple_of(dim) || i32::try_from(dim).is_err() {
        return Err(DatasetError::BadRowData {
            path: path.to_path_buf(),
            len: data.len(),
            dim,
            reason: "dim must be positive and divide the data length",
        });
    }
    let file =
        crate::private::create_private(path).map_err(|e| DatasetError::io(path, "create", e))?;
    let mut w = BufWriter::new(file);
    let prefix = (dim as i32).to_le_bytes();
    for row in data.chunks_exact(dim) {
        w.write_all(&prefix)
            .map_err(|e| DatasetError::io(path, "write", e))?;
        for x in row {
            w.write_all(&x.to_le_bytes())
                .map_err(|e| DatasetError::io(path, "write", e))?;
        }
    }
    w.flush().map_err(|e| DatasetError::io(path, "flush", e))?;
    Ok(())
}
