"""The batched scoring engine equals a naive one-sequence-at-a-time computation and OpenRLHF's masking."""

import os

import pytest
import torch

from sera_openrlhf.errors import ConfigError, NonFiniteError
from tiny import tiny_llama
from sera_openrlhf.scoring import (
    ScoreResult,
    SequenceItem,
    actor_logprob_fn,
    hf_logprob_fn,
    model_fingerprint,
    plan_batches,
    score_pairs,
    score_sequences,
)

PAD = 0
VOCAB = 128


def tiny_model(seed=0):
    return tiny_llama(VOCAB, seed=seed, pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_items(n=13, seed=1, min_len=3, max_len=40):
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (L,), generator=g)
        # cover the edges: prompt_len 0 (first token unscored), 1, and L-1 (only the EOS scored)
        p = [0, 1, L - 1][k] if k < 3 else int(torch.randint(1, L, (1,), generator=g))
        items.append(SequenceItem(ids, p))
    return items


@torch.no_grad()
def naive_scores(model, items):
    """Reference: one sequence at a time, full forward, log_softmax, sum over response tokens."""
    sums, counts = [], []
    for ids, p in items:
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)  # [L, V]
        total, count = 0.0, 0
        for t in range(max(p, 1), len(ids)):  # token t predicted from position t-1
            total += float(logp[t - 1, ids[t]])
            count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def counting(fn):
    calls = []

    def wrapped(input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        return fn(input_ids, attention_mask)

    wrapped.calls = calls
    return wrapped


@pytest.fixture(scope="module")
def items_and_naive(model):
    items = make_items()
    return items, naive_scores(model, items)


@pytest.mark.parametrize(
    "max_tokens,bucket",
    [(1, True), (1, False), (120, True), (120, False), (100_000, True), (100_000, False)],
)
def test_engine_matches_naive(model, items_and_naive, max_tokens, bucket):
    items, (ref_sum, ref_n) = items_and_naive
    fn = counting(hf_logprob_fn(model))
    res = score_sequences(fn, items, PAD, max_tokens_per_batch=max_tokens, bucket=bucket, show_progress=False)
    assert res.logp_sum.dtype == torch.float64 and res.num_tokens.dtype == torch.long
    torch.testing.assert_close(res.logp_sum, ref_sum, atol=1e-5, rtol=0)
    assert torch.equal(res.num_tokens, ref_n)
    torch.testing.assert_close(res.logp_mean, ref_sum / ref_n, atol=1e-5, rtol=0)
    sizes = [b for b, _ in fn.calls]
    assert sum(sizes) == len(items)
    if max_tokens == 1:
        assert set(sizes) == {1}  # every item alone
    if max_tokens == 100_000:
        assert len(fn.calls) == 1  # all 13 fit in one batch (max_batch_size 64)
    assert all(b * L <= max(max_tokens, L) for b, L in fn.calls)


def test_two_ranks_in_process_give_identical_results(model, items_and_naive):
    items, (ref_sum, ref_n) = items_and_naive
    kw = dict(max_tokens_per_batch=64, show_progress=False, world_size=2)
    captured = {}

    class Captured(Exception):
        pass

    def capture(rank):
        def gather(local):
            captured[rank] = local
            raise Captured

        return gather

    for r in (0, 1):  # each rank's local work, captured at its gather (plain path: counting hides .packed)
        with pytest.raises(Captured):
            score_sequences(counting(hf_logprob_fn(model)), items, PAD, rank=r, gather_fn=capture(r), **kw)
    # whole batches of the one-process plan, dealt in turn: every item once, each rank a share
    mine = [sorted(i for i, _, _ in captured[r]) for r in (0, 1)]
    assert sorted(mine[0] + mine[1]) == list(range(len(items))) and mine[0] and mine[1]
    lengths = [int(it[0].shape[0]) if isinstance(it, tuple) else int(it.input_ids.shape[0]) for it in items]
    plan = plan_batches(lengths, 64)
    assert mine[0] == sorted(i for b in plan[0::2] for i in b) and mine[1] == sorted(i for b in plan[1::2] for i in b)

    results, forwards = [], []
    for r in (0, 1):
        def gather(local, r=r):
            assert local == captured[r]  # deterministic
            return [captured[0], captured[1]]

        fn = counting(hf_logprob_fn(model))
        results.append(score_sequences(fn, items, PAD, rank=r, gather_fn=gather, **kw))
        forwards.append(fn.calls)
    # same number of forwards on every rank (ZeRO-3 all-gathers parameters in each one)
    assert len(forwards[0]) == len(forwards[1])
    single = score_sequences(hf_logprob_fn(model), items, PAD, max_tokens_per_batch=64, show_progress=False)
    for res in results:
        assert torch.equal(res.logp_sum, results[0].logp_sum) and torch.equal(res.num_tokens, single.num_tokens)
        torch.testing.assert_close(res.logp_sum, ref_sum, atol=1e-5, rtol=0)
    # each sequence ran in the same batch as in one process (the plain path, like the ranks): the same numbers
    one = score_sequences(counting(hf_logprob_fn(model)), items, PAD, max_tokens_per_batch=64, show_progress=False)
    assert torch.equal(results[0].logp_sum, one.logp_sum)
    # duplicated entries (ranks sharing a data shard, e.g. ring attention) are tolerated
    dup = score_sequences(
        counting(hf_logprob_fn(model)), items, PAD, rank=0, gather_fn=lambda l: [l, l, captured[1], captured[1]],
        **kw
    )
    assert torch.equal(dup.logp_sum, results[0].logp_sum)
    # a gather that loses a rank is an error, not silent NaNs
    with pytest.raises(RuntimeError, match="scored by no rank"):
        score_sequences(hf_logprob_fn(model), items, PAD, rank=0, gather_fn=lambda l: [l], **kw)


def test_ranks_with_fewer_batches_pad_with_dummy_forwards(model):
    # 7 batches (6 long items alone, the 6 short ones together): rank 0 runs 4, rank 1 runs 3 and one dummy
    items = [SequenceItem(torch.arange(1, 41) if k % 2 == 0 else torch.arange(1, 5), 1) for k in range(12)]
    calls, local = [], {}
    for r in (0, 1):
        fn = counting(hf_logprob_fn(model))

        def gather(entries, r=r):
            local[r] = entries
            got = {i for i, _, _ in entries}
            return [entries, [(i, 0.0, 0) for i in range(12) if i not in got]]

        score_sequences(fn, items, PAD, max_tokens_per_batch=40, rank=r, world_size=2, gather_fn=gather,
                        show_progress=False)
        calls.append(fn.calls)
    assert sorted(i for i, _, _ in local[0]) == [0, 1, 3, 4, 5, 7, 8, 9, 11]  # dummy forwards add no entries
    assert sorted(i for i, _, _ in local[1]) == [2, 6, 10]
    assert len(calls[0]) == len(calls[1]) == 4
    assert calls[1].count((1, 2)) == 1 and calls[0].count((1, 2)) == 0  # one 2-token dummy


def test_world_size_without_dist_or_gather_is_config_error(model):
    with pytest.raises(ConfigError, match="gather_fn"):
        score_sequences(hf_logprob_fn(model), make_items(2), PAD, rank=0, world_size=2, show_progress=False)
    with pytest.raises(ConfigError):
        score_sequences(hf_logprob_fn(model), make_items(2), PAD, rank=2, world_size=2, show_progress=False)


def get_batch_logps(per_token_logps, attention_mask, prompt_id_lens):
    """OpenRLHF 0.11.2 DPOTrainer._get_batch_logps, verbatim logic."""
    loss_masks = attention_mask.clone().bool()
    for mask, source_len in zip(loss_masks, prompt_id_lens):
        mask[:source_len] = False
    loss_masks = loss_masks[:, 1:]
    logprobs_sums = (per_token_logps * loss_masks).sum(-1)
    logprobs_means = (per_token_logps * loss_masks).sum(-1) / loss_masks.sum(-1)
    return logprobs_sums, logprobs_means, loss_masks.sum(-1)


def test_masking_matches_openrlhf_get_batch_logps(model):
    items = make_items(6, seed=5)
    L = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for k, (ids, _) in enumerate(items):
        input_ids[k, : len(ids)] = ids
        mask[k, : len(ids)] = 1
    with torch.no_grad():
        logps = hf_logprob_fn(model)(input_ids, mask)  # one right-padded batch, as DPOTrainer sees it
    assert logps.shape == (len(items), L - 1)
    sums, means, lens = get_batch_logps(logps, mask, [p for _, p in items])
    res = score_sequences(hf_logprob_fn(model), items, PAD, max_tokens_per_batch=1, show_progress=False)
    torch.testing.assert_close(res.logp_sum, sums.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.logp_mean, means.double(), atol=1e-6, rtol=0)
    assert torch.equal(res.num_tokens, lens)


def test_plan_batches_budget_and_coverage():
    lengths = [5, 50, 7, 7, 30, 1, 12, 12, 12, 3]
    for bucket in (True, False):
        for budget, cap in [(1, 64), (24, 64), (40, 2), (10_000, 3)]:
            batches = plan_batches(lengths, budget, cap, bucket)
            assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
            for b in batches:
                assert len(b) <= cap
                assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    b = plan_batches(lengths, 24, 64, True)
    assert b[0] == [1] and b[1] == [4]  # longest first; the over-long ones alone
    flat = [lengths[i] for bb in b for i in bb]
    assert flat == sorted(flat, reverse=True)
    with pytest.raises(ConfigError):
        plan_batches(lengths, 0)


def test_overlong_single_item_is_scored_alone(model):
    items = make_items(4, seed=3, min_len=5, max_len=10) + [SequenceItem(torch.arange(1, 61), 20)]
    fn = counting(hf_logprob_fn(model))
    res = score_sequences(fn, items, PAD, max_tokens_per_batch=32, show_progress=False)
    assert (1, 60) in fn.calls
    ref_sum, ref_n = naive_scores(model, items)
    torch.testing.assert_close(res.logp_sum, ref_sum, atol=1e-5, rtol=0)
    assert int(res.num_tokens[-1]) == 40


def test_nonfinite_logprobs_raise_with_count_and_first_index():
    def fake(input_ids, attention_mask):
        # log-prob NaN wherever the predicted token is 7
        out = torch.full(input_ids[:, 1:].shape, -1.0)
        out[input_ids[:, 1:] == 7] = float("nan")
        return out

    ok = SequenceItem(torch.tensor([3, 4, 5, 6]), 1)
    bad = SequenceItem(torch.tensor([3, 4, 7, 6]), 1)
    in_prompt = SequenceItem(torch.tensor([3, 7, 5, 6]), 2)  # the 7 is a prompt token: not scored, no error
    items = [ok, in_prompt, ok, bad, ok, bad]
    with pytest.raises(NonFiniteError, match=r"2 of 6 sequences.*first: item 3"):
        score_sequences(fake, items, PAD, show_progress=False)
    res = score_sequences(fake, [ok, in_prompt], PAD, show_progress=False)
    assert res.logp_sum.tolist() == [-3.0, -2.0]

    def nan_on_padding(input_ids, attention_mask):
        out = torch.full(input_ids[:, 1:].shape, -1.0)
        out[attention_mask[:, 1:] == 0] = float("nan")
        return out

    res = score_sequences(nan_on_padding, [ok, SequenceItem(torch.arange(1, 10), 1)], PAD, show_progress=False)
    assert res.logp_sum.tolist() == [-3.0, -8.0]  # padded slots never reach the sum


def test_logprob_fn_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[B, L-1\]"):
        score_sequences(lambda i, m: torch.zeros(i.shape), make_items(2), PAD, show_progress=False)


def test_empty_input():
    res = score_sequences(lambda i, m: 1 / 0, [], PAD, show_progress=False)
    assert len(res) == 0 and res.logp_sum.dtype == torch.float64


def test_score_pairs_one_call_and_accepts_reward_dataset_shapes(model):
    items = make_items(8, seed=9)
    pairs = [(items[k].input_ids[None], items[k + 4].input_ids.tolist(), 2) for k in range(4)]  # [1,L] and list
    fn = counting(hf_logprob_fn(model))
    chosen, rejected = score_pairs(fn, pairs, PAD, max_tokens_per_batch=100_000, show_progress=False)
    assert len(fn.calls) == 1 and fn.calls[0][0] == 8
    flat = [SequenceItem(torch.as_tensor(c).reshape(-1), p) for c, _, p in pairs]
    flat += [SequenceItem(torch.as_tensor(r), p) for _, r, p in pairs]
    ref_sum, ref_n = naive_scores(model, flat)
    torch.testing.assert_close(chosen.logp_sum, ref_sum[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.logp_sum, ref_sum[4:], atol=1e-5, rtol=0)
    assert torch.equal(rejected.num_tokens, ref_n[4:])
    assert isinstance(chosen, ScoreResult)


def test_actor_logprob_fn_duck_typed(model):
    class FakeActor(torch.nn.Module):
        """Mimics openrlhf.models.Actor.forward(..., return_logprobs=True)."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner
            self.kwargs = []

        def forward(self, sequences, attention_mask=None, return_logprobs=False, ring_attn_group=None, **kw):
            self.kwargs.append(dict(return_logprobs=return_logprobs, ring_attn_group=ring_attn_group, **kw))
            return hf_logprob_fn(self.model)(sequences, attention_mask)

    actor = FakeActor(model)
    items = make_items(5, seed=4)
    res = score_sequences(actor_logprob_fn(actor, ring_attn_group="G"), items, PAD, show_progress=False)
    assert actor.kwargs and all(k == {"return_logprobs": True, "ring_attn_group": "G"} for k in actor.kwargs)
    torch.testing.assert_close(res.logp_sum, naive_scores(model, items)[0], atol=1e-5, rtol=0)


def test_fingerprint_module_and_directory(tmp_path):
    m = tiny_model(seed=0)
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(tiny_model(seed=0)) and len(fp) == 64
    assert model_fingerprint(m, extra={"dtype": "bf16"}) != fp
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(m) != fp

    def save(module, d):  # what save_pretrained writes, without its slow DeepSpeed-probing import path
        from safetensors.torch import save_file

        d.mkdir(exist_ok=True)
        module.config.to_json_file(d / "config.json")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, d / "model.safetensors")

    d = tmp_path / "ckpt"
    save(tiny_model(seed=0), d)
    fd = model_fingerprint(str(d))
    assert fd == model_fingerprint(d)  # PathLike too; nothing changed -> same
    os.utime(d / "config.json")  # touching does not change content
    assert model_fingerprint(d) == fd
    save(m, d)  # one weight differs
    assert model_fingerprint(d) != fd
    with pytest.raises(ConfigError):
        model_fingerprint(tmp_path / "missing")


def test_fingerprint_large_file_is_sampled(tmp_path):
    f = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(5 << 20))
    f.write_bytes(bytes(data))
    fp, fp_full = model_fingerprint(tmp_path), model_fingerprint(tmp_path, full=True)
    data[-10] ^= 0xFF  # a change in the last MiB is seen
    f.write_bytes(bytes(data))
    fp2 = model_fingerprint(tmp_path)
    assert fp2 != fp
    # documented trade-off: a lone change between the sampled middle blocks is seen only with full=True
    data[(1 << 20) + 100_000] ^= 0xFF
    f.write_bytes(bytes(data))
    assert model_fingerprint(tmp_path) == fp2
    assert model_fingerprint(tmp_path, full=True) not in (fp_full, fp2)


def test_hf_logprob_fn_chunking_is_exact(model):
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        full = hf_logprob_fn(model)(ids, mask)
        for elems in (1, 300, 128 * 16 * 2):  # one logit row at a time / pieces of a row / two whole rows
            assert torch.equal(hf_logprob_fn(model, chunk_elems=elems)(ids, mask), full)


# ---------------------------------------------------------------------------------------------------------------
# packed path: shared prompts, packed rows, LM head on scored positions only


def pair_items(n=6, seed=11):
    """Items of n pairs (chosen k, rejected k share their prompt) plus prompt_len 0 / 1 / L-1 edge items."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for _ in range(n):
        p = int(torch.randint(1, 12, (1,), generator=g))
        prompt = torch.randint(1, VOCAB, (p,), generator=g)
        for side in (chosen, rejected):
            resp = torch.randint(1, VOCAB, (int(torch.randint(0, 15, (1,), generator=g)),), generator=g)
            side.append(SequenceItem(torch.cat([prompt, resp]), p))
    return chosen + rejected + make_items(3, seed=seed)


def count_packed(fn):
    inner = fn.packed
    calls = []

    def wrapped(input_ids, *a):
        calls.append(tuple(input_ids.shape))
        return inner(input_ids, *a)

    for k in ("supports_4d", "model", "verified", "disabled"):
        setattr(wrapped, k, getattr(inner, k))
    fn.packed, wrapped.calls = wrapped, calls
    return fn


@pytest.mark.parametrize("max_tokens", [1, 48, 100_000])
@pytest.mark.parametrize("share,pack", [(True, True), (False, True), (True, False)])
def test_packed_path_matches_naive(model, max_tokens, share, pack):
    items = pair_items()
    fn = hf_logprob_fn(model)
    assert fn.packed.supports_4d  # sdpa
    res = score_sequences(fn, items, PAD, max_tokens_per_batch=max_tokens, share_prefix=share, pack=pack,
                          show_progress=False)
    assert fn.packed.verified is True and not fn.packed.disabled
    ref_sum, ref_n = naive_scores(model, items)
    torch.testing.assert_close(res.logp_sum, ref_sum, atol=1e-5, rtol=0)
    assert torch.equal(res.num_tokens, ref_n)


def test_packed_rows_share_prompts_and_fill_padding(model):
    items = pair_items(8)
    fn = count_packed(hf_logprob_fn(model))
    fn.packed.verified = True  # skip the self-check forwards in the count
    score_sequences(fn, items, PAD, max_tokens_per_batch=100_000, show_progress=False)
    slots = sum(b * L for b, L in fn.packed.calls)
    assert slots < sum(len(it.input_ids) for it in items)  # the 8 shared prompts run once


def test_packed_scores_do_not_depend_on_batch_composition(model):
    items = pair_items(5, seed=3)
    fn = hf_logprob_fn(model)
    alone = score_sequences(fn, items, PAD, max_tokens_per_batch=1, share_prefix=False, show_progress=False)
    together = score_sequences(fn, items, PAD, max_tokens_per_batch=100_000, show_progress=False)
    reordered = score_sequences(fn, items[::-1], PAD, max_tokens_per_batch=64, show_progress=False)
    torch.testing.assert_close(together.logp_sum, alone.logp_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.logp_sum.flip(0), alone.logp_sum, atol=1e-5, rtol=0)


def test_response_only_head_equals_full_forward(model):
    """PackedLogprobs on the scored positions == the full [B, L-1] log-probs of hf_logprob_fn there."""
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    with torch.no_grad():
        full = hf_logprob_fn(model, packed=False)(ids, mask)
    rows = torch.tensor([0, 0, 1, 2, 2])
    cols = torch.tensor([0, 15, 7, 3, 8])
    packed = hf_logprob_fn(model).packed
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = packed(ids, pos, mask.bool()[:, None, None, :] & torch.ones(17, 17, dtype=torch.bool).tril(), rows, cols,
                 ids[rows, cols + 1])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full[rows, cols], atol=1e-5, rtol=0)
    packed.chunk_elems = 1  # one logit row at a time: the same numbers
    torch.testing.assert_close(packed(ids, pos, mask[:, None, None, :].bool() & torch.ones(17, 17).tril().bool(),
                                      rows, cols, ids[rows, cols + 1]), got, atol=0, rtol=0)


def test_bf16_model_accumulates_in_float32():
    m16 = tiny_model().to(torch.bfloat16)
    items = pair_items(4, seed=5)
    fn = hf_logprob_fn(m16)
    res = score_sequences(fn, items, PAD, max_tokens_per_batch=1, share_prefix=False, show_progress=False)
    assert res.logp_sum.dtype == torch.float64
    # reference: the same bf16 logits, upcast to float32 before log_softmax, summed in float64
    ref = []
    with torch.no_grad():
        for ids, p in items:
            logp = torch.log_softmax(m16(ids[None]).logits[0].float(), -1)
            t = torch.arange(max(p, 1), len(ids))
            ref.append(logp[t - 1, ids[t]].double().sum())
    torch.testing.assert_close(res.logp_sum, torch.stack(ref), atol=2e-3, rtol=1e-4)
    ids = items[0].input_ids[None]
    out = fn.packed(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids), torch.tensor([0]),
                    torch.tensor([0]), ids[0, 1:2])
    assert out.dtype == torch.float32


