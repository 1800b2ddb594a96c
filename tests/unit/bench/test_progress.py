"""The benchmarks' progress bars: on stderr when it is a terminal, silent otherwise."""

import asyncio
import io
import sys

from tandem.bench.progress import RequestBar, tick_seconds


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_request_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    with RequestBar(3, "disaggregated") as bar:
        for ok in (True, False, True):
            bar.sent()
            bar.done(ok)
        assert bar.bar.disable
    assert (bar.num_sent, bar.num_failed) == (3, 1)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_request_bar_counts_sent_completed_and_failed_on_a_terminal(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with RequestBar(2, "colocated") as bar:
        assert not bar.bar.disable
        bar.sent()
        bar.sent()
        bar.done(True)
        bar.done(False)
        line = str(bar.bar)  # as drawn (tqdm redraws at most every 0.1 s)
    assert "colocated" in line and "2/2" in line and "sent=2, failed=1" in line
    assert terminal.getvalue().startswith("\rcolocated")  # drawn on stderr


def test_seconds_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    async def run() -> None:
        task = asyncio.create_task(tick_seconds(10.0, "soak", lambda: "status"))
        await asyncio.sleep(0.05)
        assert task.done()  # nothing to draw: it returned at once
        await task

    asyncio.run(run())
    assert capsys.readouterr().err == ""


def test_seconds_bar_shows_the_status_on_a_terminal(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    async def run() -> None:
        task = asyncio.create_task(tick_seconds(10.0, "interference", lambda: "phase A"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert "interference" in terminal.getvalue() and "phase A" in terminal.getvalue()
