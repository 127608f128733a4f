"""engine/stages/clean.py: every rule on a planted positive and a planted negative (English and CJK), the judged field
per format, conservation of rows, and the kept share on the real Chinese set."""

from __future__ import annotations

import collections
import random
import string

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
         ("Say it twice.", "Yes yes"), ("Repeat.", "la la la la la la")],  # short: below the 50-word gate (and
        # not repeated_words: two repeats pass, and "la" x6 was asked for)
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


def test_classification_rows_are_judged_on_their_text(stage):
    """engine/io/schema.py puts a classification row's text in ``response`` (prompt ""): every rule judges it there,
    the details name no prompt, and the model-answer rules (refusal, truncated) leave a review alone."""
    rows = [
        ("", EN_LOOP, "classification"),  # the text loops
        ("", "What a lovely day!", "classification"),
        ("", "I'm sorry, but I cannot stand this movie.", "classification"),  # a review, not a refusal
        ("", "N/A", "classification"),  # the text is a placeholder
        ("", "Checking Checking Checking Checking Checking Checking Checking Checking", "classification"),
        ("", "xkqjz wpfmrt bvnzq hjkw", "classification"),
        ("", "!!! ...", "classification"),
        ("", "The film was long and", "classification"),  # a tweet may stop anywhere
        ("great film", "B", "alpaca"),  # a one-letter answer is a fine answer
    ]
    v, d = verdicts(stage, rows)
    assert v == ["gopher_repetition", "kept", "kept", "placeholder", "repeated_words", "random_letters", "no_content",
                 "kept", "kept"], list(zip(v, d))  # fmt: skip
    assert not any(x and x.startswith("prompt.") for x in d)
    assert d[4] == "unit_words=1, repeats=8 >= 3"


def test_rejected_rows_are_measured_not_rejudged(stage):
    rows = [("Q?", "<noinput>", "alpaca", "empty_prompt"), ("Q?", "<noinput>"), ("Explain.", PROSE)]
    out = stage.process(make_batch(rows))
    assert out.column("verdict").to_pylist() == ["empty_prompt", "placeholder", "kept"]
    assert out.column("n_words").to_pylist() == [1, 1, 63]


def test_rows_order_columns_and_conservation(stage):
    rows = [("Explain.", PROSE), ("Q", "<noinput>"), ("写一段话。", ZH_LOOP), ("Draw.", "As an AI, I cannot draw."),
            ("Q", "positive"), ("", EN_LOOP, "classification")] * 5  # fmt: skip
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
    # short-text junk: no_content, placeholder, repeated_words, random_letters, and their exemptions
    ("Q", "!!! ..."), ("Q", "\u200b"), ("Convert SOS to Morse code.", "··· ––– ···"), ("Q", "test test"),
    ("Q", "TODO: fill in"), ("Q", "Todo me parece bonito"), ("Q", "Checking, checking. CHECKING"),
    ("Q", "buy now buy now buy now"), ("Q", "Bora Bora"), ("Repeat it 3 times.", "go go go"), ("Q", "0 0 0"),
    ("Q", "xkqjz wpfmrt bvnzq hjkw"), ("Generate a random string.", "xkqjz wpfmrt bvnzq"), ("Q", "哈哈哈哈"),
    ("Q", "Wszystkie dzieci lubią czekoladę."), ("Q", "don’t-stop #xkqjz @bvnzq"),
    # other formats and already rejected rows
    ("", EN_LOOP, "classification"), ("", "N/A", "classification"), ("", "qwzx vbkj prtz", "classification"),
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
    for verdict in (
        "placeholder",
        "refusal",
        "truncated",
        "gopher_repetition",
        "script_mismatch",
        "repeats_prompt",
        "no_content",
        "repeated_words",
        "random_letters",
    ):
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


# ---- short-text junk (issue 9): planted truth ---------------------------------------------------------------------
def _random_words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10))) for _ in range(n))