def test_eager_attention_uses_an_additive_4d_mask():
    m = tiny_llama(VOCAB, seed=0, pad_token_id=PAD, attn_implementation="eager")
    fn = hf_logprob_fn(m)
    assert fn.packed.supports_4d and fn.packed.attn_impl == "eager"
    items = pair_items(4, seed=6)
    res = score_sequences(fn, items, PAD, max_tokens_per_batch=100_000, show_progress=False)
    torch.testing.assert_close(res.logp_sum, naive_scores(m, items)[0], atol=1e-5, rtol=0)


def test_self_check_failure_falls_back_to_plain_forward(model):
    fn = hf_logprob_fn(model)
    torch.manual_seed(0)
    fn.packed.head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=False)  # not the model's logits
    items = pair_items(3)
    with pytest.warns(RuntimeWarning, match="packed scoring path disagrees"):
        res = score_sequences(fn, items, PAD, show_progress=False)
    assert fn.packed.disabled
    torch.testing.assert_close(res.logp_sum, naive_scores(model, items)[0], atol=1e-5, rtol=0)


def test_packed_two_ranks_run_equal_forwards_and_match_single(model):
    items = pair_items(7) + [SequenceItem(torch.arange(1, 41), 3)]
    single = score_sequences(hf_logprob_fn(model), items, PAD, max_tokens_per_batch=40, show_progress=False)
    local, forwards = {}, {}
    for r in (0, 1):
        fn = count_packed(hf_logprob_fn(model))
        fn.packed.verified = True

        def gather(entries, r=r):
            local[r] = entries
            return [entries]

        with pytest.raises(RuntimeError, match="scored by no rank"):  # the other rank's entries are not here
            score_sequences(fn, items, PAD, max_tokens_per_batch=40, rank=r, world_size=2, gather_fn=gather,
                            show_progress=False)
        forwards[r] = fn.packed.calls
    assert len(forwards[0]) == len(forwards[1])
    both = score_sequences(hf_logprob_fn(model), items, PAD, max_tokens_per_batch=40, rank=0, world_size=2,
                           gather_fn=lambda e: [local[0], local[1]], show_progress=False)
    assert torch.equal(both.logp_sum, single.logp_sum)  # the same packed rows as one process: the same numbers


