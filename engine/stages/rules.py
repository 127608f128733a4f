"""Basic rules on canonical rows: empty prompt or response, length bounds, response identical to prompt.

Each rule sets a verdict named after it on rows still kept, with the measured value in ``detail``. Every format is
judged on ``response``: for ``classification`` and ``text`` rows that is the text itself (engine/io/schema.py), so an
empty classification text is ``empty_text`` and the length rules apply to it as to any response; those rows have no
prompt, so ``empty_prompt`` and ``response_equals_prompt`` do not apply. A text of whitespace only is empty
(normalisation trims it to "" anyway; with ``--no-normalize`` it reaches this stage as it was).
Adds ``prompt_chars`` and ``response_chars`` (Unicode code points, after normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.registry import Option, Range, register
from engine.stage import Stage, reject, set_column

STR = pa.large_string()


@dataclass
class RulesConfig:
    min_response_chars: int = 1  # shorter responses get verdict too_short (characters, after normalisation)
    max_response_chars: int = 32768  # longer responses get verdict too_long (characters); -1 = no limit
    max_prompt_chars: int = 32768  # longer prompts get verdict prompt_too_long (characters); -1 = no limit
    reject_response_equals_prompt: bool = True  # verdict response_equals_prompt

    def validate(self) -> None:
        if 0 <= self.max_response_chars < self.min_response_chars:
            raise ValueError(
                f"--min-response-chars {self.min_response_chars} is above --max-response-chars "
                f"{self.max_response_chars}: every response would be rejected"
            )


@register(
    name="rules", kind="map", section="rules", config=RulesConfig, order=20,
    columns=("prompt_chars", "response_chars"),
    options=[
        Option("--min-response-chars", "min_response_chars",
               "responses shorter than this many characters get verdict too_short (default: 1)", int,
               allowed=Range(0)),
        Option("--max-response-chars", "max_response_chars",
               "responses longer than this get verdict too_long, characters (default: 32768; -1 = no limit)", int,
               allowed=Range(1, also=(-1,))),
        Option("--max-prompt-chars", "max_prompt_chars",
               "prompts longer than this get verdict prompt_too_long, characters (default: 32768; -1 = no limit)",
               int, allowed=Range(1, also=(-1,))),
    ],
)  # fmt: skip
class RulesStage(Stage):
    def __init__(self, config: RulesConfig | None = None):
        super().__init__(config or RulesConfig())

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        c = self.config
        fmt = batch.column("format")
        is_cls = pc.equal(fmt, "classification").to_numpy(zero_copy_only=False)
        is_text = pc.equal(fmt, "text").to_numpy(zero_copy_only=False)
        prompt, response = batch.column("prompt"), batch.column("response")
        pchars = pc.utf8_length(prompt).to_numpy(zero_copy_only=False).astype(np.int64)
        rchars = pc.utf8_length(response).to_numpy(zero_copy_only=False).astype(np.int64)
        batch = set_column(batch, "prompt_chars", pa.array(pchars, pa.int32()))
        batch = set_column(batch, "response_chars", pa.array(rchars, pa.int32()))

        def rule(name: str, mask: np.ndarray, detail):
            nonlocal batch
            batch, k = reject(batch, mask, name, detail)
            self.count(name, k)

        p_blank = pc.fill_null(pc.utf8_is_space(prompt), False)  # non-empty and whitespace only
        r_blank = pc.fill_null(pc.utf8_is_space(response), False)
        r_empty = (rchars == 0) | r_blank.to_numpy(zero_copy_only=False)
        rule("empty_text", is_cls & r_empty, _empty_detail("classification text", r_blank))
        rule(
            "empty_prompt",
            ~is_cls & ~is_text & ((pchars == 0) | p_blank.to_numpy(zero_copy_only=False)),
            _empty_detail("prompt", p_blank),
        )
        rule("empty_response", ~is_cls & r_empty, _empty_detail("response", r_blank))
        if c.min_response_chars > 1:
            rule(
                "too_short",
                rchars < c.min_response_chars,
                _measured("response_chars", rchars, "<", c.min_response_chars),
            )
        if c.max_response_chars >= 0:
            rule(
                "too_long",
                rchars > c.max_response_chars,
                _measured("response_chars", rchars, ">", c.max_response_chars),
            )
        if c.max_prompt_chars >= 0:
            rule(
                "prompt_too_long",
                pchars > c.max_prompt_chars,
                _measured("prompt_chars", pchars, ">", c.max_prompt_chars),
            )
        if c.reject_response_equals_prompt:
            same = pc.equal(batch.column("prompt"), batch.column("response")).to_numpy(zero_copy_only=False)
            rule(
                "response_equals_prompt",
                ~is_cls & ~is_text & same & (rchars > 0),
                "response repeats the prompt verbatim",
            )
        return batch


def _empty_detail(what: str, blank: pa.Array) -> pa.Array:
    return pc.if_else(blank, pa.scalar(f"{what} is whitespace only", STR), pa.scalar(f"{what} is empty", STR))


def _measured(name: str, values: np.ndarray, op: str, bound: int) -> pa.Array:
    """Per-row detail like 'response_chars=12 < 16' (built as Arrow strings, no Python loop)."""
    v = pc.cast(pa.array(values), STR)
    return pc.binary_join_element_wise(
        pa.scalar(f"{name}=", STR), v, pa.scalar(f" {op} {bound}", STR), pa.scalar("", STR)
    )
