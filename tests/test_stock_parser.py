"""`build_stock_parser()` (read out of the installed openrlhf/cli/train_dpo.py with `ast`) is the parser the
installed stock CLI really builds: every flag, with the same default, choices, type, nargs and action. So an
OpenRLHF upgrade that changes the CLI fails this test, not a user.

The stock side runs the installed CLI itself (`python -m openrlhf.cli.train_dpo --help`, CPU compatibility layer
applied first) and records the parser it hands to `parse_args`, then lets `--help` run as usual.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import pytest
from conftest import ENV, REPO

from sera_openrlhf.openrlhf_adapter import args as stock_args

MARK = "SERA_STOCK_PARSER_JSON "
FROZEN_NOW = (2000, 1, 2, 3, 4)  # the stock --logger.wandb.run_name default embeds datetime.now()

# Runs in a fresh interpreter: the installed stock CLI as `__main__`, exactly as `python -m` would.
STOCK_CLI = r"""
import argparse, builtins, datetime, json, runpy, sys, types

class FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(*FROZEN_NOW)

# Only the stock CLI module's own `from datetime import datetime` gets the frozen clock (replacing
# datetime.datetime process-wide breaks C extensions).
frozen_module = types.ModuleType("datetime")
frozen_module.datetime = FrozenDatetime
original_import = builtins.__import__

def import_(name, globals=None, locals=None, fromlist=(), level=0):
    if (name == "datetime" and fromlist and (globals or {}).get("__name__") == "__main__"
            and str((globals or {}).get("__file__", "")).replace("\\", "/").endswith("openrlhf/cli/train_dpo.py")):
        return frozen_module
    return original_import(name, globals, locals, fromlist, level)

builtins.__import__ = import_

from sera_openrlhf.openrlhf_adapter import compat

compat.set_launch_env_defaults()
compat.apply()  # OpenRLHF imports flash_attn at module level; the stand-in makes it importable on CPU

original_parse_args = argparse.ArgumentParser.parse_args

def parse_args(self, *a, **k):
    print(MARK + json.dumps(describe(self)), flush=True)
    return original_parse_args(self, *a, **k)  # --help: prints the help and exits 0

argparse.ArgumentParser.parse_args = parse_args
sys.argv = ["openrlhf.cli.train_dpo", "--help"]
runpy.run_module("openrlhf.cli.train_dpo", run_name="__main__", alter_sys=True)
raise SystemExit("the stock CLI did not exit on --help")
"""


def describe(parser: argparse.ArgumentParser) -> dict:
    """Every optional flag of `parser` -> what a user sees of it (JSON-safe; defaults as repr, so tuple != list)."""
    out = {}
    for a in parser._actions:
        entry = {
            "dest": a.dest,
            "action": type(a).__name__,
            "default": repr(a.default),
            "choices": None if a.choices is None else [repr(c) for c in a.choices],
            "type": getattr(a.type, "__name__", repr(a.type)),
            "nargs": repr(a.nargs),
            "const": repr(a.const),
            "required": a.required,
        }
        for opt in a.option_strings:
            out[opt] = entry
    return out


@pytest.fixture(scope="module")
def stock():
    """(flags of the parser the installed stock CLI builds, its --help text)."""
    import inspect

    code = (f"from __future__ import annotations\nMARK = {MARK!r}\nFROZEN_NOW = {FROZEN_NOW!r}\n"
            + inspect.getsource(describe) + STOCK_CLI)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, **ENV})
    assert proc.returncode == 0, f"stock CLI --help failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, proc.stdout[-3000:]
    flags = json.loads(lines[0][len(MARK):])
    # a copy patched with patches/openrlhf-0.11.2-sera.patch registers our --sera.* flags itself
    flags = {k: v for k, v in flags.items() if not k.startswith("--sera.")}
    return flags, proc.stdout


@pytest.fixture
def ours(monkeypatch):
    class FrozenDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*FROZEN_NOW)

    monkeypatch.setattr(stock_args, "datetime", FrozenDatetime)
    return describe(stock_args.build_stock_parser())


def test_stock_cli_really_built_that_parser(stock):
    flags, help_text = stock
    assert "--model.beta" in flags and "--ds.param_dtype" in flags, sorted(flags)
    missing = [f for f in flags if f not in help_text]
    assert not missing, f"flags recorded from parse_args but absent from the stock --help output: {missing}"


def test_our_parser_matches_the_installed_stock_cli(stock, ours):
    flags, _ = stock
    assert sorted(set(flags) - set(ours)) == [], "stock flags missing from build_stock_parser()"
    assert sorted(set(ours) - set(flags)) == [], "build_stock_parser() has flags the stock CLI does not"
    diffs = []
    for flag, theirs in flags.items():
        mine = dict(ours[flag])
        if flag == "--ds.param_dtype":  # the one deliberate difference: fp32 is added (CPU) unless stock has it
            fp32 = repr("fp32")
            expected = theirs["choices"] + ([] if fp32 in theirs["choices"] else [fp32])
            assert mine["choices"] == expected, (mine["choices"], expected)
            mine["choices"] = theirs["choices"]
        for key in theirs:
            if mine[key] != theirs[key]:
                diffs.append(f"{flag} {key}: stock {theirs[key]} != ours {mine[key]}")
    assert not diffs, "\n".join(diffs)


def test_run_name_default_is_compared_not_skipped(stock, ours):
    """The clock-dependent --logger.wandb.run_name default is pinned by freezing the clock on both sides (so the
    comparison above cannot flake at a minute boundary), not by leaving it out. If a new OpenRLHF formats it
    differently, update the expected timestamp here."""
    flags, _ = stock
    for side, d in (("stock", flags), ("ours", ours)):
        assert "0102T03:04" in d["--logger.wandb.run_name"]["default"], (side, d["--logger.wandb.run_name"])
