"""engine/stages/clean.py: every rule on a planted positive and a planted negative (English and CJK), the judged field
per format, conservation of rows, and the kept share on the real Chinese set."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.stages.clean import (
    PLACEHOLDER_REGEX,
    REFUSAL_REGEX,
    TRANSLATION_REGEX,
    CleanConfig,
    CleanStage,
    _alternatives,
    _anchored_part,
    _regex,
)
from kernels.text_stats import contains_literals
from tests.conftest import SHARED_DATA

STR = pa.large_string()

PROSE = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. "
    "Chlorophyll in the leaves absorbs mostly red and blue light, and the energy splits water into oxygen and "
    "hydrogen. The plant then uses carbon dioxide from the air to build sugars, which feed its growth, and it "
    "releases the oxygen that most animals need to breathe."
)  # 63 words, no repetition
ZH_PROSE = (
    "光合作用是绿色植物利用光能，把二氧化碳和水转化为储存能量的有机物，并释放出氧气的过程。叶绿体中的叶绿素主要吸收"
    "红光和蓝紫光，这些能量先把水分解，再用于合成糖类。植物依靠这些糖类生长，动物则呼吸植物释放的氧气。"
)
ZH_LOOP = "我喜欢学习编程。" * 20
EN_LOOP = "I like to learn new things every day. " * 12


@pytest.fixture(scope="module")
def stage():
    return CleanStage(CleanConfig())


def make_batch(rows: list[tuple]) -> pa.RecordBatch:
    """rows: (prompt, response) or (prompt, response, format) or (prompt, response, format, verdict)."""
    cols = collections.defaultdict(list)
    for i, r in enumerate(rows):
        prompt, response = r[0], r[1]
        cols["id"].append(f"r{i}")
        cols["prompt"].append(prompt)
        cols["response"].append(response)
        cols["format"].append(r[2] if len(r) > 2 else "alpaca")
        cols["verdict"].append(r[3] if len(r) > 3 else "kept")
        cols["detail"].append(None)
    return pa.RecordBatch.from_arrays([pa.array(cols[k], STR) for k in cols], names=list(cols))


def verdicts(stage, rows) -> tuple[list[str], list]:
    out = stage.process(make_batch(rows))
    return out.column("verdict").to_pylist(), out.column("detail").to_pylist()


def check(stage, rule: str, positives: list[tuple], negatives: list[tuple]) -> list:
    v, d = verdicts(stage, positives + negatives)
    assert v[: len(positives)] == [rule] * len(positives), list(zip(v, d))
    assert all(x == "kept" for x in v[len(positives) :]), list(zip(v[len(positives) :], d[len(positives) :]))
    return d[: len(positives)]


def test_placeholder(stage):
    d = check(
        stage,
        "placeholder",
        [("Design a logo.", "<noinput>"), ("Draw a cat.", "N/A"), ("Describe the image.", "<No Output>"),
         ("画一只猫。", "暂无"), ("Write a story.", "Lorem ipsum dolor sit amet, consectetur adipiscing elit."),
         ("Summarize.", "The text is short.\n\n2. Instruction: Make a list.\n2. Input:\n<noinput>")],
        [("What does print(f()) return when f has no return statement?", "None"), ("Is it raining?", "No"),
         ("这句话有错误吗？", "无"), ("Explain N/A.", "N/A stands for not applicable.")],
    )  # fmt: skip
    assert d[0] == "matched '<noinput>'"


def test_refusal(stage):
    d = check(
        stage,
        "refusal",
        [("Give me your opinion on cats.", "As an AI language model, I do not have personal opinions."),
         ("Draw a map of France.", "I'm sorry, but I cannot draw images."),
         ("Create a logo.", "This instruction cannot be completed by a GPT language model."),
         ("Make a chart.", "Sorry, the task involves visual output. Due to limitations, we cannot complete this task."),
         ("画一张海报。", "抱歉，作为AI语言模型我无法直接生成图片。"),
         ("你喜欢什么？", "作为人工智能语言模型，我没有情感和个人喜好。")],
        [("Write a sentence about summer.", "I can't believe it's already summer!"),
         ("Reply to a customer.", "I'm sorry that you're not happy with your purchase. We will refund you."),
         ("Write an apology for missing the meeting.", "I'm sorry, but I cannot attend the meeting on Friday."),
         ("What can GPT models not do?", "An example of something that cannot be done by a GPT model is drawing."),
         ("写一句话。", "无论我付出多少努力，我都无法完成任务。")],
    )  # fmt: skip
    assert d[0].startswith("matched 'As an AI language model")


def test_repeats_prompt(stage):
    p = "Write a short poem about the sea and the sky."
    zp = "请写一首关于大海和天空的短诗。"
    d = check(
        stage,
        "repeats_prompt",
        [(p, "write a short poem about   the sea and the sky."), (p, p + " Done."), (zp, zp + "好的")],
        [(p, "The sea is blue,\nthe sky is too,\nand both are wide\nfor me and you."),
         ("Predict the cost of living in the US five years from now.",
          ("It is impossible to accurately predict the cost of living in the US five years from now. However, the "
           "trend of the past decades suggests it will rise with inflation, housing and health-care costs.")),
         ("Hello there", "Hello there! How can I help you today?")],
    )  # fmt: skip
    assert d[0] == "response equals the prompt (case, spacing aside)" and d[1] == "response contains the whole prompt"


def test_truncated(stage):
    d = check(
        stage,
        "truncated",
        [("Write Python code.", "Here it is:\n```python\nprint('hi')\n"),
         ("Describe calcium.", "Calcium is a chemical element with the symbol Ca and atomic number of"),
         ("List the colours.", "The colours of the rainbow are red, orange, yellow, green, blue, indigo and"),
         ("Tell a story.", ("The film begins in Paris, where a young man meets an old painter who teaches him to "
                            "see the city differently. Over the years they grow close, but Charles and...")),
         ("Explain it.", ("The process has three stages that each matter a great deal for the quality of the final "
                          "result, and the first one,")),
         ("介绍一下北京。", "北京是中国的首都，有三千多年的历史，也是全国的政治和文化中心，每年吸引大量游客，"),
         ("介绍一下北京。", "北京是中国的首都（")],
        [("Write Python code.", "```python\nprint('hi')\n```"),
         ("Write a cover letter.", "I look forward to hearing from you.\n\nSincerely,"),
         ("Delete all words starting with s.", "She by the"),
         ("Write the first line of a poem.", "A whisper of spring in the winter's chill night,"),
         ("Answer with the letter.", "A"), ("Sentiment?", "positive"), ("介绍一下北京。", "北京是中国的首都。"),
         ("给出一个连接词。", "此外，"), ("回复邮件。", "亲爱的乔，\n\n感谢您告诉我您的假期安排。祝您玩得开心！\n\n最好的，"),
         ("Give the sequence.", "1, 1, 2, 3, 5, 8, 13, 21, 34...")],
    )  # fmt: skip
    assert d[0] == "unclosed code block: n_code_fences=1"
    assert d[1].startswith("ends with '")


def test_script_mismatch(stage):
    en = "Explain how photosynthesis works in green plants."
    d = check(
        stage,
        "script_mismatch",
        [(en, ZH_PROSE), ("Объясните, как работает фотосинтез у растений.", ZH_PROSE)],
        [("Translate into Chinese: photosynthesis turns light into sugar in plants.", ZH_PROSE),
         ("Please answer in Chinese: how does photosynthesis work in plants?", ZH_PROSE),
         ("编写一个函数，返回列表中不重复的元素。", "def unique(xs):\n    return list(dict.fromkeys(xs))"),
         ("用三句话解释光合作用。", ZH_PROSE), (en, PROSE),
         ("“Scratch Design Studio Galleries”是什么？", "Scratch Design Studio Galleries是用户可以请求将其项目添加到其中的画廊。")],
    )  # fmt: skip
    assert d == ["prompt latin, response han", "prompt cyrillic, response han"]


def test_gopher_repetition(stage):
    d = check(
        stage,
        "gopher_repetition",
        [("Write about learning.", EN_LOOP), ("写一段关于学习的话。", ZH_LOOP),
         ("List the planets.", "\n".join(["Mercury is the closest planet to the sun and the smallest one."] * 6))],
        [("Explain photosynthesis.", PROSE), ("解释光合作用。", ZH_PROSE),
         ("Say it twice.", "Yes yes"), ("Repeat.", "la la la la la la")],  # short: below the 50-word gate
    )  # fmt: skip
    assert d[0].startswith("frac_dup_line") or "gram_frac=" in d[0]
    assert "gram_frac=" in d[1]  # Chinese loops are caught on character n-grams


def test_gopher_repetition_at_gophers_own_thresholds():
    gopher = CleanStage(CleanConfig.gopher())
    song = "Verse:\nWe sing along\nAll night long\n\nChorus:\nOh we sing along\nAll night long\n" * 2
    v, _ = verdicts(gopher, [("Write a song.", song), ("Explain.", PROSE)])
    assert v == ["gopher_repetition", "kept"]
    v, _ = verdicts(CleanStage(CleanConfig()), [("Write a song.", song)])
    assert v == ["kept"]  # the SFT default: a chorus is not junk (and 30 words is below the gate)


def test_gopher_quality(stage):
    rng = np.random.default_rng(0)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"))
    blob = " ".join("".join(rng.choice(letters, 28)) for _ in range(60))  # 60 distinct 28-character words
    ellipses = "\n".join([  # noqa: FLY002
        "The old house stood at the end of a quiet road ...", "Nobody had lived there since the winter storm ...",
        "Children dared each other to touch its gate ...", "One evening a light appeared in the attic window ...",
        "The neighbours gathered on the pavement to watch ...", "Then the door opened slowly and a cat walked out ...",
    ])  # fmt: skip
    small = CleanStage(CleanConfig(max_words=40))
    d = check(stage, "gopher_quality", [("Encode it.", blob), ("Tell a story.", ellipses)], [("Explain.", PROSE)])
    assert d[0] == "mean_word_len=28 > 15" and d[1] == "frac_ellipsis_lines=1 > 0.3"
    v, d = verdicts(small, [("Explain.", PROSE), ("Explain.", "Short answer.")])
    assert v == ["gopher_quality", "kept"] and d[0] == "n_words=63 > 40"


def test_word_rules_do_not_apply_to_cjk():
    """Under Gopher's own quality thresholds a Chinese text (one-character words) is not judged by word length,
    while an English text of 2-character words is."""
    no_repetition = {"max_dup_line_frac": -1, "max_dup_line_chars_frac": -1, "max_top_ngram_frac": [-1] * 3,
                     "max_dup_ngram_frac": [-1] * 6}  # fmt: skip
    gopher = CleanStage(CleanConfig.gopher(**no_repetition))
    zh = ZH_PROSE  # 90+ one-character words, mean length about 1
    en = " ".join(["ab", "cd", "ef", "gh", "ij", "kl"] * 10)
    v, d = verdicts(gopher, [("解释光合作用。", zh), ("x y z", en)])
    assert v[0] == "kept" and v[1] == "gopher_quality" and d[1].startswith("mean_word_len=2 < 3")


def test_classification_rows_are_judged_on_the_prompt(stage):
    rows = [
        (EN_LOOP, "positive", "classification"),  # the text loops: rejected, detail names the prompt
        ("What a lovely day!", "N/A", "classification"),  # a label is not judged
        ("I'm sorry, but I cannot stand this movie.", "negative", "classification"),  # text, not a refusal
        ("N/A", "neutral", "classification"),  # the text is a placeholder
        ("great film", "B", "alpaca"),  # a one-letter answer is a fine answer
    ]
    v, d = verdicts(stage, rows)
    assert v == ["gopher_repetition", "kept", "kept", "placeholder", "kept"], list(zip(v, d))
    assert d[0].startswith("prompt.")


def test_rejected_rows_are_measured_not_rejudged(stage):
    rows = [("Q?", "<noinput>", "alpaca", "empty_prompt"), ("Q?", "<noinput>"), ("Explain.", PROSE)]
    out = stage.process(make_batch(rows))
    assert out.column("verdict").to_pylist() == ["empty_prompt", "placeholder", "kept"]
    assert out.column("n_words").to_pylist() == [1, 1, 63]


def test_rows_order_columns_and_conservation(stage):
    rows = [("Explain.", PROSE), ("Q", "<noinput>"), ("写一段话。", ZH_LOOP), ("Draw.", "As an AI, I cannot draw."),
            ("Q", "positive"), (EN_LOOP, "x", "classification")] * 5  # fmt: skip
    batch = make_batch(rows)
    st = CleanStage(CleanConfig())
    out = st.process(batch)
    assert out.num_rows == batch.num_rows
    assert out.column("id").to_pylist() == batch.column("id").to_pylist()
    assert out.column("response").to_pylist() == batch.column("response").to_pylist()
    for col in ("n_words", "frac_dup_line", "dup_5gram_frac", "script", "prompt_n_words", "prompt_top_2gram_frac"):
        assert col in out.schema.names
    assert out.column("script").to_pylist()[:3] == ["latin", "latin", "han"]
    counts = collections.Counter(out.column("verdict").to_pylist())
    assert sum(counts.values()) == len(rows)
    assert {k: v for k, v in st.stats.items() if k != "rows" and v} == {k: v for k, v in counts.items() if k != "kept"}
    off = CleanStage(CleanConfig(enabled=False)).process(batch)
    assert set(off.column("verdict").to_pylist()) == {"kept"} and "n_words" in off.schema.names


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_chinese").exists(), reason="shared datasets absent")
def test_alpaca_chinese_keeps_the_large_majority(stage):
    import polars as pl

    df = pl.read_parquet(SHARED_DATA / "alpaca_chinese" / "train.parquet").head(6000)
    prompt = pl.when(pl.col("input").str.len_chars() > 0).then(pl.col("instruction") + "\n\n" + pl.col("input"))
    df = df.select(prompt.otherwise(pl.col("instruction")).str.strip_chars(), pl.col("output").str.strip_chars())
    rows = list(zip(df.to_series(0).to_list(), df.to_series(1).to_list()))
    v, _ = verdicts(stage, rows)
    kept = np.mean([x == "kept" for x in v])
    assert kept >= 0.98, collections.Counter(v)


# ---- the default path (ASCII kernel path, split patterns, tails cut only where needed) against the reference ------
LONG_LINE = " ".join(["word"] * 70)  # 349 characters: the 300-character tail starts inside it
VARIED = [
    # placeholder: every unanchored alternative, in odd case, and the anchored whole-text ones
    ("Q", "<no input>"), ("Q", "see < NO  OUTPUT >"), ("Q", "x &lt;no input&gt; y"), ("Q", "<无输入>"),
    ("Q", "&lt;无输入&gt;"), ("Q", "Intro. LOREM Ipsum dolor"), ("Q", "lorem ip\u017fum"), ("Q", "  tbd. "),
    ("Q", "[insert your answer here]"), ("Q", "<empty>"), ("Q", "a < b && c > d"), ("Q", "lorem, ipsum"),
    # refusal: every unanchored alternative (and ſ / K spellings), the anchored ones, look-alikes
    ("Q", "As an AI language model, I cannot."), ("Q", "Sure. AS A LANGUAGE MODEL I know."),
    ("Q", "Well!  as an artificial intelligence I"), ("Q", "Hi, I'm just an AI."), ("Q", "i am an ai assistant"),
    ("Q", "Sadly we cannot complete this task."), ("Q", "So i can't complete this request, sorry"),
    ("Q", "好的，作为一个AI，我"), ("Q", "语言模型无法完成这个"), ("Q", "这无法由AI模型完成"), ("Q", "我无法回答这个问题"),
    ("Q", "a\u017f an AI language model"), ("Q", "I'm sorry, but I cannot draw images."),
    ("Q", "I cannot provide that."), ("Q", "Unfortunately, this task cannot be completed here."),
    ("Q", "抱歉，我无法完成"), ("Q", "This task requires a visual output."), ("Q", "as a rule, yes"),
    ("Q", "I am a teacher."), ("Say sorry.", "I'm sorry, but I cannot come."),
    # truncated: ends the three patterns look for, on short and on long texts (the tail cut matters)
    ("Q", "An answer that stops at the word and"), ("Q", "A list: (red, green"), ("Q", "北京是中国的首都（"),
    ("Q", LONG_LINE + ","), ("Q", LONG_LINE + "..."), ("Q", "x " * 200 + "y" * 5 + "，"),
    ("Q", "one two three four five six seven eight nine ten eleven twelve and so on and on to twenty words here,"),
    ("Q", "one two three four five six seven eight nine ten eleven twelve and so on and on to twenty words end…"),
    ("Q", "```py\nx = 1\n"), ("Q", "The end."),
    # repetition, quality, scripts, repeats_prompt
    ("Write about learning.", EN_LOOP), ("写一段关于学习的话。", ZH_LOOP), ("Explain.", PROSE), ("解释。", ZH_PROSE),
    ("Explain how photosynthesis works in green plants.", ZH_PROSE),
    ("Write a short poem about the sea and the sky.", "write a short poem about   the sea and the sky."),
    ("Q", "\n".join(["- same item here"] * 30)), ("Q", "see http://a.b and https://c.d/x, www.e.f"),
    ("Q", "naïve café, 😀 and\u00a0spaces\u3000here"), ("Q", ""), ("Q", " "),
    # other formats and already rejected rows
    (EN_LOOP, "positive", "classification"), ("N/A", "neutral", "classification"),
    ("", "Lorem ipsum text", "text"), ("Q?", "<noinput>", "alpaca", "empty_prompt"),
]  # fmt: skip


def assert_paths_agree(config: CleanConfig, rows: list[tuple]) -> collections.Counter:
    fast, ref = CleanStage(config), CleanStage(config)
    ref.reference = True
    batch = make_batch(rows)
    a, b = fast.process(batch), ref.process(batch)
    assert a.schema.names == b.schema.names
    for name in a.schema.names:
        assert a.column(name).equals(b.column(name)), (name, [
            (i, x, y) for i, (x, y) in enumerate(zip(a.column(name).to_pylist(), b.column(name).to_pylist())) if x != y
        ][:5])  # fmt: skip
    assert fast.stats == ref.stats
    return collections.Counter(a.column("verdict").to_pylist())


def test_default_path_equals_reference_path():
    counts = assert_paths_agree(CleanConfig(), VARIED * 3)
    for verdict in ("placeholder", "refusal", "truncated", "gopher_repetition", "script_mismatch", "repeats_prompt"):
        assert counts[verdict] > 0, counts  # the rows exercise every rule
    assert_paths_agree(CleanConfig.gopher(judge_prompt_repetition=True), VARIED)
    # a pattern that is not a default one is matched whole on both paths
    assert_paths_agree(CleanConfig(refusal_regex=REFUSAL_REGEX + "|zzz", placeholder_regex="(?i)^n/a$"), VARIED)


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_52k").exists(), reason="shared datasets absent")
def test_default_path_equals_reference_path_on_real_rows():
    import polars as pl

    rows = []
    for name in ("alpaca_52k", "alpaca_chinese"):
        df = pl.read_parquet(SHARED_DATA / name / "train.parquet").sample(3000, seed=2)
        rows += list(zip(df["instruction"].to_list(), df["output"].to_list()))
    counts = assert_paths_agree(CleanConfig(), rows)
    assert counts["placeholder"] and counts["refusal"], counts


def test_pattern_split_is_lossless():
    for pattern in (PLACEHOLDER_REGEX, REFUSAL_REGEX, TRANSLATION_REGEX, r"a|(b|c)|[|]|\||[]|]x|[^]|]y"):
        flags, alts = _alternatives(pattern)
        assert flags + "|".join(alts) == pattern
    assert _alternatives(r"(?i)a|(b|c)|[|]|\|") == ("(?i)", ["a", "(b|c)", "[|]", r"\|"])
    assert _alternatives(r"[]|]x|[^]|]y") == ("", ["[]|]x", "[^]|]y"])
    flags, alts = _alternatives(REFUSAL_REGEX)
    assert flags == "(?i)" and len(alts) == 14 and sum(a.startswith("^") for a in alts) == 7
    assert _anchored_part(PLACEHOLDER_REGEX).startswith(r"(?i)^\s*(?:n/?a|") and _anchored_part("a|b") is None


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_split_patterns_agree_with_whole_patterns(data):
    """Texts holding a match of an unanchored alternative of a default pattern (any case): the split match agrees
    with the whole pattern's on every row."""
    stage = CleanStage(CleanConfig())
    for pattern in (PLACEHOLDER_REGEX, REFUSAL_REGEX):
        flags, alts = _alternatives(pattern)
        floating = st.one_of(*[st.from_regex(flags + a) for a in alts if not a.startswith("^")])
        texts = data.draw(st.lists(floating | st.text(max_size=20), min_size=1, max_size=6))
        arr = pa.array(texts, STR)
        rows = np.ones(len(texts), dtype=bool)
        split = stage._search(arr, pattern, rows, contains_literals(arr, stage._literals))
        assert split.tolist() == _regex(arr, pattern, rows).tolist(), texts
