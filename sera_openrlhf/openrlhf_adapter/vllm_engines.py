"""`--sera.vllm_engines N`: generation on OpenRLHF's Ray-managed vLLM engines, with weight sync.

The engines (`openrlhf.trainer.ray.vllm_engine.create_vllm_engines`: N engines x --sera.vllm_tensor_parallel_size
GPUs each, bf16) are created once per run, at the first generation, from the checkpoint it samples, on the GPUs
of the Ray cluster (RAY_ADDRESS, or a local one; keep them apart from the training GPUs). After every training
phase of a main policy, the trained DeepSpeed model is broadcast to them over an NCCL group between global rank 0
and the engines' workers, as OpenRLHF's PPO actor does (`broadcast_to_vllm`: `update_weight` per parameter,
ZeRO-3 parameters gathered first), instead of reloading from disk; after a resume the engines get the weights of
the checkpoint they must sample from. Only global rank 0 talks to Ray; the other ranks take part in the ZeRO-3
gathers.
"""

from __future__ import annotations

import os
import socket

import torch

from sera_openrlhf.generation import build_generator


class EnginePool:
    """vLLM's offline `.generate(prompts, sampling_params)` over Ray engines: request k goes to engine k mod N
    (each with its own seed, so the split does not change the samples); outputs come back in request order."""

    def __init__(self, engines: list, get):
        self.engines, self.get = engines, get

    def generate(self, prompts: list, sampling_params: list) -> list:
        n = len(self.engines)
        refs = [self.engines[k % n].generate.remote(p["prompt_token_ids"], params)
                for k, (p, params) in enumerate(zip(prompts, sampling_params))]
        return self.get(refs)


class RayVLLMEngines:
    """The run's engines and their weight-sync group. Build with `launch`; tests pass fakes directly."""

    def __init__(self, engines: list, group, holds: str, *, is_driver: bool, zero_stage: int, get=None,
                 dtype=torch.bfloat16):
        self.engines, self.group, self.holds = engines, group, holds
        self.is_driver, self.zero_stage = is_driver, zero_stage
        self.get = get
        self.dtype = dtype  # create_vllm_engines builds bf16 engines; update_weight asserts the dtype
        self.synced = []  # (source, path) of every sync, for the stats and tests

    @classmethod
    def launch(cls, args, strategy, model_path: str) -> "RayVLLMEngines":
        """Create the engines from `model_path` (collective: every rank calls it; only global rank 0 acts)."""
        if not strategy.is_rank_0():
            return cls([], None, model_path, is_driver=False, zero_stage=args.ds.zero_stage)
        import ray
        from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
        from openrlhf.utils.distributed_util import stateless_init_process_group

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        s = args.sera
        engines = create_vllm_engines(
            s.vllm_engines, s.vllm_tensor_parallel_size, model_path, args.train.seed, full_determinism=False,
            enable_prefix_caching=False, enforce_eager=False, max_model_len=args.data.max_len + s.max_new_tokens,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
        )
        # the weight-sync group: rank 0 = this process, then every engine worker (OpenRLHF's layout)
        address = ray._private.services.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        tp = s.vllm_tensor_parallel_size
        world = s.vllm_engines * tp + 1
        refs = [e.init_process_group.remote(address, port, i * tp + 1, world, "sera", backend="nccl", use_ray=False)
                for i, e in enumerate(engines)]
        group = stateless_init_process_group(address, port, 0, world, torch.cuda.current_device())
        ray.get(refs)
        return cls(engines, group, model_path, is_driver=True, zero_stage=args.ds.zero_stage, get=ray.get)

    def _send(self, name: str, tensor: torch.Tensor, last: bool) -> None:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        tensor = tensor.detach().to(device=device, dtype=self.dtype)
        refs = [e.update_weight.remote(name, dtype=self.dtype, shape=tuple(tensor.shape), empty_cache=last)
                for e in self.engines]
        if torch.cuda.is_available():
            self.group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        else:
            self.group.broadcast(tensor, src=0)
        self.get(refs)

    def sync_from_model(self, actor, path: str) -> None:
        """Broadcast a trained Actor's weights (its DeepSpeed engine's module) to the engines; every rank calls
        this (under ZeRO-3 each parameter is gathered collectively first). The engines then hold `path`."""
        import deepspeed

        model = getattr(actor.model, "module", actor.model)
        params = list(model.named_parameters())
        for k, (name, param) in enumerate(params):
            with deepspeed.zero.GatheredParameters([param], enabled=self.zero_stage == 3):
                if self.is_driver:
                    self._send(name, param.data, last=k == len(params) - 1)
        self.holds = path
        self.synced.append(("model", path))

    def sync_from_checkpoint(self, path: str) -> None:
        """Broadcast a saved HF checkpoint's weights (rank 0 only: after a resume, or for a policy no training
        phase of this process produced)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        params = list(model.named_parameters())
        for k, (name, param) in enumerate(params):
            self._send(name, param.data, last=k == len(params) - 1)
        del model
        self.holds = path
        self.synced.append(("checkpoint", path))

    def generate(self, model_path: str, tokenizer, cfg, prompts: list, keys: list):
        """Samples from the policy at `model_path` (rank 0 only), syncing it first if the engines hold another."""
        if self.holds != model_path:
            self.sync_from_checkpoint(model_path)
        pool = EnginePool(self.engines, self.get)
        return build_generator("vllm", tokenizer, cfg, model_path=model_path, engine=pool).generate(prompts, keys)

    def close(self) -> None:
        if self.is_driver and self.engines:
            import ray

            for e in self.engines:
                ray.kill(e)
        self.engines = []
