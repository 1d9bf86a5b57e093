"""Make OpenRLHF's DPO path run anywhere: version check, flash_attn stand-in, CPU patches.

Measured in ../shared/docs/openrlhf-on-cpu.md: OpenRLHF 0.11.2 imports `flash_attn` at module level and assumes
CUDA in a handful of places. On a machine without CUDA, `apply()` installs a pure-torch stand-in for the four
flash_attn names OpenRLHF imports and patches those places. With CUDA present it changes nothing except
allowing `--ds.param_dtype fp32` (an added choice; bf16/fp16 behave as stock).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import sys
import types
import warnings

import torch
import torch.nn.functional as F

from sera_openrlhf.errors import ConfigError, SeraError

SUPPORTED_OPENRLHF = (">=0.10.2", "<0.12")
INSTALL_HINT = (
    "install it beside sera-openrlhf: on GPU `pip install openrlhf==0.11.2`; on CPU (flash-attn cannot build) "
    "`pip install --no-deps openrlhf==0.11.2` after the lean requirements (see requirements/cpu.txt, or run "
    "scripts/setup.sh)"
)

_applied = False


class OpenRLHFMissingError(SeraError, ImportError):
    pass


def require_openrlhf() -> str:
    """Return the installed OpenRLHF version, or raise a clear error saying how to install a supported one."""
    from packaging.version import Version

    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        raise OpenRLHFMissingError(f"OpenRLHF is not installed; {INSTALL_HINT}.") from None
    if not (Version("0.10.2") <= Version(version) < Version("0.12")):
        raise OpenRLHFMissingError(
            f"OpenRLHF {version} is installed, but sera-openrlhf supports openrlhf>=0.10.2,<0.12; {INSTALL_HINT}."
        )
    return version


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --- flash_attn stand-in -------------------------------------------------------------------------------------
# OpenRLHF's models/ring_attn_utils.py imports these at module level. They are only *called* with packing or
# ring attention, which need real flash attention (refused on CPU by the CLI), but these versions are correct.


def _index_first_axis(x, idx):
    return x[idx]


def _unpad_input(hidden, mask, unused_mask=None):
    from einops import rearrange

    m = mask + unused_mask if unused_mask is not None else mask
    seqlens = m.sum(-1, dtype=torch.int32)
    idx = torch.nonzero(m.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = rearrange(hidden, "b s ... -> (b s) ...")
    return flat[idx], idx, cu, int(seqlens.max()), mask.sum(-1, dtype=torch.int32)


def _pad_input(hidden, idx, batch, seqlen):
    from einops import rearrange

    out = torch.zeros(batch * seqlen, *hidden.shape[1:], dtype=hidden.dtype, device=hidden.device)
    out[idx] = hidden
    return rearrange(out, "(b s) ... -> b s ...", b=batch)


def _all_gather(x, group):
    out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out, 0)


def install_flash_attn_stub() -> bool:
    """Register the stand-in as `flash_attn` unless a real flash_attn imports. Returns True if installed."""
    if "flash_attn" in sys.modules:
        return False
    try:
        import flash_attn  # noqa: F401

        return False
    except ImportError:
        pass
    from einops import rearrange

    def module(name, package=False):
        m = types.ModuleType(name)
        # transformers calls importlib.util.find_spec, which raises on __spec__ = None
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        m.__sera_stub__ = True
        if package:
            m.__path__ = []
        sys.modules[name] = m
        return m

    fa, bert_padding = module("flash_attn", True), module("flash_attn.bert_padding")
    utils, distributed = module("flash_attn.utils", True), module("flash_attn.utils.distributed")
    bert_padding.index_first_axis, bert_padding.pad_input = _index_first_axis, _pad_input
    bert_padding.unpad_input, bert_padding.rearrange = _unpad_input, rearrange
    distributed.all_gather = _all_gather
    fa.bert_padding, fa.utils, utils.distributed = bert_padding, utils, distributed
    return True


# --- CPU patches ---------------------------------------------------------------------------------------------


def _device_agnostic_all_reduce(self, data, op="mean"):
    import torch.distributed as dist

    if isinstance(data, dict):
        return {k: self.all_reduce(v, op) for k, v in data.items()}
    is_tensor = isinstance(data, torch.Tensor)
    t = data.detach().clone().float() if is_tensor else torch.tensor([float(data)])
    if dist.is_initialized() and self.world_size > 1:
        if op == "mean":
            t /= self.world_size
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t if is_tensor else t.item()


def _device_agnostic_all_gather(self, data):
    import torch.distributed as dist

    if isinstance(data, dict):
        return {k: self.all_gather(v) for k, v in data.items()}
    data = data if isinstance(data, torch.Tensor) else torch.tensor([data])
    if not (dist.is_initialized() and self.world_size > 1):
        return data.clone()
    ret = [torch.zeros_like(data) for _ in range(self.world_size)]
    dist.all_gather(ret, data)
    return torch.cat(ret)


def _barrier_only():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _allow_fp32():
    import openrlhf.utils.utils as ou

    if getattr(ou.convert_to_torch_dtype, "__sera__", False):
        return
    original = ou.convert_to_torch_dtype

    def convert_to_torch_dtype(param_dtype: str) -> torch.dtype:
        if param_dtype == "fp32":
            return torch.float32
        return original(param_dtype)

    convert_to_torch_dtype.__sera__ = True
    ou.convert_to_torch_dtype = convert_to_torch_dtype


def _torch_adam_on_cpu(strategy_cls):
    # OpenRLHF asks DeepSpeed for {"type": "AdamW"}; on CPU DeepSpeed would JIT-compile cpu_adam with gcc (~70 s).
    original = strategy_cls.get_ds_train_config
    if getattr(original, "__sera__", False):
        return

    def get_ds_train_config(self, optim_dict=None, **kwargs):
        cfg = original(self, optim_dict, **kwargs)
        opt = cfg.get("optimizer")
        if opt and str(opt.get("type", "")).lower() == "adamw":
            opt.setdefault("params", {})["torch_adam"] = True
        return cfg

    get_ds_train_config.__sera__ = True
    strategy_cls.get_ds_train_config = get_ds_train_config


def set_launch_env_defaults() -> None:
    """Environment a single process needs when started without a launcher, plus CPU speed settings.

    Only fills variables the user or a launcher has not set.
    """
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # With 2 intra-op threads a busy second core made an epoch 25x slower (openrlhf-on-cpu.md).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # Plain `python -m ...`: a world of one. LOCAL_RANK=-1 makes OpenRLHF skip torch.cuda.set_device.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="-1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply() -> None:
    """Apply the compatibility layer once. Must run before any `openrlhf.models` import."""
    global _applied
    if _applied:
        return
    require_openrlhf()
    if not cuda_available():
        install_flash_attn_stub()
    import openrlhf.utils.deepspeed.deepspeed as ods

    _allow_fp32()
    if not cuda_available():
        import deepspeed.ops

        ods.torch_dist_barrier_and_cuda_sync = _barrier_only
        ods.DeepspeedStrategy.all_reduce = _device_agnostic_all_reduce
        ods.DeepspeedStrategy.all_gather = _device_agnostic_all_gather
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build at init_distributed
        _torch_adam_on_cpu(ods.DeepspeedStrategy)
        torch.cuda.set_device = lambda *a, **k: None  # torchrun/deepspeed launchers call it with LOCAL_RANK>=0
        # OpenRLHF's dataloaders ask for pinned memory, which has no meaning without an accelerator
        warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator")
    # torchdata's StatefulDataLoader calls its own deprecated torch.set_vital on every dataloader OpenRLHF builds
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
    _applied = True


def check_cpu_args(args) -> list[str]:
    """Refuse what cannot work without CUDA; return notices for settings we changed on the user's behalf."""
    notices = []
    if cuda_available():
        return notices
    if args.ds.packing_samples:
        raise ConfigError(
            "--ds.packing_samples needs FlashAttention 2, which needs a CUDA GPU; drop the flag to train on CPU."
        )
    attn = args.ds.attn_implementation
    if "flash" in str(attn):
        if getattr(args, "_attn_defaulted", False):
            args.ds.attn_implementation = "sdpa"
            notices.append("no CUDA device: --ds.attn_implementation defaults to sdpa instead of flash_attention_2")
        else:
            raise ConfigError(
                f"--ds.attn_implementation {attn} needs a CUDA GPU; use sdpa or eager on CPU."
            )
    if args.ds.param_dtype == "fp16":
        raise ConfigError("--ds.param_dtype fp16 is not supported on CPU; use bf16 or fp32.")
    return notices
