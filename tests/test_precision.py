"""`--sera.precision`: flag validation and the auto choice, with the CPU flags and the matmul probe faked (no
timing is asserted, nothing is trained)."""

from __future__ import annotations

import json
import os

import pytest

from sera_openrlhf import precision
from sera_openrlhf.errors import ConfigError


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU machine with no CUDA, given flags, a probe that records its calls, and a private cache dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    state = {"flags": set(), "figures": {"fp32": 50.0, "bf16": 400.0, "n": 1024}, "calls": []}
    monkeypatch.setattr(precision, "cuda_bf16", lambda: None)
    monkeypatch.setattr(precision, "cpu_flags", lambda: state["flags"])
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Test CPU 9000")

    def probe(threads):
        state["calls"].append(threads)
        return dict(state["figures"])

    monkeypatch.setattr(precision, "matmul_gflops", probe)
    return state


def test_auto_is_fp32_on_a_cpu_without_bf16_instructions_and_does_not_probe(machine):
    info = precision.resolve("auto", "bf16", param_dtype_given=False, threads=2)
    assert info["choice"] == "fp32" and "neither amx_bf16 nor avx512_bf16" in info["reason"]
    assert machine["calls"] == [] and info["matmul_gflops"] is None and info["cpu_bf16_flags"] == []


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_auto_is_bf16_where_the_cpu_has_it_and_the_probe_measures_it_faster(machine, flag):
    machine["flags"] = {"avx2", flag}
    info = precision.resolve("auto", threads=2)
    assert info["choice"] == "bf16" and info["cpu_bf16_flags"] == [flag]
    assert info["matmul_gflops"]["bf16"] == 400.0 and info["probe_cached"] is False and machine["calls"] == [2]
    json.dumps(info)  # the run's stats record it as is


def test_auto_is_fp32_where_the_probe_measures_bf16_slower_or_barely_faster(machine):
    machine["flags"] = {"avx512_bf16"}
    machine["figures"] = {"fp32": 50.0, "bf16": 52.0, "n": 1024}
    info = precision.resolve("auto", threads=1)
    assert info["choice"] == "fp32" and "1.04x" in info["reason"]


def test_the_probe_is_cached_per_cpu_model_and_thread_count(machine, monkeypatch):
    machine["flags"] = {"amx_bf16"}
    first = precision.resolve("auto", threads=2)
    again = precision.resolve("auto", threads=2)
    assert machine["calls"] == [2] and again["probe_cached"] is True and again["choice"] == first["choice"]
    assert again["matmul_gflops"] == first["matmul_gflops"]
    precision.resolve("auto", threads=1)  # another thread count: measured once more
    assert machine["calls"] == [2, 1]
    path = precision.cache_path()
    assert path.startswith(os.environ["XDG_CACHE_HOME"]) and path.endswith(os.path.join("sera-openrlhf",
                                                                                        "precision.json"))
    entries = json.load(open(path, encoding="utf-8"))["entries"]
    assert sorted(entries) == ["Test CPU 9000|threads=1", "Test CPU 9000|threads=2"]
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]  # atomic: no leftovers
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Other CPU")
    precision.resolve("auto", threads=2)
    assert machine["calls"] == [2, 1, 2]


def test_a_damaged_or_other_torch_cache_is_measured_again(machine):
    machine["flags"] = {"amx_bf16"}
    path = precision.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    assert precision.resolve("auto", threads=2)["probe_cached"] is False
    data = json.load(open(path, encoding="utf-8"))
    data["entries"]["Test CPU 9000|threads=2"]["torch"] = "0.0.1"
    with open(path, "w") as f:
        json.dump(data, f)
    assert precision.resolve("auto", threads=2)["probe_cached"] is False and machine["calls"] == [2, 2]


def test_home_falls_back_when_xdg_cache_home_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert precision.cache_path() == os.path.join(str(tmp_path), ".cache", "sera-openrlhf", "precision.json")


