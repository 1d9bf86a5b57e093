"""`pip install sera-openrlhf` as a user does it: a wheel built from the repository installs into a fresh virtual
environment, and the console entry point works from there, not from the source tree.

The fresh environment gets the CPU OpenRLHF stack (torch, DeepSpeed, transformers, openrlhf 0.11.2 ...) without a
download: a `.pth` file appends the test interpreter's site-packages to its sys.path. Python does not process `.pth`
files inside a directory that a `.pth` line added, so the editable install of sera_openrlhf there (a `.pth` that
installs an import finder pointing at the repository) stays inactive; the test checks that sera_openrlhf is imported
from the new environment. The wheel is installed before that `.pth` exists, so pip sees only the fresh environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest
from conftest import ENV, REPO, base_flags

pytestmark = pytest.mark.slow

IGNORED = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.pyc", ".pytest_cache", ".ruff_cache")


def sh(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    label = " ".join([os.path.basename(str(cmd[0])), *map(str, cmd[1:3])]).splitlines()[0][:80]
    print(f"{label}: exit {proc.returncode} after {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def source_tree(dest) -> str:
    """The repository's files as a checkout has them (tracked and untracked-but-not-ignored), outside the repo so
    that building leaves no build/ or egg-info behind in it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            src = os.path.join(REPO, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(dest, rel))
    else:  # not a git checkout
        shutil.copytree(REPO, dest, ignore=IGNORED, dirs_exist_ok=True)
    return str(dest)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("wheel_build")
    src = source_tree(root / "src")
    # offline: no build isolation (setuptools and wheel of this interpreter), no index
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "-w", str(root / "dist"), src], cwd=root)
    (path,) = (root / "dist").glob("sera_openrlhf-*.whl")
    return str(path)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("user_venv")
    env_dir = root / "venv"
    sh([sys.executable, "-m", "venv", str(env_dir)], cwd=root)  # with pip (ensurepip: bundled, offline)
    py = env_dir / "bin" / "python"
    sh([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", wheel], cwd=root)
    site = sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    stack = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(site, "cpu_openrlhf_stack.pth"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in stack))
    return env_dir


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **ENV}


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = "sera_openrlhf/resources/hh_rlhf_harmless_base/"
    for f in ("pairs.jsonl", "prompts.jsonl", "pairs_chat.jsonl", "prompts_chat.jsonl", "LICENSE", "README.md"):
        assert data + f in names, f
    assert "sera_openrlhf/cli/train_dpo.py" in names and "sera_openrlhf/openrlhf_adapter/compat.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/")) or "/tests/" in n
                or n.endswith(("conftest.py", "/tiny.py", "fault_cli.py"))]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sera-train-dpo = sera_openrlhf.cli.train_dpo:main" in text


def test_installed_package_comes_from_the_venv(venv, tmp_path):
    probe = (
        "import importlib.metadata, json, sys, sera_openrlhf, openrlhf, deepspeed\n"
        "from sera_openrlhf import assets\n"
        "print(json.dumps({'sera': sera_openrlhf.__file__, 'data': assets.default_dataset_path(),\n"
        "  'prompts': assets.default_prompts_path(), 'openrlhf': importlib.metadata.version('openrlhf'),\n"
        "  'finders': [type(f).__module__ for f in sys.meta_path], 'path': sys.path}))\n"
    )
    out = json.loads(sh([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=user_env()).stdout
                     .strip().splitlines()[-1])
    venv_dir = os.path.realpath(venv)
    for key in ("sera", "data", "prompts"):
        path = os.path.realpath(out[key])
        assert path.startswith(venv_dir + os.sep) and not path.startswith(REPO + os.sep), (key, path)
    assert os.path.getsize(out["data"]) > 0 and os.path.getsize(out["prompts"]) > 0
    assert out["openrlhf"] == "0.11.2"
    assert not [m for m in out["finders"] if "editable" in m], out["finders"]  # the repo's editable finder is off
    assert os.path.realpath(REPO) not in [os.path.realpath(p) for p in out["path"] if p]  # no source tree


def test_console_script_help_and_tiny_sera_run(venv, tiny_model, tiny_data, tmp_path):
    assert all((venv / "bin" / name).exists() for name in ("sera-train-dpo", "sera-report", "sera-demo"))
    exe = str(venv / "bin" / "sera-train-dpo")
    proc = sh([exe, "--help"], cwd=tmp_path, env=user_env())
    assert "--sera.enable" in proc.stdout and "--model.beta" in proc.stdout

    run_dir = tmp_path / "run"
    flags = base_flags(tiny_model, tiny_data, str(run_dir), "--data.max_samples", "16", "--sera.enable",
                       "--sera.iterations", "2", "--sera.num_prompts", "4", "--sera.num_samples", "2",
                       "--sera.max_new_tokens", "8")
    proc = sh([exe, *flags], cwd=tmp_path, env=user_env(), timeout=900)
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert "iter2/train" in state["done"], state["done"]
    assert (run_dir / "iter_2" / "policy" / "model.safetensors").exists()
    assert (run_dir / "report" / "report.md").exists()
    assert f"[sera] final policy: {run_dir / 'iter_2' / 'policy'}" in proc.stdout + proc.stderr
