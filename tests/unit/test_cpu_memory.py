"""The engine's CPU allocator setting: freed temporaries are reused, not faulted in again."""

import subprocess
import sys

import pytest

# A forward pass's pattern: sixteen temporaries of 4 MiB alive together, then freed; the
# next step's are a little larger (more tokens). Per round, the page faults of its
# temporaries, four rounds after a first one. By default glibc maps a temporary above its
# threshold afresh and unmaps it when freed; its threshold rises to the largest freed, so
# growing sizes are mapped (and faulted in) every time. Kept, they reuse the freed memory
# and fault in only the growth.
PROBE = """
import resource, sys, torch
from tandem.engine.model_runner import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def faults_of_one_round(numel):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temporaries = [torch.ones(numel) for _ in range(16)]
    del temporaries
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round(2**20)
print(max(faults_of_one_round(2**20 + r * 2**14) for r in range(1, 5)))
"""
PAGES = 16 * 4 * 2**20 // 4096  # what one round's temporaries span


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_temporaries_are_reused_instead_of_faulted_in_every_step():
    assert _faults("default") > PAGES // 2  # the probe measures what the setting removes
    # The growth, and a temporary that did not fit in the freed space: ~1/16
    assert _faults("tuned") < PAGES // 4
