"""The engine's CPU settings: freed temporaries are reused, not faulted in again; `auto`
resolves to bf16 only on CPUs that multiply it fast."""

import subprocess
import sys

import pytest

from tandem.engine.model_runner import cpu_bf16_is_fast

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


def _cpuinfo(vendor: str, *flags: str) -> str:
    flag_line = " ".join(("fpu", "sse2", "avx2", *flags))
    block = f"processor\t: {{n}}\nvendor_id\t: {vendor}\nflags\t\t: {flag_line}\n"
    return "\n".join(block.format(n=n) for n in range(2))


@pytest.mark.parametrize(
    "vendor,flags,fast",
    [
        ("GenuineIntel", ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), True),
        ("GenuineIntel", ("avx512f", "avx512_bf16"), False),  # no AMX: bf16 GEMM at half fp32's
        ("AuthenticAMD", ("avx512f", "avx512_bf16"), True),  # Zen 4: 2.2x fp32's
        ("AuthenticAMD", ("avx2",), False),
        ("GenuineIntel", (), False),
    ],
)
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_it_fast(vendor, flags, fast):
    assert cpu_bf16_is_fast(_cpuinfo(vendor, *flags)) is fast
    assert cpu_bf16_is_fast("") is False
