"""Conversations as model text through a tokenizer's chat template, with the character span of every assistant content.

``render(tokenizer, messages)`` is the reference: one jinja call per conversation, assistant contents replaced by
sentinels (private-use code points), so the spans are exact whatever the template writes around them.

``ChatRenderer`` gives the same text and spans with one jinja call per conversation *shape* (the roles in order, and
which non-assistant contents are empty): it renders the shape once with a marker in place of every content, splits
the result into literal pieces, and builds each row's text by concatenating pieces and contents. Scoring renders two
texts per Alpaca row (the conversation, the response alone), 2 x 10^7 jinja calls at 10M rows; with the shape cache
the template runs a handful of times and a row costs one ``str.join`` (see ``bench/bench_loss.py --render-only``).

A shape is trusted only when the template inserts contents verbatim. Two checks decide, both once per shape:
- non-assistant contents are rendered as a probe (the marker wrapped in spaces, tabs, newlines, mixed case and
  ``<&'">``); a template that trims, changes case, escapes or encodes a content alters the probe;
- the first real conversation of the shape is rendered the reference way and compared with the filled pieces.
A shape that fails either check (or whose template raises on the markers) is rendered per row with ``render`` from
then on. Assistant contents are markers in both paths, as ``render`` has always done, so the two agree on them by
construction. What the checks cannot see: a template that branches on what a user content says (not just on its
presence) in a way the shape's first conversation does not exercise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Private-use code points: never produced by tokenizers' normalisers or by real text in the shared data sets.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# The non-assistant marker of a shape: whitespace a trimming template removes, letters a case filter changes,
# characters an escaping filter rewrites. A template that inserts contents verbatim leaves it whole.
_PROBE_HEAD, _PROBE_TAIL = " \n\t\ue000", "\ue001Aa<&'\"> \n"
_PROBE = _PROBE_HEAD + "{}" + _PROBE_TAIL
_MARK_RE = re.compile(re.escape(_PROBE_HEAD) + r"(\d+)" + re.escape(_PROBE_TAIL) + "|\ue000(\\d+)\ue001")
# Models without a chat template (base LMs loaded by path) get Alpaca's prompt layout, as Cherry LLM uses.
_FALLBACK_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def apply_template(tokenizer, messages: list[dict]) -> str:
    """The text of ``messages`` (role, content) through the tokenizer's chat template, or the Alpaca layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    text = "\n\n".join(_FALLBACK_HEADERS.get(m["role"], "") + m["content"] for m in messages)
    return text + (tokenizer.eos_token or "")


def render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text through the chat template, with the character span of every assistant content."""
    masked = []
    for j, m in enumerate(messages):
        masked.append(
            {"role": m["role"], "content": _SENTINEL.format(j) if m["role"] == "assistant" else m["content"]}
        )
    templ = apply_template(tokenizer, masked)
    parts = _SENTINEL_RE.split(templ)
    text, spans, pos = [], [], 0
    want = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    got = [int(x) for x in parts[1::2]]
    if got != want:
        raise ValueError(
            f"the chat template did not render every assistant turn exactly once (turns {want}, "
            f"rendered {got}); pass a model whose template keeps assistant contents"
        )
    for k, piece in enumerate(parts):
        if k % 2 == 0:
            text.append(piece)
            pos += len(piece)
        else:
            content = messages[int(piece)]["content"]
            spans.append((pos, pos + len(content)))
            text.append(content)
            pos += len(content)
    return "".join(text), spans


@dataclass
class _Shape:
    """One rendered shape: ``literals[0] + content[slots[0]] + literals[1] + ... + literals[-1]``."""

    literals: list[str]  # len(slots) + 1 pieces of template text
    slots: list[int]  # message index of each content slot (a non-assistant content may fill several)
    assistant: list[bool]  # per slot: an assistant content, whose span is reported

    def fill(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        lits = self.literals
        out = [lits[0]]
        pos = len(lits[0])
        spans = []
        for k, j in enumerate(self.slots):
            c = messages[j]["content"]
            if self.assistant[k]:
                spans.append((pos, pos + len(c)))
            lit = lits[k + 1]
            out.append(c)
            out.append(lit)
            pos += len(c) + len(lit)
        return "".join(out), spans


def _shape_key(messages: list[dict]) -> tuple:
    # An empty non-assistant content is rendered as "" (templates may test for it); assistant contents never reach
    # the template (markers), so their emptiness does not matter.
    return tuple((m["role"], m["role"] != "assistant" and m["content"] == "") for m in messages)


def _compile(tokenizer, messages: list[dict]) -> _Shape | None:
    """The shape of ``messages`` from one template call with markers, or None when it cannot be trusted."""
    masked = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            content = _SENTINEL.format(j)
        else:
            content = "" if m["content"] == "" else _PROBE.format(j)
        masked.append({"role": m["role"], "content": content})
    try:
        templ = apply_template(tokenizer, masked)
    except Exception:  # noqa: BLE001 - the per-row path renders (and raises) the way it always has
        return None
    literals, slots, assistant, pos = [], [], [], 0
    for mt in _MARK_RE.finditer(templ):
        probe, bare = mt.group(1), mt.group(2)
        j = int(probe if probe is not None else bare)
        is_assistant = j < len(messages) and messages[j]["role"] == "assistant"
        if j >= len(messages) or (bare is not None) != is_assistant:
            return None  # a probe that lost its wrapping: the template transformed a content
        literals.append(templ[pos : mt.start()])
        slots.append(j)
        assistant.append(is_assistant)
        pos = mt.end()
    literals.append(templ[pos:])
    if any("\ue000" in t or "\ue001" in t for t in literals):
        return None  # a marker the template took apart
    want = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if [j for j, a in zip(slots, assistant) if a] != want:
        return None  # not every assistant turn exactly once: render() raises its error for this row
    return _Shape(literals, slots, assistant)


@dataclass
class ChatRenderer:
    """``render(tokenizer, messages)`` with one template call per conversation shape (see the module docstring).

    Not thread-safe: one renderer per thread (the loss scorer's planner thread owns its own)."""

    tokenizer: object
    shapes: dict = field(default_factory=dict)  # shape key -> _Shape, or None (rendered per row)
    rows_cached: int = 0  # conversations built from cached pieces
    rows_per_row: int = 0  # conversations rendered through the template (first of a shape, or a failed shape)
    _template: object = None

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        template = getattr(self.tokenizer, "chat_template", None)
        if template is not self._template:  # the template was replaced: every cached shape is stale
            self.shapes.clear()
            self._template = template
        key = _shape_key(messages)
        shape = self.shapes.get(key, False)
        if shape is False:
            shape = _compile(self.tokenizer, messages)
            want = render(self.tokenizer, messages)
            if shape is not None and shape.fill(messages) != want:
                shape = None
            self.shapes[key] = shape
            self.rows_per_row += 1
            return want
        if shape is None:
            self.rows_per_row += 1
            return render(self.tokenizer, messages)
        self.rows_cached += 1
        return shape.fill(messages)

    def info(self) -> dict:
        """Shape counts for the manifest: how many shapes were cached and how many fell back to per-row rendering."""
        bad = sum(1 for s in self.shapes.values() if s is None)
        return {"shapes": len(self.shapes) - bad, "shapes_per_row": bad, "rows_cached": self.rows_cached,
                "rows_per_row": self.rows_per_row}  # fmt: skip
