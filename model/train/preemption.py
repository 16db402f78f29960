"""A stop request from the outside (SIGTERM: preemption, scancel, a scheduler's time limit), turned into a
clean stop at a step boundary: the loop asks ``requested_anywhere`` after each step, the ranks agree, and
the run checkpoints the step it finished and ends instead of being killed mid-write."""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class StopRequest:
    """Installs a handler for ``signals`` (while in its ``with`` block, main thread only: elsewhere Python
    cannot install one and the signals keep their handlers) that records the first one received."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        if self.received is None:
            self.received = number

    def __enter__(self) -> "StopRequest":
        for number in self.signals:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def requested_anywhere(self, device: torch.device) -> bool:
        """Whether some rank received a stop signal (an all-reduce under torch.distributed: call it on every
        rank at the same steps; the signal reaches the ranks at different times)."""
        flag = torch.tensor(float(self.received is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
