"""scripts/gpu_check.sh / gpu_check.py: the parts that run without a GPU (syntax, the JSON it writes, its JUnit
reading). The GPU parts themselves run only on a lent GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import gpu_check  # noqa: E402


def test_script_syntax():
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "gpu_check.sh")]).returncode == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU answer")
def test_without_cuda_every_part_is_skipped_with_its_reason(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {s["part"] for s in report["skipped"]} == {"bench", "gpu_tests", "sera_loop_2_iterations", "vllm"}
    assert all(s["why"] == "no CUDA device" for s in report["skipped"])
    assert report["device"] is None and report["versions"]["torch"] and report["results"] == {}
    assert 0 < report["budget_s"] <= 360


def test_junit_counts_and_report_rewrites(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><skipped message="needs vllm"/></testcase>'
                   '<testcase classname="t" name="c"><failure message="boom"/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(str(xml))
    assert (counts["passed"], counts["skipped"], counts["failed"]) == (1, 1, 1)
    assert counts["tests"]["t::b"] == "skipped: needs vllm"
    out = tmp_path / "r" / "g.json"
    report = gpu_check.Report(str(out), budget_s=100)
    report.put("scoring", {"tokens_per_s": 5})
    report.skip("vllm", "not installed")
    report.error("bench", ValueError("bad"))
    data = json.loads(out.read_text())  # written after every change: a run cut short keeps what it measured
    assert data["results"]["scoring"] == {"tokens_per_s": 5} and data["skipped"] == [{"part": "vllm",
                                                                                      "why": "not installed"}]
    assert data["errors"]["bench"] == "ValueError: bad" and 0 < report.left() <= 100


def test_bench_and_random_weights_on_a_tiny_model(tmp_path):
    """The benchmark code itself, on CPU at toy sizes, from a model directory without weights (config + tokenizer,
    as the device check carries SmolLM2): every figure is recorded."""
    import shutil

    import tiny

    full = tiny.build_tiny_llama(str(tmp_path / "full"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(full):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(full, f), bare)
    path, note = gpu_check.model_dir(str(bare))
    assert "random weights" in note and os.path.exists(os.path.join(path, "config.json"))
    report = gpu_check.Report(str(tmp_path / "g.json"), budget_s=100)
    gpu_check.bench(path, report, device="cpu", dtype="fp32", size=gpu_check.SMALL)
    r = json.loads((tmp_path / "g.json").read_text())["results"]
    assert r["train_step"]["step_s"] > 0 and r["train_step"]["tokens_per_s"] > 0
    assert r["scoring"]["sequences"] == 32 and r["scoring"]["packed"] is True
    assert r["generation_hf"]["samples"] == 16 and 0 < r["generation_hf"]["generated_tokens"] <= 16 * 8
    assert gpu_check.model_dir(str(tmp_path / "nothing"))[0] is None
