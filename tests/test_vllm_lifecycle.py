"""The vLLM paths with the engines replaced by fakes (vLLM and Ray need GPUs): the in-process engine's lifecycle
per generation phase, OpenRLHF's Ray engines (dispatch, per-request seeds, weight sync), and the backend wiring;
plus the shared run-directory check of multi-node runs (two gloo processes)."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import tiny

from sera_openrlhf.errors import ConfigError
from sera_openrlhf.generation import GenerationConfig, request_seed

from sera_openrlhf.openrlhf_adapter import compat  # noqa: E402

compat.apply()  # OpenRLHF on CPU (flash_attn stand-in) before the adapter modules import it
from sera_openrlhf.openrlhf_adapter import generate as gen_mod  # noqa: E402
from sera_openrlhf.openrlhf_adapter.vllm_engines import EnginePool, RayVLLMEngines  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def completion(token_ids, reason="stop"):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=token_ids, finish_reason=reason)])


def args_for(**sera):
    s = dict(generation_backend="vllm", vllm_tensor_parallel_size=1, vllm_gpu_memory_utilization=0.5,
             vllm_engines=0, trust_remote_code=False, max_new_tokens=6)
    s.update(sera)
    return SimpleNamespace(sera=SimpleNamespace(**s), ds=SimpleNamespace(param_dtype="bf16", zero_stage=2),
                           data=SimpleNamespace(max_len=64), train=SimpleNamespace(seed=1))


def one_process():
    return SimpleNamespace(_sera_dp_layout=(0, 1, [0]), is_rank_0=lambda: True)


@pytest.fixture
def fake_vllm(monkeypatch, tok):
    """A `vllm` module whose LLM records its life in `events`; memory.release and the free-memory probe too."""
    events, engines = [], []

    class LLM:
        def __init__(self, **kwargs):
            events.append("create")
            self.kwargs, self.params = kwargs, []
            self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: events.append("shutdown")))
            engines.append(self)

        def generate(self, prompts, params):
            events.append("generate")
            self.params += params
            return [completion([40 + p["seed"] % 50, tok.eos_token_id]) for p in params]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.destroy_model_parallel = lambda: events.append("destroy_model_parallel")
    for name, mod in (("vllm", vllm), ("vllm.distributed", types.ModuleType("vllm.distributed")),
                      ("vllm.distributed.parallel_state", state)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(gen_mod.memory, "release", lambda: events.append("release"))
    monkeypatch.setattr(gen_mod, "free_gpu_share", lambda: 0.3)
    monkeypatch.setattr(gen_mod, "format_prompt", lambda args, tokenizer, p: p)  # no OpenRLHF preprocessing
    monkeypatch.setattr(gen_mod, "load_hf_tokenizer", lambda args, path: tok)
    return SimpleNamespace(events=events, engines=engines)


def test_engine_per_phase_released_built_destroyed_in_order(fake_vllm):
    args, cfg = args_for(), GenerationConfig(num_samples=2, max_new_tokens=6, seed=9)
    prompts, keys = ["good day", "the cat"], ["a", "b"]
    for phase in range(2):  # two generation phases (e.g. the fluency floor, then iteration 2)
        samples, per_rank = gen_mod.generate_samples(args, one_process(), f"/policy{phase}", prompts, cfg, keys)
        assert per_rank == [2] and [len(row) for row in samples] == [2, 2]
    one_phase = ["release", "create", "generate", "shutdown", "destroy_model_parallel", "release"]
    assert fake_vllm.events == one_phase * 2  # created once per phase, destroyed before the next one exists
    first = fake_vllm.engines[0]
    assert first.kwargs["model"] == "/policy0" and first.kwargs["dtype"] == "bfloat16"
    assert first.kwargs["gpu_memory_utilization"] == pytest.approx(0.27)  # 90 % of the free 30 %, under the 0.5 cap
    assert [p["seed"] for p in first.params] == [request_seed(9, k, s) for k in keys for s in range(2)]


def test_engine_with_too_little_free_memory_is_a_clear_error(fake_vllm, monkeypatch):
    monkeypatch.setattr(gen_mod, "free_gpu_share", lambda: 0.02)
    with pytest.raises(ConfigError, match="--sera.vllm_gpu_memory_utilization"):
        gen_mod.generate_samples(args_for(), one_process(), "/p", ["x y"], GenerationConfig(num_samples=2), ["a"])
    assert "create" not in fake_vllm.events


class FakeRayEngine:
    """A Ray actor handle: `.method.remote(...)` runs at once and returns its result (the fake `ray.get` is id)."""

    def __init__(self, name, eos):
        self.name, self.eos, self.calls = name, eos, []
        for method in ("generate", "update_weight"):
            setattr(self, method, SimpleNamespace(remote=getattr(self, "_" + method)))

    def _generate(self, prompt_token_ids, params):
        self.calls.append(("generate", params["seed"]))
        return completion([40 + params["seed"] % 50, self.eos])

    def _update_weight(self, name, dtype, shape, empty_cache):
        self.calls.append(("update_weight", name, dtype, shape, empty_cache))


class FakeGroup:
    def __init__(self):
        self.sent = []

    def broadcast(self, tensor, src, stream=None):
        assert src == 0
        self.sent.append(tensor.clone())


def ray_engines(tok, n=2):
    engines = [FakeRayEngine(f"e{i}", tok.eos_token_id) for i in range(n)]
    return RayVLLMEngines(engines, FakeGroup(), "/policy0", is_driver=True, zero_stage=2, get=lambda refs: refs)


def test_ray_engines_spread_requests_with_their_own_seeds(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    engines = ray_engines(tok)
    cfg = GenerationConfig(num_samples=3, max_new_tokens=6, seed=5)
    keys = ["a", "b"]
    out = engines.generate("/policy0", tok, cfg, ["good day", "the cat"], keys)
    seeds = [request_seed(5, k, s) for k in keys for s in range(3)]
    assert [c[1] for c in engines.engines[0].calls] == seeds[0::2]  # request k on engine k mod 2
    assert [c[1] for c in engines.engines[1].calls] == seeds[1::2]
    assert [[smp.token_ids[0] for smp in row] for row in out] == [[40 + s % 50 for s in seeds[:3]],
                                                                  [40 + s % 50 for s in seeds[3:]]]
    synced = []
    monkeypatch.setattr(engines, "sync_from_checkpoint", lambda path: synced.append(path))
    engines.generate("/policy1", tok, cfg, ["good day"], ["a"])  # the engines hold π0: π1's weights go first
    assert synced == ["/policy1"]


def test_ray_engines_weight_sync_from_the_trained_model(tok):
    engines = ray_engines(tok)
    model = tiny.tiny_llama(vocab_size=64)
    actor = SimpleNamespace(model=SimpleNamespace(module=model))  # an Actor around a DeepSpeed engine
    engines.sync_from_model(actor, "/run/iter_2/policy")
    params = list(model.named_parameters())
    for e in engines.engines:
        updates = [c for c in e.calls if c[0] == "update_weight"]
        assert [u[1] for u in updates] == [n for n, _ in params]
        assert all(u[2] == torch.bfloat16 and u[3] == tuple(p.shape) for u, (_, p) in zip(updates, params))
        assert [u[4] for u in updates] == [False] * (len(params) - 1) + [True]  # empty the cache after the last
    assert len(engines.group.sent) == len(params)
    assert all(torch.equal(t, p.detach().to(torch.bfloat16)) for t, (_, p) in zip(engines.group.sent, params))
    assert engines.holds == "/run/iter_2/policy" and engines.synced == [("model", "/run/iter_2/policy")]


def test_backend_launches_engines_once_and_syncs_main_policies_only(monkeypatch, tok):
    from sera_openrlhf.openrlhf_adapter import backend as backend_mod

    launched, trained = [], []
    fake = SimpleNamespace(sync_from_model=lambda model, path: None, close=lambda: launched.append("close"))
    monkeypatch.setattr(RayVLLMEngines, "launch", classmethod(lambda cls, a, s, p: launched.append(p) or fake))
    monkeypatch.setattr(backend_mod, "generate_samples", lambda *a: ([[]], [1]))
    monkeypatch.setattr(backend_mod, "train_policy",
                        lambda *a, on_trained=None, **k: trained.append(on_trained) or {"scored_per_rank": None})
    args = args_for(vllm_engines=2)
    args.sera.ref_cache = "on"
    args.logger = SimpleNamespace(wandb=SimpleNamespace(run_name="r"))
    args.ckpt = SimpleNamespace(path="/ckpt")
    backend = backend_mod.OpenRLHFBackend(args, SimpleNamespace(args=args), use_prompt_key=True, cache_dir="/c",
                                          daa_loss=None)
    cfg = GenerationConfig(num_samples=2)
    backend.generate("/p0", ["x"], cfg, ["a"])
    backend.generate("/p1", ["x"], cfg, ["a"])
    assert launched == ["/p0"]
    assert backend.take_load() == {"generated_per_rank": [2]} and backend.take_load() == {}
    backend.train("iter2", [], "/p1", "/ref", "/run/iter_2/policy")
    backend.train("iter2_fold0", [], "/p1", "/ref", "/run/iter_2/fold_0/policy")
    assert trained[0] is not None and trained[1] is None  # fold twins are never sampled from
    backend.close()
    assert launched[-1] == "close"


def test_engine_pool_keeps_request_order():
    engines = [SimpleNamespace(generate=SimpleNamespace(remote=lambda ids, p, i=i: (i, p))) for i in range(3)]
    out = EnginePool(engines, get=list).generate([{"prompt_token_ids": [1]}] * 5, list(range(5)))
    assert out == [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4)]


def test_run_dir_must_be_shared_by_every_node(tmp_path):
    """Rank 1 given another directory stands in for a node that does not mount the run dir: both ranks fail with
    an error naming the rank that cannot see it and the flag; rank 0's token file is gone afterwards. (Every
    multi-process run of tests/test_distributed.py passes the check with a shared directory.)"""
    import torch.multiprocessing as mp
    from shared_dir_check import check_dir

    roots = [str(tmp_path / "run"), str(tmp_path / "elsewhere")]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=check_dir, args=(r, 2, init, roots, result)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(result.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(30)
    for rank in (0, 1):
        assert "is not visible from" in got[rank] and "(rank 1)" in got[rank] and "--sera.run_dir" in got[rank]
        assert "(rank 0)" not in got[rank]
    assert os.listdir(tmp_path / "run") == []
