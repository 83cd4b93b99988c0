//! Subject lists as CSV/TSV, with a small RFC 4180 parser of our own (quoted fields, doubled quotes,
//! delimiters and newlines inside quotes, LF or CRLF line ends, optional UTF-8 BOM).
//!
//! A subjects file has a header row. `subject_id` is required; for each modality the optional columns
//! `<key>_present` (`1/0`, `true/false`, `yes/no`, `y/n`, `t/f`) and `<key>_quality` (a number in [0, 1];
//! empty = unknown) may follow, where `<key>` is `face` or `finger1` … `finger10`. Other columns are ignored.
//! The delimiter comes from the extension (`.csv` comma, `.tsv`/`.tab` tab) or is sniffed from the header
//! (tab, comma or semicolon). IDs must be non-empty, valid UTF-8, free of control characters, and unique.

use crate::error::{DatasetError, Result};
use crate::modality::Modality;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// One parsed CSV record: the 1-based line where it starts, and its raw fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvRecord {
    /// 1-based physical line where the record starts.
    pub line: u64,
    /// Fields as raw bytes (quotes removed, doubled quotes undone).
    pub fields: Vec<Vec<u8>>,
}

/// A streaming CSV/TSV record reader over any buffered input.
#[derive(Debug)]
pub struct CsvReader<R> {
    inner: R,
    path: PathBuf,
    delim: u8,
    lines_read: u64,
    buf: Vec<u8>,
    first: bool,
}

enum Parse {
    Done(Vec<Vec<u8>>),
    NeedMore,
}

