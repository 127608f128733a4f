import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import ipc

from engine.errors import UserError
from engine.io.readers import ERROR, RAW, ROW, discover, read_shard

ROWS = [{"instruction": f"q{i}", "input": "", "output": f"answer number {i}"} for i in range(25)]


def _write_all(tmp_path):
    t = pa.Table.from_pylist(ROWS)
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=7)
    with ipc.new_file(tmp_path / "b.arrow", t.schema) as w:
        w.write_table(t, max_chunksize=6)
    with ipc.new_stream(tmp_path / "c.arrows", t.schema) as w:
        w.write_table(t, max_chunksize=6)
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "d.jsonl").write_text(text)
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(text)
    (tmp_path / "f.json").write_text(json.dumps(ROWS))
    (tmp_path / "notes.txt").write_text("not data")


def _collect(shard, **kw):
    batches = list(read_shard(shard, **kw))
    return pa.Table.from_batches(batches) if batches else None, batches


def test_every_format_streams_the_same_rows_in_bounded_batches(tmp_path):
    _write_all(tmp_path)
    shards, warnings = discover([str(tmp_path)])
    assert [s.kind for s in shards] == ["parquet", "arrow", "arrow", "jsonl", "jsonl.gz", "json"]
    assert any("notes.txt" in w for w in warnings)
    for sh in shards:
        t, batches = _collect(sh, batch_rows=10, jsonl_block_bytes=200)
        assert all(b.num_rows <= 10 for b in batches), sh.kind
        assert t.column("instruction").to_pylist() == [r["instruction"] for r in ROWS], sh.kind
        assert t.column(ROW).to_pylist() == list(range(25)), sh.kind
        assert t.column(ERROR).null_count == 25


def test_jsonl_block_boundaries_keep_line_numbers(tmp_path):
    lines = [json.dumps({"text": "x" * (i % 13)}) for i in range(500)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines))  # no trailing newline
    (sh,), _ = discover([str(tmp_path / "x.jsonl")])
    t, _ = _collect(sh, batch_rows=64, jsonl_block_bytes=1000)
    assert t.num_rows == 500
    assert t.column(ROW).to_pylist() == list(range(500))
    assert t.column("text").to_pylist() == ["x" * (i % 13) for i in range(500)]


def test_bad_lines_become_rows_with_reasons(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    raw = (
        b"\n".join(
            [
                good.encode(),
                b'{"instruction": "broken',
                json.dumps({"instruction": "n", "output": 5}).encode(),
                b"",
                b"[1, 2]",
                b'{"instruction": "bad \xff utf8", "output": "x"}',
                good.encode(),
            ]
        )
        + b"\n"
    )
    (tmp_path / "bad.jsonl").write_bytes(raw)
    (sh,), _ = discover([str(tmp_path / "bad.jsonl")])
    t, _ = _collect(sh)
    assert t.num_rows == 6  # the blank line is not a row
    assert t.column(ROW).to_pylist() == [0, 1, 2, 4, 5, 6]
    errs = t.column(ERROR).to_pylist()
    assert errs[0] is None and errs[5] is None
    assert "line 2: malformed JSON" in errs[1]
    assert "line 3: field 'output': expected text, got number" in errs[2]
    assert "line 5: expected a JSON object" in errs[3]
    assert "line 6: invalid UTF-8" in errs[4]
    raws = t.column(RAW).to_pylist()
    assert raws[1] == '{"instruction": "broken' and '"output": 5' in raws[2] and raws[0] is None


def test_fatal_inputs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        discover([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="no file matches"):
        discover([str(tmp_path / "*.parquet")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        discover([str(tmp_path / "x.csv")])
    pq.write_table(pa.table({"text": ["a"] * 1000}), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    (sh,), _ = discover([str(tmp_path / "t.parquet")])
    with pytest.raises(UserError, match="t.parquet: not a readable Parquet file"):
        list(read_shard(sh))
    gz = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "g.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (sh,), _ = discover([str(tmp_path / "g.jsonl.gz")])
    with pytest.raises(UserError, match="truncated gzip"):
        list(read_shard(sh))


def test_empty_file_yields_no_rows(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (sh,), _ = discover([str(tmp_path / "e.jsonl")])
    assert list(read_shard(sh)) == []


def test_parquet_reader_never_loads_more_than_a_batch(tmp_path):
    n = 20000
    pq.write_table(pa.table({"text": np.arange(n).astype(str)}), tmp_path / "big.parquet", row_group_size=2000)
    (sh,), _ = discover([str(tmp_path / "big.parquet")])
    sizes = [b.num_rows for b in read_shard(sh, batch_rows=1000)]
    assert max(sizes) <= 1000 and sum(sizes) == n


def test_jsonl_lines_longer_than_a_parse_block(tmp_path):
    rows = [{"text": "a" * 100}] * 50 + [{"text": "b" * (3 << 20)}] + [{"text": "c"}] * 5
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sh,), _ = discover([str(tmp_path / "long.jsonl")])
    t, _ = _collect(sh, jsonl_block_bytes=4 << 20)
    assert t.num_rows == 56 and t.column(ERROR).null_count == 56
    assert len(t.column("text")[50].as_py()) == 3 << 20
