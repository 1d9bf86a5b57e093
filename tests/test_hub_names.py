"""Hub model ids and Hub dataset names, offline, as clusters run (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1).

A temporary HF_HOME holds what earlier online runs would have left:

- models: the hub cache layout `hub/models--ORG--NAME/refs/main` (a commit id) and `snapshots/<commit>/` (the files),
  for `org/tiny` and the slashless `tinyslash`, both the session's tiny Llama;
- a dataset: with HF_HUB_OFFLINE, `datasets` (5.x) never looks at the hub cache for a dataset name
  (`dataset_module_factory` gives up on the Hub first), it falls back to the Arrow cache that an earlier
  `load_dataset("org/prefs")` leaves in HF_DATASETS_CACHE: `org___prefs/default/0.0.0/<commit>/` with
  `dataset_info.json` and `prefs-<split>.arrow`. `save_to_disk` output is not that cache. We write it with
  `datasets`' own json builder (dataset name "prefs", config "default") and rename `prefs/` to `org___prefs/`:
  the builder refuses repo_id="org/prefs" for data files outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import tiny
from conftest import read_jsonl, run_cli

from sera_openrlhf.errors import ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL, SLASHLESS, DATASET = "org/tiny", "tinyslash", "org/prefs"


def msg(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def chat_pairs(n: int, seed: int) -> list[dict]:
    """Whole conversations, no prompt column: the prompt is the conversation before the last assistant turn."""
    return [{"chosen": [msg("user", r["prompt"]), msg("assistant", r["chosen"])],
             "rejected": [msg("user", r["prompt"]), msg("assistant", r["rejected"])]}
            for r in tiny.preference_pairs(n, seed=seed)]


@pytest.fixture(scope="module")
def hf_home(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    for repo in ("models--org--tiny", f"models--{SLASHLESS}"):
        root = home / "hub" / repo
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)
        shutil.copytree(tiny_model, root / "snapshots" / COMMIT)

    from datasets.packaged_modules.json.json import Json

    src = home / "src"
    files = {"train": tiny.write_jsonl(str(src / "train.jsonl"), chat_pairs(16, seed=11)),
             "test": tiny.write_jsonl(str(src / "test.jsonl"), chat_pairs(8, seed=12))}
    cache = home / "datasets"
    Json(cache_dir=str(cache), dataset_name="prefs", config_name="default", config_id="default", hash=COMMIT,
         data_files=files).download_and_prepare()
    (cache / "prefs").rename(cache / "org___prefs")
    return home


def hub_env(home) -> dict:
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def in_cache(hf_home, monkeypatch):
    """This process reads the temporary caches (the libraries read these paths at call time)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hf_home


def spec(dataset: str, **changes):
    from sera_openrlhf.sources import DataSpec

    fields = dict(dataset=dataset, probs=None, seed=42, prompt_key=None, chosen_key="chosen", rejected_key="rejected",
                  max_samples=1000000, split="train", use_ms=False, skip_invalid=False, prompts=None,
                  flag="--data.dataset")
    return DataSpec(**{**fields, **changes})


# ---------------------------------------------------------------------------------------------------- in-process


def test_hub_ids_resolve_to_cached_snapshots(in_cache, tiny_model):
    from sera_openrlhf.cli.train_dpo import check_model_dir
    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()  # before anything imports openrlhf.models (no flash_attn on CPU)
    from sera_openrlhf.openrlhf_adapter.train import reference_fingerprint
    from sera_openrlhf.scoring import model_fingerprint
    from sera_openrlhf.sources import resolve_model

    snapshot = str(in_cache / "hub" / "models--org--tiny" / "snapshots" / COMMIT)
    assert resolve_model(MODEL, "--model.model_name_or_path") == snapshot
    assert resolve_model(SLASHLESS, "--model.model_name_or_path").endswith(f"models--{SLASHLESS}/snapshots/{COMMIT}")
    for name in (MODEL, SLASHLESS):
        check_model_dir(name, "--model.model_name_or_path", trust_remote_code=False)
    # the reference cache's key is the snapshot's content: the same as the local copy's
    args = SimpleNamespace(ds=SimpleNamespace(param_dtype="fp32", attn_implementation="sdpa"))
    extra = {"dtype": "fp32", "attn": "sdpa"}
    assert reference_fingerprint(args, MODEL) == reference_fingerprint(args, SLASHLESS) \
        == model_fingerprint(tiny_model, extra=extra) == model_fingerprint(MODEL, extra=extra)

    for name, needle in (("org/missing", "not in the Hugging Face cache"), ("gpt2", "not in the Hugging Face cache"),
                         ("./nope", "no such model directory"), ("a/b/c", "no such model directory")):
        with pytest.raises(ConfigError, match=needle) as e:
            check_model_dir(name, "--ref.model_name_or_path", trust_remote_code=False)
        assert str(e.value).startswith(f"--ref.model_name_or_path {name}: ") and "\n" not in str(e.value)


