"""benchmarks/laptop.py: each path measured in its own process at toy shapes, rows appended, a rerun resumes."""

import json

import pytest


@pytest.mark.slow
def test_laptop_benchmark_measures_each_path_once(smollm2_dir, tmp_path, capsys):
    from benchmarks.laptop import main

    shapes = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
    paths = "ce:llamacpp-q8_0,ce:torch-bf16,train:nf4,train:bf16,grad:nf4"
    main(["--paths", paths, "--threads", "1", "--candidates", "1", "--out", str(tmp_path), *shapes])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == paths.split(",")
    assert all(r["wall_s"] > 0 and 0 < r["peak_rss_gb"] < 4 for r in rows), rows
    assert all(10 < r["loss"] < 12 for r in rows if r["path"].startswith("ce:"))  # ~ln(49152): random weights
    assert all("AVX" in r["llamacpp"] for r in rows if r["path"].startswith("ce:llamacpp"))  # the build's features
    assert all(r["tokens"] > 0 for r in rows if r["path"].startswith("train:"))
    main(["--paths", paths, "--out", str(tmp_path), *shapes])  # everything measured: nothing runs again
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)
    main(["--report", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| ce:llamacpp-q8_0 |" in table and "| train:nf4 |" in table and "| grad:nf4 |" in table


def test_an_unknown_path_is_one_clear_line(tmp_path):
    from benchmarks.laptop import main

    with pytest.raises(SystemExit, match="--paths: unknown ce:gpu"):
        main(["--paths", "ce:gpu", "--out", str(tmp_path)])
    assert not (tmp_path / "rows.jsonl").exists()
