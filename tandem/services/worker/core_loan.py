"""Cores that follow the load: a decode worker borrows the prefill workers' cores while none
of them has work.

On a machine split into pinned workers (`tandem serve`'s default where there are as many cores
as workers), a prefill worker's cores idle between prompts, while at low concurrency the decode
worker's step is one-row products bound by memory bandwidth that one core cannot use up. The
launcher then gives the decode worker a loan: it may run on the prefill workers' cores too, and
uses `--core-loan-threads` torch threads in each step it starts while no prefill worker is busy,
its own `--torch-threads` otherwise. Isolation is kept where it matters: a prefill worker marks
itself busy before it runs a plan, so a long prompt costs the decode worker at most the one step
that had already started with the borrowed threads (and the prefill worker runs at a lower
priority than the decode worker on the cores the light stages share).

The mark is a file named after the prefill worker in a directory the launcher makes (in
/dev/shm, memory only) and passes to the workers as `--core-loan-dir`: present while busy. A
prefill worker that dies busy leaves its mark behind, which only stops the loan (the safe way)
until it starts again and clears it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class BusyMark:
    """A prefill worker's side: its file in the loan directory while it has work."""

    def __init__(self, directory: str | os.PathLike, worker_id: str) -> None:
        self.path = Path(directory) / worker_id
        self.busy = True
        self.set(False)  # a mark left by an earlier run of this worker goes

    def set(self, busy: bool) -> None:
        if busy == self.busy:
            return
        self.busy = busy
        try:
            if busy:
                self.path.touch()
            else:
                self.path.unlink(missing_ok=True)
        except OSError as e:  # the directory went (the launcher stopped): no loan to keep
            logger.debug("core loan mark %s: %s", self.path, e)


# Seconds every prefill worker must have been idle before the cores are lent: back-to-back
# plans leave the marks gone for a moment between them, and a decode step started with the
# borrowed threads just then would run beside the next plan, its threads on the busy core
# holding it back (measured: ITL p99 with long prompts 169 -> 208 ms without this wait).
SETTLE_S = 0.25


class CoreLoan:
    """A decode worker's side: how many torch threads its next step may use."""

    def __init__(
        self, directory: str | os.PathLike, own: int, lent: int, settle_s: float = SETTLE_S
    ) -> None:
        self.directory = str(directory)
        self.own, self.lent = own, max(lent, own)
        self.settle_s = settle_s

    def lendable(self) -> bool:
        """No prefill worker is busy, nor has been for `settle_s` (a mark made or removed
        changes the directory's time). A directory that cannot be read lends nothing."""
        try:
            changed = os.stat(self.directory).st_mtime
            with os.scandir(self.directory) as marks:
                if next(marks, None) is not None:
                    return False
        except OSError:
            return False
        return time.time() - changed >= self.settle_s

    def threads(self) -> int:
        return self.lent if self.lendable() else self.own
