"""Hostile or odd inputs: each ends as rows accounted for (a row with ``__error`` naming file and line) or as one
UserError naming the file; never a crash, a traceback, a segfault or a hang."""

import contextlib
import gzip
import json
import os
import random
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import ipc

from engine.errors import UserError
from engine.io import readers
from engine.io.readers import ERROR, MAX_JSON_DEPTH, RAW, ROW, check_out, discover, read_shard

GOOD = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(3)]
BOM = b"\xef\xbb\xbf"


def _lines(*objs) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def _read(path, **kw) -> pa.Table:
    (sh,), _ = discover([str(path)])
    tables = [pa.Table.from_batches([b]) for b in read_shard(sh, **kw)]
    return pa.concat_tables(tables, promote_options="permissive")  # small blocks differ in columns, types


def _no_slow_path(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the block went to the slow line-by-line path")

    monkeypatch.setattr(readers, "_parse_lines", boom)


@contextlib.contextmanager
def _deadline(seconds):
    """Turn a hang (opening a FIFO blocks until a writer comes) into a test failure."""

    def fail(*_):
        raise AssertionError(f"still running after {seconds} s: something blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- 1. nesting depth --------------------------------------------------------------------------------------------


def _nested_line(depth: int, kind: str = "list") -> bytes:
    """A row whose own object is level 1 and whose field (``a`` for lists, ``o`` for objects) nests ``depth - 1``
    more levels."""
    d = depth - 1
    inner = "[" * d + "1" + "]" * d if kind == "list" else '{"b": ' * d + "1" + "}" * d
    field = "a" if kind == "list" else "o"
    return ('{"instruction": "deep", "output": "x", "' + field + '": ' + inner + "}").encode()


def _nested(depth: int, kind: str = "list") -> dict:
    return json.loads(_nested_line(depth, kind))


@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_line_nested_100k_deep_is_malformed_not_a_segfault(tmp_path, kind):
    p = tmp_path / "deep.jsonl"
    p.write_bytes(_lines(GOOD[0], _nested_line(100_000, kind), GOOD[1], GOOD[2]))
    t = _read(p)
    assert t.num_rows == 4 and t.column(ROW).to_pylist() == [0, 1, 2, 3]
    errs = t.column(ERROR).to_pylist()
    assert errs[0] is None and errs[2] is None and errs[3] is None
    assert errs[1] == f"deep.jsonl line 2: nested deeper than {MAX_JSON_DEPTH} levels"
    assert t.column(RAW)[1].as_py().startswith('{"instruction": "deep"')
    assert t.column("instruction").to_pylist() == ["question 0", None, "question 1", "question 2"]


def test_depth_limit_is_exact_and_rows_at_the_limit_survive_parquet(tmp_path):
    """A row at the limit is read (and its nested column survives a Parquet round trip: pyarrow's Parquet reader
    refuses schemas deeper than 100 nodes, i.e. about 49 nested lists, which is why the limit is below that);
    one level more is malformed."""
    p = tmp_path / "edge.jsonl"
    p.write_bytes(
        _lines(
            _nested_line(MAX_JSON_DEPTH),
            _nested_line(MAX_JSON_DEPTH + 1),
            GOOD[0],
            _nested_line(MAX_JSON_DEPTH, "object"),
        )
    )
    t = _read(p)
    errs = t.column(ERROR).to_pylist()
    assert errs[0] is None and errs[2] is None and errs[3] is None
    assert "line 2: nested deeper than" in errs[1]
    kept = t.filter(pa.compute.is_null(t.column(ERROR)))
    sink = pa.BufferOutputStream()
    pq.write_table(kept, sink)
    back = pq.read_table(sink.getvalue())
    assert back.column("a")[0].as_py() == _nested(MAX_JSON_DEPTH)["a"]


def test_brackets_in_strings_and_escaped_quotes_do_not_count(tmp_path, monkeypatch):
    rows = [
        {"instruction": "[" * 500 + "{" * 500, "output": "]]]"},
        {"instruction": 'a \\" quote "[[[[' + "[" * 200, "output": '\\\\"' + "{" * 100},
        {"instruction": "ends with a backslash \\", "output": "[" * 100},
    ]
    p = tmp_path / "strings.jsonl"
    p.write_bytes(_lines(*rows))
    _no_slow_path(monkeypatch)  # clean lines stay on pyarrow's fast path
    t = _read(p)
    assert t.column(ERROR).null_count == 3
    assert t.column("instruction").to_pylist() == [r["instruction"] for r in rows]


def test_a_deep_line_among_other_bad_lines_in_small_blocks(tmp_path):
    """The slow path (any bad line in the block) never hands a too-deep line to json.loads (RecursionError)."""
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(_lines(GOOD[0], b'{"instruction": "broken', _nested_line(5000, "object"), b"[1, 2]", GOOD[1]))
    for block in (64, 1 << 20):
        t = _read(p, jsonl_block_bytes=block)
        errs = t.column(ERROR).to_pylist()
        assert t.num_rows == 5 and errs[0] is None and errs[4] is None
        assert "line 2: malformed JSON" in errs[1]
        assert "line 3: nested deeper than" in errs[2]
        assert "line 4: expected a JSON object" in errs[3]


def test_depth_scan_matches_a_plain_reference():
    def reference(buf: bytes, limit: int, reset: bool) -> list[int]:
        deep, depth, in_str, esc, line = set(), 0, False, False, 0
        for c in buf:
            if c == 0x0A:  # every newline counts as a line, even an escaped one or one inside a string
                esc, line = False, line + 1
                if reset:  # JSON lines: each line starts afresh
                    depth, in_str = 0, False
            elif in_str:
                if esc:
                    esc = False
                elif c == 0x5C:
                    esc = True
                elif c == 0x22:
                    in_str = False
            elif c == 0x22:
                in_str = True
            elif c in b"[{":
                depth += 1
                if depth > limit:
                    deep.add(line)
            elif c in b"]}":
                depth -= 1
        return sorted(deep)

    rng = random.Random(7)
    alphabet = b'ab"\\{}[]\n xy_Y'  # y, Y, _ share the bracket test's bit pattern: they must not count
    cases = [
        (bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 120))), rng.randint(0, 4), rng.random() < 0.8)
        for _ in range(1500)
    ]
    cases.append((b'[["x"]]\n' * 50, 1, True))  # more too-deep lines than the scan's first buffer holds
    for buf, limit, reset in cases:
        n_lines, deep = readers.scan_depth(buf, limit, reset)
        assert (n_lines, deep.tolist()) == (buf.count(b"\n"), reference(buf, limit, reset)), (buf, limit, reset)


