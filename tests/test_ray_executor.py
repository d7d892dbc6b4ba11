"""`bnlab reproduce --executor ray`: the same children as the local executor, on a local Ray
instance — the same numbers, the same files. Skipped (with the reason) where Ray is not installed;
CI installs it (bnlab[ray])."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'bnlab[ray]' to run this test")

from bnlab.lab.reproduce import reproduce  # noqa: E402

VOLATILE = {"seconds", "started", "command", "git_sha", "versions"}


def _result(path):
    r = json.loads(path.read_text())
    for part in r["parts"]:
        part.pop("registration", None)          # the lock's dates are the same; keep the test about numbers
    return {k: v for k, v in r.items() if k not in VOLATILE}


def test_ray_and_local_executors_write_the_same_results(tmp_path):
    ids = ["E1", "E3"]
    assert reproduce("tiny", tmp_path / "local", only=ids, jobs=2, progress=False) == 0
    try:
        assert reproduce("tiny", tmp_path / "ray", only=ids, jobs=2, progress=False, executor="ray") == 0
    finally:
        ray.shutdown()
    for eid in ids:
        a, b = tmp_path / "local" / eid, tmp_path / "ray" / eid
        assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes(), eid
        assert _result(a / "result.json") == _result(b / "result.json"), eid
        assert (b / "log.txt").read_text().strip()
    assert (tmp_path / "ray" / "report.html").exists()


def test_resume_with_ray_keeps_finished_experiments(tmp_path):
    assert reproduce("tiny", tmp_path, only=["E1"], jobs=1, progress=False) == 0
    before = (tmp_path / "E1" / "result.json").read_bytes()
    try:
        assert reproduce("tiny", tmp_path, only=["E1"], jobs=1, progress=False, executor="ray", resume=True) == 0
    finally:
        ray.shutdown()
    assert (tmp_path / "E1" / "result.json").read_bytes() == before        # finished: not rerun
