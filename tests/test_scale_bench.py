"""The scale benchmark (issue 5) end to end at a tiny shape: a correctness test, not a timed one."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lorablend.benchmarks import scale
from lorablend.combine import Factors, combine

TINY = ["--n", "6", "--layers", "2", "--hidden", "64", "--r", "4", "--top-k", "3", "--distance-sketches", "20",
        "--sample-layers", "1"]


def test_tiny_benchmark_runs_end_to_end_and_every_method_agrees(tmp_path):
    env = {**os.environ, "LORABLEND_HOME": str(tmp_path / "home")}
    cache = tmp_path / "bank"
    run = subprocess.run([sys.executable, "-m", "lorablend.benchmarks.scale", *TINY, "--cache", str(cache)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert fields["n"] == "6"
    for key in ("dense_s", "dense_rss_mb", "topk_s", "peft_svd_ratio", "read_floor_ratio", "max_rel_err"):
        assert re.fullmatch(r"[0-9.e+-]+", fields[key]), (key, fields[key])
    assert float(fields["max_rel_err"]) < 1e-4
    assert "FAILED" not in run.stderr and "failed" not in run.stdout
    # a proper lorablend bank, found complete (reused) next time; the methods' outputs are cleaned up
    assert (cache / "bank.json").exists() and (cache / "index" / "tokens.npz").exists()
    assert not any((cache / "run").glob("lb-*/"))
    logged = []
    assert scale.check_bank(cache, 6, "f32", scale.Shape(layers=2, hidden=64, kv=16, r=4), 0, 20, 0, logged.append) is None
    assert "reusing" in logged[0]


def test_not_enough_disk_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scale, "_free_bytes", lambda path: 1000)
    assert scale.main([*TINY, "--cache", str(tmp_path / "bank")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "free" in err[-1]
    assert not (tmp_path / "bank" / "adapters").exists()


def test_other_settings_in_the_cache_are_refused(tmp_path, capsys):
    cache = tmp_path / "bank"
    cache.mkdir()
    (cache / "scale.json").write_text('{"n": 7}')
    assert scale.main([*TINY, "--cache", str(cache)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_mistral_shape_arithmetic():
    shape = scale.Shape()
    assert len(shape.modules()) == 96
    assert shape.params == 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024)) == 9_437_184


def _factors(rng, n, d, k, r):
    return [Factors(A=rng.standard_normal((r, k), dtype=np.float32),
                    B=(rng.standard_normal((d, r)) * 10 ** rng.uniform(-3, 1)).astype(np.float32),
                    scale=float(rng.uniform(0.5, 2))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(12))
def test_proposed_combinations_match_the_core_ones(seed):
    rng = np.random.default_rng(seed)
    d, k, r = int(rng.integers(8, 60)), int(rng.integers(8, 60)), int(rng.integers(1, 6))
    fs = _factors(rng, int(rng.integers(1, 14)), d, k, r)
    fs += [fs[0]] if seed % 3 == 0 else []  # duplicates: a rank-deficient stack
    if seed % 4 == 0:
        fs.append(Factors(A=np.zeros((r, k), np.float32), B=np.zeros((d, r), np.float32), scale=1.0))
    c = rng.random(len(fs))
    c[0] = 0 if len(fs) > 1 else c[0]
    rank = int(rng.integers(1, 20))
    want, got = combine("svd", fs, c, rank), scale.combine_svd_gram(fs, c, rank)
    assert got.A.shape == want.A.shape and got.B.shape == want.B.shape
    assert np.linalg.norm(got.delta() - want.delta()) <= 1e-9 * np.linalg.norm(want.delta())
    paper = combine("paper", fs, c)
    fast = scale.combine_paper_inplace(fs, c)
    assert np.array_equal(paper.A, fast.A) and np.array_equal(paper.B, fast.B)


def test_lean_reader_reads_what_safetensors_reads(tmp_path):
    from lorablend.adapter import AdapterReader

    shape = scale.Shape(layers=2, hidden=32, kv=8, r=4)
    for dtype in ("f32", "bf16"):
        adir = tmp_path / dtype
        adir.mkdir()
        (adir / "adapter_model.safetensors").write_bytes(scale.adapter_bytes(shape, dtype, 0, 3))
        (adir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32,
                                                              "target_modules": ["q_proj", "k_proj", "v_proj"]}))
        ref, fast = AdapterReader(adir), scale.LeanReader(adir)
        assert ref.modules == fast.modules
        for m in ref.modules:
            a, b = ref.factors(m), fast.factors(m)
            assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B) and a.scale == b.scale == 8.0
