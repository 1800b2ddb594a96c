"""KV blocks between two workers on one machine, through shared memory.

Over NATS a request's KV crosses two sockets and the server, and the decode worker's share
(reading its socket 32 KiB at a time, parsing ~1 MiB messages, copying them out) costs its
core ~4-5 ms per MiB: ~100 ms for a 1,024-token prompt's 22 MiB in fp32, taken from the
steps of every request it decodes. When both workers see the same /dev/shm, the prefill
worker writes the tiles to a file there instead and only the file's name crosses NATS (a
KVFile in the hand-off); the decode worker maps the file, and its tiles are copied once,
straight into its cache, when the request joins its batch.

The prefill worker owns the file: it removes it once its hand-off is answered (the decode
worker maps it before answering, and a mapping outlives its file's name) or has failed. The
decode worker removes it as soon as it has mapped it. A file's name carries its writer's
pid, so whoever sees a prefill worker die (the launcher) removes what it left
(`remove_owned_by`). Files are created 0600 under names no one can guess; a name from the
wire is checked against the pattern before it is opened.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.v1 import engine_pb2

if TYPE_CHECKING:
    import torch
# torch (and the codec, which uses it) is imported only where tiles are handled: the launcher
# imports this module for remove_owned_by alone.

SHM_DIR = Path("/dev/shm")
NAME = re.compile(r"tandem-kv-[0-9]+-[0-9a-f]{32}")  # tandem-kv-<writer's pid>-<random>


@functools.cache
def domain(shm_dir: Path = SHM_DIR) -> str:
    """What names this machine's shared memory: two processes with the same domain see the
    same files (one boot, one tmpfs mount). "" when there is none to use, or when
    TANDEM_KV_SHM=0 keeps KV on NATS."""
    if os.environ.get("TANDEM_KV_SHM", "1") == "0":
        return ""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = shm_dir.stat()
    except OSError:
        return ""
    if not os.access(shm_dir, os.W_OK | os.X_OK):
        return ""
    return f"{boot_id}:{st.st_dev}:{st.st_ino}:{shm_dir}"


def write(kv: torch.Tensor, shm_dir: Path = SHM_DIR) -> engine_pb2.KVFile:
    """(num_blocks, ...) tiles -> a new file in shared memory. Raises OSError (a full
    /dev/shm: ENOSPC), leaving no file behind."""
    import torch

    from tandem.services.transport.kv_transfer import DTYPE_NAMES

    name = f"tandem-kv-{os.getpid()}-{uuid.uuid4().hex}"
    raw = kv.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    fd = os.open(shm_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(raw)
    except BaseException:
        remove(name, shm_dir)
        raise
    finally:
        os.close(fd)
    return engine_pb2.KVFile(name=name, num_blocks=kv.shape[0], dtype=DTYPE_NAMES[kv.dtype])


def map_tiles(
    kv_file: engine_pb2.KVFile, tile_shape: tuple[int, ...], shm_dir: Path = SHM_DIR
) -> torch.Tensor:
    """A KVFile -> (num_blocks, *tile_shape) tiles, read-only, on the file's pages (no copy).
    The mapping lives as long as the tensor. Raises ValueError for a name or size that is
    not a KVFile's, OSError for one that cannot be opened."""
    import torch

    from tandem.services.transport.kv_transfer import DTYPES

    if not NAME.fullmatch(kv_file.name) or kv_file.dtype not in DTYPES:
        raise ValueError(f"not a KV file: {kv_file.name!r} ({kv_file.dtype!r})")
    dtype = DTYPES[kv_file.dtype]
    shape = (kv_file.num_blocks, *tile_shape)
    num_bytes = dtype.itemsize * kv_file.num_blocks * math.prod(tile_shape)
    fd = os.open(shm_dir / kv_file.name, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size != num_bytes or num_bytes == 0:
            raise ValueError(f"KV file {kv_file.name} holds {size} bytes, not {num_bytes}")
        pages = mmap.mmap(fd, num_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # read-only is fine: the tiles are copied into a cache
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        flat = torch.frombuffer(pages, dtype=torch.uint8)  # holds `pages` while it lives
    return flat.view(dtype).view(shape)


def remove_owned_by(pid: int, shm_dir: Path = SHM_DIR) -> int:
    """Remove every KV file a process wrote: after it exited, they are nobody's. Returns how
    many there were."""
    stale = [p.name for p in shm_dir.glob(f"tandem-kv-{pid}-*") if NAME.fullmatch(p.name)]
    for name in stale:
        remove(name, shm_dir)
    return len(stale)


def remove(name: str, shm_dir: Path = SHM_DIR) -> None:
    """Remove a KV file by name; one already gone is fine."""
    if NAME.fullmatch(name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_dir / name)