def test_actor_logprob_fn_packed_only_when_equivalent(model):
    class Actor(torch.nn.Module):
        def __init__(self, inner, **attrs):
            super().__init__()
            self.model = inner
            self.__dict__.update(attrs)

        def forward(self, sequences, attention_mask=None, return_logprobs=False, ring_attn_group=None):
            return hf_logprob_fn(self.model, packed=False)(sequences, attention_mask)

    assert hasattr(actor_logprob_fn(Actor(model)), "packed")
    assert not hasattr(actor_logprob_fn(Actor(model), ring_attn_group="G"), "packed")
    assert not hasattr(actor_logprob_fn(Actor(model, temperature=0.7)), "packed")
    assert not hasattr(actor_logprob_fn(Actor(model, packing_samples=True)), "packed")
    items = pair_items(3)
    res = score_sequences(actor_logprob_fn(Actor(model)), items, PAD, show_progress=False)
    torch.testing.assert_close(res.logp_sum, naive_scores(model, items)[0], atol=1e-5, rtol=0)


def test_plan_rows_covers_every_group_within_budget():
    from sera_openrlhf.scoring import _best_plan, _plan_rows

    lengths = [5, 50, 7, 7, 30, 1, 12, 12, 12, 3, 25, 25]
    sizes = [2, 1, 2, 2, 1, 1, 2, 2, 2, 1, 2, 2]
    for budget, cap in [(1, 64), (24, 64), (60, 3), (10_000, 5), (10_000, 64)]:
        for plan in (_plan_rows(lengths, sizes, budget, cap, True),
                     _best_plan(lengths, sizes, budget, cap, True, 0.01)):
            assert sorted(g for b in plan for row in b for g in row) == list(range(len(lengths)))
            for b in plan:
                L = max(sum(lengths[g] for g in row) for row in b)
                assert L == max(lengths[g] for row in b for g in row)  # rows never exceed the longest group
                assert len(b) == 1 or len(b) * L <= budget
                n = sum(sizes[g] for row in b for g in row)
                assert n <= cap or sum(len(row) for row in b) == 1
    assert _plan_rows([10, 4, 6, 3, 3], [1] * 5, 30, 64, True) == [[[0], [2, 1], [3, 4]]]


