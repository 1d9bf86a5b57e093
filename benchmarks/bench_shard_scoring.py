"""Do sharded scores depend on the number of data-parallel ranks? The same HH pairs scored with world size 1, 2 and
4 (the ranks run one after another in this process, each with its own shard, as `score_sequences` plans them),
and every sequence scored alone (one unpadded forward each, the reference), in fp32 and bf16, on the packed path
(shared prompts, packed rows) and the plain path (right-padded batches, the path ZeRO-3 takes).

What it separates: a bug in padding or position ids shows in fp32 (where kernel rounding is ~1e-7 relative);
kernel order / reduction blocking shows as a difference that is at rounding level in fp32 and grows in bf16.

    python benchmarks/bench_shard_scoring.py --model .cache/sera/models/SmolLM2-135M-Instruct --pairs 48 --dtypes fp32
    python benchmarks/bench_shard_scoring.py --model .cache/sera/models/SmolLM2-135M-Instruct --pairs 8 --max-len 256 \
        --dtypes bf16 --paths packed
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from bench_scoring import hh_pairs, load  # noqa: E402

from sera_openrlhf.scoring import SequenceItem, hf_logprob_fn, score_sequences  # noqa: E402


def sharded(fn, items, pad, world: int, kw) -> torch.Tensor:
    """float64[N]: each rank's shard scored by its own call, merged as the gather would."""
    if world == 1:
        return score_sequences(fn, items, pad, show_progress=False, **kw).logp_sum
    merged = torch.full((len(items),), float("nan"), dtype=torch.float64)
    for rank in range(world):
        mine = {}

        def gather(local, rank=rank):
            mine["entries"] = local
            got = {i for i, _, _ in local}  # the other ranks' entries: placeholders, discarded
            return [local, [(i, 0.0, 0) for i in range(len(items)) if i not in got]]

        score_sequences(fn, items, pad, rank=rank, world_size=world, gather_fn=gather, show_progress=False, **kw)
        for i, s, _ in mine["entries"]:
            merged[i] = s
    return merged


@torch.no_grad()
def alone(model, items) -> torch.Tensor:
    """float64[N]: one forward per sequence, no padding, no packing (logits upcast to float32)."""
    out = []
    for it in items:
        ids = it.input_ids[None]
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(logp[max(it.prompt_len, 1) - 1 :].double().sum())
    return torch.stack(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_rel": float((d / b.abs()).max()), "max_abs_nats": float(d.max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16", help="bf16 is emulated (slow) on CPUs without bf16 matmul")
    ap.add_argument("--paths", default="packed,plain")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, model, tok = load(a.model)
    pairs = hh_pairs(tok, a.pairs, a.max_len)
    items = [SequenceItem(c, p) for c, _, p in pairs] + [SequenceItem(r, p) for _, r, p in pairs]
    kw = dict(max_tokens_per_batch=a.tokens_per_batch, max_batch_size=64)
    result = {"model": a.model, "sequences": len(items), "mean_tokens": sum(len(i.input_ids) for i in items) / len(items)}
    for name in a.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        m = model.to(dtype)
        ref = alone(m, items)
        for path in a.paths.split(","):
            fn = hf_logprob_fn(m, packed=path == "packed")
            scores = {w: sharded(fn, items, tok.pad_token_id, w, kw) for w in (1, 2, 4)}
            row = {f"world{w}_vs_alone": rel(s, ref) for w, s in scores.items()}
            row.update({f"world{w}_vs_world1": rel(scores[w], scores[1]) for w in (2, 4)})
            result[f"{name}/{path}"] = row
            print(json.dumps({f"{name}/{path}": row}), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
