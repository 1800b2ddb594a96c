"""What `tandem serve` logs while its stages come up: a line per stage once ready, and what
it still waits for every few seconds."""

import logging

from tandem.services import startup
from tandem.services.startup import StartupProgress, observe


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == startup.__name__]


def test_each_stage_is_announced_once_when_ready(caplog):
    caplog.set_level(logging.INFO, logger=startup.__name__)
    clock = Clock()
    progress = StartupProgress({"tokenizer": "waiting for gRPC ready"}, clock)
    clock.now += 1.5
    progress.ready("tokenizer", "gRPC ready on 127.0.0.1:5")
    progress.ready("tokenizer", "gRPC ready on 127.0.0.1:5")
    progress.ready("unknown", "up")
    assert _messages(caplog) == ["tokenizer: gRPC ready on 127.0.0.1:5 (1.5 s)"]
    assert progress.waiting == {}


def test_what_is_still_awaited_is_said_every_few_seconds_of_quiet(caplog):
    caplog.set_level(logging.INFO, logger=startup.__name__)
    clock = Clock()
    waits = {"prefill-0": "loading the model", "decode-0": "loading the model"}
    progress = StartupProgress(waits, clock, remind_s=5.0)
    clock.now += 4.9
    progress.remind()
    assert _messages(caplog) == []
    clock.now += 0.1
    progress.remind()
    progress.remind()  # not again at once
    assert _messages(caplog) == [
        "still waiting after 5 s: prefill-0 (loading the model), decode-0 (loading the model)"
    ]
    clock.now += 3.0
    progress.ready("prefill-0", "model loaded")  # a line restarts the quiet period
    clock.now += 4.0
    progress.remind()
    clock.now += 1.0
    progress.remind()
    assert _messages(caplog)[1:] == [
        "prefill-0: model loaded (8.0 s)",
        "still waiting after 13 s: decode-0 (loading the model)",
    ]
    progress.ready("decode-0", "model loaded")
    clock.now += 60.0
    progress.remind()  # nothing left to wait for
    assert len(_messages(caplog)) == 4


def test_observe_reads_the_tokenizer_port_and_the_gateway_stats(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=startup.__name__)
    stats = {"scheduler": {}, "workers": {"decode-0": {"num_blocks": 64}}}
    answers = {"port": False, "stats": None}
    monkeypatch.setattr(startup, "port_open", lambda host, port: answers["port"])
    monkeypatch.setattr(startup, "gateway_stats", lambda url: answers["stats"])
    names = ["tokenizer", "scheduler", "prefill-0", "decode-0", "gateway"]
    progress = StartupProgress(dict.fromkeys(names, "starting"), Clock())
    workers = ["prefill-0", "decode-0"]

    observe(progress, "http://h:1", 5, workers)
    assert list(progress.waiting) == names
    answers["port"] = True
    observe(progress, "http://h:1", 5, workers)
    assert "tokenizer" not in progress.waiting
    answers["stats"] = stats  # the gateway answers; the scheduler has not reported yet
    observe(progress, "http://h:1", 5, workers)
    assert list(progress.waiting) == ["scheduler", "prefill-0"]
    stats["scheduler"] = {"num_waiting": 0}
    stats["workers"]["prefill-0"] = {"num_blocks": 32}
    observe(progress, "http://h:1", 5, workers)
    assert progress.waiting == {}
    assert _messages(caplog) == [
        "tokenizer: gRPC ready on 127.0.0.1:5 (0.0 s)",
        "gateway: listening on http://h:1 (0.0 s)",
        "decode-0: model loaded, heartbeating (64 KV blocks) (0.0 s)",
        "scheduler: up (its stats reach the gateway) (0.0 s)",
        "prefill-0: model loaded, heartbeating (32 KV blocks) (0.0 s)",
    ]


def test_a_worker_started_again_counts_under_its_stage_name(monkeypatch):
    monkeypatch.setattr(startup, "port_open", lambda host, port: False)
    stats = {"workers": {"prefill-0.1": {"num_blocks": 8}}}
    monkeypatch.setattr(startup, "gateway_stats", lambda url: stats)
    progress = StartupProgress({"prefill-0": "loading the model"}, Clock())
    observe(progress, "http://h:1", 5, ["prefill-0"])
    assert progress.waiting == {}
