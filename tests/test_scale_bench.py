"""The scale benchmark (issue 5) end to end at a tiny shape: a correctness test, not a timed one."""

import json
import os
import re
import subprocess
import sys

import numpy as np

from benchmarks import scale

TINY = ["--n", "6", "--layers", "2", "--hidden", "64", "--r", "4", "--top-k", "3", "--distance-sketches", "20",
        "--sample-layers", "1"]


def test_tiny_benchmark_runs_end_to_end_and_every_method_agrees(tmp_path):
    env = {**os.environ, "LORABLEND_HOME": str(tmp_path / "home")}
    cache = tmp_path / "bank"
    run = subprocess.run([sys.executable, "-m", "benchmarks.scale", *TINY, "--cache", str(cache)],
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
    assert f"remove it with: rm -rf {cache}" in run.stderr  # the user learns where the disk went
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


def test_adapter_reader_reads_what_safetensors_reads_and_survives_release(tmp_path):
    import torch
    from safetensors import safe_open

    from lorablend.adapter import PREFIX, AdapterReader

    shape = scale.Shape(layers=2, hidden=32, kv=8, r=4)
    for dtype in ("f32", "bf16"):
        adir = tmp_path / dtype
        adir.mkdir()
        (adir / "adapter_model.safetensors").write_bytes(scale.adapter_bytes(shape, dtype, 0, 3))
        (adir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32,
                                                              "target_modules": ["q_proj", "k_proj", "v_proj"]}))
        reader = AdapterReader(adir)
        with safe_open(str(adir / "adapter_model.safetensors"), framework="pt") as ref:
            assert reader.modules == sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in ref.keys() if "lora_A" in k)
            for m in reader.modules:
                f = reader.factors(m)
                reader.release(m)  # pages dropped from the process: the views read them again from the file
                want_a = ref.get_tensor(f"{PREFIX}{m}.lora_A.weight").to(torch.float32).numpy()
                want_b = ref.get_tensor(f"{PREFIX}{m}.lora_B.weight").to(torch.float32).numpy()
                assert np.array_equal(f.A, want_a) and np.array_equal(f.B, want_b) and f.scale == 8.0


def test_paper_stacking_reads_the_flat_adapter_of_both_dtypes(tmp_path):
    shape = scale.Shape(layers=2, hidden=32, kv=8, r=4)
    rows = {}
    for dtype in ("f32", "bf16"):
        path = tmp_path / f"{dtype}.safetensors"
        path.write_bytes(scale.adapter_bytes(shape, dtype, 0, 3))
        layout, raw = scale.flat_layout(path)
        assert raw == (dtype == "f32") and sum(np.prod(s) for _, s in layout) == shape.params
        rows[dtype] = np.empty(shape.params, np.float32)
        scale.read_flat(path, layout, rows[dtype])
    assert np.allclose(rows["f32"], rows["bf16"], rtol=1e-2, atol=1e-3)  # bf16 keeps 8 bits of mantissa
