"""`--sera.precision {auto,fp32,bf16}`: one dtype for training, scoring and HF generation (the loop's review,
judge and fluency scoring run in fp32 by default instead: `--sera.score_precision`, `OpenRLHFBackend.scoring_dtype`).

All three workloads take their dtype from OpenRLHF's `--ds.param_dtype` (`Actor(param_dtype=...)` for training and
scoring, the DeepSpeed bf16 config, `openrlhf_adapter/generate.py` for HF generation), so precision is resolved
once, before anything is loaded, and written to `args.ds.param_dtype`.

- `fp32` / `bf16`: that dtype. An explicit `--ds.param_dtype` that says otherwise is an error naming both flags.
- `auto` with an explicit `--ds.param_dtype`: that dtype (the stock flag wins).
- `auto` otherwise: bf16 on a CUDA device that supports it; on CPU, bf16 only where the CPU reports native bf16
  matmul instructions (`amx_bf16` or `avx512_bf16`) **and** a short matmul probe on the run's threads measures
  bf16 at least `MIN_PROBE_SPEEDUP` x fp32; fp32 elsewhere. Without those instructions PyTorch's bf16 matmul is
  an emulation (measured 8-80x slower than fp32 on an AVX2-only AMD EPYC), so the probe is not even run there.

The probe result is cached per CPU model name and thread count (and re-measured for another torch version) in
`$XDG_CACHE_HOME/sera-openrlhf/precision.json` (default `~/.cache/...`), written atomically under a file lock so
the ranks of one machine measure once and agree.

`resolve(...)` returns a plain dict (the run's stats record it) and `describe(...)` the one line that is logged.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Optional

from sera_openrlhf.errors import ConfigError

CHOICES = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# A train step realises well under the matmul ratio (1.5x of a measured 8.3x on an AMX Xeon: casts, fp32 master
# weights, fp32 log-softmax over the vocabulary), so auto asks the probe for a clear margin, not just "faster".
MIN_PROBE_SPEEDUP = 1.25
PROBE_BUDGET_S = 2.0
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ the machine


def cpu_flags() -> set[str]:
    """The CPU feature flags (/proc/cpuinfo, else `lscpu`); empty when neither can be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags") and ":" in line:
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    for line in out.splitlines():
        if line.strip().lower().startswith("flags:"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cuda_bf16() -> Optional[bool]:
    """None without a CUDA device; else whether it supports bf16."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return bool(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 - an odd driver must not stop the run: assume no bf16
        return False


# ------------------------------------------------------------------------------------------------ the probe


def matmul_gflops(dtypes=("fp32", "bf16"), n: int = 1024, budget_s: float = PROBE_BUDGET_S,
                  threads: Optional[int] = None) -> dict:
    """GFLOP/s of a square matmul per dtype, on `threads` torch threads (default: the current setting).

    A 256 x 256 call per dtype sizes the test: n (at most the given n) is the largest power of two whose slowest
    call fits an eighth of the budget, so an emulated bf16 cannot hold the run for long. Timed calls then
    alternate between the dtypes until the budget is spent, so both see the same machine load; each dtype's best
    call counts. Returns {"fp32": GFLOP/s, "bf16": GFLOP/s, "n": n}.
    """
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def once(a, b):
        t = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t

    try:
        start = time.perf_counter()
        size, slowest = 256, 0.0
        for d in dtypes:
            a = torch.randn(size, size).to(names[d])
            once(a, a)
            slowest = max(slowest, once(a, a))
        while size * 2 <= n and slowest * 8 * 8 <= budget_s:
            size, slowest = size * 2, slowest * 8
        mats = {d: (torch.randn(size, size).to(names[d]), torch.randn(size, size).to(names[d])) for d in dtypes}
        best = {d: once(*mats[d]) for d in dtypes}
        while True:
            ran = False
            for d in dtypes:
                if time.perf_counter() - start + best[d] <= budget_s:
                    best[d] = min(best[d], once(*mats[d]))
                    ran = True
            if not ran:
                break
        return {**{d: round(2 * size ** 3 / best[d] / 1e9, 2) for d in dtypes}, "n": size}
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ the cache


def cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sera-openrlhf", "precision.json")


def cache_key(model: str, threads: int) -> str:
    return f"{model}|threads={threads}"


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write(path: str, entries: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".precision.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextmanager
def _locked(path: str):
    """An exclusive lock beside the cache file (ranks of one machine probe once); a no-op where locks fail."""
    try:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(path + ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        fh.close()  # releases the lock


def cached_probe(threads: int, probe=None) -> tuple[dict, bool]:
    """(GFLOP/s per dtype, whether it came from the cache) for this CPU model and thread count."""
    import torch

    probe = probe or matmul_gflops
    path, key = cache_path(), cache_key(cpu_model_name(), threads)
    try:
        with _locked(path):
            entries = _read(path)
            hit = entries.get(key)
            if isinstance(hit, dict) and hit.get("torch") == torch.__version__ and "fp32" in hit and "bf16" in hit:
                return {k: hit[k] for k in ("fp32", "bf16", "n") if k in hit}, True
            figures = probe(threads=threads)
            entries[key] = {**figures, "torch": torch.__version__, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                _write(path, entries)
            except OSError:
                pass  # a read-only home: measured again next time, still correct
            return figures, False
    except OSError:
        return probe(threads=threads), False


# ------------------------------------------------------------------------------------------------ resolution


def check_flags(precision: str, param_dtype: Optional[str], param_dtype_given: bool) -> None:
    """An explicit --ds.param_dtype that contradicts an explicit --sera.precision is an error naming both."""
    if precision not in CHOICES:
        raise ConfigError(f"--sera.precision must be one of {', '.join(CHOICES)}; got {precision!r}")
    if precision != "auto" and param_dtype_given and param_dtype != precision:
        raise ConfigError(f"--sera.precision {precision} contradicts --ds.param_dtype {param_dtype}: give one of "
                          "them, or the same dtype to both")


def resolve(precision: str, param_dtype: Optional[str] = None, param_dtype_given: bool = False,
            threads: Optional[int] = None, probe=None) -> dict:
    """The dtype the run uses, why, and the probe figures (None where no probe ran), as a JSON-able dict:
    {"requested", "choice" (the --ds.param_dtype value), "reason", "device", "threads", "cpu_model",
    "cpu_bf16_flags", "matmul_gflops", "probe_cached"}."""
    import torch

    check_flags(precision, param_dtype, param_dtype_given)
    threads = threads or torch.get_num_threads()
    gpu = cuda_bf16()
    out = {"requested": precision, "choice": None, "reason": "", "device": "cpu" if gpu is None else "cuda",
           "threads": threads, "cpu_model": None, "cpu_bf16_flags": None, "matmul_gflops": None,
           "probe_cached": None}
    if precision != "auto" or param_dtype_given:
        choice = precision if precision != "auto" else param_dtype
        reason = f"--sera.precision {precision}" if precision != "auto" else f"--ds.param_dtype {param_dtype} given"
        if gpu is None and choice == "bf16":
            have = sorted(f for f in BF16_CPU_FLAGS if f in cpu_flags())
            out.update(cpu_model=cpu_model_name(), cpu_bf16_flags=have)
            if not have:
                reason += "; warning: this CPU has no native bf16 (amx_bf16/avx512_bf16), expect bf16 slower than fp32"
        return {**out, "choice": choice, "reason": reason}
    if gpu is not None:
        if gpu:
            return {**out, "choice": "bf16", "reason": "CUDA device with bf16"}
        return {**out, "choice": "fp32", "reason": "CUDA device without bf16 support (--ds.param_dtype fp16 for "
                                                   "half precision)"}
    have = sorted(f for f in BF16_CPU_FLAGS if f in cpu_flags())
    out.update(cpu_model=cpu_model_name(), cpu_bf16_flags=have)
    if not have:
        return {**out, "choice": "fp32", "reason": f"CPU reports neither {' nor '.join(BF16_CPU_FLAGS)}"}
    figures, cached = cached_probe(threads, probe)
    out.update(matmul_gflops=figures, probe_cached=cached)
    ratio = figures["bf16"] / figures["fp32"] if figures.get("fp32") else 0.0
    if ratio >= MIN_PROBE_SPEEDUP:
        return {**out, "choice": "bf16", "reason": f"CPU has {'+'.join(have)}; bf16 matmul {ratio:.2f}x fp32"}
    return {**out, "choice": "fp32", "reason": f"CPU has {'+'.join(have)} but bf16 matmul is only {ratio:.2f}x "
                                               f"fp32 (< {MIN_PROBE_SPEEDUP}x)"}


def describe(info: dict) -> str:
    """The one log line."""
    line = f"precision {info['choice']} ({info['requested']}: {info['reason']}; {info['device']}, " \
           f"{info['threads']} thread(s)"
    mm = info.get("matmul_gflops")
    if mm:
        line += (f"; matmul probe fp32 {mm['fp32']:.1f} / bf16 {mm['bf16']:.1f} GFLOP/s"
                 f"{', cached' if info.get('probe_cached') else ''}")
    return line + ")"


def apply_to_args(args) -> dict:
    """Resolve `args.sera.precision` against `args.ds.param_dtype` (explicit when `args._param_dtype_given`),
    write the choice to `args.ds.param_dtype`, keep the record in `args._sera_precision`, log one line (rank 0)
    and return the record. The leading underscore keeps it out of the run's configuration (dump_args), so
    probe figures never count as a changed configuration on resume."""
    info = resolve(args.sera.precision, args.ds.param_dtype, bool(getattr(args, "_param_dtype_given", False)))
    args.ds.param_dtype = info["choice"]
    args._sera_precision = info
    if os.environ.get("RANK", "0") == "0":
        print(f"[sera-openrlhf] {describe(info)}", flush=True)
    return info
