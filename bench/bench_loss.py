"""Per-sample LM losses (IFD) on real Alpaca rows with SmolLM2-135M-Instruct: winnow vs the batch-size-1 loop.

The anchor is what Cherry LLM and Superfiltering run: for every row, one forward per sequence (the response given
the prompt, then the response alone), ``model(ids).logits`` over the whole sequence, ``cross_entropy(reduction=
"none")`` and a mean over the response positions. winnow scores the same sequences (same model object, same
tokenisation, same ``max_tokens`` truncation, both built by ``engine.models.lm_scorer.build_plan`` inside the timed region) in
length-sorted batches under a token budget, with the backbone only and ``kernels.xent`` on the response positions.
Both paths run in this process on the same rows, alternating over groups of ``--group`` rows; the JSON line reports
rows/s of each, the ratio and the largest relative difference of the per-row losses.

    .venv/bin/python bench/bench_loss.py --rows 2000
    .venv/bin/python bench/bench_loss.py --rows 200   # with a shared 2-core CPU

``--render-only`` times the chat-template step alone (no model, SmolLM2's tokenizer): the per-row jinja render
(``engine.models.chat_template.render``, what every row paid before the shape cache) against ``ChatRenderer``, on the
texts ``build_plan`` renders (each conversation, and each response alone), and checks they are equal:

    .venv/bin/python bench/bench_loss.py --render-only --rows 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from bench._common import SHARED_DATA, append_result, print_json
from engine.models.chat_template import ChatRenderer, render
from engine.models.lm_scorer import LossScorer, build_plan
from engine.stages.loss import LossConfig


def alpaca_conversations(rows: int, seed: int) -> list[list[dict]]:
    import pyarrow.parquet as pq

    path = SHARED_DATA / "alpaca_52k" / "train.parquet"
    if not path.exists():
        sys.exit(f"{path} is absent: this benchmark needs ../shared/data (see its README.md)")
    t = pq.read_table(path, columns=["instruction", "input", "output"]).to_pydict()
    pick = np.random.default_rng(seed).choice(len(t["instruction"]), size=rows, replace=False)
    convs = []
    for i in pick:
        # engine.io.schema's alpaca prompt: instruction, plus "\n\n" + input when there is one.
        prompt = t["instruction"][i] + ("\n\n" + t["input"][i] if t["input"][i] else "")
        convs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": t["output"][i]}])
    return convs


@torch.inference_mode()
def batch_size_one(model, tokenizer, convs, cfg: LossConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cherry / Superfiltering's loop: one sequence per forward, full logits, cross_entropy, mean over the response."""
    plan = build_plan(tokenizer, convs, cfg.max_tokens, cfg.score_end_token)
    sums = np.zeros(2 * len(convs))
    counts = np.zeros(2 * len(convs), np.int64)
    for s in plan.sequences:
        ids = torch.from_numpy(s.ids)[None]
        logits = model(input_ids=ids).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        sums[s.segment] += float(nll[torch.from_numpy(s.positions - 1)].double().sum())
        counts[s.segment] += len(s.positions)
    with np.errstate(invalid="ignore"):
        return sums[0::2] / counts[0::2], sums[1::2] / counts[1::2]