fn parse_record(buf: &[u8], delim: u8, at_eof: bool) -> std::result::Result<Parse, String> {
    let mut fields = Vec::new();
    let mut field = Vec::new();
    let mut i = 0;
    let n = buf.len();
    loop {
        // Start of a field.
        if i < n && buf[i] == b'"' {
            i += 1;
            loop {
                if i >= n {
                    return if at_eof {
                        Err("unterminated quoted field".into())
                    } else {
                        Ok(Parse::NeedMore)
                    };
                }
                if buf[i] == b'"' {
                    if i + 1 < n && buf[i + 1] == b'"' {
                        field.push(b'"');
                        i += 2;
                    } else if i + 1 >= n && !at_eof {
                        // Cannot happen for line-based input (a line ends in '\n'), but be safe.
                        return Ok(Parse::NeedMore);
                    } else {
                        i += 1;
                        break;
                    }
                } else {
                    field.push(buf[i]);
                    i += 1;
                }
            }
            // After a closing quote: delimiter or end of record.
            if i < n && buf[i] == delim {
                fields.push(std::mem::take(&mut field));
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            if rest.is_empty() || rest == b"\n" || rest == b"\r\n" {
                fields.push(field);
                return Ok(Parse::Done(fields));
            }
            return Err(format!(
                "unexpected character {:?} after a closing quote",
                rest[0] as char
            ));
        }
        // Unquoted field.
        loop {
            if i >= n {
                fields.push(field);
                return Ok(Parse::Done(fields));
            }
            let c = buf[i];
            if c == delim {
                fields.push(std::mem::take(&mut field));
                i += 1;
                break;
            }
            if c == b'\n' || (c == b'\r' && (i + 1 == n || buf[i + 1] == b'\n')) {
                fields.push(field);
                return Ok(Parse::Done(fields));
            }
            if c == b'"' {
                return Err("stray quote inside an unquoted field (quote the whole field)".into());
            }
            field.push(c);
            i += 1;
        }
    }
}

impl<R: BufRead> CsvReader<R> {
    /// A reader over `inner`; `path` is only used in error messages.
    pub fn new(inner: R, path: impl Into<PathBuf>, delim: u8) -> Self {
        CsvReader {
            inner,
            path: path.into(),
            delim,
            lines_read: 0,
            buf: Vec::new(),
            first: true,
        }
    }
    /// The next record, or `None` at end of input. Blank lines are skipped.
    pub fn next_record(&mut self) -> Result<Option<CsvRecord>> {
        loop {
            self.buf.clear();
            let start_line = self.lines_read + 1;
            let mut at_eof = false;
            let mut got_any = false;
            loop {
                let n = self
                    .inner
                    .read_until(b'\n', &mut self.buf)
                    .map_err(|e| DatasetError::io(&self.path, "read", e))?;
                if n == 0 {
                    at_eof = true;
                } else {
                    got_any = true;
                    if self.buf.last() == Some(&b'\n') {
                        self.lines_read += 1;
                    } else {
                        at_eof = true;
                    }
                }
                if self.first && self.buf.starts_with(b"\xEF\xBB\xBF") {
                    self.buf.drain(..3);
                }
                self.first = false;
                if !got_any {
                    return Ok(None);
                }
                match parse_record(&self.buf, self.delim, at_eof) {
                    Ok(Parse::Done(fields)) => {
                        let blank = fields.len() == 1
                            && fields[0].is_empty()
                            && !self.buf.starts_with(b"\"");
                        if blank {
                            break;
                        }
                        return Ok(Some(CsvRecord {
                            line: start_line,
                            fields,
                        }));
                    }
                    Ok(Parse::NeedMore) => continue,
                    Err(reason) => {
                        return Err(DatasetError::Csv {
                            path: self.path.clone(),
                            line: start_line,
                            reason,
                        });
                    }
                }
            }
            if at_eof {
                return Ok(None);
            }
        }
    }
}

/// Quote a field for CSV output when needed (delimiter, quote, CR/LF, or surrounding spaces).
pub fn quote_field(s: &str, delim: u8) -> String {
    let needs = s.is_empty()
        || s.bytes()
            .any(|b| b == delim || b == b'"' || b == b'\n' || b == b'\r')
        || s.starts_with(' ')
        || s.ends_with(' ')
        || s.starts_with('\u{feff}');
    if needs {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The delimiter for a path: from its extension, else `None` (sniff).
fn delimiter_from_extension(path: &Path) -> Option<u8> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("csv") => Some(b','),
        Some("tsv" | "tab") => Some(b'\t'),
        _ => None,
    }
}

/// Choose the delimiter for `path`: extension first, else the most frequent of tab/comma/semicolon in the
/// first line (comma when none occurs).
pub fn detect_delimiter(path: &Path) -> Result<u8> {
    if let Some(d) = delimiter_from_extension(path) {
        return Ok(d);
    }
    let file = File::open(path).map_err(|e| DatasetError::io(path, "open", e))?;
    let mut line = Vec::new();
    BufReader::new(file)
        .read_until(b'\n', &mut line)
        .map_err(|e| DatasetError::io(path, "read", e))?;
    let count = |c: u8| line.iter().filter(|&&b| b == c).count();
    let mut best = (b',', count(b','));
    for c in [b'\t', b';'] {
        if count(c) > best.1 {
            best = (c, count(c));
        }
    }
    Ok(best.0)
}

/// Open a CSV/TSV file with its detected delimiter.
pub fn open_csv(path: &Path) -> Result<CsvReader<BufReader<File>>> {
    let delim = detect_delimiter(path)?;
    let file = File::open(path).map_err(|e| DatasetError::io(path, "open", e))?;
    Ok(CsvReader::new(
        BufReader::with_capacity(1 << 16, file),
        path,
        delim,
    ))
}

/// A header-checked table: column names (trimmed, lower-cased) and a streaming record reader.
pub(crate) struct Table {
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub reader: CsvReader<BufReader<File>>,
}

impl Table {
    pub fn open(path: &Path) -> Result<Table> {
        let mut reader = open_csv(path)?;
        let header = reader.next_record()?.ok_or_else(|| DatasetError::Csv {
            path: path.to_path_buf(),
            line: 1,
            reason: "empty file: a header row is required".into(),
        })?;
        let mut columns = Vec::with_capacity(header.fields.len());
        for (i, f) in header.fields.into_iter().enumerate() {
            let s = String::from_utf8(f).map_err(|_| DatasetError::NonUtf8 {
                path: path.to_path_buf(),
                line: header.line,
                column: format!("#{}", i + 1),
            })?;
            columns.push(s.trim().to_ascii_lowercase());
        }
        Ok(Table {
            path: path.to_path_buf(),
            columns,
            reader,
        })
    }
    pub fn column(&self, name: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| DatasetError::MissingColumn {
                path: self.path.clone(),
                column: name.to_string(),
            })
    }
    /// Next record as UTF-8 strings, checking the field count.
    pub fn next(&mut self) -> Result<Option<(u64, Vec<String>)>> {
        let Some(rec) = self.reader.next_record()? else {
            return Ok(None);
        };
        if rec.fields.len() != self.columns.len() {
            return Err(DatasetError::Csv {
                path: self.path.clone(),
                line: rec.line,
                reason: format!(
                    "expected {} fields, found {}",
                    self.columns.len(),
                    rec.fields.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(rec.fields.len());
        for (i, f) in rec.fields.into_iter().enumerate() {
            out.push(String::from_utf8(f).map_err(|_| DatasetError::NonUtf8 {
                path: self.path.clone(),
                line: rec.line,
                column: self.columns[i].clone(),
            })?);
        }
        Ok(Some((rec.line, out)))
    }
}

/// Longest accepted subject ID, in UTF-8 bytes (the store's limit).
pub const MAX_ID_BYTES: usize = 256;

/// Check a subject ID: non-empty (after trimming), at most [`MAX_ID_BYTES`] bytes, no control characters.
pub(crate) fn check_id(path: &Path, line: u64, id: &str) -> Result<()> {
    if id.trim().is_empty() {
        return Err(DatasetError::EmptyId {
            path: path.to_path_buf(),
            line,
        });
    }
    if id.len() > MAX_ID_BYTES {
        return Err(DatasetError::IdTooLong {
            path: path.to_path_buf(),
            line,
            id: crate::error::shorten(id),
            len: id.len(),
            max: MAX_ID_BYTES,
        });
    }
    if id.chars().any(char::is_control) {
        return Err(DatasetError::InvalidId {
            path: path.to_path_buf(),
            line,
            id: crate::error::shorten(id),
        });
    }
    Ok(())
}

/// Presence and quality columns of one modality in a subjects file.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectModality {
    /// The modality.
    pub modality: Modality,
    /// `<key>_present` values, when the column exists.
    pub present: Option<Vec<bool>>,
    /// `<key>_quality` values, when the column exists (empty cells read as 1.0 if present, 0.0 if absent).
    pub quality: Option<Vec<f32>>,
}

/// A subject list: IDs in file order, their source lines, and per-modality presence/quality columns.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Subjects {
    /// Subject IDs, unique, in file order.
    pub ids: Vec<String>,
    /// 1-based line of each ID in the source file (empty when built in memory).
    pub lines: Vec<u64>,
    /// Presence/quality columns, one entry per modality mentioned in the header.
    pub modalities: Vec<SubjectModality>,
}

impl Subjects {
    /// Number of subjects.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when there are no subjects.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The columns for modality `m`, if the file mentions it.
    pub fn modality(&self, m: Modality) -> Option<&SubjectModality> {
        self.modalities.iter().find(|s| s.modality == m)
    }
    /// Source line of subject `i` (its 1-based position + 1 when not read from a file).
    pub fn line(&self, i: usize) -> u64 {
        self.lines.get(i).copied().unwrap_or(i as u64 + 2)
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "t" => Some(true),
        "0" | "false" | "no" | "n" | "f" => Some(false),
        _ => None,
    }
}

/// Read and validate a subjects CSV/TSV file (see the module docs for the columns accepted).
pub fn read_subjects(path: impl AsRef<Path>) -> Result<Subjects> {
    let path = path.as_ref();
    let mut table = Table::open(path)?;
    let id_col = table.column("subject_id")?;
    // (modality, present column, quality column)
    let mut mods: Vec<(Modality, Option<usize>, Option<usize>)> = Vec::new();
    for (i, c) in table.columns.iter().enumerate() {
        let (key, is_present) = if let Some(k) = c.strip_suffix("_present") {
            (k, true)
        } else if let Some(k) = c.strip_suffix("_quality") {
            (k, false)
        } else {
            continue;
        };
        let Ok(m) = key.parse::<Modality>() else {
            continue;
        };
        let entry = match mods.iter_mut().find(|e| e.0 == m) {
            Some(e) => e,
            None => {
                mods.push((m, None, None));
                let last = mods.len() - 1;
                &mut mods[last]
            }
        };
        let slot = if is_present {
            &mut entry.1
        } else {
            &mut entry.2
        };
        if slot.is_some() {
            return Err(DatasetError::Csv {
                path: path.to_path_buf(),
                line: 1,
                reason: format!("column {c:?} appears twice"),
            });
        }
        *slot = Some(i);
    }
    mods.sort_by_key(|e| e.0);
    let mut subjects = Subjects {
        ids: Vec::new(),
        lines: Vec::new(),
        modalities: mods
            .iter()
            .map(|&(m, p, q)| SubjectModality {
                modality: m,
                present: p.map(|_| Vec::new()),
                quality: q.map(|_| Vec::new()),
            })
            .collect(),
    };
    while let Some((line, mut fields)) = table.next()? {
        let id = std::mem::take(&mut fields[id_col]);
        check_id(path, line, &id)?;
        for (k, &(_, pc, qc)) in mods.iter().enumerate() {
            let present = match pc {
                Some(c) => {
                    let v = parse_bool(&fields[c]).ok_or_else(|| DatasetError::InvalidValue {
                        path: path.to_path_buf(),
                        line,
                        column: table.columns[c].clone(),
                        value: crate::error::shorten(&fields[c]),
                        expected: "1/0, true/false, yes/no",
                    })?;
                    if let Some(p) = subjects.modalities[k].present.as_mut() {
                        p.push(v);
                    }
                    Some(v)
                }
                None => None,
            };
            if let Some(c) = qc {
                let s = fields[c].trim();
                let q = if s.is_empty() {
                    if present == Some(false) { 0.0 } else { 1.0 }
                } else {
                    match s.parse::<f32>() {
                        Ok(q) if (0.0..=1.0).contains(&q) => q,
                        _ => {
                            return Err(DatasetError::InvalidValue {
                                path: path.to_path_buf(),
                                line,
                                column: table.columns[c].clone(),
                                value: crate::error::shorten(&fields[c]),
                                expected: "a number in [0, 1] or empty",
                            });
                        }
                    }
                };
                if let Some(qv) = subjects.modalities[k].quality.as_mut() {
                    qv.push(q);
                }
            }
        }
        subjects.ids.push(id);
        subjects.lines.push(line);
    }
    check_unique(path, &subjects.ids, &subjects.lines)?;
    Ok(subjects)
}

/// Fail with [`DatasetError::DuplicateId`] naming both lines of the duplicate whose second line is earliest.
pub(crate) fn check_unique(path: &Path, ids: &[String], lines: &[u64]) -> Result<()> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_unstable_by(|&a, &b| ids[a].cmp(&ids[b]).then(a.cmp(&b)));
    let mut worst: Option<(usize, usize)> = None;
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        if ids[a] == ids[b] && worst.is_none_or(|(_, wb)| b < wb) {
            worst = Some((a, b));
        }
    }
    // In a sorted run i0 < i1 < … of equal IDs the pair (i0, i1) is adjacent, so `a` is the first occurrence.
    if let Some((a, b)) = worst {
        let line = |i: usize| lines.get(i).copied().unwrap_or(i as u64 + 2);
        return Err(DatasetError::DuplicateId {
            path: path.to_path_buf(),
            id: ids[b].clone(),
            first_line: line(a),
            second_line: line(b),
        });
    }
    Ok(())
}

