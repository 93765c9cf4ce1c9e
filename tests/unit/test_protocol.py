"""pipeline.core.protocol: the settings an evaluation is measured under, and what makes two incomparable."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import identity, protocol


def test_differences_name_every_setting_that_differs():
    a = protocol.of_evaluation("classifier", "ab" * 8, 500, 2500, 1)
    assert protocol.differences(a, dict(a)) == []
    b = {**a, "extractor_sha256": "cd" * 8, "n_fake": 1000}
    assert protocol.differences(a, b) == [f"extractor_sha256: {'ab' * 8} vs {'cd' * 8}", "n_fake: 2500 vs 1000"]
    # a champion evaluated before protocols were recorded is not silently comparable
    assert protocol.differences(a, {})[0] == "extractor_sha256: abababababababab vs unrecorded"


def test_tags_round_trip_as_strings():
    a = protocol.of_evaluation("points", None, 200, 400, 1)
    back = protocol.from_tags({**protocol.tags(a), "other": "x"})
    assert protocol.differences(a, back) == []


def test_the_extractor_hash_follows_its_bytes(tmp_path: Path):
    f = tmp_path / "extractor.pt"
    assert protocol.extractor_hash(f) is None
    f.write_bytes(b"weights")
    h = protocol.extractor_hash(f)
    f.write_bytes(b"weights2")
    assert len(h) == 16 and protocol.extractor_hash(f) != h


def test_the_extractor_is_part_of_the_run_identity():
    params = {"seed": 0}
    base = identity.identity(params, ("seed",), "d" * 64, "c" * 64)
    assert identity.identity(params, ("seed",), "d" * 64, "c" * 64, None) == base  # points: unchanged
    one = identity.key(identity.identity(params, ("seed",), "d" * 64, "c" * 64, "a" * 16))
    two = identity.key(identity.identity(params, ("seed",), "d" * 64, "c" * 64, "b" * 16))
    assert len({identity.key(base), one, two}) == 3