def render_only(args) -> None:
    """Per-row template rendering vs the shape cache, on the texts build_plan renders."""
    from engine.models.causal_lm import SMOLLM2, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2)
    convs = alpaca_conversations(args.rows, args.seed)
    work = [x for c in convs for x in (c, [m for m in c if m["role"] == "assistant"])]
    t0 = time.perf_counter()
    want = [render(tokenizer, c) for c in work]
    old_s = time.perf_counter() - t0
    renderer = ChatRenderer(tokenizer)
    t0 = time.perf_counter()
    got = [renderer.render(c) for c in work]
    new_s = time.perf_counter() - t0
    equal = got == want
    n = len(work)
    append_result("loss_render", "jinja_per_row", n, "renders_per_s", n / old_s)
    append_result("loss_render", "shape_cache", n, "renders_per_s", n / new_s)
    append_result("loss_render", "shape_cache", n, "speedup_vs_per_row", old_s / new_s)
    print(f"{args.rows} alpaca_52k rows, {n} renders (conversation + response alone), SmolLM2-135M-Instruct template")
    print(f"  jinja per row  {old_s:8.3f} s  {n / old_s:10.0f} renders/s")
    print(f"  shape cache    {new_s:8.3f} s  {n / new_s:10.0f} renders/s   ({old_s / new_s:.1f}x), equal: {equal}")
    print_json({"op": "loss_render", "rows": args.rows, "renders": n, "per_row_s": round(old_s, 4),
                "shape_cache_s": round(new_s, 4), "speedup": round(old_s / new_s, 2), "equal": equal,
                **renderer.info()})  # fmt: skip
    if not equal:
        sys.exit("the shape cache rendered differently from the per-row template")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000, help="Alpaca rows to score (default 2000)")
    ap.add_argument("--max-tokens", type=int, default=512, help="tokens per sequence, both paths (default 512)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="winnow's padded tokens per batch (default 8192)")
    ap.add_argument("--group", type=int, default=100, help="rows per alternation between the two paths (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render-only", action="store_true", help="time the chat-template step alone (no model)")
    args = ap.parse_args()
    if args.render_only:
        return render_only(args)
    cfg = LossConfig(max_tokens=args.max_tokens, batch_tokens=args.batch_tokens, device="cpu")
    convs = alpaca_conversations(args.rows, args.seed)
    t0 = time.perf_counter()
    scorer = LossScorer(cfg)
    load_s = time.perf_counter() - t0

    # The CPU is shared: the two paths alternate over groups of rows (and alternate which goes first), so a burst
    # of load from other processes lands on both rather than on whichever ran during it.
    parts, base_c, base_a = [], [], []
    ours_s = base_s = 0.0
    for g, g0 in enumerate(range(0, len(convs), args.group)):
        group = convs[g0 : g0 + args.group]
        for who in (0, 1) if g % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            if who == 0:
                parts.append(scorer.score(group))
                ours_s += time.perf_counter() - t0
            else:
                c, a = batch_size_one(scorer.model, scorer.tokenizer, group, cfg)
                base_s += time.perf_counter() - t0
                base_c.append(c)
                base_a.append(a)
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    base_c, base_a = np.concatenate(base_c), np.concatenate(base_a)

    ok = res["scored"]
    rel = lambda a, b: np.abs(a[ok] - b[ok]) / np.abs(b[ok])
    max_rel = float(max(rel(res["loss_response_given_prompt"], base_c).max(), rel(res["loss_response"], base_a).max()))
    n = args.rows
    ratio = base_s / ours_s
    tokens = int(res["loss_tokens"][ok].sum())
    append_result("loss_cpu", "bs1_logits_loop", n, "rows_per_s", n / base_s)
    append_result("loss_cpu", "winnow", n, "rows_per_s", n / ours_s)
    append_result("loss_cpu", "winnow", n, "speedup_vs_bs1", ratio)
    append_result("loss_cpu", "winnow", n, "max_rel_diff", max_rel)
    print(
        f"{n} alpaca_52k rows, SmolLM2-135M-Instruct float32 CPU ({torch.get_num_threads()} threads), "
        f"max_tokens={args.max_tokens}, model load {load_s:.1f} s"
    )
    print(f"  batch-size-1 loop  {base_s:8.1f} s  {n / base_s:6.2f} rows/s")
    print(f"  winnow             {ours_s:8.1f} s  {n / ours_s:6.2f} rows/s   ({ratio:.2f}x)")
    print(
        f"  scored {int(ok.sum())}, truncated {int(res['loss_truncated'].sum())}, response tokens {tokens}, "
        f"median IFD {float(np.nanmedian(res['ifd'])):.3f}, max relative difference {max_rel:.2e}"
    )
    print_json(
        {
            "op": "loss_cpu",
            "rows": n,
            "max_tokens": args.max_tokens,
            "batch_tokens": args.batch_tokens,
            "bs1_s": round(base_s, 2),
            "winnow_s": round(ours_s, 2),
            "speedup": round(ratio, 3),
            "bs1_rows_per_s": round(n / base_s, 3),
            "winnow_rows_per_s": round(n / ours_s, 3),
            "scored": int(ok.sum()),
            "truncated": int(res["loss_truncated"].sum()),
            "response_tokens": tokens,
            "median_ifd": round(float(np.nanmedian(res["ifd"])), 4),
            "max_rel_diff": max_rel,
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
