"""Batched, no-grad sequence scoring: the sum of response-token log-probs of many (prompt + response) sequences.

Used for reference log-probs (cached once, see `refcache.py`), for SeRA self-review (implicit reward of every
offline pair under the current policy) and for bootstrapping (implicit reward of generated samples).

Exactness contract: for every sequence the result equals what OpenRLHF 0.11.2's
`DPOTrainer._get_batch_logps` computes for it inside a training batch:

    loss_mask = attention_mask.clone().bool(); loss_mask[i, :prompt_len_i] = False; loss_mask = loss_mask[:, 1:]
    logp_sum  = (per_token_logps * loss_mask).sum(-1)          # per_token_logps: [B, L-1], token t+1 given <= t
    num_tokens = loss_mask.sum(-1)

i.e. the log-probs of tokens `prompt_len .. L-1` (response + EOS); with `prompt_len == 0` the first token is
excluded too, because nothing predicts it. Right padding + causal attention means padding never changes the
scores of real tokens, so batching is only a speed question: sequences are bucketed by length and packed so that
`batch_size * max_len <= max_tokens_per_batch`, and results come back in the caller's order.

This module imports only torch and tqdm; OpenRLHF actors are used duck-typed (`actor_logprob_fn`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, NonFiniteError

__all__ = [
    "SequenceItem",
    "ScoreResult",
    "LogprobFn",
    "hf_logprob_fn",
    "actor_logprob_fn",
    "score_sequences",
    "score_pairs",
    "plan_batches",
    "model_fingerprint",
]

# (input_ids LongTensor[B, L], attention_mask LongTensor[B, L]) -> FloatTensor[B, L-1]:
# log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t = 0 .. L-2 (values at padded positions are ignored).
LogprobFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# What the gather step exchanges: (dataset index, logp_sum, num_tokens) per locally scored item.
_LocalEntry = Tuple[int, float, int]
GatherFn = Callable[[List[_LocalEntry]], List[List[_LocalEntry]]]


class SequenceItem(NamedTuple):
    """One sequence to score.

    input_ids: LongTensor[L], 1-D, no padding: prompt tokens + response tokens (+ EOS), as OpenRLHF tokenizes.
    prompt_len: number of leading prompt tokens (OpenRLHF's `prompt_id_len`); they are not scored.
    """

    input_ids: torch.Tensor
    prompt_len: int


@dataclass
class ScoreResult:
    """Scores of N sequences, in the caller's order.

    logp_sum: Tensor[N] float64, sum of response-token log-probs (log pi(y|x)).
    num_tokens: LongTensor[N], number of scored response tokens (|y|, EOS included).
    """

    logp_sum: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def logp_mean(self) -> torch.Tensor:
        """Tensor[N] float64: mean per-token log-prob. NaN where num_tokens == 0 (as OpenRLHF's 0/0)."""
        return self.logp_sum / self.num_tokens.to(torch.float64)

    def __len__(self) -> int:
        return int(self.logp_sum.shape[0])

    def select(self, index) -> "ScoreResult":
        """Rows `index` (a slice, LongTensor or BoolTensor) as a new ScoreResult."""
        return ScoreResult(self.logp_sum[index], self.num_tokens[index])

    def clone(self) -> "ScoreResult":
        return ScoreResult(self.logp_sum.clone(), self.num_tokens.clone())


# --------------------------------------------------------------------------------------------------------------
# log-prob functions


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Same as openrlhf.models.Actor.forward: positions count real tokens only; padded slots get 1.
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return position_ids


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def hf_logprob_fn(model: torch.nn.Module, chunk_elems: int = 1 << 24) -> LogprobFn:
    """LogprobFn for a Hugging Face causal LM (anything returning `.logits` [B, L, V]).

    Inputs are moved to the model's device; position ids are built from the mask as OpenRLHF's Actor does.
    Log-probs are computed in float32 from the (possibly bf16) logits in slices of at most `chunk_elems` logits
    (default 16M = 64 MiB of float32), so no float32 copy of the whole [B, L, V] tensor is made.
    Put the model in eval() mode yourself (dropout would make scores random); this function does not change it.
    Returns FloatTensor[B, L-1] float32 on the model's device.
    """

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = _module_device(model)
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        logits = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=_position_ids(attention_mask),
            use_cache=False,
        ).logits[:, :-1]
        labels = input_ids[:, 1:]
        B, T, V = logits.shape
        out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
        if T == 0:
            return out
        # Slices: several whole rows when they fit the budget, else pieces of one row.
        rows = max(1, chunk_elems // max(1, T * V))
        cols = T if rows > 1 or T * V <= chunk_elems else max(1, chunk_elems // V)
        for r0 in range(0, B, rows):
            for c0 in range(0, T, cols):
                part = logits[r0 : r0 + rows, c0 : c0 + cols].float()
                picked = part.gather(-1, labels[r0 : r0 + rows, c0 : c0 + cols].unsqueeze(-1)).squeeze(-1)
                out[r0 : r0 + rows, c0 : c0 + cols] = picked - torch.logsumexp(part, dim=-1)
        return out

    return fn


def actor_logprob_fn(actor: Any, ring_attn_group: Any = None, device: Optional[torch.device] = None) -> LogprobFn:
    """LogprobFn for an `openrlhf.models.Actor` (duck-typed: no OpenRLHF import).

    Calls `actor(input_ids, attention_mask=mask, return_logprobs=True, ring_attn_group=...)`, which builds
    position ids from the mask (and handles `packing_samples`), exactly as DPOTrainer's forward does.
    `device`: where to put the inputs (default: the device of the actor's first parameter; under ZeRO-3 that is
    still the local GPU).
    """

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dev = device if device is not None else _module_device(actor)
        out = actor(
            input_ids.to(dev),
            attention_mask=attention_mask.to(dev),
            return_logprobs=True,
            ring_attn_group=ring_attn_group,
        )
        if isinstance(out, tuple):  # (log_probs, output) when an actor returns the output too
            out = out[0]
        return out

    return fn


# --------------------------------------------------------------------------------------------------------------
# the engine


def plan_batches(
    lengths: Sequence[int],
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 64,
    bucket: bool = True,
) -> List[List[int]]:
    """Split positions 0..n-1 into batches with `len(batch) * max_len(batch) <= max_tokens_per_batch`.

    bucket=True sorts by length, longest first (similar lengths share a batch, so little padding; the largest
    batch runs first, so an out-of-memory shows up at once). A single item longer than the budget forms its own
    batch. Returns lists of positions into `lengths`.
    """
    if max_tokens_per_batch < 1 or max_batch_size < 1:
        raise ConfigError(
            f"max_tokens_per_batch ({max_tokens_per_batch}) and max_batch_size ({max_batch_size}) must be >= 1"
        )
    order = list(range(len(lengths)))
    if bucket:
        order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    batches: List[List[int]] = []
    cur: List[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * new_max > max_tokens_per_batch):
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def _as_item(item: Any) -> SequenceItem:
    ids, prompt_len = item
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # accepts [L], [1, L] (RewardDataset) or a list
    return SequenceItem(ids, int(prompt_len))


def _default_gather(local: List[_LocalEntry]) -> List[List[_LocalEntry]]:
    import torch.distributed as dist

    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


@torch.no_grad()
def _score_batch(
    logprob_fn: LogprobFn, items: Sequence[SequenceItem], pad_token_id: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score one right-padded batch. Returns (logp_sum float64[B], num_tokens int64[B], finite bool[B]) on CPU."""
    lengths = [int(it.input_ids.shape[0]) for it in items]
    B, L = len(items), max(lengths)
    input_ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for row, (it, n) in enumerate(zip(items, lengths)):
        input_ids[row, :n] = it.input_ids
        attention_mask[row, :n] = 1
    # The _get_batch_logps mask, built on CPU from the known lengths.
    loss_mask = attention_mask.bool()
    for row, it in enumerate(items):
        loss_mask[row, : it.prompt_len] = False
    loss_mask = loss_mask[:, 1:]

    logps = logprob_fn(input_ids, attention_mask)
    if tuple(logps.shape) != (B, L - 1):
        raise ValueError(f"logprob_fn returned shape {tuple(logps.shape)}; expected [B, L-1] = [{B}, {L - 1}]")
    logps = logps.detach().to("cpu", torch.float64)
    # where() rather than multiply: a NaN at a padded slot must not leak into the sum (NaN * 0 = NaN).
    finite = (torch.isfinite(logps) | ~loss_mask).all(-1)
    logp_sum = torch.where(loss_mask, logps, torch.zeros((), dtype=torch.float64)).sum(-1)
    return logp_sum, loss_mask.sum(-1).long(), finite


def score_sequences(
    logprob_fn: LogprobFn,
    items: Sequence[SequenceItem],
    pad_token_id: int,
    *,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 64,
    bucket: bool = True,
    desc: str = "score",
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gather_fn: Optional[GatherFn] = None,
) -> ScoreResult:
    """Score N sequences; returns ScoreResult (logp_sum float64[N], num_tokens int64[N]) in `items` order.

    items: SequenceItem or (input_ids, prompt_len) tuples; input_ids LongTensor[L] (or [1, L]), no padding.
    Runs under no_grad; batches are right-padded with `pad_token_id` and packed per `plan_batches`.

    Data parallel (world_size > 1): this rank scores items rank, rank+W, rank+2W, ... (interleaved, so every
    rank gets a similar length mix) and `gather_fn(local_entries) -> [entries of rank 0, ..., rank W-1]`
    (default: torch.distributed.all_gather_object) gives every rank the full result. With ring attention or
    tensor parallelism pass the data-parallel rank and size: duplicate entries from ranks that share a data
    shard are tolerated. Every rank must call this (it is a collective when world_size > 1), and every rank
    runs the same number of forwards (ranks with fewer batches add 2-token dummy forwards), as ZeRO-3 requires.

    Raises NonFiniteError (on every rank, after the gather) if any sequence has a NaN/inf log-prob among its
    scored tokens.
    """
    items = [_as_item(it) for it in items]
    n = len(items)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size} is not a valid data-parallel position")
    lengths = [int(it.input_ids.shape[0]) for it in items]
    local_idx = list(range(rank, n, world_size))
    batches = plan_batches([lengths[i] for i in local_idx], max_tokens_per_batch, max_batch_size, bucket)
    # Every rank must run the same number of forwards: under ZeRO-3 each forward all-gathers parameters, so a
    # rank with fewer batches would leave the others hanging. Every rank holds all items, so each can plan the
    # other shards itself (no communication) and pad with throw-away forwards on a 2-token dummy.
    num_dummy = 0
    if world_size > 1:
        most = max(
            len(plan_batches(lengths[r::world_size], max_tokens_per_batch, max_batch_size, bucket))
            for r in range(world_size)
        )
        num_dummy = most - len(batches)

    local: List[_LocalEntry] = []
    bar = tqdm(total=len(local_idx), desc=desc, unit="seq", disable=not show_progress or rank != 0, leave=False)
    try:
        # no_grad, not inference_mode: inference tensors break DeepSpeed ZeRO-3's in-place parameter gathering.
        with torch.no_grad():
            for batch in batches:
                idx = [local_idx[p] for p in batch]
                s, t, ok = _score_batch(logprob_fn, [items[i] for i in idx], pad_token_id)
                s = torch.where(ok, s, torch.full_like(s, float("nan")))  # NaN marks a non-finite item
                local.extend(zip(idx, s.tolist(), t.tolist()))
                bar.update(len(idx))
            dummy = [SequenceItem(torch.full((2,), int(pad_token_id), dtype=torch.long), 1)]
            for _ in range(num_dummy):
                _score_batch(logprob_fn, dummy, pad_token_id)  # result discarded
    finally:
        bar.close()

    if world_size > 1:
        if gather_fn is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError(
                    f"score_sequences(world_size={world_size}) needs torch.distributed initialised or a gather_fn"
                )
            gather_fn = _default_gather
        per_rank = gather_fn(local)
    else:
        per_rank = [local]

    logp_sum = torch.full((n,), float("nan"), dtype=torch.float64)
    num_tokens = torch.full((n,), -1, dtype=torch.long)
    for entries in per_rank:
        for i, s, t in entries:
            logp_sum[i] = s
            num_tokens[i] = t
    missing = (num_tokens < 0).nonzero().flatten()
    if missing.numel():
        raise RuntimeError(
            f"score_sequences: {missing.numel()} of {n} items were scored by no rank (first: {int(missing[0])}); "
            f"rank/world_size ({rank}/{world_size}) do not match the gather group"
        )
    bad = (~torch.isfinite(logp_sum)).nonzero().flatten()
    if bad.numel():
        first = int(bad[0])
        raise NonFiniteError(
            f"{bad.numel()} of {n} sequences have non-finite log-probs (first: item {first}, "
            f"length {int(items[first].input_ids.shape[0])}, prompt_len {items[first].prompt_len}). "
            "The model's weights or activations overflowed; try float32/bfloat16 instead of float16, or check the "
            "checkpoint."
        )
    return ScoreResult(logp_sum, num_tokens)


def score_pairs(
    logprob_fn: LogprobFn,
    pairs: Sequence[Tuple[Any, Any, int]],
    pad_token_id: int,
    **kw: Any,
) -> Tuple[ScoreResult, ScoreResult]:
    """Score preference pairs `(chosen_ids, rejected_ids, prompt_len)`; returns (chosen, rejected) ScoreResults[N].

    One engine call over 2N sequences (chosen 0..N-1, then rejected 0..N-1), so bucketing mixes both sides.
    Keyword arguments go to `score_sequences`.
    """
    items = [SequenceItem(c, p) for c, _, p in pairs] + [SequenceItem(r, p) for _, r, p in pairs]
    res = score_sequences(logprob_fn, items, pad_token_id, **kw)
    n = len(pairs)
    return res.select(slice(0, n)).clone(), res.select(slice(n, 2 * n)).clone()


# --------------------------------------------------------------------------------------------------------------
# fingerprints

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file
_SAMPLES, _SAMPLE = 16, 1 << 16  # plus 16 x 64 KiB spread through the middle


def _hash_file_sampled(h: "hashlib._Hash", path: str, full: bool) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}\0{size}\0".encode())
    with open(path, "rb") as f:
        if full or size <= 2 * _EDGE + _SAMPLES * _SAMPLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        # Sampled: head + tail + evenly spaced middle blocks. A training step changes (nearly) every weight, so
        # this sees it; a change confined to one unsampled block would not be seen (use full=True for that).
        offsets = [0, size - _EDGE]
        offsets += [_EDGE + (size - 2 * _EDGE - _SAMPLE) * k // (_SAMPLES - 1) for k in range(_SAMPLES)]
        for off in sorted(offsets):
            f.seek(off)
            h.update(f.read(_EDGE if off in (0, size - _EDGE) else _SAMPLE))


def model_fingerprint(model_or_path: Any, extra: Optional[dict] = None, full: bool = False) -> str:
    """A sha256 hex digest that changes when the model's weights (or `extra` settings) change.

    - a directory (HF checkpoint): config.json's content + each weight file's name, size, first and last 1 MiB
      and 16 evenly spaced 64 KiB blocks (`full=True`: whole files). Fast on multi-GB checkpoints.
    - a Hub id (`org/name`, `gpt2`): resolved as transformers resolves it (sources.resolve_model), then hashed as
      the directory of its snapshot in the Hugging Face cache (fetched first when online and not cached).
    - a file: the same sampled hash of that file.
    - an nn.Module: every state_dict tensor's name, shape, dtype and bytes (use when no path exists; under
      ZeRO-3 gather the parameters first).
    `extra`: settings that change the numbers without changing the weights (dtype, attention implementation),
    mixed into the hash so that e.g. bf16 and fp32 reference scores never share a cache file.
    """
    h = hashlib.sha256()
    if isinstance(model_or_path, torch.nn.Module):
        h.update(b"sera-fp-module-v1\0")
        for name, t in sorted(model_or_path.state_dict().items()):
            t = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            from sera_openrlhf.sources import resolve_model

            try:
                path = resolve_model(path, "model path", download=True)
            except ConfigError:
                raise ConfigError(f"model path {path!r} does not exist, nor is it a Hub id in the Hugging Face "
                                  "cache; pass a local checkpoint directory, a cached Hub id or a module") from None
        if os.path.isdir(path):
            h.update(b"sera-fp-dir-v1\0")
            names = sorted(os.listdir(path))
            weights = [n for n in names if n.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, n))]
            if "config.json" not in names and not weights:
                raise ConfigError(f"{path}: no config.json and no weight files; not a model checkpoint")
            for name in ["config.json"] + weights:
                p = os.path.join(path, name)
                if os.path.isfile(p):
                    _hash_file_sampled(h, p, full)
        elif os.path.isfile(path):
            h.update(b"sera-fp-file-v1\0")
            _hash_file_sampled(h, path, full)
        else:
            raise ConfigError(f"model path {path!r} does not exist; pass a local checkpoint directory or a module")
    else:
        raise TypeError(f"model_fingerprint expects an nn.Module or a path, got {type(model_or_path).__name__}")
    if extra:
        h.update(b"\0extra\0" + repr(sorted((str(k), repr(v)) for k, v in extra.items())).encode())
    return h.hexdigest()
