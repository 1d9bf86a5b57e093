"""The launch scripts in scripts/launch/.

Fast: each script, run with stand-in launchers (`deepspeed`, `torchrun`, `srun`, `scontrol`, the interpreter) that
record their arguments, passes only flags that the entry point's real parser accepts (stock OpenRLHF flags +
--sera.*), with its real defaults and with the tiny substitutions the slow tests use; every environment variable a
script reads is documented at its top.

Slow: each script runs end to end on CPU, for real (`bash SCRIPT`, the real `deepspeed` launcher), with only the
model, the data and the sizes substituted through the environment variables the scripts honour, plus the settings
that need a GPU: `ATTN_IMPL=sdpa` (flash attention needs CUDA), `GENERATION_BACKEND=hf` (vLLM needs a GPU),
`NUM_GPUS=1` (without CUDA DeepSpeed's CPU accelerator counts NUMA nodes) and a free port per run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

import pytest
import tiny
from conftest import ENV, REPO, read_jsonl

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "scripts", "launch", "*.sh")))
BIN = os.path.dirname(sys.executable)  # the venv with `deepspeed`, `torchrun` and sera_openrlhf

# every variable any launch script reads (tests start each script from an environment without them)
SCRIPT_VARS = ("MODEL", "DATA", "PROMPTS", "OUTPUT_DIR", "RUN_DIR", "ITERATIONS", "NUM_PROMPTS", "NUM_SAMPLES",
               "MAX_NEW_TOKENS", "MAX_SAMPLES", "MAX_LEN", "BATCH_SIZE", "MICRO_BATCH_SIZE", "GENERATION_BACKEND",
               "ATTN_IMPL", "NUM_GPUS", "LAUNCHER_ARGS", "HOSTFILE", "MASTER_PORT", "PYTHON", "VLLM_ENGINES")
# set by the script itself or by SLURM, not by the user
INTERNAL_VARS = {"BASH_SOURCE", "REPO", "RES", "MASTER_ADDR", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID",
                 "OMP_NUM_THREADS"}

TINY_SIZES = {"ITERATIONS": "2", "NUM_PROMPTS": "4", "NUM_SAMPLES": "2", "MAX_NEW_TOKENS": "8", "MAX_SAMPLES": "16",
              "MAX_LEN": "64", "BATCH_SIZE": "8", "MICRO_BATCH_SIZE": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_pairs(tiny_data: str, path) -> str:
    """The tiny pairs as the GPU scripts' dataset has them: `chosen`/`rejected` conversations, no prompt key."""
    rows = []
    for r in read_jsonl(tiny_data):
        user = {"role": "user", "content": r["prompt"]}
        rows.append({"id": r["id"], "chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": r["rejected"]}]})
    return tiny.write_jsonl(str(path), rows)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    return {**env, **ENV, "PATH": BIN + os.pathsep + env.get("PATH", ""), **extra}


def tiny_env(script: str, tiny_model: str, tiny_data: str, tmp_path) -> dict:
    """What each script gets on CPU: the tiny model, data and sizes, a run directory in tmp_path, and for the GPU
    scripts the settings that cannot work without one."""
    name = os.path.basename(script)
    env = {"MODEL": tiny_model, "OUTPUT_DIR": str(tmp_path / "out"), **TINY_SIZES}
    if name == "train_sera_cpu.sh":
        return {**env, "DATA": tiny_data, "PROMPTS": tiny_data, "PYTHON": sys.executable}
    gpu = {"ATTN_IMPL": "sdpa", "GENERATION_BACKEND": "hf"}  # the vLLM script runs with HF generation on CPU
    if name == "train_sera_multinode.sh":
        # Simulated: one node, "localhost slots=2", two local processes through the real DeepSpeed launcher.
        # --no_ssh_check and --master_addr: a one-node hostfile then launches locally, without ssh to localhost.
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        return {**env, **gpu, "DATA": tiny_data, "RUN_DIR": str(tmp_path / "run"), "HOSTFILE": str(hostfile),
                "MASTER_PORT": str(free_port()), "LAUNCHER_ARGS": "--no_ssh_check --master_addr 127.0.0.1"}
    return {**env, **gpu, "DATA": chat_pairs(tiny_data, tmp_path / "chat_pairs.jsonl"), "NUM_GPUS": "1",
            "LAUNCHER_ARGS": f"--master_port {free_port()}"}


