import json

import pyarrow as pa
import pytest

from engine.errors import UserError
from engine.io.readers import discover, read_shard
from engine.io.schema import CANONICAL, canonicalize, detect_format


def _canon(tmp_path, rows, name="x.jsonl", fmt="auto", mapping=None):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sh,), _ = discover([str(p)])
    out = []
    for b in read_shard(sh):
        f = detect_format([c for c in b.schema.names if not c.startswith("__")], fmt, mapping)
        out.append(canonicalize(b, f, sh.path, mapping))
    return pa.Table.from_batches(out).to_pylist()


def test_alpaca_prompt_joins_instruction_and_input(tmp_path):
    rows = _canon(
        tmp_path,
        [
            {"instruction": "Translate", "input": "bonjour", "output": "hello", "source": "web"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    assert rows[0]["prompt"] == "Translate\n\nbonjour" and rows[0]["response"] == "hello"
    assert rows[1]["prompt"] == "Say hi"
    assert rows[0]["format"] == "alpaca" and rows[0]["verdict"] == "kept"
    assert rows[0]["orig_source"] == "web"  # the input's own `source` column is kept under another name
    assert rows[0]["source"].endswith("x.jsonl") and rows[0]["row"] == 0
    assert list(rows[0])[: len(CANONICAL)] == list(CANONICAL)


def test_chat_and_sharegpt_take_the_last_assistant_turn(tmp_path):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    rows = _canon(tmp_path, [{"messages": msgs}, {"messages": msgs[1:3]}, {"messages": msgs[1:2]}])
    assert rows[0]["prompt"] == "system: S\n\nuser: U1\n\nassistant: A1\n\nuser: U2"
    assert rows[0]["response"] == "A2"
    assert rows[1]["prompt"] == "U1" and rows[1]["response"] == "A1"
    assert rows[2]["verdict"] == "malformed" and "no assistant turn" in rows[2]["detail"]
    assert rows[0]["messages"] == msgs  # the turns are kept
    sg = _canon(
        tmp_path,
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
        name="sg.jsonl",
    )
    assert sg[0]["format"] == "sharegpt" and sg[0]["prompt"] == "Q" and sg[0]["response"] == "A"


def test_classification_text_and_mapped_formats(tmp_path):
    cls = _canon(tmp_path, [{"text": "great phone", "label": 2, "label_name": "positive"}], name="c.jsonl")
    # the content of a classification row is its text (every stage judges `response`); the label stays in `label`
    assert cls[0]["response"] == "great phone" and cls[0]["prompt"] == "" and cls[0]["label"] == "2"
    assert cls[0]["orig_label"] == 2 and cls[0]["label_name"] == "positive"
    txt = _canon(tmp_path, [{"text": "just text"}], name="t.jsonl")
    assert txt[0]["format"] == "text" and txt[0]["prompt"] == "" and txt[0]["response"] == "just text"
    m = _canon(
        tmp_path,
        [{"question": "Q?", "answer": "A."}],
        name="m.jsonl",
        mapping={"prompt": "question", "response": "answer"},
    )
    assert m[0]["format"] == "mapped" and m[0]["prompt"] == "Q?" and m[0]["response"] == "A."


def test_ids_are_stable_unique_and_keep_the_source_id_aside(tmp_path):
    rows = [{"instruction": "same", "output": "same answer"}] * 3
    a = _canon(tmp_path, rows)
    b = _canon(tmp_path, rows)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == 3
    own = _canon(tmp_path, [{"id": 17, "instruction": "q", "output": "a"}], name="own.jsonl")
    assert own[0]["orig_id"] == 17 and own[0]["id"] != "17"  # the source's id is kept, never trusted as unique
    m = _canon(
        tmp_path,
        [{"uid": "u-1", "instruction": "q", "output": "a"}, {"instruction": "q", "output": "b"}],
        name="mapped_id.jsonl",
        mapping={"prompt": "instruction", "response": "output", "id": "uid"},
    )
    assert m[0]["id"] == "u-1" and m[0]["uid"] == "u-1"
    assert m[1]["verdict"] == "malformed" and "missing field 'uid'" in m[1]["detail"] and m[1]["id"] != "u-1"


def test_input_columns_named_like_winnow_columns_are_stored_escaped(tmp_path):
    row = {
        "instruction": "q",
        "output": "a",
        "n_words": 99,
        "embedding": "mine",
        "source": "s1",
        "orig_source": "s2",
        "__row": 5,
        "__raw": "r",
        "__error": "e",
        "orig_x": 1,
        "_id": "m",
    }
    (r,) = _canon(tmp_path, [row], name="esc.jsonl")
    assert r["orig_n_words"] == 99 and r["orig_embedding"] == "mine"
    assert r["orig_source"] == "s1" and r["orig_orig_source"] == "s2"
    assert r["orig___row"] == 5 and r["orig___raw"] == "r" and r["orig___error"] == "e"
    assert r["orig_orig_x"] == 1 and r["orig__id"] == "m"
    assert r["verdict"] == "kept" and r["row"] == 0 and r["detail"] is None


def test_missing_fields_and_wrong_types_are_row_level(tmp_path):
    rows = _canon(
        tmp_path,
        [
            {"instruction": "q", "output": "a"},
            {"instruction": "q"},
            {"output": "a"},
        ],
    )
    assert [r["verdict"] for r in rows] == ["kept", "malformed", "malformed"]
    assert rows[1]["detail"] == "x.jsonl line 2: missing field 'output'"
    assert rows[2]["detail"] == "x.jsonl line 3: missing field 'instruction'"


def test_unknown_columns_name_the_way_out():
    with pytest.raises(UserError, match="--format"):
        detect_format(["foo", "bar"])
    with pytest.raises(UserError, match="unknown format"):
        detect_format(["text"], "csv")
