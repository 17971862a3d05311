"""The BIG-bench cut into train/valid/test: fixed sizes, test first, small tasks still trainable."""

import pytest

from lorablend.bank.sources.bigbench import MIN_TRAIN, compact
from lorablend.dataset import Dataset, Example


def _dataset(n: int) -> Dataset:
    return Dataset(name="t", splits={"train": [Example(input=f"q{i}", outputs=(f"a{i}",)) for i in range(n)],
                                     "valid": [], "test": []}, sha256="", source="")


@pytest.mark.parametrize("n, sizes", [(400, (200, 50, 100)), (176, (26, 50, 100)), (58, (34, 8, 16))])
def test_cut_sizes(n, sizes):
    ds = compact(_dataset(n), seed=0, train=200, valid=50, test=100)
    assert tuple(len(ds.splits[s]) for s in ("train", "valid", "test")) == sizes
    assert len(ds.splits["train"]) >= MIN_TRAIN
    seen = [e.input for s in ("train", "valid", "test") for e in ds.splits[s]]
    assert len(seen) == len(set(seen))  # disjoint


def test_cut_is_seeded():
    a, b, c = (compact(_dataset(120), seed=s, train=200, valid=50, test=100) for s in (0, 0, 1))
    assert a.splits == b.splits and a.splits != c.splits


def test_data_bigbench_names_the_routes_when_the_sdist_cannot_be_had(tmp_path, monkeypatch, capfd):
    """The registry serves bigbench 0.0.1 only (checked 2026-12-05): pip fails, and the line says what to do."""
    import subprocess

    from conftest import run_cli

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No matching distribution"))
    code, out, err = run_cli(["data", "bigbench", "--out", str(tmp_path / "data")], capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "lorablend bank build --tasks default --out DIR" in lines[0] and "--sdist FILE" in lines[0]
    assert not (tmp_path / "data").exists()