def test_json_array_with_a_too_deep_item_is_a_user_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_bytes(b"[\n" + json.dumps(GOOD[0]).encode() + b",\n" + _nested_line(100_000) + b"\n]\n")
    (sh,), _ = discover([str(p)])
    with pytest.raises(UserError, match=r"deep\.json: line 3: .*nested deeper than"):
        list(read_shard(sh))


def test_arrow_column_nested_too_deep_is_a_user_error(tmp_path):
    t = pa.table({"a": [_nested(MAX_JSON_DEPTH + 5)["a"]]})
    with ipc.new_file(tmp_path / "deep.arrow", t.schema) as w:
        w.write_table(t)
    (sh,), _ = discover([str(tmp_path / "deep.arrow")])
    with pytest.raises(UserError, match=r"deep\.arrow: column 'a' is nested \d+ levels deep"):
        list(read_shard(sh))


# -- 2. lone surrogates ------------------------------------------------------------------------------------------


def test_lone_surrogates_are_malformed_rows(tmp_path):
    p = tmp_path / "sur.jsonl"
    p.write_bytes(
        _lines(
            GOOD[0],
            b'{"instruction": "x\\ud800y", "output": "a"}',
            b'{"instruction": "pair \\ud83d\\ude00", "output": "a"}',
            b'{"instruction": "low \\uDC00", "output": "a"}',
            b'{"instruction": "literal \\\\ud800", "output": "a"}',
            b'{"k\\ud800": "key", "output": "a"}',
            GOOD[1],
        )
    )
    t = _read(p)
    errs = t.column(ERROR).to_pylist()
    assert t.num_rows == 7
    assert [e is None for e in errs] == [True, False, True, False, True, False, True]
    assert errs[1] == "sur.jsonl line 2: lone surrogate \\ud800 in a string (not valid Unicode)"
    assert "line 4: lone surrogate \\udc00" in errs[3]
    assert "line 6: lone surrogate" in errs[5]
    assert t.column("instruction").to_pylist()[2] == "pair \U0001f600"
    assert t.column("instruction").to_pylist()[4] == "literal \\ud800"
    assert t.column(RAW)[1].as_py() == '{"instruction": "x\\ud800y", "output": "a"}'


