"""The loss scorer: conversations in, per-row response losses of a causal LM out, in length-sorted packed batches.

How it runs (no Python object per token): conversations are rendered through the chat template with exact
assistant-content character spans (``engine.models.chat_template``, one template call per conversation shape); one
batched fast-tokenizer call maps spans to tokens (``build_plan``); sequences are sorted by length and packed under a
token budget, padding on the right (``pack``); the model's backbone (``model.model(...)``) gives hidden states, and
only the hidden states that predict a response token go through ``kernels.xent`` with the LM head: prompt tokens never
pay for the 49,152-word head, and no ``[T, V]`` logits are ever held. ``model(...).logits`` is never called.
Sequences that all open with the same tokens (SmolLM2's default system turn) share one key/value cache for them.

Rows are scored in chunks of ``chunk_rows``. A planner thread renders and tokenises chunk k+1 (the Rust tokenizer
releases the GIL) while chunk k runs through the model, never more than one chunk ahead; it also pulls the rows'
text from the caller's source, so reading, rendering and tokenising all overlap the forward passes.

Measured (bench/bench_loss.py, 200 Alpaca rows, SmolLM2 float32 on the shared 2-core CPU, both paths in one run):
1.73x the batch-size-1 logits loop at load ~3.5, 3.48x at load ~6.5; per-row losses agree within 3.3e-5 relative.
On a CPU the batch-size-1 loop is already compute-bound, so the gain is the work removed (head and log-softmax on
prompt tokens, the shared prefix) plus GEMM efficiency; the larger batching gains are a GPU's (not measured).

torch and the kernels are imported inside the functions that use them (planning needs neither).
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.models.causal_lm import backbone_and_head, load_model, resolve_device
from engine.models.chat_template import ChatRenderer
from engine.stages.loss import Budget, LossConfig

if TYPE_CHECKING:
    import torch

# The per-row result arrays of score() / score_chunks(); the first five are the stage's columns.
RESULT_KEYS = ("loss_response", "loss_response_given_prompt", "ifd", "loss_tokens", "loss_truncated", "scored",
               "attempted")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- sequences
@dataclass
class Sequence:
    """One forward pass: token ids (already cut), the positions whose token is scored, and its segment
    (``2 * row + 0`` given the prompt, ``2 * row + 1`` response alone)."""

    ids: np.ndarray  # int64 token ids
    positions: np.ndarray  # int64 positions p >= 1 in ids whose token is scored (predicted from hidden p - 1)
    segment: int  # 2 * row + kind


@dataclass
class Plan:
    sequences: list[Sequence] = field(default_factory=list)
    truncated: np.ndarray = None  # bool per row: some response token was cut by max_tokens
    no_tokens: np.ndarray = None  # bool per row: nothing left to score (empty response, or cut entirely)


def _token_positions(offsets: np.ndarray, text: str, span: tuple[int, int], eos: str | None) -> np.ndarray:
    """Token positions overlapping ``span`` (plus the EOS right after it, when ``eos`` is given)."""
    start, end = span
    if eos and text.startswith(eos, end):
        end += len(eos)
    s, e = offsets[:, 0], offsets[:, 1]
    return np.flatnonzero((s < end) & (e > start) & (e > s)).astype(np.int64)


def build_plan(
    tokenizer,
    conversations: list[list[dict] | None],
    max_tokens: int,
    score_end_token: bool = True,
    renderer: ChatRenderer | None = None,
) -> Plan:
    """Tokenise the conversations and cut them into sequences; both losses get the same response tokens.

    ``renderer``: a ``ChatRenderer`` for ``tokenizer`` kept across calls (its shape cache then lasts the run); a
    fresh one per call otherwise."""
    renderer = renderer if renderer is not None else ChatRenderer(tokenizer)
    n = len(conversations)
    plan = Plan(truncated=np.zeros(n, bool), no_tokens=np.zeros(n, bool))
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    owners: list[tuple[int, int]] = []  # (row, -1) for the conditioned text, (row, turn) for a turn alone
    for r, conv in enumerate(conversations):
        if not conv or not any(m["role"] == "assistant" for m in conv):
            plan.no_tokens[r] = True
            continue
        t, sp = renderer.render(conv)
        texts.append(t)
        spans.append(sp)
        owners.append((r, -1))
        for j, m in enumerate(conv):
            if m["role"] == "assistant":
                t, sp = renderer.render([m])
                texts.append(t)
                spans.append(sp)
                owners.append((r, j))
    if not texts:
        return plan
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token if score_end_token else None
    k = 0
    while k < len(texts):
        r = owners[k][0]
        cond_ids = np.asarray(enc["input_ids"][k], dtype=np.int64)
        cond_off = np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)
        cond_turns = [_token_positions(cond_off, texts[k], sp, eos) for sp in spans[k]]
        n_turns = len(cond_turns)
        cond_keep, alone_seqs, cut = [], [], False
        for j in range(n_turns):
            a = k + 1 + j
            a_ids = np.asarray(enc["input_ids"][a], dtype=np.int64)
            a_off = np.asarray(enc["offset_mapping"][a], dtype=np.int64).reshape(-1, 2)
            a_pos = _token_positions(a_off, texts[a], spans[a][0], eos)
            c_pos = cond_turns[j]
            # Same context before the content (the assistant header) -> same content tokens in both; min() guards
            # templates where they differ.
            m = min(len(c_pos), len(a_pos))
            c_pos, a_pos = c_pos[:m], a_pos[:m]
            fit = (c_pos < max_tokens) & (a_pos < max_tokens)
            if not fit.all():
                cut = True
            ok = fit & (c_pos >= 1) & (a_pos >= 1)  # a token at position 0 has no context to be predicted from
            c_pos, a_pos = c_pos[ok], a_pos[ok]
            if len(a_pos):
                alone_seqs.append(Sequence(a_ids[: a_pos[-1] + 1], a_pos, 2 * r + 1))
                cond_keep.append(c_pos)
        plan.truncated[r] = cut
        if cond_keep:
            c_all = np.concatenate(cond_keep)
            # Tokens after the last scored one cannot change any scored NLL (causal attention): drop them.
            plan.sequences.append(Sequence(cond_ids[: c_all[-1] + 1], c_all, 2 * r))
            plan.sequences.extend(alone_seqs)
        else:
            plan.no_tokens[r] = True
        k += 1 + n_turns
    return plan


def pack(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Sequence indices grouped into batches, longest first, with (count x longest) <= batch_tokens.

    Sorting by length keeps padding small: the 4,000 sequences of 2,000 Alpaca rows (26-507 tokens, mean 94) pad
    to 3.0% of the batched tokens, against 59% for batches of 16 in input order.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        longest = int(lengths[order[i]])
        size = max(1, batch_tokens // max(1, longest))
        batches.append(order[i : i + size])
        i += size
    return batches


# ---------------------------------------------------------------------------------------------------- planner
_DONE = object()


class _OneAhead:
    """Runs ``produce()`` (a generator function) in a worker thread, never more than one item ahead: the worker
    starts item k+1 once the consumer has taken item k. Exceptions reach the consumer; ``close()`` stops the worker
    (it finishes the item in hand) and closes the generator."""

    def __init__(self, produce: Callable[[], Iterator]):
        self._q: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(produce,), name="loss-planner", daemon=True)
        self._thread.start()

    def _work(self, produce) -> None:
        it = None
        try:
            it = produce()
            while True:
                self._slot.acquire()
                if self._stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    self._q.put(_DONE)
                    return
                self._q.put((item,))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._q.put(e)
        finally:
            if it is not None:
                it.close()

    def __iter__(self) -> Iterator:
        while True:
            got = self._q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            self._slot.release()
            yield got[0]

    def close(self) -> None:
        self._stop.set()
        self._slot.release()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------- the scorer
class LossScorer:
    """Loads the reference model once; ``score(conversations)`` returns the loss columns as numpy arrays."""

    def __init__(self, config: LossConfig | None = None, model=None, tokenizer=None):
        self.config = config or LossConfig()
        self.device = resolve_device(self.config.device)
        if model is None:
            model, tokenizer = load_model(self.config.model, self.device, self.config.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.backbone, self.head, self.scale = backbone_and_head(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        # The kernel dispatcher follows the data: hidden states on the GPU -> Triton, on the CPU -> chunked torch.
        self.xent_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._prefix: tuple[bytes | None, list] = (None, [])  # (prefix ids, per-layer keys/values) of the last prefix
        self.prefix_tokens_reused = 0  # tokens served from the shared-prefix cache instead of the backbone
        self.renderer = ChatRenderer(tokenizer)  # used by the planner thread only
        # Wall seconds: plan (render + tokenise, in the planner thread), forward (model + head), wait (the model
        # idle for want of a plan: near 0 when planning keeps up).
        self.seconds = {"plan": 0.0, "forward": 0.0, "wait": 0.0}

    def _shared_prefix(self, seqs: list[Sequence]) -> int:
        """Tokens every sequence starts with and none is scored on (their hidden states are never read).

        SmolLM2's template opens every conversation with the same default system turn plus ``<|im_start|>``:
        22 tokens of the 94 of an average Alpaca sequence (2,640 of 11,420 tokens on 60 rows). Their keys and values
        are computed once and reused by every batch, so the backbone skips ~23% of its tokens.
        """
        if not self.config.share_prefix or getattr(self.model.config, "sliding_window", None):
            return 0
        first = seqs[0].ids
        n = min(min(len(s.ids) for s in seqs), min(int(s.positions[0]) for s in seqs) - 1)
        for s in seqs[1:]:
            diff = np.flatnonzero(s.ids[:n] != first[:n])
            if len(diff):
                n = int(diff[0])
            if n == 0:
                break
        return n if n >= 4 else 0  # a prefix shorter than 4 tokens saves less than its extra forward costs

    def _prefix_kv(self, ids: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of the shared prefix, computed once per distinct prefix."""
        import torch

        key = ids.tobytes()
        if self._prefix[0] != key:
            out = self.backbone(input_ids=torch.from_numpy(ids)[None].to(self.device), use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            self._prefix = (key, [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix[1]

    def _forward(self, seqs: list[Sequence], sums: np.ndarray, counts: np.ndarray, prefix: int = 0) -> None:
        """One padded batch through the backbone, then the head on the scored positions only.

        ``prefix``: leading tokens shared by every sequence, served from a key/value cache computed once.
        """
        import torch

        with torch.inference_mode():
            self._forward_batch(seqs, sums, counts, prefix)

    def _forward_batch(self, seqs, sums, counts, prefix) -> None:
        import torch

        from kernels import xent as xent_mod

        lens = [len(s.ids) for s in seqs]
        longest = max(lens)
        ids = np.full((len(seqs), longest), self.pad_id, dtype=np.int64)
        attn = np.zeros((len(seqs), longest), dtype=np.int64)
        b_idx, p_idx, seg = [], [], []
        for b, s in enumerate(seqs):
            ids[b, : len(s.ids)] = s.ids
            attn[b, : len(s.ids)] = 1
            b_idx.append(np.full(len(s.positions), b, np.int64))
            p_idx.append(s.positions)
            seg.append(np.full(len(s.positions), s.segment, np.int64))
        b_idx, p_idx, seg = np.concatenate(b_idx), np.concatenate(p_idx), np.concatenate(seg)
        ids_t = torch.from_numpy(ids).to(self.device)
        # No mask when nothing is padded: attention then takes the plain causal path.
        mask_t = None if min(lens) == longest else torch.from_numpy(attn).to(self.device)
        if prefix:
            from transformers import DynamicCache

            cache = DynamicCache()
            for i, (k, v) in enumerate(self._prefix_kv(ids[0, :prefix])):
                cache.update(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1), i)
            # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
            name = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
            out = self.backbone(input_ids=ids_t[:, prefix:], attention_mask=mask_t, use_cache=True, **{name: cache})
            self.prefix_tokens_reused += prefix * len(seqs)
        else:
            out = self.backbone(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        bt = torch.from_numpy(b_idx).to(self.device)
        pt = torch.from_numpy(p_idx).to(self.device)
        h = hidden[bt, pt - 1 - prefix]  # the hidden state at p - 1 predicts the token at p
        if self.scale != 1.0:
            h = h * self.scale
        s, c = xent_mod.xent(
            h,
            self.head,
            ids_t[bt, pt],
            device=self.xent_device,
            segment_ids=torch.from_numpy(seg).to(self.device),
            num_segments=len(sums),
        )
        sums += s.cpu().numpy()
        counts += c.cpu().numpy()

    def _run_plan(self, plan: Plan, deadline: float | None) -> dict[str, np.ndarray]:
        """The result arrays (``RESULT_KEYS``) of one planned chunk; stops between batches at ``deadline``."""
        m = len(plan.truncated)
        sums = np.zeros(2 * m)
        counts = np.zeros(2 * m, np.int64)
        pending = np.zeros(m, np.int64)  # sequences of each row not yet through the model
        for s in plan.sequences:
            pending[s.segment // 2] += 1
        lengths = np.array([len(s.ids) for s in plan.sequences], np.int64)
        prefix = self._shared_prefix(plan.sequences) if plan.sequences else 0
        for batch in pack(lengths, self.config.batch_tokens):
            if deadline is not None and time.monotonic() >= deadline:
                break
            seqs = [plan.sequences[i] for i in batch]
            self._forward(seqs, sums, counts, prefix)
            for s in seqs:
                pending[s.segment // 2] -= 1
        done = (pending == 0) & ~plan.no_tokens
        cond, alone = sums[0::2], sums[1::2]
        n_c, n_a = counts[0::2], counts[1::2]
        with np.errstate(invalid="ignore", divide="ignore"):
            lc = np.where(done, cond / np.maximum(n_c, 1), np.nan)
            la = np.where(done, alone / np.maximum(n_a, 1), np.nan)
            ifd = np.where(done & (la > 0), lc / la, np.nan)
        return {
            "loss_response": la,
            "loss_response_given_prompt": lc,
            "ifd": ifd,
            "loss_tokens": np.where(done, n_c, np.where(plan.no_tokens, 0, -1)).astype(np.int64),
            "loss_truncated": plan.truncated,
            "scored": done,
            "attempted": done | plan.no_tokens,  # tokenised: loss_truncated is known even when nothing was scored
        }

    def score_chunks(
        self, items: Iterable[tuple[Any, Any]], budget: Budget | None = None
    ) -> Iterator[tuple[Any, int, int, dict[str, np.ndarray]]]:
        """Score a stream of ``(tag, conversations)`` items within ``budget``, one chunk of ``chunk_rows`` at a time.

        ``conversations`` is anything with ``len()`` and slicing that gives lists of conversations (a list, or a lazy
        view that builds them from Arrow per slice); ``tag`` is passed through. Yields ``(tag, c0, c1, result)`` for
        rows ``c0:c1`` of an item, ``result`` holding ``RESULT_KEYS`` arrays. Rows never yielded were not attempted:
        the budget ran out first (items are not even pulled from ``items`` once it has).

        Budget semantics are those of a sequential loop: a row budget of R scores the first R rows that have
        response tokens; a minutes budget stops between batches and leaves the rest of that chunk unscored. The
        planner counts the rows it hands over (``budget.planned_rows``), so running a chunk ahead never plans past R.
        """
        cfg = self.config
        budget = budget if budget is not None else Budget()
        budget.start()
        deadline = budget.deadline()

        def out_of_budget() -> bool:
            return budget.rows_to_plan() == 0 or (deadline is not None and time.monotonic() >= deadline)

        def plans() -> Iterator[tuple[Any, int, int, Plan]]:  # runs in the planner thread
            source = iter(items)
            while not out_of_budget():
                try:
                    tag, convs = next(source)
                except StopIteration:
                    return
                n, c0 = len(convs), 0
                while c0 < n:
                    if out_of_budget():
                        return
                    c1 = min(n, c0 + cfg.chunk_rows)
                    left = budget.rows_to_plan()
                    if left > 0:
                        c1 = min(c1, c0 + left)
                    t0 = time.perf_counter()
                    plan = build_plan(self.tokenizer, convs[c0:c1], cfg.max_tokens, cfg.score_end_token,
                                      renderer=self.renderer)  # fmt: skip
                    self.seconds["plan"] += time.perf_counter() - t0
                    budget.planned_rows += int((~plan.no_tokens).sum())
                    yield tag, c0, c1, plan
                    c0 = c1
                tag = convs = None  # let the item's text go before the next one is read

        ahead = _OneAhead(plans)
        try:
            t_wait = time.perf_counter()
            for tag, c0, c1, plan in ahead:
                self.seconds["wait"] += time.perf_counter() - t_wait
                if deadline is not None and time.monotonic() >= deadline:
                    break
                t0 = time.perf_counter()
                res = self._run_plan(plan, deadline)
                self.seconds["forward"] += time.perf_counter() - t0
                budget.spent_rows += int(res["scored"].sum())
                yield tag, c0, c1, res
                if not res["scored"][~plan.no_tokens].all():
                    break  # the minutes budget ran out inside this chunk
                t_wait = time.perf_counter()
        finally:
            ahead.close()
            budget.planned_rows = budget.spent_rows  # a chunk planned but never run gives its rows back

    def score(self, conversations, budget: Budget | None = None) -> dict[str, np.ndarray]:
        """Loss columns for each conversation (NaN / -1 where not scored) plus ``scored`` and ``attempted`` (bool).

        ``conversations``: a list of conversations (``[{"role", "content"}, ...]`` or None), or a lazy view with
        ``len()`` and slicing."""
        n = len(conversations)
        res = {
            "loss_response": np.full(n, np.nan),
            "loss_response_given_prompt": np.full(n, np.nan),
            "ifd": np.full(n, np.nan),
            "loss_tokens": np.full(n, -1, np.int64),
            "loss_truncated": np.zeros(n, bool),
            "scored": np.zeros(n, bool),
            "attempted": np.zeros(n, bool),
        }
        for _tag, c0, c1, got in self.score_chunks([(None, conversations)], budget):
            for k in RESULT_KEYS:
                res[k][c0:c1] = got[k]
        return res

    def manifest_info(self) -> dict:
        """What the manifest records about this scorer: model, device, the xent paths that ran, the render cache."""
        from engine.models.causal_lm import model_files
        from engine.models.fingerprint import fingerprint
        from kernels import xent as xent_mod

        return {
            "model": self.config.model,
            "fingerprint": fingerprint(model_files(self.config.model)),
            "device": str(self.device),
            "dtype": str(self.head.dtype).removeprefix("torch."),
            # device key ("cuda:0 NVIDIA H200 bfloat16") -> "triton" | "torch-chunked" | "triton-failed-check->..."
            "xent_paths_used": xent_mod.xent_paths_used(),
            "render": self.renderer.info(),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "prefix_tokens_reused": self.prefix_tokens_reused,
        }
