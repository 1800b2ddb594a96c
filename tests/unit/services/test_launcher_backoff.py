"""`tandem serve` starts a dead stage again after a back-off (1 s doubling to 30 s, reset once
it stayed up a minute), for every stage and however often, and never waits on one stage's
back-off while another needs starting. On a fake clock, with fake processes."""

from __future__ import annotations

import argparse
import logging

import pytest

from tandem.services import launcher
from tandem.services.launcher import Backoff, Cluster, Stage
from tandem.services.transport.subjects import Role


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeProc:
    """A child process that has exited with `returncode` (None: running)."""

    next_pid = 1000

    def __init__(self, returncode: int | None = None) -> None:
        FakeProc.next_pid += 1
        self.pid = FakeProc.next_pid
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


def test_delay_doubles_from_one_second_up_to_the_cap():
    clock = FakeClock()
    backoff = Backoff(clock)
    delays = []
    for _ in range(8):
        delays.append(backoff.died())
        clock.now += delays[-1]
        backoff.started()
        clock.now += 2  # dies again soon after starting
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_stage_that_stayed_up_a_minute_starts_from_the_first_delay_again():
    clock = FakeClock()
    backoff = Backoff(clock)
    for _ in range(4):
        backoff.died()
        backoff.started()
        clock.now += 10
    assert backoff.delay == 8
    clock.now += 60
    assert backoff.died() == 1
    backoff.started()
    clock.now += 59  # not quite stable: doubles on
    assert backoff.died() == 2


def test_the_first_death_waits_the_first_delay_even_right_after_start():
    clock = FakeClock()
    assert Backoff(clock, first=0.5, cap=4).died() == 0.5


def test_first_delay_must_be_positive_and_under_the_cap():
    with pytest.raises(ValueError):
        Backoff(first=0)
    with pytest.raises(ValueError):
        Backoff(first=10, cap=5)


@pytest.fixture
def cluster(monkeypatch):
    """A Cluster whose stages are fake processes: `_start` gives a running one."""
    clock = FakeClock()
    started: list[str] = []

    def fake_start(stage: Stage) -> None:
        stage.proc = FakeProc()
        started.append(stage.argv[-1])

    monkeypatch.setattr(launcher, "_start", fake_start)
    monkeypatch.setattr(launcher, "_remove_kv_files", lambda stage: None)
    c = Cluster(argparse.Namespace(), clock=clock)
    argv = ["tandem", "--worker-id"]
    c.stages = [
        Stage("gateway", ["tandem", "gateway"], Role.GATEWAY),
        Stage("scheduler", ["tandem", "scheduler"], Role.SCHEDULER),
        Stage("prefill-0", [*argv, "prefill-0"], Role.PREFILL),
        Stage("decode-0", [*argv, "decode-0"], Role.DECODE),
    ]
    for stage in c.stages:
        stage.backoff = Backoff(clock)
        stage.proc = FakeProc()
    c.started = started  # what was started again, by its last argument
    return c


def _stage(cluster: Cluster, name: str) -> Stage:
    return next(s for s in cluster.stages if s.name == name)


def test_any_dead_stage_is_started_again_and_the_cluster_goes_on(cluster, caplog):
    caplog.set_level(logging.INFO, logger=launcher.__name__)
    _stage(cluster, "scheduler").proc.returncode = 1
    _stage(cluster, "gateway").proc.returncode = -9
    cluster.tend()
    assert cluster.started == []  # not at once: after their back-off
    assert "scheduler exited with 1: starting it again in 1 s" in caplog.text
    assert "gateway exited with -9: starting it again in 1 s" in caplog.text
    cluster.clock.now += 1
    cluster.tend()
    assert sorted(cluster.started) == ["gateway", "scheduler"]
    assert len(cluster.stages) == 4
    assert all(s.restart_at is None and s.proc.poll() is None for s in cluster.stages)


def test_a_crash_looping_stage_holds_up_no_other(cluster):
    """The scheduler dies again and again, its delay growing; meanwhile a decode worker
    that dies is started again after its own 1 s."""
    scheduler = _stage(cluster, "scheduler")
    clock = cluster.clock
    for delay in (1, 2, 4):
        scheduler.proc.returncode = 1
        cluster.tend()
        assert scheduler.restart_at == clock.now + delay
        clock.now += delay
        cluster.tend()
        assert scheduler.restart_at is None
    scheduler.proc.returncode = 1
    cluster.tend()
    assert scheduler.restart_at == clock.now + 8
    _stage(cluster, "decode-0").proc.returncode = 1
    cluster.tend()
    clock.now += 1
    cluster.tend()
    assert cluster.started[-1] == "decode-0.1"  # started while the scheduler still waits
    assert scheduler.restart_at == clock.now + 7


def test_a_restarted_worker_gets_a_new_id_each_time(cluster):
    prefill = _stage(cluster, "prefill-0")
    for incarnation in (1, 2, 3):
        prefill.proc.returncode = 1
        cluster.tend()
        cluster.clock.now += 60
        cluster.tend()
        assert prefill.argv[-1] == f"prefill-0.{incarnation}"
    assert prefill.name == "prefill-0"


def test_a_worker_that_drained_leaves_for_good(cluster):
    _stage(cluster, "decode-0").proc.returncode = 0
    cluster.tend()
    cluster.clock.now += 60
    cluster.tend()
    assert "decode-0" not in {s.name for s in cluster.stages}
    assert cluster.started == []


def test_a_gateway_that_exits_cleanly_is_started_again(cluster):
    """Only workers drain: any other stage exiting, even with 0, is a stage gone missing."""
    _stage(cluster, "gateway").proc.returncode = 0
    cluster.tend()
    cluster.clock.now += 1
    cluster.tend()
    assert cluster.started == ["gateway"]