def test_lone_surrogate_in_a_json_array_item(tmp_path):
    p = tmp_path / "sur.json"
    p.write_bytes(b'[{"instruction": "ok", "output": "a"}, {"instruction": "\\ud800", "output": "b"}]')
    t = _read(p)
    errs = t.column(ERROR).to_pylist()
    assert errs[0] is None and "sur.json item 1: lone surrogate \\ud800" in errs[1]


# -- 3. invalid UTF-8 in columnar files --------------------------------------------------------------------------


def _bad_utf8_table() -> pa.Table:
    text = pa.array([b"ok", b"bad \xff here", None, b"fine"], pa.binary()).view(pa.string())
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    content = pa.array([b"hi", b"yo", b"\xc3", b"sure"], pa.binary()).view(pa.string())
    structs = pa.StructArray.from_arrays([pa.array(["user"] * 4), content], names=["role", "content"])
    msgs = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4], pa.int32()), structs).cast(msg_type)
    tag = pa.DictionaryArray.from_arrays(
        pa.array([0, 1, 0, 0], pa.int32()), pa.array([b"a", b"b\xfe"], pa.binary()).view(pa.string())
    )
    return pa.table({"text": text, "messages": msgs, "tag": tag, "n": [0, 1, 2, 3]})


def _write_columnar(tmp_path, t):
    pq.write_table(t, tmp_path / "u.parquet", row_group_size=2)
    with ipc.new_file(tmp_path / "u.arrow", t.schema) as w:
        w.write_table(t)
    with ipc.new_stream(tmp_path / "u.arrows", t.schema) as w:
        w.write_table(t, max_chunksize=3)
    return ["u.parquet", "u.arrow", "u.arrows"]


def test_invalid_utf8_in_parquet_and_arrow_string_columns(tmp_path):
    for name in _write_columnar(tmp_path, _bad_utf8_table()):
        t = _read(tmp_path / name)
        t.validate(full=True)  # nothing invalid goes downstream
        assert t.num_rows == 4 and t.column(ROW).to_pylist() == [0, 1, 2, 3], name
        errs = t.column(ERROR).to_pylist()
        assert errs[0] is None and errs[3] is None, name
        assert errs[1] == f"{name} row 1: columns 'text', 'tag' hold invalid UTF-8", name
        assert errs[2] == f"{name} row 2: column 'messages' holds invalid UTF-8", name
        assert t.column("text").to_pylist() == ["ok", None, None, "fine"], name
        assert t.column("n").to_pylist() == [0, 1, 2, 3], name
        assert t.column("messages")[3].as_py() == [{"role": "user", "content": "sure"}], name
        assert t.column("tag").to_pylist() == ["a", None, "a", "a"], name


# -- 4. byte order marks -----------------------------------------------------------------------------------------


def test_bom_before_a_json_array_and_before_json_lines(tmp_path):
    (tmp_path / "a.json").write_bytes(BOM + json.dumps(GOOD).encode())
    (tmp_path / "b.jsonl").write_bytes(BOM + _lines(*GOOD))
    (tmp_path / "c.json").write_bytes(BOM + _lines(*GOOD))  # JSON lines in a .json file
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(BOM + _lines(*GOOD)))
    (tmp_path / "e.json").write_bytes(BOM + b"\n  " + json.dumps(GOOD, indent=2).encode())
    for name in ("a.json", "b.jsonl", "c.json", "d.jsonl.gz", "e.json"):
        t = _read(tmp_path / name)
        assert t.num_rows == 3 and t.column(ERROR).null_count == 3, name
        assert t.column("instruction").to_pylist() == [g["instruction"] for g in GOOD], name


# -- 5, 6, 7. what is not a readable regular file ----------------------------------------------------------------


def test_fifo_in_a_folder_is_skipped_and_named_is_a_user_error(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_lines(*GOOD))
    os.mkfifo(tmp_path / "pipe.jsonl")
    with _deadline(20):
        shards, warnings = discover([str(tmp_path)])
        assert [os.path.basename(s.path) for s in shards] == ["a.jsonl"]
        assert any("pipe.jsonl" in w and "named pipe" in w for w in warnings)
        with pytest.raises(UserError, match=r"pipe\.jsonl: .*named pipe"):
            discover([str(tmp_path / "pipe.jsonl")])
        shards, warnings = discover([str(tmp_path / "*.jsonl")])
        assert [os.path.basename(s.path) for s in shards] == ["a.jsonl"]
        assert any("pipe.jsonl" in w for w in warnings)