def test_cuda_is_bf16_when_the_gpu_supports_it(machine, monkeypatch):
    monkeypatch.setattr(precision, "cuda_bf16", lambda: True)
    assert precision.resolve("auto", threads=1)["choice"] == "bf16"
    monkeypatch.setattr(precision, "cuda_bf16", lambda: False)
    assert precision.resolve("auto", threads=1)["choice"] == "fp32"
    assert machine["calls"] == []


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_used_as_is(machine, requested):
    machine["flags"] = {"amx_bf16"}
    info = precision.resolve(requested, "bf16", param_dtype_given=False, threads=2)
    assert info["choice"] == requested and machine["calls"] == [] and "warning" not in info["reason"]


def test_bf16_forced_on_a_cpu_without_it_is_kept_with_a_warning(machine):
    info = precision.resolve("bf16", threads=2)
    assert info["choice"] == "bf16" and "warning: this CPU has no native bf16" in info["reason"]


def test_an_explicit_param_dtype_wins_over_auto(machine):
    machine["flags"] = {"amx_bf16"}
    info = precision.resolve("auto", "fp32", param_dtype_given=True, threads=2)
    assert info["choice"] == "fp32" and "--ds.param_dtype fp32 given" in info["reason"] and machine["calls"] == []


def test_contradicting_flags_are_an_error_naming_both():
    with pytest.raises(ConfigError, match="--sera.precision bf16 contradicts --ds.param_dtype fp32"):
        precision.check_flags("bf16", "fp32", param_dtype_given=True)
    precision.check_flags("bf16", "bf16", param_dtype_given=True)  # the same dtype twice is fine
    precision.check_flags("bf16", "fp32", param_dtype_given=False)  # the parser's default is not a choice


def cli_args(argv, **ds):
    """What parse_args gives, without building OpenRLHF's parser (that import alone takes seconds)."""
    from types import SimpleNamespace

    from sera_openrlhf.cli.train_dpo import mark_given
    from sera_openrlhf.config import defaults

    sera = {**defaults(), **{a.split("=")[0][len("--sera."):]: v for a, v in zip(argv, argv[1:] + [None])
                             if a.startswith("--sera.")}}
    args = SimpleNamespace(sera=SimpleNamespace(**sera), ds=SimpleNamespace(param_dtype="bf16", **ds),
                           model=SimpleNamespace(model_name_or_path="no/such/model"))
    return mark_given(args, argv)


def test_cli_rejects_contradicting_flags_before_anything_loads(machine):
    from sera_openrlhf.cli.train_dpo import run

    args = cli_args(["--sera.precision", "fp32", "--ds.param_dtype", "bf16"])
    with pytest.raises(ConfigError, match="--sera.precision fp32 contradicts --ds.param_dtype bf16"):
        run(args)  # before the model path (which does not exist) is even looked at


def test_cli_writes_the_choice_to_param_dtype_and_keeps_the_record(machine):
    args = cli_args(["--sera.precision", "auto"])
    assert args._param_dtype_given is False and args._sera_active
    info = precision.apply_to_args(args)
    assert args.ds.param_dtype == "fp32" and args._sera_precision is info and info["requested"] == "auto"
    # underscore: dump_args (the run's configuration, compared on resume) leaves it out
    args = cli_args(["--sera.precision", "auto", "--ds.param_dtype=bf16"])
    assert args._param_dtype_given is True
    precision.apply_to_args(args)
    assert args.ds.param_dtype == "bf16" and args._sera_precision["reason"].startswith("--ds.param_dtype bf16 given")


def test_the_log_line_names_choice_reason_and_probe(machine):
    machine["flags"] = {"amx_bf16"}
    line = precision.describe(precision.resolve("auto", threads=2))
    assert line.startswith("precision bf16 (auto: CPU has amx_bf16") and "fp32 50.0 / bf16 400.0 GFLOP/s" in line