@pytest.mark.parametrize("cfg, slides", [({"sliding_window": 16}, True), ({"sliding_window": None}, False),
                                          ({"sliding_window": 16, "use_sliding_window": False}, False),
                                          ({"sliding_window": 16, "layer_types": ["full_attention"] * 2}, False),
                                          ({"sliding_window": 16, "layer_types": ["sliding_attention",
                                                                                  "full_attention"]}, True)])
def test_sliding_window_models_get_no_custom_4d_mask(model, cfg, slides):
    """transformers uses a 4-D mask as given, so a sliding window would be silently lost: such models score one
    sequence per row with a 2-D mask (transformers then builds the window itself)."""
    from types import SimpleNamespace

    from sera_openrlhf.scoring import PackedLogprobs

    m = torch.nn.Module()
    m.config = SimpleNamespace(_attn_implementation="sdpa", **cfg)
    assert PackedLogprobs(m, model.model, model.lm_head).supports_4d is (not slides)


def test_prompt_groups_respect_the_token_and_sequence_limits():
    from sera_openrlhf.scoring import _make_groups

    prompt = torch.arange(1, 11)
    items = [SequenceItem(torch.cat([prompt, torch.full((5,), 7 + k)]), 10) for k in range(6)]  # one prompt, 6x
    assert [len(g.items) for g in _make_groups(items, True)] == [6]
    by_tokens = _make_groups(items, True, max_tokens=25)  # prompt 10 + 3 responses of 5
    assert [len(g.items) for g in by_tokens] == [3, 3] and max(g.length for g in by_tokens) == 25
    assert [len(g.items) for g in _make_groups(items, True, max_items=4)] == [4, 2]


def test_self_check_waits_for_an_informative_item_and_survives_a_failing_body(model):
    fn = hf_logprob_fn(model)
    no_prompt = [SequenceItem(torch.arange(1, 9), 0)]
    score_sequences(fn, no_prompt, PAD, show_progress=False)
    assert fn.packed.verified is None and not fn.packed.disabled  # nothing to compare yet: checked next time

    def broken(**kw):
        raise TypeError("this body does not take a 4-D mask")

    fn.packed.body = broken
    items = pair_items(2)
    with pytest.warns(RuntimeWarning, match="packed scoring path failed"):
        res = score_sequences(fn, items, PAD, show_progress=False)
    assert fn.packed.disabled
    torch.testing.assert_close(res.logp_sum, naive_scores(model, items)[0], atol=1e-5, rtol=0)
