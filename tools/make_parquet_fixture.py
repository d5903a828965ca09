#!/usr/bin/env python3
"""Small .parquet corpora for crates/sae-lm/tests/hf_dir.rs (pyarrow).

    python3 tools/make_parquet_fixture.py crates/sae-lm/tests/fixtures

docs.parquet: snappy (pyarrow's default), two row groups, columns id (int64), text (string,
one null) and content (string). docs_zstd.parquet: the same with zstd, a codec the reader
is built without, to check the error.
"""
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    None,
    "Sparse autoencoders find interpretable features in the residual stream.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in documentation. naïve café 東京",
]
CONTENT = ["Python's for statement iterates over the items of any sequence."] * 3 + [
    "in the order that they appear", "unlike C"]


def main():
    out = sys.argv[1]
    table = pa.table({
        "id": pa.array(range(len(TEXT)), pa.int64()),
        "text": pa.array(TEXT, pa.string()),
        "content": pa.array(CONTENT, pa.string()),
    })
    pq.write_table(table, os.path.join(out, "docs.parquet"), row_group_size=3)
    pq.write_table(table, os.path.join(out, "docs_zstd.parquet"), compression="zstd")
    print("wrote", out)


if __name__ == "__main__":
    main()