/// Streaming subjects writer: header `subject_id,<key>_present,<key>_quality,…`, delimiter from the
/// extension (tab for `.tsv`/`.tab`, comma otherwise).
#[derive(Debug)]
pub struct SubjectsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    delim: u8,
    modalities: Vec<Modality>,
    line: String,
}

impl SubjectsWriter {
    /// Create (truncate) a subjects file with presence/quality columns for `modalities`.
    pub fn create(path: impl AsRef<Path>, modalities: &[Modality]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let delim = delimiter_from_extension(&path).unwrap_or(b',');
        let file = crate::private::create_private(&path)
            .map_err(|e| DatasetError::io(&path, "create", e))?;
        let mut w = SubjectsWriter {
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            delim,
            modalities: modalities.to_vec(),
            line: String::new(),
        };
        let d = w.delim as char;
        let mut header = String::from("subject_id");
        for m in modalities {
            header.push(d);
            header.push_str(&format!("{}_present{d}{}_quality", m.key(), m.key()));
        }
        header.push('\n');
        w.out
            .write_all(header.as_bytes())
            .map_err(|e| DatasetError::io(&w.path, "write", e))?;
        Ok(w)
    }
    /// Write one subject: `cells[k]` is (present, quality) for the k-th modality given to `create`.
    pub fn write_row(&mut self, id: &str, cells: &[(bool, f32)]) -> Result<()> {
        if cells.len() != self.modalities.len() {
            return Err(DatasetError::BadRowData {
                path: self.path.clone(),
                len: cells.len(),
                dim: self.modalities.len(),
                reason: "one (present, quality) cell per modality is required",
            });
        }
        let d = self.delim as char;
        self.line.clear();
        self.line.push_str(&quote_field(id, self.delim));
        for &(p, q) in cells {
            self.line.push(d);
            self.line.push(if p { '1' } else { '0' });
            self.line.push(d);
            self.line.push_str(&format!("{q}"));
        }
        self.line.push('\n');
        self.out
            .write_all(self.line.as_bytes())
            .map_err(|e| DatasetError::io(&self.path, "write", e))
    }
    /// Flush and close.
    pub fn finish(mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| DatasetError::io(&self.path, "flush", e))
    }
}

