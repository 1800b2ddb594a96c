"""The generated protobuf code is what protos/ generates now."""

import filecmp

from tandem import protogen


def test_generated_code_is_up_to_date(tmp_path):
    fresh = protogen.generate(tmp_path)
    assert fresh, "no generated files"
    committed = protogen.ROOT / "tandem" / "v1"
    for path in fresh:
        mine = committed / path.name
        assert mine.is_file(), f"{path.name} missing: run python -m tandem.protogen"
        assert filecmp.cmp(path, mine, shallow=False), (
            f"{path.name} stale: run python -m tandem.protogen"
        )
    names = {p.name for p in fresh}
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - names
    assert not extra, f"generated files without a .proto: {extra}"
