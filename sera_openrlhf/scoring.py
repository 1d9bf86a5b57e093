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

import bisect
import hashlib
import os
import warnings
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
    "add_counts",
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
    per_rank: sequences each gathered rank scored in the call that produced this result (one entry per
    `gather_fn` position, i.e. per global rank with the default gather; [N] in one process). Not kept by
    `select` / `clone`.
    """

    logp_sum: torch.Tensor
    num_tokens: torch.Tensor
    per_rank: Optional[List[int]] = None

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


def add_counts(a: Optional[List[int]], b: Optional[List[int]]) -> Optional[List[int]]:
    """Element-wise sum of two per-rank counts (None: nothing counted yet)."""
    if a is None or b is None:
        return b if a is None else a
    return [x + y for x, y in zip(a, b)]


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


def hf_logprob_fn(model: torch.nn.Module, chunk_elems: int = 1 << 24, packed: bool = True) -> LogprobFn:
    """LogprobFn for a Hugging Face causal LM (anything returning `.logits` [B, L, V]).

    packed=True (default) also attaches `fn.packed` (a `PackedLogprobs`) when the model's logits are plainly
    `lm_head(body)`, which `score_sequences` then uses: prompts shared by several sequences run once, sequences
    are packed into rows without padding, and the LM head / log-softmax run only on the scored positions.

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

    parts = _plain_head_model(model) if packed else None
    if parts is not None:
        fn.packed = PackedLogprobs(model, *parts)
    return fn


def actor_logprob_fn(
    actor: Any, ring_attn_group: Any = None, device: Optional[torch.device] = None, packed: bool = True
) -> LogprobFn:
    """LogprobFn for an `openrlhf.models.Actor` (duck-typed: no OpenRLHF import).

    Calls `actor(input_ids, attention_mask=mask, return_logprobs=True, ring_attn_group=...)`, which builds
    position ids from the mask (and handles `packing_samples`), exactly as DPOTrainer's forward does.
    `device`: where to put the inputs (default: the device of the actor's first parameter; under ZeRO-3 that is
    still the local GPU).

    packed=True attaches `fn.packed` (see `hf_logprob_fn`) on the actor's inner Hugging Face model when that is
    equivalent to the actor's forward: no sample packing, no ring attention, temperature 1, not a VLM, not
    ZeRO-3, and plain `lm_head(body)` logits. `score_sequences` checks it once against the forward above.
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

    inner = getattr(actor, "model", None)
    inner = getattr(inner, "module", inner)  # a DeepSpeed engine wraps the HF model
    if (
        packed
        and device is None
        and ring_attn_group is None
        and not getattr(actor, "packing_samples", False)
        and not getattr(actor, "is_vlm", False)
        and float(getattr(actor, "temperature", 1.0)) == 1.0
        and inner is not None
    ):
        parts = _plain_head_model(inner)
        if parts is not None:
            fn.packed = PackedLogprobs(inner, *parts)
    return fn


# --------------------------------------------------------------------------------------------------------------
# packed scoring: shared prompts, packed rows, LM head on scored positions only


def _zero3(module: torch.nn.Module) -> bool:
    # DeepSpeed ZeRO-3 partitions parameters (they carry ds_id); their submodules must be called through the
    # engine's hooks, so the packed path (which calls the body and the head separately) is not used there.
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _plain_head_model(model: Any) -> Optional[Tuple[torch.nn.Module, torch.nn.Module]]:
    """(body, lm_head) when `model` is a Hugging Face causal LM whose logits are exactly `lm_head(body(x)[0])`
    (no soft-capping / logit scaling), else None."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        return None
    try:
        head = model.get_output_embeddings()
    except Exception:
        return None
    body = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    cfg = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, name, None):
            return None
    if getattr(cfg, "logits_scaling", 1.0) not in (None, 1, 1.0):
        return None
    if _zero3(model):
        return None
    return body, head


def _slides(cfg: Any) -> bool:
    """Whether some attention layer of this config uses a sliding window (Mistral, Gemma 2/3, Qwen2 with
    use_sliding_window, Phi-3 ...)."""
    if not getattr(cfg, "sliding_window", None):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    return getattr(cfg, "use_sliding_window", True) is not False


