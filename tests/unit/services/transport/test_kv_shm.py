"""KV tiles through a file in shared memory: the tiles come back bit for bit, the file is
private, and a name or size from the wire that is not a KV file's is refused."""

import os
import stat

import pytest
import torch

from tandem.services.transport import kv_shm
from tandem.v1 import engine_pb2

TILE = (3, 2, 2, 4, 8)  # (layers, 2, Hkv, block_size, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiles_round_trip_and_outlive_the_files_name(tmp_path, dtype):
    kv = torch.randn(5, *TILE).to(dtype)
    kv_file = kv_shm.write(kv, tmp_path)
    path = tmp_path / kv_file.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # other users cannot read it
    assert kv_file.num_blocks == 5 and path.stat().st_size == kv.numel() * kv.element_size()
    wire = engine_pb2.KVFile.FromString(kv_file.SerializeToString())
    tiles = kv_shm.map_tiles(wire, TILE, tmp_path)
    kv_shm.remove(kv_file.name, tmp_path)  # as the decode worker does once it has mapped it
    assert not path.exists()
    assert tiles.dtype == dtype and tiles.shape == (5, *TILE)
    assert torch.equal(tiles.view(torch.uint8), kv.view(torch.uint8))
    kv_shm.remove(kv_file.name, tmp_path)  # removing twice (both sides do) is fine


def test_names_sizes_and_dtypes_that_are_not_a_kv_files_are_refused(tmp_path):
    kv_file = kv_shm.write(torch.zeros(2, *TILE), tmp_path)
    (tmp_path / "secret").write_text("x")
    for name in ("secret", "../secret", f"tandem-kv-1-{'0' * 31}/", kv_file.name + "0"):
        with pytest.raises(ValueError, match="not a KV file"):
            kv_shm.map_tiles(engine_pb2.KVFile(name=name, num_blocks=2, dtype="float32"), TILE)
    bad_dtype = engine_pb2.KVFile(name=kv_file.name, num_blocks=2, dtype="int64")
    with pytest.raises(ValueError, match="not a KV file"):
        kv_shm.map_tiles(bad_dtype, TILE, tmp_path)
    too_many = engine_pb2.KVFile(name=kv_file.name, num_blocks=3, dtype="float32")
    with pytest.raises(ValueError, match="bytes, not"):
        kv_shm.map_tiles(too_many, TILE, tmp_path)
    gone = engine_pb2.KVFile(name=f"tandem-kv-1-{'a' * 32}", num_blocks=2, dtype="float32")
    with pytest.raises(FileNotFoundError):
        kv_shm.map_tiles(gone, TILE, tmp_path)
    kv_shm.remove("../secret", tmp_path)  # only KV files are ever removed
    assert (tmp_path / "secret").exists()


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    """A full /dev/shm (ENOSPC) raises, and the partial file is gone."""

    class Full:  # a file on a full tmpfs
        def __init__(self, fd, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(kv_shm, "open", Full, raising=False)
    with pytest.raises(OSError, match="No space"):
        kv_shm.write(torch.zeros(2, *TILE), tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        kv_shm.write(torch.zeros(2, *TILE), tmp_path / "missing")


def test_domain_names_the_mount_and_can_be_switched_off(tmp_path, monkeypatch):
    kv_shm.domain.cache_clear()
    try:
        here = kv_shm.domain(tmp_path)
        assert here and here == kv_shm.domain(tmp_path)
        other = tmp_path / "other"
        other.mkdir()
        assert kv_shm.domain(other) != here  # another directory: another inode
        assert kv_shm.domain(tmp_path / "missing") == ""
        kv_shm.domain.cache_clear()
        monkeypatch.setenv("TANDEM_KV_SHM", "0")
        assert kv_shm.domain(tmp_path) == ""
    finally:
        kv_shm.domain.cache_clear()
    assert os.environ.get("TANDEM_KV_SHM") == "0"


def test_the_files_of_a_process_that_is_gone_are_removed_by_its_pid(tmp_path):
    """The launcher's clean-up after a prefill worker that died mid-hand-off."""
    import subprocess
    import types

    from tandem.services import launcher

    mine = [kv_shm.write(torch.zeros(1, *TILE), tmp_path).name for _ in range(2)]
    other = tmp_path / f"tandem-kv-{os.getpid() + 1}-{'b' * 32}"
    other.write_bytes(b"")
    assert all(name.startswith(f"tandem-kv-{os.getpid()}-") for name in mine)
    assert kv_shm.remove_owned_by(os.getpid(), tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [other.name]

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = kv_shm.SHM_DIR / f"tandem-kv-{dead.pid}-{'c' * 32}"
    left.write_bytes(b"\0" * 64)
    launcher._remove_kv_files(types.SimpleNamespace(name="prefill-0", proc=dead))
    assert not left.exists()
