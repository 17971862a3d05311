"""benchmarks/merge at a tiny shape (untimed): its synthetic base and adapter merge, and the merge is exact."""

from __future__ import annotations

import numpy as np


def test_synthetic_base_merges(tmp_path):
    from gguf import GGUFReader

    from benchmarks.merge import CONFIG, base_tensors, write_inputs
    from lorablend.runtime.gguf import merge_gguf

    cfg = {**CONFIG, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 128}
    model, src, adapter = write_inputs(tmp_path, "f32", cfg)
    base = {t.name: np.array(t.data) for t in GGUFReader(src).tensors}
    assert [(n, s) for n, s in base_tensors(cfg)] == [(n, base[n].shape) for n, _ in base_tensors(cfg)]
    out = merge_gguf(adapter, str(model), src, tmp_path / "m.gguf", "f32")
    merged = {t.name: np.array(t.data) for t in GGUFReader(out).tensors}
    changed = {n for n in base if not np.array_equal(base[n], merged[n])}
    assert changed == {f"blk.{i}.attn_{p}.weight" for i in range(2) for p in "qkv"}