class PackedLogprobs:
    """The model half of the engine's packed path, attached to a LogprobFn as `fn.packed`.

    `__call__(input_ids [R, L], position_ids [R, L], attention_mask, rows [N], cols [N], labels [N])` runs the
    body once and returns float32[N]: log p(labels[k] | hidden state at (rows[k], cols[k])). The LM head and the
    log-softmax run only on those N positions, in chunks of at most `chunk_elems` logits, in float32 (bf16 logits
    are upcast first, as OpenRLHF's Actor does). attention_mask: bool [R, 1, L, L] (True = attend) when
    `supports_4d`, else a 2-D padding mask [R, L] (one sequence per row, causal).
    `disabled` is set by the engine when its one-time self-check against the plain forward fails.
    """

    def __init__(self, model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module,
                 chunk_elems: int = 1 << 22) -> None:
        self.model, self.body, self.head = model, body, head
        self.chunk_elems = int(chunk_elems)
        cfg = getattr(model, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        self.attn_impl = impl
        # A 4-D mask is used as given, so transformers would not build a sliding-window mask: models with any
        # sliding-window layer get one sequence per row with a 2-D mask instead.
        self.supports_4d = impl in ("sdpa", "eager") and not _slides(cfg)
        self.verified: Optional[bool] = None  # None: not yet checked
        self.disabled = False

    def __call__(self, input_ids, position_ids, attention_mask, rows, cols, labels, grad: bool = False
                 ) -> torch.Tensor:
        device = _module_device(self.model)
        with torch.inference_mode(not grad):
            mask = attention_mask.to(device)
            if mask.dim() == 4 and self.attn_impl == "eager":  # eager adds the mask to the scores
                dtype = next(self.model.parameters()).dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
                    ~mask, torch.finfo(dtype).min)
            hidden = self.body(
                input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids.to(device),
                use_cache=False,
            )[0]
            h = hidden[rows.to(device), cols.to(device)]  # [N, d]: only the positions that predict scored tokens
            del hidden
            labels = labels.to(device)
            step = max(1, self.chunk_elems // max(1, int(self.head.out_features)))
            parts = []
            for c0 in range(0, int(h.shape[0]), step):
                logits = self.head(h[c0 : c0 + step]).float()
                picked = logits.gather(-1, labels[c0 : c0 + step, None]).squeeze(-1)
                parts.append(picked - torch.logsumexp(logits, dim=-1))
                del logits
            out = torch.cat(parts) if parts else torch.zeros((0,), dtype=torch.float32, device=device)
        return out if grad else out.clone()  # clone: a normal tensor, usable outside inference mode


class _Group(NamedTuple):
    items: List[int]  # positions into the engine's item list, sharing their first `prefix` tokens
    prefix: int  # shared prefix length (0: none; the item's whole sequence is its own suffix)
    length: int  # tokens in one packed row: prefix + every item's suffix


def _make_groups(items: Sequence[SequenceItem], share_prefix: bool, max_tokens: int = 1 << 62,
                 max_items: int = 1 << 62) -> List[_Group]:
    """Items with identical prompt tokens (prompt_len >= 1, e.g. a pair's chosen and rejected) form one group,
    scored as prompt + suffix 1 + suffix 2 ... in one row, while the row stays within `max_tokens` and
    `max_items` sequences (then the next such item opens a new group); every other item is a group of its own."""
    groups: List[_Group] = []
    index: dict = {}
    for i, it in enumerate(items):
        n = int(it.input_ids.shape[0])
        p = min(int(it.prompt_len), n)
        if share_prefix and p >= 1:
            key = (p, it.input_ids[:p].numpy().tobytes())
            k = index.get(key)
            if k is not None and (groups[k].length + n - p > max_tokens or len(groups[k].items) >= max_items):
                k = None  # full: this item starts the prompt's next group
            if k is not None:
                g = groups[k]
                g.items.append(i)
                groups[k] = g._replace(length=g.length + n - p)
                continue
            index[key] = len(groups)
            groups.append(_Group([i], p, n))
        else:
            groups.append(_Group([i], 0, n))
    return groups


def _plan_rows(
    lengths: Sequence[int], sizes: Sequence[int], max_tokens: int, max_batch_size: int, pack: bool
) -> List[List[List[int]]]:
    """Batches of rows of group positions. A batch's row length L is its longest group; it has at most
    max(1, max_tokens // L) rows and `max_batch_size` sequences (`sizes`: sequences per group). pack=True
    fills each row's tail with the largest remaining groups that fit (no padding where a group fits)."""
    if max_tokens < 1 or max_batch_size < 1:
        raise ConfigError(
            f"max_tokens_per_batch ({max_tokens}) and max_batch_size ({max_batch_size}) must be >= 1"
        )
    if not pack:
        return [[[g] for g in b] for b in plan_batches(lengths, max_tokens, max_batch_size, True)]
    # remaining groups sorted by (length, -position): the last is the longest (first seen among equals)
    rem = sorted(range(len(lengths)), key=lambda g: (lengths[g], -g))
    rem_len = [lengths[g] for g in rem]
    batches: List[List[List[int]]] = []
    while rem:
        L = rem_len[-1]
        max_rows = max(1, max_tokens // max(1, L))
        rows: List[List[int]] = []
        seqs = 0
        full = False
        while rem and len(rows) < max_rows and not full:
            row: List[int] = []
            free = L
            while rem:
                j = bisect.bisect_right(rem_len, free) - 1
                if j < 0:
                    break
                g = rem[j]
                if seqs + sizes[g] > max_batch_size and (rows or row):
                    full = True
                    break
                rem.pop(j)
                rem_len.pop(j)
                row.append(g)
                free -= lengths[g]
                seqs += sizes[g]
            if row:
                rows.append(row)
        batches.append(rows)
    return batches


def _best_plan(lengths: Sequence[int], sizes: Sequence[int], max_tokens: int, max_batch_size: int, pack: bool,
               attn_coef: float = 0.0, forward_cost: int = 32) -> List[List[List[int]]]:
    """`_plan_rows` under the token budget that minimises the modelled cost: every row slot computed (padding
    included) costs 1 + attn_coef * L (attention grows with the row length L; attn_coef ~ 1 / (6 * hidden)), and
    each forward `forward_cost` slots. Smaller budgets split a wide length spread into batches of similar
    lengths (less padding); larger ones amortise per-forward overhead. Deterministic: every rank plans the
    same batches."""
    best, best_cost = None, float("inf")
    longest = max(lengths, default=1)
    budget = max_tokens
    while True:
        batches = _plan_rows(lengths, sizes, budget, max_batch_size, pack)
        cost = 0.0
        for rows in batches:
            L = max(sum(lengths[g] for g in row) for row in rows)
            cost += len(rows) * L * (1 + attn_coef * L) + forward_cost
        if cost < best_cost:
            best, best_cost = batches, cost
        if budget <= longest or budget <= 1:
            break
        budget //= 2
    return best


def _build_packed(items: Sequence[SequenceItem], groups: Sequence[_Group], rows: List[List[int]],
                  pad_token_id: int, four_d: bool):
    """Tensors of one packed batch: (input_ids, position_ids, mask, rows, cols, labels, owner [N] -> position
    of the scored token's item in `batch_items`, batch_items)."""
    L = max(sum(groups[g].length for g in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, L), int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    gid = torch.full((R, L), -1, dtype=torch.long)
    seg = torch.zeros((R, L), dtype=torch.long)
    t_rows, t_cols, t_labels, t_owner, batch_items = [], [], [], [], []
    k = 0
    for r, row in enumerate(rows):
        o = 0
        for g in row:
            grp = groups[g]
            P = grp.prefix
            first = items[grp.items[0]].input_ids
            input_ids[r, o : o + P] = first[:P]
            position_ids[r, o : o + P] = torch.arange(P)
            gid[r, o : o + grp.length] = k
            s = o + P
            for j, i in enumerate(grp.items):
                ids = items[i].input_ids
                n = int(ids.shape[0])
                input_ids[r, s : s + n - P] = ids[P:]
                position_ids[r, s : s + n - P] = torch.arange(P, n)
                seg[r, s : s + n - P] = j + 1
                t = torch.arange(max(int(items[i].prompt_len), 1), n)  # scored tokens (the _get_batch_logps mask)
                if t.numel():
                    prev = t - 1
                    t_cols.append(torch.where(prev < P, o + prev, s + prev - P))
                    t_rows.append(torch.full_like(t, r))
                    t_labels.append(ids[t])
                    t_owner.append(torch.full_like(t, len(batch_items)))
                batch_items.append(i)
                s += n - P
            o += grp.length
            k += 1
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros((0,), dtype=torch.long)  # noqa: E731
    if four_d:
        causal = torch.ones((L, L), dtype=torch.bool).tril_()
        same = gid[:, :, None] == gid[:, None, :]
        seg_ok = (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])
        mask = (causal & same & seg_ok) | torch.eye(L, dtype=torch.bool)  # padding attends to itself: no NaN rows
        mask = mask[:, None]
    else:
        mask = (gid >= 0).long()
    return input_ids, position_ids, mask, cat(t_rows), cat(t_cols), cat(t_labels), cat(t_owner), batch_items


def _score_packed_batch(packed: PackedLogprobs, items, groups, rows, pad_token_id):
    """(batch_items, logp_sum float64[B], num_tokens int64[B]); a non-finite item has a NaN sum."""
    ids, pos, mask, r, c, lab, owner, batch_items = _build_packed(items, groups, rows, pad_token_id,
                                                                  packed.supports_4d)
    lp = packed(ids, pos, mask, r, c, lab).detach().to("cpu", torch.float64)
    if tuple(lp.shape) != (int(lab.shape[0]),):
        raise ValueError(f"packed log-prob function returned shape {tuple(lp.shape)}; expected [{lab.shape[0]}]")
    B = len(batch_items)
    sums = torch.zeros((B,), dtype=torch.float64).index_add_(0, owner, lp)
    counts = torch.zeros((B,), dtype=torch.long).index_add_(0, owner, torch.ones_like(owner))
    return batch_items, sums, counts


def packed_train_logps(packed: PackedLogprobs, items: Sequence[SequenceItem], pad_token_id: int
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logp_sum float32[N], num_tokens int64[N]) of `items` in order, carrying gradients: the packed layout for a
    training step. Items sharing their prompt tokens (a pair's chosen and rejected) share one row and one
    forward of the prompt; one group per row; the LM head runs on the scored positions only. The summed log-probs
    and their gradients equal a plain per-sequence forward's up to float rounding."""
    groups = _make_groups(items, packed.supports_4d)
    ids, pos, mask, r, c, lab, owner, batch_items = _build_packed(
        items, groups, [[g] for g in range(len(groups))], pad_token_id, packed.supports_4d)
    lp = packed(ids, pos, mask, r, c, lab, grad=True)
    item = torch.tensor(batch_items, dtype=torch.long)[owner].to(lp.device)
    n = len(items)
    sums = torch.zeros((n,), dtype=lp.dtype, device=lp.device).index_add(0, item, lp)
    return sums, torch.bincount(item, minlength=n)


def packed_usable(packed: PackedLogprobs, logprob_fn: LogprobFn, items: Sequence[SequenceItem], pad_token_id: int,
                  share_prefix: bool = True) -> bool:
    """Whether to take the packed path for `items` (scoring and --sera.packed_train). The first informative call
    checks it against `logprob_fn` (the model's plain forward); a disagreement disables it for good, with a
    warning."""
    if not packed.disabled and packed.verified is None and items:
        with torch.no_grad():
            packed.verified = _self_check(packed, logprob_fn, items, pad_token_id, share_prefix)
        if packed.verified is False:
            packed.disabled = True
            warnings.warn("the packed scoring path disagrees with the model's plain forward (unusual logits head "
                          "or attention masking?); using the plain forward", RuntimeWarning)
    return not packed.disabled


def _self_check(packed: PackedLogprobs, logprob_fn: LogprobFn, items: Sequence[SequenceItem], pad_token_id: int,
                share_prefix: bool) -> bool:
    """Once per packed function: the packed path (prompt shared by two responses in one row) must equal the
    plain forward on a short real item. Guards against models whose logits are not lm_head(body) or which
    ignore custom masks."""
    cand = [it for it in items if 1 <= it.prompt_len <= int(it.input_ids.shape[0]) - 2]
    if not cand:
        return None  # nothing informative to check yet: check on the next call
    it = max(cand, key=lambda x: int(x.input_ids.shape[0]))  # the longest: position effects show there
    p = it.prompt_len
    twin = SequenceItem(torch.cat([it.input_ids[:p], it.input_ids[p:].flip(0)]), p)
    test = [it, twin]
    groups = _make_groups(test, share_prefix and packed.supports_4d)
    rows = [[g] for g in range(len(groups))] if not packed.supports_4d else [list(range(len(groups)))]
    try:
        got, fast, n_tok = _score_packed_batch(packed, test, groups, rows, pad_token_id)
    except Exception as e:  # a body that rejects a 4-D mask or position ids, a wrapper whose base_model has a head
        warnings.warn(f"score_sequences: the packed scoring path failed on this model ({type(e).__name__}: {e})",
                      RuntimeWarning)
        return False
    order = [got.index(0), got.index(1)]
    fast, n_tok = fast[order], n_tok[order].double().clamp(min=1)
    slow, _, _ = _score_batch(logprob_fn, test, pad_token_id)
    # compared per scored token: a tolerance on the sum would grow with the length and hide a real disagreement
    low = next(packed.model.parameters()).dtype in (torch.float16, torch.bfloat16)
    return bool((((fast - slow).abs() / n_tok) <= (2e-2 if low else 1e-3)).all())


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


def _deal(batches: list, rank: int, world_size: int) -> Tuple[list, int]:
    """(this rank's batches, dummy forwards it adds): batch j goes to rank j mod W. Batches come longest first,
    so dealing them in turn balances the ranks' work. Every rank must run the same number of forwards (under
    ZeRO-3 each forward all-gathers parameters, so a rank with fewer would leave the others hanging): ranks with
    one batch fewer run a throw-away forward on a 2-token dummy."""
    mine = batches[rank::world_size]
    return mine, -(-len(batches) // world_size) - len(mine)


def _run_plain(logprob_fn, items, pad_token_id, max_tokens_per_batch, max_batch_size, bucket, rank, world_size,
               desc, show_progress) -> List[_LocalEntry]:
    lengths = [int(it.input_ids.shape[0]) for it in items]
    # One plan for all items, whole batches dealt to the ranks: a sequence is scored in the same batch (same
    # padding, same kernels) whatever the world size, so the scores do not depend on it (see _deal).
    batches, num_dummy = _deal(plan_batches(lengths, max_tokens_per_batch, max_batch_size, bucket), rank,
                               world_size)

    local: List[_LocalEntry] = []
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="seq", disable=not show_progress or rank != 0, leave=False)
    try:
        # no_grad, not inference_mode: inference tensors break DeepSpeed ZeRO-3's in-place parameter gathering.
        with torch.no_grad():
            for idx in batches:
                s, t, ok = _score_batch(logprob_fn, [items[i] for i in idx], pad_token_id)
                s = torch.where(ok, s, torch.full_like(s, float("nan")))  # NaN marks a non-finite item
                local.extend(zip(idx, s.tolist(), t.tolist()))
                bar.update(len(idx))
            dummy = [SequenceItem(torch.full((2,), int(pad_token_id), dtype=torch.long), 1)]
            for _ in range(num_dummy):
                _score_batch(logprob_fn, dummy, pad_token_id)  # result discarded
    finally:
        bar.close()

    return local


def _run_packed(packed, items, pad_token_id, max_tokens_per_batch, max_batch_size, share_prefix, pack, rank,
                world_size, desc, show_progress) -> List[_LocalEntry]:
    four_d = packed.supports_4d
    groups = _make_groups(items, share_prefix and four_d, max_tokens_per_batch, max_batch_size)
    glens = [g.length for g in groups]
    gsizes = [len(g.items) for g in groups]

    hidden = getattr(getattr(packed.model, "config", None), "hidden_size", None)
    attn_coef = 1.0 / (6 * hidden) if isinstance(hidden, int) and hidden > 0 else 0.0

    # one plan for all groups, whole batches dealt to the ranks (see _run_plain)
    plan = _best_plan(glens, gsizes, max_tokens_per_batch, max_batch_size, pack and four_d, attn_coef)
    batches, num_dummy = _deal(plan, rank, world_size)
    local: List[_LocalEntry] = []
    total = sum(gsizes[g] for rows in batches for row in rows for g in row)
    bar = tqdm(total=total, desc=desc, unit="seq", disable=not show_progress or rank != 0, leave=False)
    try:
        with torch.no_grad():
            for rows in batches:
                idx, s, t = _score_packed_batch(packed, items, groups, rows, pad_token_id)
                s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
                local.extend(zip(idx, s.tolist(), t.tolist()))
                bar.update(len(idx))
            dummy = [SequenceItem(torch.full((2,), int(pad_token_id), dtype=torch.long), 1)]
            for _ in range(num_dummy):
                _score_packed_batch(packed, dummy, [_Group([0], 0, 2)], [[0]], pad_token_id)  # discarded
    finally:
        bar.close()
    return local


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
    share_prefix: bool = True,
    pack: bool = True,
) -> ScoreResult:
    """Score N sequences; returns ScoreResult (logp_sum float64[N], num_tokens int64[N]) in `items` order.

    items: SequenceItem or (input_ids, prompt_len) tuples; input_ids LongTensor[L] (or [1, L]), no padding.

    Packed path (when `logprob_fn.packed` exists, as `hf_logprob_fn` / `actor_logprob_fn` attach it, and
    bucket=True): items whose prompt tokens are identical (a pair's chosen and rejected) share one copy of the
    prompt in a row, prompt + response 1 + response 2, with an attention mask that hides response 1 from
    response 2 and position ids that restart after the prompt (share_prefix); such groups, longest first, are
    packed into rows of the batch's longest group, shorter groups filling the tails (pack), with at most
    `max_tokens_per_batch` row tokens and `max_batch_size` sequences per batch; the LM head and log-softmax run
    only on the scored positions, in float32. The first use of a packed function checks it once against the
    plain forward on a short item and falls back (with a warning) when they differ.
    Plain path (any other LogprobFn): right-padded batches per `plan_batches`, full [B, L-1] log-probs.
    Either way the results equal a plain per-sequence forward within floating-point tolerance, whatever the
    batch composition.

    Data parallel (world_size > 1): the batches are planned once over all items, as one process would, and
    dealt whole, batch j to rank j mod W (longest first, so the ranks' work is similar), so every sequence is
    scored in the same batch, with the same padding and kernels, and gets the same numbers whatever the world
    size; a rank with no batch idles (lower the batch sizes to spread small jobs).
    `gather_fn(local_entries) -> [entries of rank 0, ..., rank W-1]`
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
    packed = getattr(logprob_fn, "packed", None) if bucket else None
    if packed is not None and packed_usable(packed, logprob_fn, items, pad_token_id, share_prefix):
        local = _run_packed(packed, items, pad_token_id, max_tokens_per_batch, max_batch_size, share_prefix, pack,
                            rank, world_size, desc, show_progress)
    else:
        local = _run_plain(logprob_fn, items, pad_token_id, max_tokens_per_batch, max_batch_size, bucket, rank,
                           world_size, desc, show_progress)

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
    return ScoreResult(logp_sum, num_tokens, [len(entries) for entries in per_rank])


def score_pairs(
    logprob_fn: LogprobFn,
    pairs: Sequence[Tuple[Any, Any, int]],
    pad_token_id: int,
    **kw: Any,
) -> Tuple[ScoreResult, ScoreResult]:
    """Score preference pairs `(chosen_ids, rejected_ids, prompt_len)`; returns (chosen, rejected) ScoreResults[N].

    One engine call over 2N sequences (chosen 0..N-1, then rejected 0..N-1), so bucketing mixes both sides; both
    results carry that call's `per_rank`. Keyword arguments go to `score_sequences`.
    """
    items = [SequenceItem(c, p) for c, _, p in pairs] + [SequenceItem(r, p) for _, r, p in pairs]
    res = score_sequences(logprob_fn, items, pad_token_id, **kw)
    n = len(pairs)
    chosen, rejected = res.select(slice(0, n)).clone(), res.select(slice(n, 2 * n)).clone()
    chosen.per_rank = rejected.per_rank = res.per_rank  # sequences per rank of the whole call (both sides)
    return chosen, rejected


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
