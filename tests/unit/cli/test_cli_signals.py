"""Every Tandem process takes SIGINT as "stop now", even when started with SIGINT ignored
(as a shell starts its background jobs): the launcher stops its stages with SIGINT, the
bench its server."""

import signal

import pytest

from tandem.cli import main


def test_main_restores_sigint_when_started_with_it_ignored(capsys):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit):
            main(["--help"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
