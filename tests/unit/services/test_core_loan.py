"""The core loan: which cores a decode worker may borrow, the command lines that say so, and
the busy marks that end the loan while a prefill worker works."""

from __future__ import annotations

import os
import time

import torch

from tandem.cli import build_parser
from tandem.services.launcher import place_workers, plan_stages
from tandem.services.placement import make_loan_dir, plan_loan, remove_loan_dir
from tandem.services.transport.subjects import Role
from tandem.services.worker.core_loan import BusyMark, CoreLoan


def test_only_a_single_decode_worker_beside_pinned_prefill_workers_borrows():
    pinned = place_workers([0, 1], 2, "pinned")
    assert plan_loan(["prefill", "decode"], pinned, on_gpus=False) == [0]
    four = place_workers([0, 1, 2, 3], 3, "pinned")  # one core each, the fourth unused
    assert plan_loan(["prefill", "prefill", "decode"], four, on_gpus=False) == [0, 1]
    assert plan_loan(["prefill", "decode"], pinned, on_gpus=True) is None
    assert plan_loan(["prefill", "decode"], place_workers([0], 2, "shared"), False) is None
    two_decode = place_workers([0, 1, 2], 3, "pinned")
    assert plan_loan(["prefill", "decode", "decode"], two_decode, on_gpus=False) is None
    assert plan_loan(["prefill"], place_workers([0], 1, "pinned"), on_gpus=False) is None


def _workers(argv: list[str], loan):
    args = build_parser().parse_args(["serve", "--model", "m", *argv])
    urls = dict.fromkeys(Role, "nats://127.0.0.1:4222")
    placements = place_workers([0, 1], 2, "pinned")
    stages = plan_stages(args, urls, "redis://r", 50051, placements, [0], loan)
    return {s.role: s for s in stages if s.role in (Role.PREFILL, Role.DECODE)}


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_launcher_tells_both_workers_and_pins_the_decode_worker_to_both_cores():
    workers = _workers([], ("/dev/shm/loan", [0]))
    prefill, decode = workers[Role.PREFILL], workers[Role.DECODE]
    assert prefill.cores == [0] and decode.cores == [0, 1]
    assert _flag(prefill.argv, "--core-loan-dir") == _flag(decode.argv, "--core-loan-dir")
    assert _flag(prefill.argv, "--core-loan-threads") is None
    assert _flag(decode.argv, "--torch-threads") == "1"
    assert _flag(decode.argv, "--core-loan-threads") == "2"
    # --torch-threads given: the loan adds a thread per lent core to it
    decode = _workers(["--torch-threads", "3"], ("/dev/shm/loan", [0]))[Role.DECODE]
    assert _flag(decode.argv, "--core-loan-threads") == "4"
    # no loan: nothing said, the decode worker on its own core
    workers = _workers([], None)
    assert workers[Role.DECODE].cores == [1]
    assert all("--core-loan-dir" not in s.argv for s in workers.values())


def test_the_worker_flags_parse():
    parser = build_parser()
    args = parser.parse_args(["decode", "--core-loan-dir", "/x", "--core-loan-threads", "2"])
    assert (args.core_loan_dir, args.core_loan_threads) == ("/x", 2)
    assert parser.parse_args(["prefill", "--core-loan-dir", "/x"]).core_loan_dir == "/x"
    assert parser.parse_args(["serve", "--model", "m"]).core_loan is True
    assert parser.parse_args(["serve", "--model", "m", "--no-core-loan"]).core_loan is False


def test_a_busy_mark_ends_the_loan_until_it_is_cleared():
    directory = make_loan_dir()
    try:
        loan = CoreLoan(directory, own=1, lent=2, settle_s=0.0)
        assert loan.lendable() and loan.threads() == 2
        first, second = BusyMark(directory, "prefill-0"), BusyMark(directory, "prefill-1")
        first.set(True)
        assert not loan.lendable() and loan.threads() == 1
        second.set(True)
        first.set(False)
        assert loan.threads() == 1  # one busy prefill worker is enough
        second.set(False)
        assert loan.threads() == 2
        # a worker that died busy left its mark: it clears it when it starts again
        first.set(True)
        again = BusyMark(directory, "prefill-0")
        assert not again.busy and loan.threads() == 2
    finally:
        remove_loan_dir(directory)
    assert not os.path.exists(directory)
    assert CoreLoan(directory, own=1, lent=2, settle_s=0).threads() == 1  # gone: nothing lent
    BusyMark(directory, "prefill-0").set(True)  # a mark in a removed directory: no error


def test_the_cores_are_lent_only_once_the_prefill_workers_have_settled_idle():
    directory = make_loan_dir()
    try:
        loan = CoreLoan(directory, own=1, lent=2, settle_s=0.2)
        old = time.time() - 10
        os.utime(directory, (old, old))
        assert loan.threads() == 2
        mark = BusyMark(directory, "prefill-0")
        mark.set(True)
        mark.set(False)  # a plan just ended: the next may come at once
        assert loan.threads() == 1
        time.sleep(0.25)
        assert loan.threads() == 2
    finally:
        remove_loan_dir(directory)


def test_the_loan_never_lends_fewer_threads_than_the_worker_has():
    assert CoreLoan("/nonexistent", own=torch.get_num_threads(), lent=0).lent >= 1
