"""Progress bars of the benchmarks, on stderr and off where stderr is not a terminal (tqdm's
`disable=None`): logs, pipes and captured test output get the figures only."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from tqdm import tqdm


def bar(total: float | None, desc: str, unit: str, **kwargs) -> tqdm:
    """A bar on stderr, disabled when stderr is not a TTY, cleared when done (the figures
    printed next are the record)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False,
                **kwargs)  # fmt: skip


class RequestBar:
    """Requests completed out of `total`, with how many were sent and how many failed."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = bar(total, desc, "req")
        self.num_sent = 0
        self.num_failed = 0

    def sent(self) -> None:
        self.num_sent += 1
        self._postfix()
        self.bar.update(0)  # redrawn at most every tqdm's mininterval

    def done(self, ok: bool) -> None:
        self.num_failed += not ok
        self._postfix()
        self.bar.update(1)

    def _postfix(self) -> None:
        failed = f", failed={self.num_failed}" if self.num_failed else ""
        self.bar.set_postfix_str(f"sent={self.num_sent}{failed}", refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> RequestBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def tick_seconds(
    total_s: float, desc: str, status: Callable[[], str], interval_s: float = 0.5
) -> None:
    """A bar of seconds elapsed out of `total_s`, its postfix from `status()`, redrawn every
    `interval_s` until cancelled (for loads that run for a time, not a number of requests)."""
    seconds = "{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}"
    with bar(round(total_s, 1), desc, "s", bar_format=seconds) as b:
        if b.disable:
            return
        start = time.perf_counter()
        try:
            while True:
                b.n = min(round(time.perf_counter() - start, 1), b.total)
                b.set_postfix_str(status(), refresh=False)
                b.refresh()
                await asyncio.sleep(interval_s)
        except asyncio.CancelledError:
            b.set_postfix_str(status(), refresh=True)
            raise