# --- fast: flags -------------------------------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; } >> "$STUB_LOG"
"""


@pytest.fixture
def stubs(tmp_path):
    """A bin directory whose launchers only record their arguments (one NUL-separated record per call)."""
    bindir = tmp_path / "stubs"
    bindir.mkdir()
    for name in ("deepspeed", "torchrun", "python"):
        (bindir / name).write_text(STUB)
    (bindir / "scontrol").write_text("#!/usr/bin/env bash\necho node-0\n")
    (bindir / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir


def launched(script, stubs, tmp_path, *script_args, **env) -> list[list[str]]:
    """Run SCRIPT with the stand-in launchers; return each recorded call's arguments."""
    log = tmp_path / "stub.log"
    log.unlink(missing_ok=True)
    env = clean_env(**{**env, "PYTHON": str(stubs / "python"), "STUB_LOG": str(log),
                       "SLURM_JOB_NODELIST": "node-[0-3]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "1"})
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", script, *script_args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [rec.split("\0") for rec in log.read_text().split("\0\n") if rec] if log.exists() else []


def entry_args(call: list[str]) -> list[str]:
    i = call.index("sera_openrlhf.cli.train_dpo")
    assert call[i - 1] in ("-m", "--module"), call
    return call[i + 1:]


def test_there_are_launch_scripts():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"train_sera_deepspeed.sh", "train_sera_multinode.sh", "train_sera_vllm.sh",
            "train_sera_cpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_syntax_and_flags(script, stubs, tmp_path, tiny_data):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    from sera_openrlhf.cli.train_dpo import build_parser

    parser = build_parser()
    calls = launched(script, stubs, tmp_path)  # the real defaults
    assert len(calls) == 1, calls
    args = parser.parse_args(entry_args(calls[0]))  # exits (SystemExit) on an unknown or bad flag
    assert getattr(args, "sera.enable") is True

    sub = tiny_env(script, "/m", tiny_data, tmp_path)  # the slow tests' substitutions all reach the entry point
    calls = launched(script, stubs, tmp_path, **sub)
    args = parser.parse_args(entry_args(calls[0]))
    assert (getattr(args, "model.model_name_or_path"), getattr(args, "data.dataset")) == ("/m", sub["DATA"])
    assert (getattr(args, "sera.iterations"), getattr(args, "data.max_len"), getattr(args, "data.max_samples"),
            getattr(args, "sera.max_new_tokens")) == (2, 64, 16, 8)
    if "GENERATION_BACKEND" in sub:
        assert getattr(args, "sera.generation_backend") == "hf"
        assert getattr(args, "ds.attn_implementation") == "sdpa"


def test_multinode_slurm_path_flags(stubs, tmp_path):
    script = os.path.join(REPO, "scripts", "launch", "train_sera_multinode.sh")
    calls = launched(script, stubs, tmp_path, "slurm")
    assert [c[0] for c in calls] == ["torchrun"], calls
    launcher = calls[0][:calls[0].index("-m")]
    assert launcher[launcher.index("--nproc_per_node") + 1] == "8"
    assert launcher[launcher.index("--rdzv_endpoint") + 1] == "node-0:29500"
    from sera_openrlhf.cli.train_dpo import build_parser

    build_parser().parse_args(entry_args(calls[0]))
    calls = launched(script, stubs, tmp_path, VLLM_ENGINES="2")  # OpenRLHF's Ray engines instead
    assert getattr(build_parser().parse_args(entry_args(calls[0])), "sera.vllm_engines") == 2


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_variable_is_documented(script):
    with open(script, encoding="utf-8") as f:
        text = f.read()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text)) - INTERNAL_VARS
    assert used <= set(SCRIPT_VARS), used - set(SCRIPT_VARS)
    undocumented = {v for v in used if not re.search(rf"\b{v}\b", header)}
    assert not undocumented, f"{os.path.basename(script)}: {sorted(undocumented)} not described in its header"


# --- slow: each script end to end on CPU -------------------------------------------------------------------------


def run_script(script, env, cwd, timeout=900) -> subprocess.CompletedProcess:
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{os.path.basename(script)}: exit {proc.returncode} after {time.monotonic() - start:.1f} s "
          f"({used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s CPU)")
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def check_run(run_dir, proc, n_pairs: int = 16, iterations: int = 2):
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert f"iter{iterations}/train" in state["done"], state["done"]
    policy = run_dir / f"iter_{iterations}" / "policy"
    assert (policy / "model.safetensors").exists()
    assert json.loads((policy / "config.json").read_text())["hidden_size"] == 64  # the tiny model, not the default
    assert len(read_jsonl(run_dir / f"iter_{iterations}" / "review.jsonl")) == n_pairs  # MAX_SAMPLES pairs
    assert (run_dir / "report" / "report.md").exists()
    assert f"[sera] final policy: {policy}" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_runs_on_cpu(script, tiny_model, tiny_data, tmp_path):
    env = tiny_env(script, tiny_model, tiny_data, tmp_path)
    work = tmp_path / "cwd"  # relative paths of the scripts (./logs, ./checkpoint) land here
    work.mkdir()
    proc = run_script(script, clean_env(**env), work)
    check_run(tmp_path / ("run" if "RUN_DIR" in env else "out"), proc)
    if os.path.basename(script) == "train_sera_multinode.sh":
        ranks = set(re.findall(r"Process (\d+) exits successfully", proc.stdout + proc.stderr))
        assert len(ranks) == 2, ranks  # two local processes
