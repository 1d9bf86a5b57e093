"""Fault injection for resume and hardening tests.

`SERA_FAULT_KILL_AT` holds comma-separated points; reaching one SIGKILLs the process at once, exactly like an
out-of-memory kill or a lost node. Points used by the loop and the trainer:

    iter<t>/<phase>:start     the phase began, nothing written yet
    iter<t>/<phase>:end       the phase's outputs are written but the phase is not yet marked done
    iter<t>/train:step<n>     after optimizer step n of iteration t's training

`SERA_FAULT_SIGNAL=TERM` sends SIGTERM instead (what a scheduler sends before a kill). Unset in normal use:
`kill_point` is then a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

current_phase = ""  # set by the loop so the trainer can name its points


def kill_point(point: str) -> None:
    points = os.environ.get("SERA_FAULT_KILL_AT")
    if points and point in points.split(","):
        os.kill(os.getpid(), signal.SIGTERM if os.environ.get("SERA_FAULT_SIGNAL") == "TERM" else signal.SIGKILL)