def planted_junk(seed: int = 0) -> list[tuple[str, str]]:
    """(text, the reason it must get): junk of every kind, short and long."""
    rng = random.Random(seed)
    junk = [(_random_words(rng, rng.choice([6, 8, 12, 30, 120])), "random_letters") for _ in range(20)]
    junk += [("".join(rng.choice(string.ascii_lowercase) for _ in range(k)), "random_letters") for k in (40, 400)]
    junk += [("Xkqjz Wpfmrt Bvnzq Hjkw", "random_letters"), ("gvhbzesqrfjz kdjfhg", "random_letters")]
    junk += [(t, "repeated_words") for t in [
        "Checking Checking Checking Checking Checking Checking Checking Checking", "Checking Checking Checking",
        "Checking, checking. CHECKING!", "buy now buy now buy now", "click here now click here now click here now click",
        "\n".join(["hello"] * 40), " ".join(["lol"] * 200), "好 好 好 好", "哈哈哈哈哈哈", "No no no no no",
    ]]  # fmt: skip
    junk += [
        (t, "no_content") for t in ["...", "!!!", "?!", "—", "。。。", "\u200b", "• • •", "* * *", "()", ". " * 150]
    ]
    junk += [(t, "placeholder") for t in [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit.", " ".join(["lorem ipsum dolor"] * 60), "N/A",
        "TODO: write this", "test test", "Testing, testing, 1 2 3", "asdf", "<answer goes here>", "dummy text", "测试",
        "暂无", "foo bar", "blah blah blah",
    ]]  # fmt: skip
    return junk


LEGIT = [
    "Yes", "No", "42", "3.14", "-7", "1,234", "x = 5", "B", "positive", "Paris", "Tbilisi", "Mkhitaryan", "pwd", "fm",
    "NASA", "DNA", "XXX", "Test", "None", "undefined", "hello world", "Hayy ibn Yaqdhan", "Dzhokhar Tsarnaev",
    "今天天气很好。", "谢谢", "我喜欢学习编程，也喜欢读书。", "¿Dónde está la biblioteca?", "El perro corre rápido.",
    "Sí, claro.", "Conozco a tu hermano desde hace muchos años.", "Wszystkie dzieci lubią czekoladę.",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "Zhongguo de shoudu shi Beijing.",
    "def f(x):\n    return x**2", "SELECT * FROM users WHERE id = 3;", "print('hi')", "mkdir -p /tmp/x",
    "😂😂😂 🔥🔥", "❤️", "Love this! 😍 #blessed", "@user lol 😂", "Sizzle sizzle #kbbq #ktown @ Oo-Kook BBQ",
    "2 + 2 = 4", "∫ x dx = x²/2 + C", "(a+b)^2 = a^2 + 2ab + b^2", "1 2 3 4 5", "0 0 0", "$ $ $", "😂 😂 😂",
    "New York, New York", "Bora Bora", "Yes yes", "Nah nah ✋🏼😭", "ATCG", "The answer is 12.", "Joyful.",
]  # fmt: skip


@pytest.mark.parametrize("fmt", ["alpaca", "classification"])
def test_planted_short_text_junk_and_legitimate_rows(stage, fmt):
    """Every planted junk row is rejected with its kind's reason, at any length; no short legitimate row is: one-word
    answers, numbers, names, Chinese, Spanish, Polish, pinyin, code, math, emoji, tweets. As instruction rows (prompt
    'Answer.', which asks for nothing special) and as classification rows (the text in ``response``)."""
    junk = planted_junk()
    prompt = "Answer." if fmt == "alpaca" else ""
    rows = [(prompt, t, fmt) for t, _ in junk] + [(prompt, t, fmt) for t in LEGIT]
    v, d = verdicts(stage, rows)
    wrong = [(t[:40], why, x, y) for (t, why), x, y in zip(junk, v, d) if x != why]
    assert not wrong, wrong
    rest = list(zip(LEGIT, v[len(junk) :], d[len(junk) :]))
    assert all(x == "kept" for _, x, _ in rest), [r for r in rest if r[1] != "kept"]


