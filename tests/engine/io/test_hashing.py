import json
import os

from engine.io.hashing import file_hash, file_hashes


def test_hashes_are_cached_by_size_and_mtime_and_follow_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 1}\n')
    ha, hb = file_hashes([str(a), str(b)])
    assert ha == hb and ha.startswith("xxh3_128:")
    cache = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert len(cache) == 2
    # a cached entry is used as long as size and mtime match (here: a planted value proves the read came from it)
    key = next(k for k in cache if k.startswith(os.path.realpath(a)))
    cache[key] = "xxh3_128:planted"
    (tmp_path / "cache" / "file_hashes.json").write_text(json.dumps(cache))
    assert file_hash(str(a)) == "xxh3_128:planted"
    a.write_text('{"x": 2}\n')  # new bytes, new mtime: hashed again, and the old entry replaced
    assert file_hash(str(a)) not in ("xxh3_128:planted", hb)
    cache = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert sum(k.startswith(os.path.realpath(a) + "|") for k in cache) == 1
