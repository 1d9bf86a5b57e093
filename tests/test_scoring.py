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

    for r in (0, 1):  # each rank's local work, captured at its gather
        with pytest.raises(Captured):
            score_sequences(hf_logprob_fn(model), items, PAD, rank=r, gather_fn=capture(r), **kw)
    # interleaved shard: rank r scored items r, r+2, ...
    assert sorted(i for i, _, _ in captured[0]) == list(range(0, len(items), 2))
    assert sorted(i for i, _, _ in captured[1]) == list(range(1, len(items), 2))

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
        torch.testing.assert_close(res.logp_sum, single.logp_sum, atol=1e-5, rtol=0)
    # duplicated entries (ranks sharing a data shard, e.g. ring attention) are tolerated
    dup = score_sequences(
        hf_logprob_fn(model), items, PAD, rank=0, gather_fn=lambda l: [l, l, captured[1], captured[1]], **kw
    )
    assert torch.equal(dup.logp_sum, results[0].logp_sum)
    # a gather that loses a rank is an error, not silent NaNs
    with pytest.raises(RuntimeError, match="scored by no rank"):
        score_sequences(hf_logprob_fn(model), items, PAD, rank=0, gather_fn=lambda l: [l], **kw)


def test_ranks_with_fewer_batches_pad_with_dummy_forwards(model):
    # rank 0 gets the long items, rank 1 the short ones: 6 batches vs 1 without padding
    items = [SequenceItem(torch.arange(1, 41) if k % 2 == 0 else torch.arange(1, 5), 1) for k in range(12)]
    calls = []
    for r in (0, 1):
        fn = counting(hf_logprob_fn(model))
        local = {}

        def gather(entries):
            local[r] = entries
            return [entries, [(i, 0.0, 0) for i in range(1 - r, 12, 2)]]

        score_sequences(fn, items, PAD, max_tokens_per_batch=40, rank=r, world_size=2, gather_fn=gather,
                        show_progress=False)
        calls.append(fn.calls)
        assert len(local[r]) == 6  # dummy forwards add no entries
    assert len(calls[0]) == len(calls[1]) == 6
    assert calls[1].count((1, 2)) == 5  # five 2-token dummies


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