def test_dangling_symlink_and_symlink_loop(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_lines(*GOOD))
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    os.symlink(tmp_path / "loop2.jsonl", tmp_path / "loop1.jsonl")
    os.symlink(tmp_path / "loop1.jsonl", tmp_path / "loop2.jsonl")
    os.symlink(tmp_path / "a.jsonl", tmp_path / "link.jsonl")  # a link to a regular file is read
    shards, warnings = discover([str(tmp_path)])
    assert sorted(os.path.basename(s.path) for s in shards) == ["a.jsonl", "link.jsonl"]
    assert any("dangling.jsonl" in w and "does not exist" in w for w in warnings)
    assert any("loop1.jsonl" in w and "loop" in w for w in warnings)
    with pytest.raises(UserError, match=r"dangling\.jsonl: a symbolic link whose target does not exist"):
        discover([str(tmp_path / "dangling.jsonl")])
    with pytest.raises(UserError, match=r"loop1\.jsonl: a symbolic link loop"):
        discover([str(tmp_path / "loop1.jsonl")])


@pytest.mark.parametrize("name", ["x.json", "x.jsonl", "x.parquet"])
def test_unreadable_file_is_a_user_error(tmp_path, name):
    p = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": ["a"]}), p)
    else:
        p.write_bytes(_lines(*GOOD))
    p.chmod(0)
    try:
        if os.geteuid() == 0:
            try:
                p.open("rb").close()
                pytest.skip(
                    "root reads a chmod 000 file anyway (run under `setpriv --bounding-set=-dac_override,"
                    "-dac_read_search` to test this as root)"
                )
            except PermissionError:
                pass  # root without CAP_DAC_OVERRIDE: the test means something
        for target in (p, tmp_path):
            with pytest.raises(UserError, match=rf"{name}: cannot read it \(permission denied\)"):
                discover([str(target)])
    finally:
        p.chmod(0o644)


@pytest.mark.parametrize("name", ["x.json", "x.jsonl", "x.parquet"])
def test_permission_denied_is_a_user_error_even_for_root(tmp_path, monkeypatch, name):
    """The same path as above, with the refusal simulated (the suite may run as root, which reads anything)."""
    p = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": ["a"]}), p)
    else:
        p.write_bytes(_lines(*GOOD))
    (sh,), _ = discover([str(p)])
    real_open = os.open

    def refuse(path, *a, **k):
        if os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError, match=rf"{name}: cannot read it \(permission denied\)"):
        discover([str(tmp_path)])
    with pytest.raises(UserError, match=rf"{name}: cannot read it \(permission denied\)"):
        list(read_shard(sh))


# -- 8. inputs vs outputs ----------------------------------------------------------------------------------------


def _fake_run_outputs(out):
    (out / "work" / "map").mkdir(parents=True)
    t = pa.table({"instruction": ["from winnow"] * 100})
    with ipc.new_file(out / "work" / "map" / "part-00000-0000.arrow", t.schema) as w:
        w.write_table(t)
    (out / "work" / "map" / "done-00000.json").write_text(json.dumps([{"instruction": "x"}]))
    (out / "work" / "lock").write_text("")
    (out / "scores").mkdir()
    pq.write_table(t, out / "scores" / "part-00000-0000.parquet")
    (out / "selected").mkdir()
    (out / "selected" / "selected.jsonl").write_bytes(_lines(*GOOD))
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    for name in ("manifest.json", "compare.json"):
        (out / name).write_text(json.dumps({"rows_in": 3}))
    (out / "report.html").write_text("<html></html>")
    (out / "part.parquet.tmp").write_bytes(b"partial")
    (out / "run.lock").write_text("")