def test_planted_recall_over_lengths(stage):
    """A pool like the benchmark's (bench/bench_rules_fp.py): a quarter each of random letters (2-10 letter words,
    some capitalised), one word or a 2-3 word unit repeated, punctuation only, placeholders, 1..200 words
    log-uniform (half of them under 10 words): >= 95% rejected with the kind's reason; the misses are short random
    strings, which read like abbreviations or names."""
    rng = random.Random(3)
    rows, want = [], []
    for i in range(400):
        n = min(200, int(np.exp(rng.uniform(0, np.log(201)))))
        kind = ("random_letters", "repeated_words", "no_content", "placeholder")[i % 4]
        if kind == "random_letters":
            words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10))) for _ in range(n)]
            text = " ".join(w.capitalize() if rng.random() < 0.2 else w for w in words)
        elif kind == "repeated_words":
            unit = rng.choice(["Checking", "buy now", "good", "click here now", "lol"])
            text = rng.choice([" ", ", ", "\n"]).join([unit] * max(3, n // len(unit.split())))
        elif kind == "no_content":
            text = " ".join(rng.choice([".", "!!!", "?", "-", "…", "。", "*"]) for _ in range(n))
        else:
            text = " ".join((["lorem", "ipsum", "dolor", "sit", "amet"] * 40)[: max(2, n)])
        rows.append(("", text, "classification"))
        want.append(kind)
    v, _ = verdicts(stage, rows)
    hits = np.array([a == b for a, b in zip(v, want)])
    assert hits.mean() >= 0.95, collections.Counter((w, x) for w, x in zip(want, v) if w != x)
    assert all(h for h, w in zip(hits, want) if w != "random_letters")  # the other kinds: every length
    long = [h for h, w, r in zip(hits, want, rows) if w == "random_letters" and len(r[1].split()) >= 10]
    assert all(long)


def test_short_text_exemptions_by_prompt(stage):
    """An instruction row whose prompt asks for such a text, or quotes the whole response, is not junk; the same text
    as a classification row (no prompt) is."""
    asked = [
        ("Convert SOS to Morse code.", "··· ––– ···"), ("Generate a smiley face using only ASCII characters", ":-)"),
        ("What does this function return when the input is empty?", "[]"),
        ("Repeat the input 5 times.\n\nHello", "Hello\nHello\nHello\nHello\nHello"),
        ("Write 'go go go' in capitals.", "GO GO GO"),
        ("Generate a random sequence of 12 letters.", "gvhbzesqrfjz kdjfhgwq"),
        ("Encode the sentence with a Caesar cipher of key 3.\n\nThis is a secret message.", "Wklw lv d vhfuhw phvvdjh."),
        ("Remove every vowel.\n\nThe quick brown fox jumps over the lazy dog.", "Th qck brwn fx jmps vr th lzy dg."),
    ]  # fmt: skip
    v, d = verdicts(stage, asked)
    assert v == ["kept"] * len(asked), list(zip(v, d))
    v, _ = verdicts(stage, [("", r, "classification") for _, r in asked])
    assert v == ["no_content", "no_content", "no_content", "repeated_words", "repeated_words", "random_letters",
                 "random_letters", "random_letters"]  # fmt: skip


def test_short_text_details_and_switches(stage):
    rows = [("Q", "!!!"), ("Q", "lol lol lol lol"), ("Q", "xkqjz wpfmrt bvnzq")]
    v, d = verdicts(stage, rows)
    assert v == ["no_content", "repeated_words", "random_letters"]
    assert d[0] == "no letter, number or symbol in 3 characters"
    assert d[1] == "unit_words=1, repeats=4 >= 3"
    assert d[2].startswith("mean_bigram_score=-") and d[2].endswith(" < -1.5 (rare_bigrams=7 of 13)"), d[2]
    off = CleanStage(CleanConfig(no_content=False, repeated_words=False, random_letters=False))
    assert verdicts(off, rows)[0] == ["kept"] * 3
    loose = CleanStage(CleanConfig(repeated_min_repeats=2, repeated_max_unit_words=2))
    v, _ = verdicts(loose, [("Q", "Bora Bora"), ("Q", "a b c a b c a b c")])
    assert v == ["repeated_words", "kept"]  # a 3-word unit is beyond max_unit_words 2


def test_short_text_config_is_validated():
    for bad in ({"repeated_min_repeats": 1}, {"repeated_max_unit_words": 0}, {"random_min_latin_share": 1.5},
                {"random_max_mean_score": -9}, {"random_exempt_regex": "("}):  # fmt: skip
        with pytest.raises(ValueError):
            CleanConfig(**bad).validate()
    CleanConfig().validate()


def test_rules_stage_judges_classification_text():
    """engine/stages/rules.py: a classification row's text is its response: empty or whitespace-only text is
    empty_text, the length bounds apply to it, and the empty prompt of such a row is not empty_prompt."""
    from engine.stages.rules import RulesConfig, RulesStage

    rows = [("", "", "classification"), ("", " \n ", "classification"), ("", "A fine day.", "classification"),
            ("", "x" * 40, "classification"), ("Q", "  ", "alpaca"), ("  ", "A", "alpaca"), ("", "hi", "text"),
            ("", "", "text")]  # fmt: skip
    out = RulesStage(RulesConfig(max_response_chars=30)).process(make_batch(rows))
    assert out.column("verdict").to_pylist() == ["empty_text", "empty_text", "kept", "too_long", "empty_response",
                                                 "empty_prompt", "kept", "empty_response"]  # fmt: skip
    d = out.column("detail").to_pylist()
    assert d[:2] == ["classification text is empty", "classification text is whitespace only"]
    assert (
        d[3] == "response_chars=40 > 30"
        and d[4] == "response is whitespace only"
        and d[5] == "prompt is whitespace only"
    )
    short = RulesStage(RulesConfig(min_response_chars=5)).process(make_batch([("", "ok", "classification")]))
    assert short.column("verdict").to_pylist() == ["too_short"]