/// Write a whole [`Subjects`] table (modalities without a presence column are written as present where the
/// quality is positive; without either column, as present with quality 1).
pub fn write_subjects(path: impl AsRef<Path>, subjects: &Subjects) -> Result<()> {
    let mods: Vec<Modality> = subjects.modalities.iter().map(|m| m.modality).collect();
    let mut w = SubjectsWriter::create(path, &mods)?;
    let mut cells = Vec::with_capacity(mods.len());
    for (i, id) in subjects.ids.iter().enumerate() {
        cells.clear();
        for m in &subjects.modalities {
            let q = m.quality.as_ref().and_then(|q| q.get(i).copied());
            let p = m
                .present
                .as_ref()
                .and_then(|p| p.get(i).copied())
                .unwrap_or(q.is_none_or(|q| q > 0.0));
            cells.push((p, q.unwrap_or(if p { 1.0 } else { 0.0 })));
        }
        w.write_row(id, &cells)?;
    }
    w.finish()
}

/// Write a generic CSV file with a header (fields quoted as needed).
pub fn write_csv<'a, I>(path: impl AsRef<Path>, header: &[&str], rows: I) -> Result<()>
where
    I: IntoIterator<Item = Vec<std::borrow::Cow<'a, str>>>,
{
    let path = path.as_ref();
    let file =
        crate::private::create_private(path).map_err(|e| DatasetError::io(path, "create", e))?;
    let mut out = BufWriter::new(file);
    let mut line = header.join(",");
    line.push('\n');
    out.write_all(line.as_bytes())
        .map_err(|e| DatasetError::io(path, "write", e))?;
    for row in rows {
        line.clear();
        for (i, f) in row.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&quote_field(f, b','));
        }
        line.push('\n');
        out.write_all(line.as_bytes())
            .map_err(|e| DatasetError::io(path, "write", e))?;
    }
    out.flush().map_err(|e| DatasetError::io(path, "flush", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(text: &[u8], delim: u8) -> Result<Vec<CsvRecord>> {
        let mut r = CsvReader::new(text, "mem.csv", delim);
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn parses_quotes_crlf_and_multiline_fields() {
        let recs = parse_all(
            b"\xEF\xBB\xBFa,b\r\n\"x,\"\"y\"\"\",2\r\n\r\n\"multi\nline\",3\nlast,4",
            b',',
        )
        .unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].fields, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(recs[1].fields, vec![b"x,\"y\"".to_vec(), b"2".to_vec()]);
        assert_eq!(recs[2].fields, vec![b"multi\nline".to_vec(), b"3".to_vec()]);
        assert_eq!(recs[2].line, 4);
        assert_eq!(recs[3].line, 6);
        assert_eq!(recs[3].fields, vec![b"last".to_vec(), b"4".to_vec()]);
    }

    #[test]
    fn rejects_malformed_quotes() {
        assert!(matches!(
            parse_all(b"a\n\"open,1\n", b','),
            Err(DatasetError::Csv { line: 2, .. })
        ));
        assert!(matches!(
            parse_all(b"a\nab\"c\n", b','),
            Err(DatasetError::Csv { line: 2, .. })
        ));
        assert!(matches!(
            parse_all(b"a\n\"ab\"c\n", b','),
            Err(DatasetError::Csv { line: 2, .. })
        ));
    }

    #[test]
    fn duplicate_ids_name_the_earliest_repeat_and_its_first_line() {
        let ids: Vec<String> = ["b", "a", "c", "a", "b", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let lines: Vec<u64> = (10..16).collect();
        match check_unique(Path::new("x.csv"), &ids, &lines) {
            Err(DatasetError::DuplicateId {
                id,
                first_line,
                second_line,
                ..
            }) => {
                assert_eq!((id.as_str(), first_line, second_line), ("a", 11, 13));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(check_unique(Path::new("x.csv"), &ids[..3], &lines).is_ok());
    }

    #[test]
    fn quoting_round_trips() {
        for s in ["plain", "a,b", "q\"uote", " lead", "multi\nline", ""] {
            let line = format!("{}\n", quote_field(s, b','));
            let recs = parse_all(line.as_bytes(), b',').unwrap();
            assert_eq!(recs[0].fields, vec![s.as_bytes().to_vec()]);
        }
    }
}
