#!/usr/bin/env python3
# Usage: python bench/npy_to_parquet.py POP_DIR OUT.parquet  (needs numpy + pyarrow; used by BENCHMARKS.md, "Parquet ingest")
"""Convert a generated population's face.npy + finger2.npy + subjects.csv into one Parquet table with
pyarrow's defaults (write_table: snappy, row groups of up to 1 Mi rows), nulls where a template is absent."""
import sys, csv
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
pop, out = sys.argv[1], sys.argv[2]
ids, present = [], {"face": [], "finger2": []}
quality = {"face": [], "finger2": []}
with open(f"{pop}/subjects.csv", newline="") as f:
    r = csv.DictReader(f)
    for row in r:
        ids.append(row["subject_id"])
        for k in present:
            present[k].append(row.get(f"{k}_present", "1") in ("1", "true"))
            q = row.get(f"{k}_quality", "")
            quality[k].append(float(q) if q and present[k][-1] else None)
cols = {"subject_id": pa.array(ids, type=pa.string())}
for k in ("face", "finger2"):
    x = np.load(f"{pop}/{k}.npy", mmap_mode="r")
    n, d = x.shape
    values = pa.array(np.ascontiguousarray(x).reshape(-1))
    mask = np.array(present[k]) & (np.abs(x).sum(axis=1) > 0)
    arr = pa.FixedSizeListArray.from_arrays(values, d, mask=pa.array(~mask))
    cols[k] = arr
    cols[f"{k}_quality"] = pa.array(quality[k], type=pa.float32())
t = pa.table(cols)
print(t.schema)
pq.write_table(t, out)
print(pq.ParquetFile(out).metadata)
