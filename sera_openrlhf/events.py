"""Named points of a run that outside code can observe: phase boundaries and optimizer steps.

The loop and the trainer `emit` a point; whoever `subscribe`d (a monitoring hook, the test suite's fault
injector in tests/fault_cli.py) is called with its name. With no subscriber `emit` does nothing. Points:

    iter<t>/<phase>:start     a phase began, nothing written yet
    iter<t>/<phase>:end       the phase's outputs are written but the phase is not yet marked done
    iter<t>/<phase>:step<n>   after optimizer step n of a training phase
"""

from __future__ import annotations

from typing import Callable

_subscribers: list[Callable[[str], None]] = []
current_phase = ""  # "iter<t>/<phase>", set by the driver so the trainer can name its step points


def subscribe(fn: Callable[[str], None]) -> None:
    _subscribers.append(fn)


def emit(point: str) -> None:
    for fn in _subscribers:
        fn(point)
