"""Launch scripts that need GPUs or clusters are checked here for shell syntax and for flags: every flag they pass
must parse with the entry point's real parser (stock OpenRLHF flags + --sera.*)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess

import pytest
from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "scripts", "launch", "*.sh")))


def training_args(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    block = re.search(r"<<EOF\n(.*?)\nEOF", text, re.S)
    assert block, f"{path}: no training_commands heredoc"
    body = re.sub(r"\$\{?(\w+)\}?", r"/placeholder/\1", block.group(1))  # shell variables
    words = shlex.split(body.replace("\\\n", " "))
    assert words[0] == "sera_openrlhf.cli.train_dpo", words[0]
    return words[1:]


def test_there_are_launch_scripts():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"train_sera_deepspeed.sh", "train_sera_multinode.sh", "train_sera_vllm.sh",
            "train_sera_cpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_syntax_and_flags(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    from sera_openrlhf.cli.train_dpo import build_parser

    args = build_parser().parse_args(training_args(script))  # exits (SystemExit) on an unknown or bad flag
    assert getattr(args, "sera.enable") is True
