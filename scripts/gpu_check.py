"""The GPU check behind scripts/gpu_check.sh: measurements on one CUDA device, written to one JSON file.

    python3 scripts/gpu_check.py --out OUT/gpu_check.json [--model DIR] [--budget-s 330]

1. versions (torch, transformers, deepspeed, openrlhf, vllm, ray) and the device;
2. micro-benchmarks of the SmolLM2-135M architecture in bf16: a DPO train step (forward + backward + AdamW on
   chosen/rejected pairs: step time, tokens/s), the scoring engine (`score_pairs`, sequences/s and tokens/s),
   HF generation (`HFGenerator`, generated tokens/s), peak GPU memory of each;
3. the GPU-marked tests (`pytest -m gpu`), counted from their JUnit XML;
4. a 2-iteration SeRA loop (`python -m sera_openrlhf.cli.train_dpo`, ZeRO-2, bf16, HF generation) on the model,
   with its seconds per phase and peak GPU memory from sera_state.json.

The model: --model DIR (an HF checkpoint), else .gpu_check/model (config + tokenizer, with weights if carried);
a directory without weights gets SmolLM2's architecture with seeded random weights, which gives the same speed
and memory figures (the 517 MB checkpoint does not fit the device tool's 64 MiB carry) but meaningless samples.
Every part is skipped with its reason when what it needs is missing; the file is rewritten after each part, so a
run cut short still reports what it measured. Exit 0 unless the JSON cannot be written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Report:
    """The JSON being built: `results` per part, `skipped` [{part, why}], rewritten atomically after each change."""

    def __init__(self, path: str, budget_s: float):
        self.path, self.start, self.budget_s = path, time.time(), budget_s
        self.data = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s,
                     "results": {}, "skipped": [], "errors": {}}
        self.write()

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def skip(self, part: str, why: str) -> None:
        self.data["skipped"].append({"part": part, "why": why})
        self.write()

    def put(self, part: str, value) -> None:
        self.data["results"][part] = value
        self.write()

    def error(self, part: str, err: BaseException | str) -> None:
        self.data["errors"][part] = err if isinstance(err, str) else f"{type(err).__name__}: {err}"[-2000:]
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "deepspeed", "openrlhf", "vllm", "ray"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def importable(name: str) -> str | None:
    """None if `name` imports, else why not."""
    try:
        importlib.import_module(name)
        return None
    except Exception as e:  # a broken install is as good as a missing one here
        return f"{type(e).__name__}: {e}"[:300]


def model_dir(arg: str | None) -> tuple[str | None, str]:
    """(checkpoint directory, what it is); None when no config is there."""
    path = arg or os.path.join(ROOT, ".gpu_check", "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        return None, f"no config.json in {path} (run `bash scripts/gpu_check.sh prepare` here and carry .gpu_check)"
    weights = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
    if weights:
        return path, f"{path} (trained weights)"
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tempfile.mkdtemp(prefix="gpu_check_model_")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out, f"{path}: the architecture with seeded random weights (no weights carried)"


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mb():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None


FULL = dict(pairs=8, half=128, repeats=5, score_pairs=256, prompts=32, new_tokens=128)
SMALL = dict(pairs=2, half=16, repeats=2, score_pairs=16, prompts=4, new_tokens=8)  # the CPU test


def bench(path: str, report: Report, device: str = "cuda", dtype: str = "bf16", size: dict = FULL) -> None:
    """Train step, scoring and generation throughput of the model (bf16 on the GPU; the tests run it on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sera_openrlhf.generation import GenerationConfig, HFGenerator
    from sera_openrlhf.scoring import hf_logprob_fn, score_pairs

    dev = torch.device(device)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                                                 attn_implementation="sdpa").to(dev)
    vocab = model.config.vocab_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(0)

    # train step: B pairs of 2 x H tokens (H prompt + H response), DPO-shaped: chosen and rejected forwards
    B, H = size["pairs"], size["half"]
    ids = torch.randint(10, vocab, (2 * B, 2 * H), generator=gen).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step():
        logits = model(ids, use_cache=False).logits[:, H - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, H:, None]).squeeze(-1).sum(-1)
        loss = -torch.nn.functional.logsigmoid(0.1 * (logp[:B] - logp[B:])).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _reset_peak()
    t = _timed(step, size["repeats"])
    report.put("train_step", {"pairs": B, "seq_len": 2 * H, "step_s": round(t, 4),
                              "tokens_per_s": round(4 * B * H / t), "peak_gpu_mb": _peak_mb()})
    opt = None  # noqa: F841  (frees the Adam states before scoring)
    model.eval()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # scoring engine: prompts of 3/4 H tokens shared by a H/2- and a 3/4 H-token response
    pairs = []
    for _ in range(size["score_pairs"]):
        prompt = torch.randint(10, vocab, (3 * H // 4,), generator=gen)
        pairs.append((torch.cat([prompt, torch.randint(10, vocab, (H // 2,), generator=gen)]),
                      torch.cat([prompt, torch.randint(10, vocab, (3 * H // 4,), generator=gen)]), 3 * H // 4))
    fn = hf_logprob_fn(model)
    score_pairs(fn, pairs[:4], pad, show_progress=False)  # warm-up (and the packed path's self-check)
    _reset_peak()
    t = _timed(lambda: score_pairs(fn, pairs, pad, max_tokens_per_batch=65536, max_batch_size=512,
                                   show_progress=False), size["repeats"])
    tokens = sum(len(c) + len(r) for c, r, _ in pairs)
    report.put("scoring", {"sequences": 2 * len(pairs), "seconds": round(t, 4),
                           "sequences_per_s": round(2 * len(pairs) / t), "tokens_per_s": round(tokens / t),
                           "packed": not getattr(getattr(fn, "packed", None), "disabled", True),
                           "peak_gpu_mb": _peak_mb()})

    # HF generation: P prompts x 4 samples, per-request seeds, blocks of 16 prompts
    prompts = [tok.decode(torch.randint(10, vocab, (48,), generator=gen).tolist()) for _ in range(size["prompts"])]
    cfg = GenerationConfig(num_samples=4, max_new_tokens=size["new_tokens"], batch_size=64, temperature=0.8,
                           top_p=0.95, seed=1)
    generator = HFGenerator(model, tok, cfg, progress=False)
    generator.generate(prompts[:2])  # warm-up
    _reset_peak()
    _sync()
    t0 = time.perf_counter()
    out = generator.generate(prompts)
    _sync()
    t = time.perf_counter() - t0
    new = sum(len(smp.token_ids) for row in out for smp in row)
    report.put("generation_hf", {"prompts": len(prompts), "samples": 4 * len(prompts), "generated_tokens": new,
                                 "max_new_tokens": size["new_tokens"], "seconds": round(t, 3),
                                 "tokens_per_s": round(new / t), "peak_gpu_mb": _peak_mb()})


def run(cmd: list[str], timeout: float, log: str) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds); output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, round(time.time() - start, 1)


def junit_counts(path: str) -> dict:
    """{passed, failed, skipped, tests: {name: outcome or skip reason}} from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            tests[name], kind = "failed", "failed"
        elif skipped is not None:
            tests[name], kind = "skipped: " + (skipped.get("message") or ""), "skipped"
        else:
            tests[name], kind = "passed", "passed"
        counts[kind] += 1
    return {**counts, "tests": tests}


def sera_run(path: str, out_dir: str, report: Report) -> None:
    from sera_openrlhf.assets import default_dataset_path, default_prompts_path

    run_dir = "/tmp/gpu_check_sera"
    flags = ["--model.model_name_or_path", path, "--data.dataset", default_dataset_path(chat=True),
             "--data.prompt_key", "prompt", "--data.apply_chat_template", "--data.max_samples", "128",
             "--data.max_len", "384", "--train.batch_size", "16", "--train.micro_batch_size", "4",
             "--train.max_epochs", "1", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
             "--ds.attn_implementation", "sdpa", "--adam.lr", "5e-6", "--ckpt.output_dir", run_dir,
             "--sera.enable", "--sera.iterations", "2", "--sera.prompts", default_prompts_path(chat=True),
             "--sera.num_prompts", "32", "--sera.num_samples", "4", "--sera.max_new_tokens", "96",
             "--sera.generation_batch_size", "64", "--sera.temperature", "0.8", "--sera.top_p", "0.95"]
    budget = max(30.0, report.left() - 10)
    rc, seconds = run([sys.executable, "-m", "sera_openrlhf.cli.train_dpo", *flags], budget,
                      os.path.join(out_dir, "sera_run.log"))
    result = {"exit": rc, "seconds": seconds, "timed_out": rc is None}
    state_path = os.path.join(run_dir, "sera_state.json")
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        result["done"] = state.get("done")
        result["seconds_per_phase"] = state.get("seconds")
        result["peak_gpu_mb_per_phase"] = {k: v.get("cuda_peak_mb") for k, v in (state.get("memory") or {}).items()}
        steps = []
        for t in ("1", "2"):
            log = os.path.join(run_dir, f"iter_{t}", "policy", "train_log.jsonl")
            if os.path.exists(log):
                with open(log) as f:
                    steps += [json.loads(line) for line in f if line.strip()]
        train_s = sum((state.get("seconds") or {}).get(f"iter{t}/train", 0) for t in (1, 2))
        if steps:
            result["optimizer_steps"] = len(steps)
            result["train_phase_s_per_step"] = round(train_s / len(steps), 3)  # model loads included
    report.put("sera_loop_2_iterations", result)
    if rc != 0:
        report.error("sera_loop_2_iterations", f"exit {rc}: see sera_run.log")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--model", help="HF checkpoint directory (default: .gpu_check/model)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new parts after this")
    a = ap.parse_args()
    report = Report(a.out, a.budget_s)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    report.data["versions"] = versions()
    import torch

    if not torch.cuda.is_available():
        report.data["device"] = None
        for part in ("bench", "gpu_tests", "sera_loop_2_iterations", "vllm"):
            report.skip(part, "no CUDA device")
        return 0
    report.data["device"] = {"name": torch.cuda.get_device_name(0),
                             "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    missing = {n: why for n in ("deepspeed", "openrlhf") if (why := importable(n))}
    vllm_missing = importable("vllm")
    if vllm_missing:
        report.skip("vllm", "vllm is not installed (its wheel is larger than the device tool can carry): the "
                            "vLLM paths stay untested on GPU; " + vllm_missing)

    path, note = model_dir(a.model)
    report.data["model"] = note
    if path is None:
        report.skip("bench", note)
    else:
        try:
            bench(path, report)
        except Exception as e:
            report.error("bench", e)

    if missing:
        report.skip("gpu_tests", f"needs {', '.join(missing)}: {missing}")
    elif report.left() < 60:
        report.skip("gpu_tests", "out of time")
    else:
        xml = os.path.join(out_dir, "gpu_tests.xml")
        rc, seconds = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "gpu",
                           "tests/test_gpu.py", "tests/test_generation.py", f"--junitxml={xml}"],
                          min(150.0, report.left() - 100), os.path.join(out_dir, "gpu_tests.log"))
        result = {"exit": rc, "seconds": seconds, "timed_out": rc is None}
        if os.path.exists(xml):
            result.update(junit_counts(xml))
        report.put("gpu_tests", result)

    if missing:
        report.skip("sera_loop_2_iterations", f"needs {', '.join(missing)}")
    elif path is None:
        report.skip("sera_loop_2_iterations", note)
    elif report.left() < 45:
        report.skip("sera_loop_2_iterations", "out of time")
    else:
        sera_run(path, out_dir, report)
    report.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