def test_out_equal_to_the_input_folder_never_reads_winnow_outputs(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(_lines(*GOOD))
    (tmp_path / "mine").mkdir()
    pq.write_table(pa.table({"instruction": ["user's own"]}), tmp_path / "mine" / "more.parquet")
    (tmp_path / "extra.json").write_text(json.dumps(GOOD))  # the user's own .json beside winnow's
    _fake_run_outputs(tmp_path)
    shards, _ = discover([str(tmp_path)], exclude=str(tmp_path))
    assert sorted(os.path.relpath(s.path, tmp_path) for s in shards) == [
        "data.jsonl",
        "extra.json",
        os.path.join("mine", "more.parquet"),
    ]
    # a glob over the run folder is filtered the same way
    shards, _ = discover([str(tmp_path / "**" / "*.json*")], exclude=str(tmp_path))
    assert sorted(os.path.relpath(s.path, tmp_path) for s in shards) == ["data.jsonl", "extra.json"]
    # the input named through another spelling of the same folder
    shards, _ = discover([str(tmp_path / "mine" / "..")], exclude=str(tmp_path))
    assert len(shards) == 3


def test_check_out(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(_lines(*GOOD))
    shards, _ = discover([str(tmp_path / "data.jsonl")])
    check_out(tmp_path / "new", shards)  # a new folder
    check_out(tmp_path, shards)  # an existing folder (the input's own)
    with pytest.raises(UserError, match=r"--out .*data\.jsonl is one of the input files"):
        check_out(tmp_path / "data.jsonl", shards)
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(UserError, match=r"--out .*other\.txt is a file, not a folder"):
        check_out(str(tmp_path / "other.txt"), shards)
    os.mkfifo(tmp_path / "p")
    with pytest.raises(UserError, match=r"--out .*p is not a folder"):
        check_out(tmp_path / "p", shards)
    _fake_run_outputs(tmp_path / "run")
    named, _ = discover([str(tmp_path / "run" / "scores" / "part-00000-0000.parquet")])
    with pytest.raises(UserError, match=r"part-00000-0000\.parquet: is winnow's own output in --out"):
        check_out(tmp_path / "run", named)


def test_score_refuses_an_out_that_is_an_input_file(tmp_path):
    from engine.config import Config
    from engine.run.local import score

    (tmp_path / "data.jsonl").write_bytes(_lines(*GOOD))
    with pytest.raises(UserError, match="is one of the input files"):
        score([str(tmp_path / "data.jsonl")], tmp_path / "data.jsonl", Config(), map_stages=[], global_stages=[])
    assert (tmp_path / "data.jsonl").read_bytes() == _lines(*GOOD)


# -- column names that collide with winnow's -------------------------------------------------------------------


def test_source_and_orig_source_columns_both_read(tmp_path):
    rows = [{"source": f"s{i}", "orig_source": f"o{i}", "instruction": "q", "output": "a"} for i in range(3)]
    (tmp_path / "a.jsonl").write_bytes(_lines(*rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    for name in ("a.jsonl", "b.parquet"):
        t = _read(tmp_path / name)
        assert t.column("orig_source").to_pylist() == ["s0", "s1", "s2"], name
        assert t.column("orig_orig_source").to_pylist() == ["o0", "o1", "o2"], name
        assert "source" not in t.column_names


def test_internal_names_as_input_keys_are_user_columns(tmp_path, monkeypatch):
    rows = [{"__row": 100 + i, "__raw": f"raw {i}", "__error": "not an error", "instruction": "q"} for i in range(3)]
    (tmp_path / "fast.jsonl").write_bytes(_lines(*rows))
    (tmp_path / "slow.jsonl").write_bytes(_lines(rows[0], b'{"broken', rows[1], rows[2]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name, n in (("fast.jsonl", 3), ("slow.jsonl", 4), ("c.parquet", 3)):
        with monkeypatch.context() as m:
            if name == "fast.jsonl":
                _no_slow_path(m)
            t = _read(tmp_path / name)
        ok = [i for i in range(n) if not (name == "slow.jsonl" and i == 1)]
        assert t.column(ROW).to_pylist() == list(range(n)), name
        errs = t.column(ERROR).to_pylist()
        assert [errs[i] for i in ok] == [None] * 3, name
        assert [t.column("orig___row")[i].as_py() for i in ok] == [100, 101, 102], name
        assert [t.column("orig___raw")[i].as_py() for i in ok] == ["raw 0", "raw 1", "raw 2"], name
        assert [t.column("orig___error")[i].as_py() for i in ok] == ["not an error"] * 3, name
        raws = t.column(RAW).to_pylist()
        assert [raws[i] for i in ok] == [None] * 3, name
        if name == "slow.jsonl":
            assert "line 2: malformed JSON" in errs[1] and raws[1] == '{"broken'
