"""The embedded demo corpus: generated deterministically (same seed, same bytes), with planted truth.

``make_demo(folder)`` writes
- ``input/alpaca.jsonl``: instruction/input/output rows, with planted exact duplicates (some differing only in
  no-break spaces and leading/trailing whitespace), near duplicates (two adjacent words of a long response edited), junk (empty, refusal,
  truncated, repeated text, response = prompt, placeholder) and three malformed lines;
- ``input/chat.jsonl`` (``messages``, some multi-turn) and ``input/sharegpt.jsonl`` (``conversations``);
- ``input/sentiment.parquet``: ``text``/``label``/``label_name`` classification rows, 5% of labels flipped;
- ``eval/eval_prompts.jsonl``: an evaluation prompt set, some of whose prompts were copied into the training
  rows (planted contamination);
- ``truth.json``: every planted row as ``[file name, row]`` per category.

Texts are built from a fixed vocabulary with a seeded generator, so distinct rows share almost no 5-grams while
planted near duplicates share most of them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = [
    "photosynthesis",
    "volcanoes",
    "compound_interest",
    "the_french_revolution",
    "black_holes",
    "vaccines",
    "machine_learning",
    "coral_reefs",
    "the_roman_empire",
    "climate_change",
    "blockchain",
    "sleep_hygiene",
    "plate_tectonics",
    "jazz_music",
    "renewable_energy",
    "the_immune_system",
    "supply_chains",
    "urban_gardening",
    "quantum_computing",
    "the_water_cycle",
    "inflation",
    "honeybees",
    "the_printing_press",
    "solar_eclipses",
    "marathon_training",
    "sourdough_bread",
    "typography",
    "public_libraries",
    "electric_cars",
    "the_silk_road",
    "cloud_computing",
    "wetlands",
    "chess_openings",
    "the_human_heart",
    "recycling",
    "glaciers",
    "remote_work",
    "bird_migration",
    "microfinance",
    "the_periodic_table",
]
VERBS = (
    "Explain",
    "Describe",
    "Summarize what is known about",
    "Write a short paragraph about",
    "List the main facts about",
    "Give practical advice related to",
    "Teach a beginner about",
    "Outline the history of",
    "Discuss the benefits and drawbacks of",
    "Write a brief report on",
)
WORDS = [
    "system",
    "energy",
    "process",
    "people",
    "water",
    "light",
    "growth",
    "change",
    "history",
    "market",
    "structure",
    "layer",
    "signal",
    "pattern",
    "balance",
    "pressure",
    "surface",
    "network",
    "memory",
    "cell",
    "region",
    "method",
    "result",
    "value",
    "cycle",
    "factor",
    "source",
    "effect",
    "model",
    "record",
    "theory",
    "practice",
    "design",
    "level",
    "range",
    "rate",
    "form",
    "power",
    "heat",
    "field",
    "stage",
    "route",
    "chain",
    "policy",
    "branch",
    "trade",
    "season",
    "material",
    "habit",
    "device",
    "signal",
    "core",
    "layer",
    "index",
    "border",
    "crew",
    "tool",
    "metal",
    "grain",
    "river",
    "forest",
    "cloud",
    "engine",
    "bridge",
    "garden",
    "harbor",
    "island",
    "valley",
    "planet",
    "orbit",
    "vessel",
    "thread",
    "fabric",
    "mirror",
    "lantern",
    "compass",
    "ladder",
    "anchor",
    "candle",
    "basket",
    "canvas",
    "marble",
    "pepper",
    "ribbon",
    "saddle",
    "timber",
    "velvet",
    "whistle",
    "quickly",
    "slowly",
    "carefully",
    "often",
    "rarely",
    "usually",
    "clearly",
    "mostly",
    "nearly",
    "simply",
    "gently",
    "firmly",
    "widely",
    "bright",
    "steady",
    "careful",
    "ancient",
    "modern",
    "rural",
    "urban",
    "formal",
    "gentle",
    "narrow",
    "broad",
    "hidden",
    "obvious",
    "rapid",
    "strong",
    "subtle",
    "typical",
    "unusual",
    "vital",
    "weak",
    "fragile",
    "robust",
    "common",
    "scarce",
    "dense",
    "sparse",
    "fertile",
    "arid",
    "builds",
    "shapes",
    "drives",
    "limits",
    "moves",
    "holds",
    "keeps",
    "turns",
    "forms",
    "links",
    "lifts",
    "guides",
    "feeds",
    "tests",
    "shows",
    "protects",
    "reduces",
    "improves",
    "supports",
    "creates",
    "changes",
    "affects",
    "requires",
    "explains",
    "connects",
    "measures",
]
POSITIVE = [
    "excellent",
    "wonderful",
    "delightful",
    "reliable",
    "impressive",
    "pleasant",
    "superb",
    "helpful",
    "great",
    "lovely",
]
NEGATIVE = [
    "terrible",
    "awful",
    "disappointing",
    "broken",
    "rude",
    "useless",
    "poor",
    "horrible",
    "faulty",
    "annoying",
]
NEUTRAL = ["average", "standard", "ordinary", "typical", "regular", "usual", "plain", "moderate", "routine", "common"]
PRODUCTS = [
    "phone",
    "laptop",
    "hotel",
    "restaurant",
    "service",
    "delivery",
    "camera",
    "movie",
    "book",
    "airline",
    "app",
    "keyboard",
]
REFUSALS = (
    "As an AI language model, I cannot help with that request.",
    "I'm sorry, but I cannot provide that information.",
    "As an AI, I do not have personal opinions on this topic.",
)
PLACEHOLDERS = ("<noinput>", "N/A", "<nooutput>")


def _sentence(rng: random.Random, topic: str, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    words.insert(rng.randrange(len(words)), topic.replace("_", " "))
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def _response(rng: random.Random, topic: str, n_sent: int) -> str:
    return " ".join(_sentence(rng, topic, rng.randint(10, 16)) for _ in range(n_sent))


def _edit_words(rng: random.Random, text: str, k: int) -> str:
    """Replace ``k`` adjacent words: on a response of >= 80 words this keeps word-5-gram Jaccard >= 0.86."""
    words = text.split(" ")
    i0 = rng.randrange(len(words) - k)
    for i in range(i0, i0 + k):
        words[i] = rng.choice(WORDS) + ("." if words[i].endswith(".") else "")
    return " ".join(words)


def make_demo(
    folder: str | Path,
    seed: int = 0,
    n_alpaca: int = 1800,
    n_chat: int = 400,
    n_sharegpt: int = 120,
    n_cls: int = 1000,
) -> dict:
    """Write the demo corpus under ``folder`` (see the module docstring); returns the planted truth."""
    rng = random.Random(seed)
    folder = Path(folder)
    inp, ev = folder / "input", folder / "eval"
    inp.mkdir(parents=True, exist_ok=True)
    ev.mkdir(parents=True, exist_ok=True)
    truth: dict[str, list] = {
        k: []
        for k in (
            "exact_duplicate",
            "near_duplicate",
            "empty_response",
            "refusal",
            "truncated",
            "repetition",
            "response_equals_prompt",
            "placeholder",
            "malformed",
            "mislabeled",
            "contaminated",
        )
    }
    truth["near_duplicate_of"] = []
    truth["exact_duplicate_of"] = []

    # Evaluation prompts (some leak into training below).
    evals = []
    for i in range(40):
        topic = rng.choice(TOPICS)
        evals.append(
            {
                "id": f"eval-{i}",
                "instruction": f"{rng.choice(VERBS)} {topic.replace('_', ' ')} "
                f"for a reader who knows {rng.choice(WORDS)} and {rng.choice(WORDS)} "
                f"but not {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)}.",
            }
        )
    (ev / "eval_prompts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))

    # Alpaca rows.
    lines: list[str] = []
    originals: list[tuple[int, dict]] = []

    def add(rec: dict | str, cats: tuple[str, ...] = ()) -> int:
        row = len(lines)
        lines.append(rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False))
        for c in cats:
            truth[c].append(["alpaca.jsonl", row])
        return row

    n_special = 0
    while len(lines) < n_alpaca:
        r = rng.random()
        topic = rng.choice(TOPICS)
        instr = f"{rng.choice(VERBS)} {topic.replace('_', ' ')}."
        has_input = rng.random() < 0.3
        inp_text = _sentence(rng, topic, 8) if has_input else ""
        if r < 0.80 or len(originals) < 50:
            rec = {"instruction": instr, "input": inp_text, "output": _response(rng, topic, rng.randint(4, 8))}
            originals.append((add(rec), rec))
            continue
        n_special += 1
        src_row, src = rng.choice(originals)
        kind = rng.choice(
            (
                "exact",
                "exact_ws",
                "near",
                "near",
                "empty",
                "refusal",
                "truncated",
                "repetition",
                "same",
                "placeholder",
                "contaminated",
            )
        )
        if kind == "exact":
            row = add(dict(src), ("exact_duplicate",))
            truth["exact_duplicate_of"].append([["alpaca.jsonl", row], ["alpaca.jsonl", src_row]])
        elif kind == "exact_ws":  # differs only in whitespace and line endings: equal after normalisation
            rec = dict(src, output="  " + src["output"].replace(" ", "\u00a0", 2) + " \r\n")
            row = add(rec, ("exact_duplicate",))
            truth["exact_duplicate_of"].append([["alpaca.jsonl", row], ["alpaca.jsonl", src_row]])
        elif kind == "near":
            long_src = [(r, o) for r, o in originals[-200:] if len(o["output"].split()) >= 80]
            src_row, src = rng.choice(long_src) if long_src else (src_row, src)
            rec = dict(src, output=_edit_words(rng, src["output"], 2))
            row = add(rec, ("near_duplicate",))
            truth["near_duplicate_of"].append([["alpaca.jsonl", row], ["alpaca.jsonl", src_row]])
        elif kind == "empty":
            add({"instruction": instr, "input": inp_text, "output": rng.choice(("", "   "))}, ("empty_response",))
        elif kind == "refusal":
            add({"instruction": instr, "input": inp_text, "output": rng.choice(REFUSALS)}, ("refusal",))
        elif kind == "truncated":
            text = _response(rng, topic, 4)
            cut = text.rfind(" ", 0, int(len(text) * 0.7))
            add({"instruction": instr, "input": inp_text, "output": text[:cut] + " and the"}, ("truncated",))
        elif kind == "repetition":
            s = _sentence(rng, topic, 9)
            add({"instruction": instr, "input": inp_text, "output": " ".join([s] * 12)}, ("repetition",))
        elif kind == "same":
            add({"instruction": instr, "input": "", "output": instr}, ("response_equals_prompt",))
        elif kind == "placeholder":
            add({"instruction": instr, "input": inp_text, "output": rng.choice(PLACEHOLDERS)}, ("placeholder",))
        elif kind == "contaminated":
            e = rng.choice(evals)
            add({"instruction": e["instruction"], "input": "", "output": _response(rng, topic, 5)}, ("contaminated",))
    # Three malformed lines: broken JSON, a number where text is expected, a missing field.
    add('{"instruction": "Name three colours", "input": "", "output": "red, green', ("malformed",))
    add({"instruction": "What is two plus two?", "input": "", "output": 4}, ("malformed",))
    add({"instruction": "This row lost its output field.", "input": ""}, ("malformed",))
    (inp / "alpaca.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # Chat rows (OpenAI messages) and ShareGPT rows.
    chat_lines = []
    for i in range(n_chat):
        topic = rng.choice(TOPICS)
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": "You are a concise and accurate assistant."})
        for _ in range(1 if rng.random() < 0.7 else 2):
            msgs.append({"role": "user", "content": f"{rng.choice(VERBS)} {topic.replace('_', ' ')}."})
            msgs.append({"role": "assistant", "content": _response(rng, topic, rng.randint(3, 6))})
        chat_lines.append(json.dumps({"id": f"chat-{i}", "messages": msgs}))
    for j in range(12):  # exact duplicates under a different id
        src = json.loads(chat_lines[j * 7])
        src["id"] = f"chat-dup-{j}"
        truth["exact_duplicate"].append(["chat.jsonl", len(chat_lines)])
        truth["exact_duplicate_of"].append([["chat.jsonl", len(chat_lines)], ["chat.jsonl", j * 7]])
        chat_lines.append(json.dumps(src))
    (inp / "chat.jsonl").write_text("\n".join(chat_lines) + "\n")
    sg_lines = []
    for i in range(n_sharegpt):
        topic = rng.choice(TOPICS)
        conv = [
            {"from": "human", "value": f"{rng.choice(VERBS)} {topic.replace('_', ' ')} in simple words."},
            {"from": "gpt", "value": _response(rng, topic, rng.randint(3, 6))},
        ]
        sg_lines.append(json.dumps({"conversations": conv}))
    (inp / "sharegpt.jsonl").write_text("\n".join(sg_lines) + "\n")

    # Classification: sentiment with planted label flips.
    texts, labels, names = [], [], []
    lex = {0: NEGATIVE, 1: NEUTRAL, 2: POSITIVE}
    label_names = {0: "negative", 1: "neutral", 2: "positive"}
    for i in range(n_cls):
        y = rng.randrange(3)
        w = lex[y]
        text = (
            f"The {rng.choice(PRODUCTS)} was {rng.choice(w)} and the {rng.choice(PRODUCTS)} felt "
            f"{rng.choice(w)}; {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)} overall {rng.choice(w)}."
        )
        if rng.random() < 0.05:
            y = (y + rng.randint(1, 2)) % 3
            truth["mislabeled"].append(["sentiment.parquet", i])
        texts.append(text)
        labels.append(y)
        names.append(label_names[y])
    pq.write_table(
        pa.table({"text": texts, "label": pa.array(labels, pa.int64()), "label_name": names}),
        inp / "sentiment.parquet",
        compression="zstd",
    )
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
