//! The saved index: own binary format, streamed through a CRC-32, versions 1 to 3 readable.

use super::*;
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// File magic of a saved index.
const MAGIC: &[u8; 8] = b"PACHAIVF";
/// File format version.
const VERSION: u32 = 3;
/// Marker of "no list" in the padded per-row probe table of saved versions 1 and 2.
const NONE: u32 = u32::MAX;

impl Ivf {
    /// Writes the index to `path` (own binary format, CRC-32 checked), streamed through a buffer, and returns
    /// the CRC-32 of the body it wrote (the file's last four bytes), so a caller can bind the file to its own
    /// metadata.
    pub fn save(&self, path: &Path) -> Result<u32, IndexError> {
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        // Index files are derived from biometric templates: private to the owner, whatever the umask.
        file.set_permissions(perms_0600()).map_err(io)?;
        let mut w = CrcWriter {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.put(MAGIC).map_err(io)?;
        w.put(&VERSION.to_le_bytes()).map_err(io)?;
        for v in [
            self.dim as u64,
            self.rows as u64,
            self.lists as u64,
            self.probes as u64,
            u64::from(self.one_way) | (u64::from(!self.mean.is_empty()) << 1),
        ] {
            w.put(&v.to_le_bytes()).map_err(io)?;
        }
        let mut buf = Vec::with_capacity(1 << 16);
        let mut put_u32s = |w: &mut CrcWriter, xs: &mut dyn Iterator<Item = u32>| {
            loop {
                buf.clear();
                buf.extend(xs.take(1 << 14).flat_map(u32::to_le_bytes));
                if buf.is_empty() {
                    return Ok(());
                }
                w.put(&buf)?;
            }
        };
        put_u32s(&mut w, &mut self.centroids.iter().map(|x| x.to_bits())).map_err(io)?;
        put_u32s(&mut w, &mut self.mean.iter().map(|x| x.to_bits())).map_err(io)?;
        w.put(&self.home).map_err(io)?;
        put_u32s(
            &mut w,
            &mut self.probe_off.windows(2).map(|o| (o[1] - o[0]) as u32),
        )
        .map_err(io)?;
        put_u32s(&mut w, &mut self.probe.iter().copied()).map_err(io)?;
        let crc = w.crc.clone().finalize();
        w.out.write_all(&crc.to_le_bytes()).map_err(io)?;
        let file = w.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(crc)
    }

    /// Reads an index written by [`Ivf::save`] (this version or the padded-table versions 1 and 2),
    /// streamed, validating checksum, shape and every list id.
    pub fn load(path: &Path) -> Result<Ivf, IndexError> {
        Ivf::load_with_crc(path).map(|(ivf, _)| ivf)
    }

    /// [`Ivf::load`], also returning the verified CRC-32 of the file's body (what [`Ivf::save`] returned).
    pub fn load_with_crc(path: &Path) -> Result<(Ivf, u32), IndexError> {
        let bad = |problem: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut r = CrcReader {
            inp: std::io::BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            left: len,
        };
        const HEAD: u64 = 8 + 4 + 4 * 8;
        if len < HEAD + 4 {
            return Err(bad(format!("{len} bytes is too short for a header")));
        }
        // A read past the end is a truncated file; any other failure is an I/O error.
        let short = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("file is truncated".into())
            } else {
                io(e)
            }
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic).map_err(short)?;
        if &magic != MAGIC {
            return Err(bad("not an IVF index (bad magic)".into()));
        }
        let version = r.u32().map_err(short)?;
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("version {version}, expected {VERSION}")));
        }
        let mut head = [0u64; 5];
        // Version 1 had no flags word (two-way visits).
        let words = if version == 1 { 4 } else { 5 };
        for h in head.iter_mut().take(words) {
            *h = r.u64().map_err(short)?;
        }
        let flags = head[4];
        if flags > 3 || (version < 3 && flags > 1) {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let one_way = flags & 1 == 1;
        let centred = flags & 2 == 2;
        let to_usize = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in memory")))
        };
        let dim = to_usize(head[0], "dim")?;
        let rows = to_usize(head[1], "rows")?;
        let lists = to_usize(head[2], "lists")?;
        let probes = to_usize(head[3], "probes")?;
        if dim == 0 || lists == 0 || probes == 0 || probes > lists || rows > u32::MAX as usize {
            return Err(bad(format!(
                "bad shape: dim {dim}, rows {rows}, lists {lists}, probes {probes}"
            )));
        }
        // Sizes known before the probe lists: centroids, homes, and the padded table or the counts.
        // Checked throughout: a damaged header may hold any value.
        let fixed = (lists as u64)
            .checked_add(u64::from(centred))
            .and_then(|x| x.checked_mul((dim as u64).checked_mul(4)?))
            .and_then(|x| x.checked_add(rows as u64))
            .and_then(|x| {
                let table = if version < 3 { probes as u64 } else { 1 };
                x.checked_add((rows as u64).checked_mul(table.checked_mul(4)?)?)
            });
        if fixed.is_none_or(|f| f > r.left.saturating_sub(4)) {
            return Err(bad(format!(
                "{len} bytes is too short for the shape in the header"
            )));
        }
        let mut bits = Vec::with_capacity(lists * dim);
        r.u32s(lists * dim, &mut bits).map_err(short)?;
        let centroids: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        if let Some(k) = centroids.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("non-finite centroid value {k}")));
        }
        let mut mean = Vec::new();
        if centred {
            let mut bits = Vec::with_capacity(dim);
            r.u32s(dim, &mut bits).map_err(short)?;
            mean = bits.into_iter().map(f32::from_bits).collect();
            if mean.iter().any(|x| !x.is_finite()) {
                return Err(bad("non-finite mean value".into()));
            }
        }
        let bias = list_biases(&centroids, &mean, dim);
        let mut home = vec![0u8; rows];
        r.take(&mut home).map_err(short)?;
        let mut probe_off = vec![0usize; rows + 1];
        let mut probe = Vec::new();
        if version < 3 {
            // The padded table: rows probing fewer lists than its width end in NONE.
            let mut row = Vec::with_capacity(probes);
            for i in 0..rows {
                row.clear();
                r.u32s(probes, &mut row).map_err(short)?;
                let used = row.iter().position(|&l| l == NONE).unwrap_or(probes);
                if row[used..].iter().any(|&l| l != NONE) {
                    return Err(bad(format!("row {i}: bad NONE padding of its probe lists")));
                }
                probe.extend_from_slice(&row[..used]);
                probe_off[i + 1] = probe.len();
            }
        } else {
            let mut counts = Vec::with_capacity(rows);
            r.u32s(rows, &mut counts).map_err(short)?;
            for (i, &k) in counts.iter().enumerate() {
                let k = k as usize;
                if k > probes {
                    return Err(bad(format!("row {i}: {k} probe lists > {probes}")));
                }
                probe_off[i + 1] = probe_off[i] + k;
            }
            let total = probe_off[rows];
            if (total as u64).checked_mul(4) != Some(r.left.saturating_sub(4)) {
                return Err(bad(format!(
                    "{} bytes left for {total} probe lists",
                    r.left.saturating_sub(4)
                )));
            }
            probe.reserve_exact(total);
            r.u32s(total, &mut probe).map_err(short)?;
        }
        if r.left != 4 {
            return Err(bad(format!(
                "{} bytes after the body, expected a 4-byte checksum",
                r.left
            )));
        }
        let computed = r.crc.clone().finalize();
        let mut tail = [0u8; 4];
        std::io::Read::read_exact(&mut r.inp, &mut tail).map_err(short)?;
        if computed != u32::from_le_bytes(tail) {
            return Err(bad("checksum mismatch".into()));
        }
        // Every row's lists: in range and distinct (a bitset over the lists per worker, cleared after each
        // row), rows in parallel; the first bad row is reported.
        let problem = (0..rows)
            .into_par_iter()
            .map_init(
                || vec![0u64; lists.div_ceil(64)],
                |seen, i| -> Option<String> {
                    let h = home[i] as usize;
                    let p = &probe[probe_off[i]..probe_off[i + 1]];
                    if h == 0 {
                        return (!p.is_empty()).then(|| format!("absent row {i} has lists"));
                    }
                    if h > p.len() {
                        return Some(format!("row {i}: {h} home lists > {} probe lists", p.len()));
                    }
                    let mut bad_list = None;
                    for &l in p {
                        let (w, b) = (l as usize / 64, 1u64 << (l % 64));
                        if l as usize >= lists || seen[w] & b != 0 {
                            bad_list = Some(l);
                            break;
                        }
                        seen[w] |= b;
                    }
                    for &l in p {
                        if let Some(word) = seen.get_mut(l as usize / 64) {
                            *word = 0;
                        }
                    }
                    bad_list.map(|l| format!("row {i}: invalid or repeated list id {l}"))
                },
            )
            .find_first(Option::is_some)
            .flatten();
        if let Some(problem) = problem {
            return Err(bad(problem));
        }
        if one_way && home.iter().any(|&h| h > 1) {
            return Err(bad("one-way visits with a row of several homes".into()));
        }
        let ivf = Ivf::assemble(
            dim,
            lists,
            probes,
            (centroids, mean, bias),
            ProbeTable {
                home,
                probe_off,
                probe,
            },
            one_way,
            false,
        );
        Ok((ivf, computed))
    }
}

/// A buffered writer that checksums what it writes (CRC-32).
struct CrcWriter {
    out: std::io::BufWriter<std::fs::File>,
    crc: crc32fast::Hasher,
}

impl CrcWriter {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }
}

/// A buffered reader that checksums what it reads (CRC-32) and counts the bytes left in the file.
struct CrcReader {
    inp: std::io::BufReader<std::fs::File>,
    crc: crc32fast::Hasher,
    left: u64,
}

impl CrcReader {
    fn take(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        if (buf.len() as u64) > self.left.saturating_sub(4) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        std::io::Read::read_exact(&mut self.inp, buf)?;
        self.crc.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Appends `n` little-endian u32 values to `out`, read in blocks.
    fn u32s(&mut self, n: usize, out: &mut Vec<u32>) -> std::io::Result<()> {
        let mut buf = [0u8; 1 << 16];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() / 4);
            self.take(&mut buf[..k * 4])?;
            out.extend(
                buf[..k * 4]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            left -= k;
        }
        Ok(())
    }
}

/// Owner read/write only (index files hold data derived from biometric templates).
fn perms_0600() -> std::fs::Permissions {
    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600)
}
