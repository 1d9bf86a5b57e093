"""Reference log-prob cache: computed once, invalidated by data or model changes, corruption detected."""

import os

import pytest
import torch

from sera_openrlhf.errors import DataError, StateError
from sera_openrlhf.refcache import ReferenceCache, content_hash
from tiny import tiny_llama
from sera_openrlhf.scoring import hf_logprob_fn, model_fingerprint, score_pairs

PAD = 0
VOCAB = 128


def tiny_model(seed=0):
    return tiny_llama(VOCAB, seed=seed, pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def fp(model):
    return model_fingerprint(model)


def make_pairs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p = int(torch.randint(2, 8, (1,), generator=g))
        c = torch.randint(1, VOCAB, (p + int(torch.randint(2, 20, (1,), generator=g)),), generator=g)
        r = torch.cat([c[:p], torch.randint(1, VOCAB, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g)])
        pairs.append((c, r, p))
    return pairs


class Counting:
    """Wraps a LogprobFn and counts forward calls and scored sequences."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, input_ids, attention_mask):
        self.calls += 1
        self.rows += input_ids.shape[0]
        return self.fn(input_ids, attention_mask)


KW = dict(show_progress=False, max_tokens_per_batch=256)


def test_second_ensure_runs_no_forward_and_reload_is_exact(tmp_path, model, fp):
    pairs, ids = make_pairs(), [f"ex{k}" for k in range(7)]
    fn = Counting(hf_logprob_fn(model))
    cache = ReferenceCache(tmp_path, fp)
    chosen, rejected = cache.ensure(ids, pairs, fn, PAD, **KW)
    assert fn.rows == 14 and cache.num_computed == 7 and len(cache) == 7
    direct_c, direct_r = score_pairs(hf_logprob_fn(model), pairs, PAD, **KW)  # packed path: equal within fp
    torch.testing.assert_close(chosen, direct_c.logp_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, direct_r.logp_sum, atol=1e-5, rtol=0)
    assert os.path.exists(cache.path) and os.path.basename(cache.path) == f"ref_logps-{fp[:16]}.pt"

    calls = fn.calls
    c2, r2 = cache.ensure(ids, pairs, fn, PAD, **KW)
    assert fn.calls == calls and cache.num_computed == 0
    assert torch.equal(c2, chosen) and torch.equal(r2, rejected)

    reloaded = ReferenceCache(tmp_path, fp)  # a new process / resumed run
    perm = [3, 0, 6, 1, 5, 2, 4]
    c3, r3 = reloaded.ensure([ids[k] for k in perm], [pairs[k] for k in perm], fn, PAD, **KW)
    assert fn.calls == calls
    assert torch.equal(c3, chosen[perm]) and torch.equal(r3, rejected[perm])  # bit-exact, caller's order
    entry = reloaded.entries["ex0"]
    assert entry[3] == direct_c.num_tokens[0] and entry[4] == direct_r.num_tokens[0]


def test_changed_pair_recomputes_only_that_pair(tmp_path, model, fp):
    pairs, ids = make_pairs(), list(range(7))  # int ids
    fn = Counting(hf_logprob_fn(model))
    cache = ReferenceCache(tmp_path, fp)
    chosen, rejected = cache.ensure(torch.tensor(ids), pairs, fn, PAD, **KW)  # ids as a collated tensor
    c, r, p = pairs[4]
    r = r.clone()
    r[-1] = (r[-1] + 1) % VOCAB
    pairs[4] = (c, r, p)
    fn.rows = 0
    c2, r2 = cache.ensure(ids, pairs, fn, PAD, **KW)
    assert cache.num_computed == 1 and fn.rows == 2
    keep = [k for k in range(7) if k != 4]
    assert torch.equal(c2[keep], chosen[keep]) and torch.equal(r2[keep], rejected[keep])
    assert r2[4] != rejected[4]
    # prompt length alone is part of the content
    assert content_hash(c, r, p) != content_hash(c, r, p + 1)
    assert content_hash(c, r, p) == content_hash(c[None], r.tolist(), p)


def test_lookup_misses(tmp_path, model, fp):
    pairs = make_pairs(3)
    cache = ReferenceCache(tmp_path, fp)
    cache.ensure(["a", "b", "c"], pairs, hf_logprob_fn(model), PAD, **KW)
    hashes = [content_hash(*p) for p in pairs]
    hit, c, r = cache.lookup(["a", "zzz", "c", "b"], [hashes[0], hashes[1], "stale", hashes[1]])
    assert hit.tolist() == [True, False, False, True]
    assert torch.isnan(c[1]) and torch.isnan(r[2]) and torch.isfinite(c[[0, 3]]).all()


def test_changed_model_uses_a_new_file(tmp_path, model, fp):
    pairs, ids = make_pairs(4), list(range(4))
    ReferenceCache(tmp_path, fp).ensure(ids, pairs, hf_logprob_fn(model), PAD, **KW)
    other = tiny_model(seed=1)
    fp2 = model_fingerprint(other)
    assert fp2 != fp
    fn = Counting(hf_logprob_fn(other))
    cache2 = ReferenceCache(tmp_path, fp2)
    assert len(cache2) == 0 and cache2.path != ReferenceCache(tmp_path, fp).path
    cache2.ensure(ids, pairs, fn, PAD, **KW)
    assert fn.rows == 8
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 2


def test_fingerprint_inside_file_is_checked(tmp_path, fp):
    cache = ReferenceCache(tmp_path, fp)
    cache.entries["x"] = ("h", -1.0, -2.0, 3, 4)
    cache.save()
    same_prefix = fp[:16] + "0" * 48
    with pytest.raises(StateError, match="belongs to model fingerprint"):
        ReferenceCache(tmp_path, same_prefix)


def flip_bytes(path, offset=200, n=4):
    data = bytearray(open(path, "rb").read())
    for k in range(offset, offset + n):
        data[k] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_corrupt_file_raises_with_path(tmp_path, model, fp):
    pairs, ids = make_pairs(4), list(range(4))
    good_c, _ = ReferenceCache(tmp_path, fp).ensure(ids, pairs, hf_logprob_fn(model), PAD, **KW)
    path = ReferenceCache(tmp_path, fp).path
    flip_bytes(path)
    with pytest.raises(StateError) as e:
        ReferenceCache(tmp_path, fp)
    assert path in str(e.value) and "sha256" in str(e.value)
    os.remove(path)  # what the message says: deleting it recomputes
    fn = Counting(hf_logprob_fn(model))
    c, _ = ReferenceCache(tmp_path, fp).ensure(ids, pairs, fn, PAD, **KW)
    assert fn.rows == 8 and torch.equal(c, good_c)
    assert len(ReferenceCache(tmp_path, fp)) == 4  # rewritten, verifies again

    os.remove(path + ".sha256")
    with pytest.raises(StateError, match="checksum file"):
        ReferenceCache(tmp_path, fp)


def test_unloadable_content_with_valid_checksum_is_corrupt(tmp_path, fp):
    cache = ReferenceCache(tmp_path, fp)
    open(cache.path, "wb").write(b"not a torch file")
    from sera_openrlhf.fileio import sha256_file

    open(cache.checksum_path, "w").write(sha256_file(cache.path) + "  x\n")
    with pytest.raises(StateError, match="cannot load it"):
        ReferenceCache(tmp_path, fp)


def test_loads_with_weights_only(tmp_path, model, fp, monkeypatch):
    ReferenceCache(tmp_path, fp).ensure([1, 2], make_pairs(2), hf_logprob_fn(model), PAD, **KW)
    seen = []
    real_load = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    assert len(ReferenceCache(tmp_path, fp)) == 2
    assert seen == [True]
    blob = real_load(ReferenceCache(tmp_path, fp).path, weights_only=True)  # plain tensors / lists only
    assert blob["ids"] == [1, 2] and blob["chosen_logp"].dtype == torch.float64


def test_kill_between_checksum_and_swap_leaves_a_loadable_cache(tmp_path, model, fp, monkeypatch):
    pairs = make_pairs(3)
    cache = ReferenceCache(tmp_path, fp)
    before, _ = cache.ensure([0, 1], pairs[:2], hf_logprob_fn(model), PAD, **KW)

    real_replace = os.replace

    def killed(src, dst):  # "kill" the process at the swap of the .pt itself
        if os.fspath(dst) == cache.path:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    # the sidecar now accepts old and new; the .pt swap is killed
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure([0, 1, 2], pairs, hf_logprob_fn(model), PAD, **KW)
    monkeypatch.undo()
    assert len(open(cache.checksum_path).read().splitlines()) == 2
    old = ReferenceCache(tmp_path, fp)
    assert len(old) == 2 and torch.equal(old.lookup([0, 1], [content_hash(*p) for p in pairs[:2]])[1], before)


def test_save_every_and_writer_flag(tmp_path, model, fp):
    pairs, ids = make_pairs(5), list(range(5))
    fn = Counting(hf_logprob_fn(model))
    reader = ReferenceCache(tmp_path, fp, writer=False)
    reader.ensure(ids, pairs, fn, PAD, **KW)
    assert not os.path.exists(reader.path) and len(reader) == 5
    cache = ReferenceCache(tmp_path, fp)
    fn.calls = 0
    cache.ensure(ids, pairs, fn, PAD, save_every=2, **KW)
    assert fn.calls >= 3  # 3 chunks of <= 2 pairs, each saved
    assert len(ReferenceCache(tmp_path, fp)) == 5


def test_duplicate_id_with_different_content_is_rejected(tmp_path, model, fp):
    pairs = make_pairs(2)
    cache = ReferenceCache(tmp_path, fp)
    with pytest.raises(DataError, match="appears twice"):
        cache.ensure([7, 7], pairs, hf_logprob_fn(model), PAD, **KW)
    fn = Counting(hf_logprob_fn(model))
    c, _ = cache.ensure([7, 7], [pairs[0], pairs[0]], fn, PAD, **KW)  # same content twice: scored once
    assert fn.rows == 2 and c[0] == c[1]


def test_the_same_pair_under_other_ids_is_scored_once(tmp_path, model, fp):
    """--sera.train_pairs repeats pairs under new ids (`<id>#2`): their tokens are scored once, in the same call
    and in later calls, and every id reads the same values."""
    pairs = make_pairs(4)
    fn = Counting(hf_logprob_fn(model))
    cache = ReferenceCache(tmp_path, fp)
    ids = ["a", "b", "c", "d", "a#2", "c#2"]
    chosen, rejected = cache.ensure(ids, pairs + [pairs[0], pairs[2]], fn, PAD, **KW)
    assert cache.num_computed == 4 and fn.rows == 8 and len(cache) == 6
    assert chosen[4] == chosen[0] and rejected[5] == rejected[2]
    c2, _ = cache.ensure(["b#2", "d#3"], [pairs[1], pairs[3]], fn, PAD, **KW)
    assert cache.num_computed == 0 and fn.rows == 8 and torch.equal(c2, chosen[[1, 3]])
    assert ReferenceCache(tmp_path, fp).entries["c#2"] == cache.entries["c"]  # saved with the copies