def test_custom_code_check_reads_the_snapshot_config(in_cache):
    from sera_openrlhf.cli.train_dpo import check_model_dir

    custom = in_cache / "hub" / "models--org--custom"
    (custom / "refs").mkdir(parents=True)
    (custom / "refs" / "main").write_text(COMMIT)
    (custom / "snapshots" / COMMIT).mkdir(parents=True)
    (custom / "snapshots" / COMMIT / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.X"}}))
    with pytest.raises(ConfigError, match="--sera.trust_remote_code"):
        check_model_dir("org/custom", "--model.model_name_or_path", trust_remote_code=False)
    check_model_dir("org/custom", "--model.model_name_or_path", trust_remote_code=True)


def test_hub_dataset_splits_and_chat_prompts(in_cache):
    from sera_openrlhf.sources import load_offline, load_prompts

    train = spec(DATASET)
    offline = load_offline(train)
    assert len(offline.rows) == 16 and offline.use_prompt_key and offline.info["files"][0]["format"] == "chat"
    assert set(offline.file_of.values()) == {DATASET}
    row = offline.rows[0]
    assert row["prompt"][-1]["role"] == "user" and [m["role"] for m in row["chosen"]] == ["assistant"]
    assert {p["prompt"][0]["content"] for p in load_prompts(train, offline)} == \
        {r["prompt"][0]["content"] for r in offline.rows}
    assert load_offline(train).rows == offline.rows  # stable ids
    assert len(load_offline(train.for_eval(DATASET, "test")).rows) == 8
    with pytest.raises(ConfigError, match="no split 'dev'; set --eval.split"):
        load_offline(train.for_eval(DATASET, "dev"))
    with pytest.raises(ConfigError, match="--data.dataset org/absent: cannot load it"):
        load_offline(spec("org/absent"))
    # --sera.prompts as a Hub dataset of pairs: the conversation before the last assistant turn
    prompts = load_prompts(spec(DATASET, prompts=DATASET, prompt_key="prompt"), offline)
    assert len(prompts) == 16 and prompts[0]["prompt"] == offline.rows[0]["prompt"]


def test_probability_mixture_matches_stock_blending(tmp_path):
    """--data.dataset_probs + --data.max_samples give the rows stock train_dpo trains on, in its order."""
    from openrlhf.datasets.utils import blending_datasets

    from sera_openrlhf.sources import load_offline

    a = tiny.write_jsonl(str(tmp_path / "a.jsonl"), tiny.preference_pairs(12, seed=1))
    b = tiny.write_jsonl(str(tmp_path / "b.jsonl"), [dict(r, id=f"b{r['id']}") for r in tiny.preference_pairs(5, 2)])
    mix = spec(f"{a},{b}", probs="0.3,0.7", seed=7, max_samples=20, prompt_key="prompt")
    offline = load_offline(mix)
    quiet = SimpleNamespace(print=lambda *a: None, args=SimpleNamespace(use_ms=False), is_rank_0=lambda: False)
    stock = blending_datasets(mix.dataset, mix.probs, quiet, 7, max_count=20)
    stock = stock.select(range(min(20, len(stock))))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in offline.rows] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in stock]
    ids = [r["id"] for r in offline.rows]
    assert len(set(ids)) == len(ids) == 20 and "bp0#2" in ids  # repeats of the smaller file get their own ids
    assert offline.file_of["bp0#2"] == b
    for probs, needle in (("0.5", "1 values for 2"), ("0.5,0.6", "sum to 1"), ("a,b", "comma-separated numbers")):
        with pytest.raises(ConfigError, match=needle):
            load_offline(spec(f"{a},{b}", probs=probs))


# ---------------------------------------------------------------------------------------------------- CLI


def cli_flags(model: str, data: str, out, *extra) -> list[str]:
    return ["--model.model_name_or_path", model, "--data.dataset", data, "--data.apply_chat_template",
            "--data.max_len", "64", "--train.batch_size", "8", "--train.micro_batch_size", "8",
            "--train.max_epochs", "1", "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--adam.lr", "1e-3",
            "--ckpt.output_dir", str(out), *extra]


@pytest.mark.slow
def test_loop_on_hub_model_and_hub_dataset_mixture(hf_home, tmp_path):
    """--sera.enable with a Hub model id and a Hub dataset mixed 50/50 with a local file, chat data without
    --data.prompt_key (the prompts to bootstrap from are the conversations before the last assistant turn), and the
    Hub dataset's test split as --eval.dataset, evaluated after every iteration."""
    local = tiny.write_jsonl(str(tmp_path / "local.jsonl"), chat_pairs(8, seed=13))
    run_dir = tmp_path / "run"
    run_cli(cli_flags(MODEL, f"{DATASET},{local}", run_dir, "--data.dataset_probs", "0.5,0.5",
                      "--data.max_samples", "16", "--sera.enable", "--sera.iterations", "2", "--sera.num_samples", "2",
                      "--sera.max_new_tokens", "8", "--sera.num_prompts", "4", "--sera.keep_truncated",
                      "--sera.no_fluency_guard", "--eval.dataset", DATASET, "--eval.split", "test"),
            env=hub_env(hf_home))
    state = json.loads((run_dir / "sera_state.json").read_text())
    for t in ("1", "2"):
        assert set(state["iterations"][t]["train"]["eval"]) == {"eval_loss", "acc_mean", "margin", "n", "n_prompt_too_long"}
    files = {f["path"]: f for f in state["data"]["files"]}
    assert set(files) == {DATASET, local} and all(f["format"] == "chat" for f in files.values())
    assert state["data"]["mixture"] == {"probs": [0.5, 0.5], "seed": 42}
    samples = read_jsonl(run_dir / "iter_2" / "samples.jsonl")
    assert samples and all(isinstance(s["prompt"], list) and s["prompt"][-1]["role"] == "user" for s in samples)
    assert os.listdir(run_dir / "cache")  # reference log-probs cached under the snapshot's fingerprint


@pytest.mark.slow
def test_stock_path_with_a_slashless_hub_id(hf_home, tmp_path):
    """No --sera flag: OpenRLHF's own train() with a slashless Hub id and a Hub dataset, from the caches."""
    out = tmp_path / "out"
    proc = run_cli(cli_flags(SLASHLESS, DATASET, out, "--data.max_samples", "8"), env=hub_env(hf_home))
    assert "model saved to" in proc.stdout and (out / "model.safetensors").exists()
