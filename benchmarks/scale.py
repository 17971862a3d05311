"""Scale benchmark: one adapter from an N-adapter Mistral-7B-shaped bank.

    python -m benchmarks.scale [--n 500] [--dtype f32|bf16] [--cache DIR]

1. Creates once, in a cache dir, a synthetic lorablend bank at Mistral-7B-Instruct-v0.2
   LoRA shapes (32 layers; q_proj 4096->4096, k_proj/v_proj 4096->1024; r=16, alpha=32;
   files exactly as PEFT saves them), with synthetic token-histogram sketches.
2. Runs every method in its own process (so peak RSS is per method), forked from a
   fork server that has imported numpy/scipy/torch/peft/lorablend (imports are paid once
   and never timed), each from the same page-cache state (cold: the bank's files are
   evicted with posix_fadvise(DONTNEED) before each method, checked with `fincore`):
   lorablend's streaming path (dense coefficients over all N, and top-k), PEFT's
   `add_weighted_adapter` (svd, cat) on the top-k adapters, the paper's stacked
   N x P matrix, the time to read the needed bytes (the floor), and the distance
   step against 1000 cached sketches.
3. Checks each result against an exact float64 reference on sampled modules and
   prints a Markdown table; the last line is machine-readable (`RESULT ...`).

Methods whose cost is dominated by per-module dense algebra (dense svd, PEFT svd)
run on `--sample-layers` layers and are projected linearly to all layers (marked
"projected" in the table); every other method runs on the whole bank.

Top-level imports are stdlib only, so `--threads` can set the BLAS thread count
before numpy loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from lorablend.machine import machine

BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
VOCAB = 32000
PREFIX = "base_model.model."
PROJ = ("q", "k", "v")
DTYPES = {"f32": ("float32", 4), "bf16": ("bfloat16", 2)}
METRIC, OPERATOR = "js", "normalized"
GB = 1e9
METHODS = (
    "floor-dense", "lb-dense-paper", "lb-dense-svd",
    "floor-topk", "lb-topk-svd", "lb-topk-paper",
    "peft-svd", "peft-cat",
    "stack-paper",
    "distances",
)
SAMPLED = {"lb-dense-svd", "peft-svd"}  # run on --sample-layers, projected to all layers
DESCRIPTION = {
    "floor-dense": "read all N adapter files once (readinto, 64 MB buffer)",
    "lb-dense-paper": "lorablend generate path, dense coefficients, combine paper",
    "lb-dense-svd": "lorablend generate path, dense coefficients, combine svd",
    "floor-topk": "read the top-k adapter files once",
    "lb-topk-svd": "lorablend generate path, top-k, combine svd",
    "lb-topk-paper": "lorablend generate path, top-k, combine paper",
    "peft-svd": "PEFT add_weighted_adapter svd on the top-k (load + merge + save)",
    "peft-cat": "PEFT add_weighted_adapter cat on the top-k (load + merge + save)",
    "stack-paper": "the paper: stack N_s flattened adapters (N_s x P f32), c @ Theta",
    "distances": "distance (js) from a new dataset to the cached sketches",
}


class BenchError(Exception):
    """A usage problem: one line on stderr, exit 2."""


# --------------------------------------------------------------------------- #
# Shapes and the synthetic bank
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    kv: int = 1024
    r: int = 16
    alpha: float = 32.0

    def modules(self) -> list[tuple[str, int, int]]:
        """(module, out_features, in_features) in layer order, as PEFT names them."""
        out = {"q": self.hidden, "k": self.kv, "v": self.kv}
        return [(f"model.layers.{i}.self_attn.{p}_proj", out[p], self.hidden) for i in range(self.layers) for p in PROJ]

    @property
    def params(self) -> int:
        return sum(self.r * (o + i) for _, o, i in self.modules())

    def file_bytes(self, dtype: str) -> int:
        """Approximate safetensors size: data plus a JSON header of ~150 bytes a tensor."""
        return self.params * DTYPES[dtype][1] + 150 * 2 * len(self.modules()) + 8


def _bank_spec(n: int, dtype: str, shape: Shape, seed: int, sketches: int) -> dict:
    return {"format": "lorablend-scale-bench", "version": 1, "n": n, "dtype": dtype, "shape": asdict(shape),
            "seed": seed, "vocab": VOCAB, "distance_sketches": sketches, "base_model": BASE_MODEL}


def default_cache(n: int, dtype: str, shape: Shape) -> Path:
    from lorablend.runtime.models import lorablend_home

    suffix = "" if shape == Shape() else f"-l{shape.layers}h{shape.hidden}r{shape.r}"
    return lorablend_home() / "bench" / f"scale-{dtype}-n{n}{suffix}"


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _fmt_bytes(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def _names(n: int) -> list[str]:
    return [f"synthetic-{i:04d}" for i in range(n)]


def adapter_config(shape: Shape) -> bytes:
    """adapter_config.json exactly as PEFT's save_pretrained writes it."""
    from peft import LoraConfig

    cfg = LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=[f"{p}_proj" for p in PROJ], base_model_name_or_path=BASE_MODEL).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def adapter_bytes(shape: Shape, dtype: str, seed: int, i: int) -> bytes:
    """One adapter's safetensors file: random factors drawn from (seed, i), keys as PEFT saves them."""
    import numpy as np

    rng = np.random.default_rng([seed, 1, i])
    tensors = {}
    for m, out_f, in_f in shape.modules():
        A = rng.standard_normal((shape.r, in_f), dtype=np.float32)
        A *= np.float32(1 / math.sqrt(in_f))
        B = rng.standard_normal((out_f, shape.r), dtype=np.float32)
        B *= np.float32(0.02)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B
    if dtype == "f32":
        from safetensors.numpy import save

        return save(tensors, metadata={"format": "pt"})
    import torch
    from safetensors.torch import save

    return save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, metadata={"format": "pt"})


def histograms(rng, rows: int, vocab: int = VOCAB, families: int = 8, tokens: int = 20000):
    """Synthetic token histograms: Zipf over a family-specific token order, per-row gamma noise, Poisson counts."""
    import numpy as np

    zipf = 1.0 / (np.arange(vocab) + 5.0) ** 1.1
    orders = [rng.permutation(vocab) for _ in range(families)]
    out = np.empty((rows, vocab), dtype=np.float64)
    for j in range(rows):
        p = zipf[orders[int(rng.integers(families))]] * rng.gamma(1.0, 1.0, vocab)
        out[j] = rng.poisson(tokens * p / p.sum())
        out[j, int(rng.integers(vocab))] += 1  # never an empty row
    return out


def check_bank(cache: Path, n: int, dtype: str, shape: Shape, seed: int, sketches: int, extra_bytes: int,
               log=print) -> dict | None:
    """None when the cached bank is complete and matches; else the spec to create it with
    (after checking the free disk space it needs). Stdlib only: runs in the parent."""
    spec = _bank_spec(n, dtype, shape, seed, sketches)
    spec_path = cache / "scale.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old != spec:
            diff = ", ".join(f"{k}={old.get(k)!r}" for k in spec if old.get(k) != spec[k])
            raise BenchError(f"{cache}: holds a scale bank made with other settings ({diff}); "
                             "delete it or pass another --cache")
        if (cache / "bank.json").exists():
            log(f"bank: reusing {cache} ({n} adapters, {dtype})")
            if _free_bytes(cache) < extra_bytes:
                raise BenchError(f"{cache}: the methods' outputs need {_fmt_bytes(extra_bytes)} of free disk, "
                                 f"only {_fmt_bytes(_free_bytes(cache))} free")
            return None
    per_file = shape.file_bytes(dtype)
    done = sum(1 for name in _names(n) if (cache / "adapters" / name / "adapter_model.safetensors").exists())
    need = (n - done) * per_file + (n + sketches) * 60_000 + extra_bytes
    free = _free_bytes(cache)
    log(f"bank: {n} adapters x {_fmt_bytes(per_file)} ({dtype}, {shape.params / 1e6:.2f}M params each) = "
        f"{_fmt_bytes(n * per_file)} in {cache}; {done} already there; needs {_fmt_bytes(need)} "
        f"(with the methods' outputs), {_fmt_bytes(free)} free")
    if need > free:
        raise BenchError(f"{cache}: the scale bench needs {_fmt_bytes(need)} of free disk but only {_fmt_bytes(free)} "
                         "is free; use --dtype bf16, a smaller --n, or --cache on a larger disk")
    return spec


def create_bank_task(cache: str, spec: dict) -> None:
    """Runs in a forked process (numpy, safetensors, peft already imported by the fork server)."""
    shape = Shape(**spec["shape"])
    _create_bank(Path(cache), spec["n"], spec["dtype"], shape, spec["seed"], spec["distance_sketches"], spec,
                 lambda msg: print(msg, file=sys.stderr, flush=True))


def _create_bank(cache: Path, n: int, dtype: str, shape: Shape, seed: int, sketches: int, spec: dict, log) -> None:
    import hashlib

    import numpy as np

    from lorablend.atomic import atomic_dir, atomic_file, sha256_file, write_json
    from lorablend.bank.manifest import Bank, BankEntry
    from lorablend.dataset import Dataset, Example, save_dataset
    from lorablend.sketch import IndexManifest, index_dir, save_npz, write_sketches

    cache.mkdir(parents=True, exist_ok=True)
    write_json(cache / "scale.json", spec)
    config = adapter_config(shape)
    bank = Bank.create(cache, BASE_MODEL)
    bank.manifest.info = {"synthetic": "benchmarks.scale", "spec": spec}
    t0 = time.perf_counter()
    entries = []
    for i, name in enumerate(_names(n)):
        adir = cache / "adapters" / name
        weights = adir / "adapter_model.safetensors"
        if not weights.exists():  # atomic_dir: a present dir is a complete one
            data = adapter_bytes(shape, dtype, seed, i)
            with atomic_dir(adir) as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(data)
                (tmp / "adapter_config.json").write_bytes(config)
            w_sha = hashlib.sha256(data).hexdigest()
        else:
            w_sha = sha256_file(weights)
        ds_rel = f"datasets/{name}.jsonl.gz"
        if not (cache / ds_rel).exists():
            ex = [Example(input=f"synthetic example {j} of {name}", outputs=(f"answer {j}",)) for j in range(3)]
            save_dataset(Dataset(name=name, splits={"train": ex}, sha256=""), cache / ds_rel)
        entries.append(BankEntry(name=name, adapter_dir=f"adapters/{name}", dataset=ds_rel, files={
            f"adapters/{name}/adapter_model.safetensors": w_sha,
            f"adapters/{name}/adapter_config.json": hashlib.sha256(config).hexdigest(),
            ds_rel: sha256_file(cache / ds_rel),
        }, info={"synthetic": True, "seed": [seed, 1, i]}))
        if (i + 1) % 50 == 0 or i + 1 == n:
            log(f"bank: {i + 1}/{n} adapters ({time.perf_counter() - t0:.0f} s)")
    bank.manifest.entries = entries
    rng = np.random.default_rng([seed, 2])
    rows = histograms(rng, n)
    write_sketches(bank, "tokens", list(rows))
    manifest = IndexManifest(tokenizer=BASE_MODEL, vocab_size=VOCAB, encoder=BASE_MODEL,
                             datasets={e.name: e.files[e.dataset] for e in entries}, sketches=["tokens"])
    write_json(index_dir(bank) / "index.json", asdict(manifest))
    # The distance benchmark: `sketches` cached histograms in the index's on-disk format.
    import scipy.sparse as sp

    counts = sp.csr_matrix(histograms(np.random.default_rng([seed, 3]), sketches).astype(np.int32))
    save_npz(cache / "distance-sketches" / "tokens.npz", names=np.array([f"sketch-{j:04d}" for j in range(sketches)]),
              data=counts.data, indices=counts.indices, indptr=counts.indptr, shape=np.array(counts.shape))
    query = histograms(np.random.default_rng([seed, 4]), 1)[0]
    with atomic_file(cache / "query.npy") as fh:
        np.save(fh, query)
    bank.save()  # last: its presence marks the bank complete
    log(f"bank: written in {time.perf_counter() - t0:.0f} s")


# --------------------------------------------------------------------------- #
# Measuring inside a child process
# --------------------------------------------------------------------------- #


class MemorySampler:
    """Peak RSS of this process: VmHWM (the kernel's high-water mark, exact) and RssAnon / RssFile
    sampled every 10 ms. (Not ru_maxrss: on Linux it keeps the forked parent's RSS across exec.)"""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(self.period)

    def __enter__(self):
        self.start = self.read()
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak[k], v)
        self.cpu_s = self._cpu() - self._cpu0

    def report(self) -> dict:
        mb = 1e6
        return {"cpu_s": self.cpu_s, "peak_rss_mb": max(self.peak["VmHWM"], self.peak["VmRSS"]) / mb, "peak_anon_mb": self.peak["RssAnon"] / mb,
                "peak_file_mb": self.peak["RssFile"] / mb, "start_rss_mb": self.start.get("VmRSS", 0) / mb}


def read_floor(paths: list[Path], chunk: int = 64 << 20) -> int:
    """Read every byte of `paths` once into one reused buffer; returns the bytes read."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def _limit_modules(readers: dict, limit: int | None) -> int:
    """Restrict every reader to its first `limit` modules (sorted order); returns the full module count."""
    total = len(next(iter(readers.values())).modules)
    if limit:
        for r in readers.values():
            r.modules = r.modules[:limit]
    return total


def child_lorablend(spec: dict, method: str) -> dict:
    """The generate path minus the query sketch (needs a tokenizer): distances → coefficients → stream → write."""
    import numpy as np

    from lorablend import __version__
    from lorablend.bank.combination import bank_rank, combine_modules, open_readers
    from lorablend.bank.manifest import Bank
    from lorablend.generate import coefficient_row
    from lorablend.output import Provenance, write_output
    from lorablend.settings import Setting
    from lorablend.sketch import distances_to_bank, load_sketches

    top_k = spec["top_k"] if "-topk-" in method else None
    setting = Setting(sketch="tokens", metric=METRIC, operator=OPERATOR, combine=method.rsplit("-", 1)[1], top_k=top_k)
    limit = 3 * spec["sample_layers"] if method in SAMPLED and spec["sample_layers"] else None
    cache, out = Path(spec["cache"]), Path(spec["work"]) / method
    query = np.load(cache / "query.npy")
    stages = {}
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        bank = Bank.open(cache)
        _, sk = load_sketches(bank, "tokens")
        d = distances_to_bank(sk, METRIC, query)
        c = coefficient_row(bank, setting, d, [])
        coefs = {n: float(w) for n, w in zip(bank.names, c)}
        names = [n for n, w in coefs.items() if w > 0]
        t1 = time.perf_counter()
        stages["distances_s"] = t1 - t0
        readers = open_readers(bank, names)
        total_modules = _limit_modules(readers, limit)
        rank = setting.rank or bank_rank(readers)
        t2 = time.perf_counter()
        stages["open_s"] = t2 - t1
        modules = dict(combine_modules(readers, coefs, setting.combine, rank, threads=spec["threads"]))
        t3 = time.perf_counter()
        stages["combine_s"] = t3 - t2
        prov = Provenance(lorablend_version=__version__, dataset="synthetic-query", dataset_sha256="", bank=str(bank.root),
                          bank_manifest_sha256=bank.sha256, sketch="tokens", metric=METRIC, operator=OPERATOR,
                          temperature=1.0, top_k=top_k, combine=setting.combine, rank=rank, excluded=[],
                          coefficients=coefs)
        write_output(out, modules, bank.manifest.base_model, prov, force=True, dtype="float32")
        t4 = time.perf_counter()
        stages["write_s"] = t4 - t3
    wall = t4 - t0
    res = {"wall_s": wall, "stages": stages, "n_adapters": len(names), "modules_done": len(modules),
           "modules_total": total_modules, "out": str(out), "coefs": {n: coefs[n] for n in names}, **mem.report()}
    if len(modules) < total_modules:
        per = stages["combine_s"] + stages["write_s"]
        res["projected_s"] = wall - per + per * total_modules / len(modules)
    return res


def child_floor(spec: dict, method: str) -> dict:
    from lorablend.bank.manifest import Bank

    bank = Bank.open(spec["cache"])
    names = list(spec["coefs"]["topk" if method == "floor-topk" else "dense"])
    paths = [bank.adapter_path(bank.entry(n)) / "adapter_model.safetensors" for n in names]
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        nbytes = read_floor(paths)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "bytes": nbytes, "gb_per_s": nbytes / wall / GB, "n_adapters": len(paths), **mem.report()}


def child_distances(spec: dict, method: str) -> dict:
    import numpy as np

    from lorablend.distances import measure
    from lorablend.sketch import read_sketches

    cache = Path(spec["cache"])
    query = np.load(cache / "query.npy")
    stages = {}
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        sk = read_sketches(cache / "distance-sketches" / "tokens.npz", "tokens", cache)
        t1 = time.perf_counter()
        d = measure(METRIC, query, sk.counts)
        t2 = time.perf_counter()
    stages = {"load_s": t1 - t0, f"{METRIC}_s": t2 - t1}
    for metric in ("kl", "wd"):  # for information, outside the measured step
        t = time.perf_counter()
        measure(metric, query, sk.counts)
        stages[f"{metric}_s"] = time.perf_counter() - t
    return {"wall_s": t2 - t0, "stages": stages, "n_adapters": int(sk.counts.shape[0]), "finite": bool(np.isfinite(d).all()),
            **mem.report()}


def _skeleton(shape: Shape):
    """Mistral's attention projections only (model.layers.{i}.self_attn.{q,k,v}_proj), with
    uninitialised base weights: allocated on meta, then `to_empty` (never touched, so not resident)."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(shape.hidden, shape.hidden, bias=False)
            self.k_proj = nn.Linear(shape.hidden, shape.kv, bias=False)
            self.v_proj = nn.Linear(shape.hidden, shape.kv, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(shape.layers))

    class Skeleton(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM looks it up
            return kwargs

    with torch.device("meta"):
        model = Skeleton()
    return model.to_empty(device="cpu")


def child_peft(spec: dict, method: str) -> dict:
    import torch
    from peft import PeftModel

    from lorablend.bank.manifest import Bank

    torch.set_num_threads(spec["threads"])
    combination = method.split("-", 1)[1]
    shape = Shape(**spec["shape"])
    bank = Bank.open(spec["cache"])
    coefs = spec["coefs"]["topk"]
    names = list(coefs)
    keys = [f"a{i}" for i in range(len(names))]
    limit = 3 * spec["sample_layers"] if method in SAMPLED and spec["sample_layers"] else None
    all_modules = sorted(m for m, _, _ in shape.modules())
    allowed = set(all_modules[:limit] if limit else all_modules)
    out = Path(spec["work"]) / method
    stages, merged = {}, {"s": 0.0, "n": 0}
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(_skeleton(shape), str(bank.adapter_path(bank.entry(names[0]))),
                                          adapter_name=keys[0])
        for key, name in zip(keys[1:], names[1:]):
            model.load_adapter(str(bank.adapter_path(bank.entry(name))), adapter_name=key)
        t1 = time.perf_counter()
        stages["load_s"] = t1 - t0
        lora = model.base_model
        module_name = {id(m): n[len("model."):] if n.startswith("model.model.") else n
                       for n, m in lora.model.named_modules()}
        original = lora._svd_generalized_task_arithmetic_weighted_adapter

        def sampled_svd(combination_type, adapters, weights, new_rank, target, target_lora_A, target_lora_B, *a, **kw):
            if module_name.get(id(target)) not in allowed:  # not sampled: leave zeros, skip the SVD
                return target_lora_A.data, target_lora_B.data
            t = time.perf_counter()
            res = original(combination_type, adapters, weights, new_rank, target, target_lora_A, target_lora_B, *a, **kw)
            merged["s"] += time.perf_counter() - t
            merged["n"] += 1
            return res

        lora._svd_generalized_task_arithmetic_weighted_adapter = sampled_svd
        kwargs = {"svd_rank": shape.r} if combination == "svd" else {}
        model.add_weighted_adapter(keys, [coefs[n] for n in names], "combined", combination_type=combination, **kwargs)
        t2 = time.perf_counter()
        stages["merge_s"] = t2 - t1
        model.save_pretrained(str(out), selected_adapters=["combined"])
        t3 = time.perf_counter()
        stages["save_s"] = t3 - t2
    wall = t3 - t0
    done = merged["n"] if combination == "svd" else len(all_modules)
    res = {"wall_s": wall, "stages": stages, "n_adapters": len(names), "modules_done": done,
           "modules_total": len(all_modules), "out": str(next(out.rglob("adapter_model.safetensors")).parent),
           "coefs": coefs, **mem.report()}
    if combination == "svd" and done < len(all_modules):
        stages["svd_sampled_s"] = merged["s"]
        res["projected_s"] = wall - merged["s"] + merged["s"] * len(all_modules) / done
    return res


def _flat_header(fh) -> tuple[list[tuple[str, tuple]], bool]:
    """(key, shape) of the tensors in file order, and whether the data section is already the flat
    float32 vector (all F32, back to back); leaves `fh` at the start of the data section."""
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ends = [0] + [v["data_offsets"][1] for _, v in items[:-1]]
    raw = all(v["dtype"] == "F32" and v["data_offsets"][0] == e for (_, v), e in zip(items, ends))
    return [(k, tuple(v["shape"])) for k, v in items], raw


def flat_layout(path: Path) -> tuple[list[tuple[str, tuple]], bool]:
    with open(path, "rb") as fh:
        return _flat_header(fh)


def read_flat(path: Path, layout: list, row) -> None:
    """The paper's flattened adapter into `row`: an all-F32 file's data section is read straight in."""
    import numpy as np

    with open(path, "rb", buffering=0) as fh:
        own, raw = _flat_header(fh)
        if own != layout:
            raise BenchError(f"{path}: tensor layout differs from the first adapter's")
        if raw:
            view, done = memoryview(row.view(np.uint8)), 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise BenchError(f"{path}: truncated")
                done += got
            return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        pos = 0
        for key, shp in layout:
            size = math.prod(shp)
            row[pos : pos + size] = f.get_tensor(key).float().numpy().ravel()
            pos += size


def child_stack(spec: dict, method: str) -> dict:
    """The paper's computation: Theta (N_s x P, float32) holds the flattened adapters, theta = c @ Theta."""
    import numpy as np

    from lorablend.adapter import write_adapter
    from lorablend.bank.manifest import Bank
    from lorablend.combine import Factors

    shape = Shape(**spec["shape"])
    bank = Bank.open(spec["cache"])
    coefs = spec["coefs"]["stack"]
    names = list(coefs)
    c = np.array([coefs[n] for n in names], dtype=np.float32)
    out = Path(spec["work"]) / method
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        layout = None
        theta_all = None
        for i, name in enumerate(names):
            path = bank.adapter_path(bank.entry(name)) / "adapter_model.safetensors"
            if layout is None:
                layout, _ = flat_layout(path)
                P = sum(int(np.prod(shp)) for _, shp in layout)
                theta_all = np.empty((len(names), P), dtype=np.float32)
            read_flat(path, layout, theta_all[i])
        t1 = time.perf_counter()
        theta = c @ theta_all
        t2 = time.perf_counter()
        tensors, pos = {}, 0
        for key, shp in layout:
            size = int(np.prod(shp))
            tensors[key] = theta[pos : pos + size].reshape(shp)
            pos += size
        scale = shape.alpha / shape.r
        modules = {}
        for m, _, _ in shape.modules():
            A, B = tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"]
            modules[m] = Factors(A=A, B=B, scale=scale)
        out.mkdir(parents=True, exist_ok=True)
        write_adapter(out, modules, BASE_MODEL)
        t3 = time.perf_counter()
    return {"wall_s": t3 - t0, "stages": {"stack_s": t1 - t0, "product_s": t2 - t1, "write_s": t3 - t2},
            "n_adapters": len(names), "matrix_gb": theta_all.nbytes / GB, "out": str(out), "coefs": coefs,
            **mem.report()}


CHILDREN = {"floor": child_floor, "lb": child_lorablend, "peft": child_peft,
            "stack": child_stack, "distances": child_distances}


# Imported once by the fork server, before any timing, for every method alike.
PRELOAD = ["numpy", "scipy.linalg", "scipy.sparse", "torch", "peft", "safetensors.numpy", "safetensors.torch",
           "lorablend.generate", "lorablend.distances", "lorablend.sketch", "lorablend.dataset"]


def run_child(method: str, spec_path: str) -> None:
    """Entry point of one method's process (forked from the fork server)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*(remote file|config file|vocabulary).*")
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    res = CHILDREN[method.split("-", 1)[0]](spec, method)
    res["method"] = method
    Path(spec["work"], f"{method}.json").write_text(json.dumps(res, indent=1))


# --------------------------------------------------------------------------- #
# The parent: coefficients, cache state, children, agreement, report
# --------------------------------------------------------------------------- #


def evict(root: Path) -> str:
    """Make the bank's files cold: drop their pages from the page cache (posix_fadvise DONTNEED,
    so other processes' caches are left alone), then check with `fincore` when it is installed."""
    files = [p for p in root.rglob("*") if p.is_file() and "run" not in p.relative_to(root).parts]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return "cold (fadvise, unverified)"
    sample = [str(p) for p in files if p.suffix == ".safetensors"][:20]
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *sample],
                         capture_output=True, text=True)
    resident = sum(int(x) for x in out.stdout.split() if x.isdigit())
    return "cold" if out.returncode == 0 and resident == 0 else f"cold? ({resident} B still cached)"


def coefficients_task(spec_path: str) -> None:
    """Forked: add the coefficient sets to the spec file."""
    from lorablend.bank.manifest import Bank

    spec = json.loads(Path(spec_path).read_text())
    spec["coefs"] = coefficient_sets(Bank.open(spec["cache"]), spec["top_k"], spec["stack_n"])
    Path(spec_path).write_text(json.dumps(spec))


def agreement_task(spec_path: str, results_path: str) -> None:
    """Forked: add the errors against the float64 references to the results file."""
    from lorablend.bank.manifest import Bank

    spec = json.loads(Path(spec_path).read_text())
    results = json.loads(Path(results_path).read_text())
    shape = Shape(**spec["shape"])
    agreement(results, Bank.open(spec["cache"]), shape, sample_modules(shape),
              lambda msg: print(msg, file=sys.stderr, flush=True))
    Path(results_path).write_text(json.dumps(results, indent=1))


def fork_call(ctx, fn, *args) -> None:
    proc = ctx.Process(target=fn, args=args, name=f"scale-{fn.__name__}")
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit {proc.exitcode}); see the traceback above")


def coefficient_sets(bank, top_k: int, stack_n: int) -> dict[str, dict[str, float]]:
    """The coefficients every method uses, from the pipeline's own functions."""
    import numpy as np

    from lorablend.coefficients import apply_operator
    from lorablend.generate import coefficient_row
    from lorablend.settings import Setting
    from lorablend.sketch import distances_to_bank, load_sketches

    _, sk = load_sketches(bank, "tokens")
    d = distances_to_bank(sk, METRIC, np.load(bank.root / "query.npy"))
    out = {}
    for key, k in (("dense", None), ("topk", top_k)):
        c = coefficient_row(bank, Setting(sketch="tokens", metric=METRIC, operator=OPERATOR, top_k=k), d, [])
        out[key] = {n: float(w) for n, w in zip(bank.names, c) if w > 0}
    c = apply_operator(d[:stack_n], OPERATOR)  # the paper's case over the N_s entries it can stack
    out["stack"] = {n: float(w) for n, w in zip(bank.names[:stack_n], c)}
    return out


class Reference:
    """Exact float64 references on sampled modules, computed from the bank's files."""

    def __init__(self, bank, rank: int):
        self.bank, self.rank = bank, rank
        self._readers, self._cache = {}, {}

    def _factors(self, name: str, module: str):
        from lorablend.adapter import AdapterReader

        if name not in self._readers:
            self._readers[name] = AdapterReader(self.bank.adapter_path(self.bank.entry(name)))
        return self._readers[name].factors(module)

    def get(self, kind: str, coefs: dict[str, float], module: str):
        import numpy as np

        key = (kind, tuple(sorted(coefs.items())), module)
        if key in self._cache:
            return self._cache[key]
        fs = [(self._factors(n, module), c) for n, c in coefs.items()]
        if kind == "exact":
            B = np.hstack([c * f.scale * f.B.astype(np.float64) for f, c in fs])
            ref = B @ np.vstack([f.A.astype(np.float64) for f, _ in fs])
        elif kind == "paper":
            ref = sum(c * f.scale * f.B.astype(np.float64) for f, c in fs) @ sum(c * f.A.astype(np.float64) for f, c in fs)
        else:  # svd: best rank-r approximation of the exact update, via the smaller Gram matrix
            from scipy.linalg import eigh

            M = self.get("exact", coefs, module)
            left = M.shape[0] <= M.shape[1]
            G = M @ M.T if left else M.T @ M
            r = min(self.rank, len(G))
            _, V = eigh(G, subset_by_index=[len(G) - r, len(G) - 1])
            ref = V @ (V.T @ M) if left else (M @ V) @ V.T
        self._cache[key] = ref
        return ref


def update_of(out_dir: str, module: str):
    import numpy as np

    from lorablend.adapter import AdapterReader

    f = AdapterReader(out_dir).factors(module)
    return f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))


def rel(x, ref) -> float:
    import numpy as np

    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


OWN_REFERENCE = {"paper": "paper", "svd": "svd", "cat": "exact"}


def agreement(results: dict, bank, shape: Shape, sample: list[str], log) -> None:
    """Fill `err` (vs the method's own exact definition) and `err_exact` (vs the exact full sum)."""
    ref = Reference(bank, shape.r)
    updates = {}
    for method, res in results.items():
        if "out" not in res:
            continue
        kind = OWN_REFERENCE[method.rsplit("-", 1)[1]]
        errs, errs_exact = [], []
        done = set(_output_modules(res["out"]))
        for module in sample:
            if module not in done or (method in SAMPLED and not _sampled(module, shape, res)):
                continue
            x = update_of(res["out"], module)
            updates[(method, module)] = x
            errs.append(rel(x, ref.get(kind, res["coefs"], module)))
            errs_exact.append(rel(x, ref.get("exact", res["coefs"], module)))
        res["err"], res["err_exact"], res["err_modules"] = max(errs), max(errs_exact), len(errs)
        log(f"agreement: {method}: {res['err']:.2e} vs its own definition, {res['err_exact']:.2e} vs the exact sum "
            f"({len(errs)} modules)")
    pairs = [("lb-topk-svd", "peft-svd")]
    for a, b in pairs:
        common = [m for (meth, m) in updates if meth == a and (b, m) in updates]
        if common:
            results[a].setdefault("vs", {})[b] = max(rel(updates[(a, m)], updates[(b, m)]) for m in common)


def _output_modules(out_dir: str) -> list[str]:
    from lorablend.adapter import AdapterReader

    return AdapterReader(out_dir).modules


def _sampled(module: str, shape: Shape, res: dict) -> bool:
    return module in sorted(m for m, _, _ in shape.modules())[: res["modules_done"]]


def sample_modules(shape: Shape) -> list[str]:
    """Three modules: layer 0 q_proj, layer 1 k_proj, last layer v_proj (one of each shape)."""
    last = shape.layers - 1
    return ["model.layers.0.self_attn.q_proj", f"model.layers.{min(1, last)}.self_attn.k_proj",
            f"model.layers.{last}.self_attn.v_proj"]


def method_files(method: str, cache: Path, coefs: dict) -> list[Path]:
    if method == "distances":
        return [cache / "distance-sketches" / "tokens.npz"]
    key = "stack" if method.startswith("stack") else "topk" if ("topk" in method or method.startswith("peft")) else "dense"
    return [cache / "adapters" / n / "adapter_model.safetensors" for n in coefs[key]]


def run_methods(spec: dict, spec_path: Path, methods: list[str], cache_state: str, timeout: float, log,
                resume: bool = False) -> dict:
    """Each method in its own process, forked from a fork server that imported PRELOAD (so peak RSS
    is per method, imports are paid once and excluded from every timing)."""
    from benchmarks import scale as module

    ctx = fork_server()  # already running: returns the same server
    entry = module.run_child
    results = {}
    for i, method in enumerate(methods):
        done = Path(spec["work"]) / f"{method}.json"
        if resume and done.exists():
            res = json.loads(done.read_text())
            if "out" not in res or Path(res["out"]).exists():
                res.setdefault("cache", "cold")
                res["resumed"] = True
                results[method] = res
                log(f"[{i + 1}/{len(methods)}] {method}: kept from the interrupted run ({res['wall_s']:.2f} s)")
                continue
        if cache_state == "cold":
            state = evict(Path(spec["cache"]))
        else:
            read_floor(method_files(method, Path(spec["cache"]), spec["coefs"]))  # same warm state for all
            state = "warm"
        log(f"[{i + 1}/{len(methods)}] {method} ({state} page cache) ...")
        t0 = time.perf_counter()
        proc = ctx.Process(target=entry, args=(method, str(spec_path)), name=f"scale-{method}")
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            rc = "timeout"
        else:
            rc = proc.exitcode
        process_s = time.perf_counter() - t0
        path = Path(spec["work"]) / f"{method}.json"
        if rc != 0 or not path.exists():
            log(f"    {method}: FAILED ({rc})")
            results[method] = {"method": method, "failed": str(rc), "cache": state}
            continue
        res = json.loads(path.read_text())
        res["cache"], res["process_s"] = state, process_s
        results[method] = res
        shown = res.get("projected_s", res["wall_s"])
        log(f"    {shown:.2f} s{' (projected)' if 'projected_s' in res else ''}, peak RSS {res['peak_rss_mb']:.0f} MB "
            f"(anon {res['peak_anon_mb']:.0f} MB), process {process_s:.1f} s")
    return results


def fork_server():
    """The multiprocessing context whose server process imports PRELOAD (started now, so its
    imports overlap with the parent's own work)."""
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    return ctx


def _thread_env(threads: int) -> dict:
    return {k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def table(results: dict, shape: Shape, spec: dict) -> list[str]:
    rows = ["| method | what | adapters | layers timed | wall s | CPU s | peak RSS MB | peak anon MB | cache | "
            "rel. err vs own definition | rel. err vs exact sum |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for method, res in results.items():
        if "failed" in res:
            rows.append(f"| {method} | {DESCRIPTION[method]} | | | failed ({res['failed']}) | | | | {res['cache']} | | |")
            continue
        layers = shape.layers
        if "modules_done" in res and res["modules_done"] < res["modules_total"]:
            layers = res["modules_done"] // 3
        wall, cpu = f"{res['wall_s']:.2f}", f"{res['cpu_s']:.2f}"
        if "projected_s" in res:
            wall = f"{res['projected_s']:.1f} (projected; {res['wall_s']:.1f} measured)"
            cpu = f"{res['cpu_s'] * res['projected_s'] / res['wall_s']:.1f} (projected)"
        extra = ""
        if method.startswith("floor"):
            extra = f" ({res['bytes'] / GB:.2f} GB at {res['gb_per_s']:.2f} GB/s)"
        if method == "stack-paper":
            extra = f" (Theta {res['matrix_gb']:.2f} GB)"
        if method == "distances":
            extra = " (" + ", ".join(f"{k} {v:.2f}" for k, v in res["stages"].items()) + ")"
        err = f"{res['err']:.1e}" if "err" in res else ""
        err_exact = f"{res['err_exact']:.2e}" if "err_exact" in res else ""
        rows.append(f"| {method} | {DESCRIPTION[method]}{extra} | {res['n_adapters']} | {layers} | {wall} | {cpu} | "
                    f"{res['peak_rss_mb']:.0f} | {res['peak_anon_mb']:.0f} | {res['cache']} | {err} | {err_exact} |")
    return rows


def result_line(n: int, results: dict) -> str:
    def t(m):
        r = results.get(m, {})
        return r.get("projected_s", r.get("wall_s")) if "failed" not in r else None

    def ratio(a, b):
        return a / b if a and b else None

    def cpu(m):
        r = results.get(m, {})
        if "cpu_s" not in r:
            return None
        return r["cpu_s"] * r["projected_s"] / r["wall_s"] if "projected_s" in r else r["cpu_s"]

    errs = [r["err"] for r in results.values() if "err" in r]
    fields = {
        "n": n,
        "dense_s": t("lb-dense-paper"),
        "dense_rss_mb": results.get("lb-dense-paper", {}).get("peak_rss_mb"),
        "topk_s": t("lb-topk-svd"),
        "peft_svd_ratio": ratio(t("peft-svd"), t("lb-topk-svd")),
        "read_floor_ratio": ratio(t("lb-dense-paper"), t("floor-dense")),
        "max_rel_err": max(errs) if errs else None,
        "dense_svd_s": t("lb-dense-svd"),
        "dist_s": t("distances"),
        "stack_n": results.get("stack-paper", {}).get("n_adapters"),
        "stack_s": t("stack-paper"),
        "dense_cpu_s": cpu("lb-dense-paper"),
        "topk_cpu_s": cpu("lb-topk-svd"),
        "peft_svd_cpu_ratio": ratio(cpu("peft-svd"), cpu("lb-topk-svd")),
    }

    def fmt(v):
        if v is None:
            return "NA"
        if isinstance(v, int):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"

    return "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in fields.items())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="bank entries (default 500)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="adapter file dtype (bf16 halves the disk)")
    p.add_argument("--cache", type=Path, default=None,
                   help="bank dir (default $LORABLEND_HOME/bench/scale-<dtype>-n<N>), created once")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096, help="q_proj in/out features")
    p.add_argument("--kv", type=int, default=None, help="k_proj/v_proj out features (default hidden/4)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="cores per method: BLAS/torch threads, and lorablend's module workers (default 1)")
    p.add_argument("--sample-layers", type=int, default=1,
                   help="layers run by dense svd and PEFT svd, projected to all layers (0: all)")
    p.add_argument("--stack-budget-gb", type=float, default=8.0, help="memory for the paper's stacked matrix")
    p.add_argument("--distance-sketches", type=int, default=1000)
    p.add_argument("--cache-state", choices=("cold", "warm"), default="cold")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    p.add_argument("--keep", action="store_true", help="keep the methods' output adapters (in CACHE/run)")
    p.add_argument("--resume", action="store_true",
                   help="keep the results of methods an interrupted run finished (CACHE/run) and run the rest")
    return p.parse_args(argv)


def run(args, log) -> tuple[dict, str]:
    if args.sample_layers < 0:
        raise BenchError("--sample-layers must be >= 0")
    for k in ("n", "layers", "hidden", "r", "top_k", "threads", "distance_sketches"):
        if getattr(args, k) < 1:
            raise BenchError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method '{unknown[0]}'; choose from: {', '.join(METHODS)}")
    shape = Shape(layers=args.layers, hidden=args.hidden, kv=args.kv or max(1, args.hidden // 4), r=args.r,
                  alpha=args.alpha)
    top_k = min(args.top_k, args.n)
    from benchmarks import scale as module

    ctx = fork_server()
    cache = (args.cache or default_cache(args.n, args.dtype, shape)).expanduser().resolve()
    out_bytes = shape.params * 4 * (4 + 2 * top_k)  # lb/stack outputs (rank r) + PEFT's cat (rank k*r)
    bank_spec = check_bank(cache, args.n, args.dtype, shape, args.seed, args.distance_sketches, out_bytes, log)
    if bank_spec is not None:
        fork_call(ctx, module.create_bank_task, str(cache), bank_spec)
    budget = min(args.stack_budget_gb * GB, 0.6 * _available_memory())
    stack_n = max(1, min(args.n, int(budget // (shape.params * 4))))
    work = cache / "run"
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"cache": str(cache), "work": str(work), "shape": asdict(shape), "top_k": top_k, "threads": args.threads,
            "sample_layers": min(args.sample_layers, shape.layers), "stack_n": stack_n}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    fork_call(ctx, module.coefficients_task, str(spec_path))
    spec = json.loads(spec_path.read_text())
    log(f"methods: {', '.join(methods)}; threads {args.threads}; stacked matrix: N_s={stack_n} "
        f"({stack_n * shape.params * 4 / GB:.2f} GB of {budget / GB:.1f} GB budget)")
    load_before = machine()["load_avg"]
    results = run_methods(spec, spec_path, methods, args.cache_state, args.timeout, log, resume=args.resume)
    results_path = work / "results.json"
    results_path.write_text(json.dumps(results))
    fork_call(ctx, module.agreement_task, str(spec_path), str(results_path))
    results = json.loads(results_path.read_text())
    info = {"machine": machine(), "load_avg_before": load_before, "disk_free_gb": round(_free_bytes(cache) / GB, 1),
            "cache": str(cache), "shape": asdict(shape), "params": shape.params, "dtype": args.dtype,
            "stack_n": stack_n, "threads": args.threads,
            "bank_gb": round(sum(p.stat().st_size for p in (cache / "adapters").rglob("*.safetensors")) / GB, 2)}
    results_path.write_text(json.dumps({"info": info, "results": results}, indent=1))
    lines = [f"machine: {info['machine']['nproc']} cores, {info['machine']['ram_gib']} GiB RAM, load average "
             f"{load_before} before / {info['machine']['load_avg']} after; bank {info['bank_gb']} GB ({args.dtype}, "
             f"{shape.params / 1e6:.2f}M params per adapter); {args.threads} BLAS/torch thread(s) per method"]
    lines += table(results, shape, spec)
    for method, res in results.items():
        for other, e in res.get("vs", {}).items():
            lines.append(f"agreement {method} vs {other}: {e:.1e} relative")
    lines.append(result_line(args.n, results))
    log(f"the synthetic bank stays in {cache} ({info['bank_gb']} GB) so that reruns skip building it; "
        f"remove it with: rm -rf {cache}")
    if not args.keep:
        for method in results:
            shutil.rmtree(work / method, ignore_errors=True)
    return results, "\n".join(lines)


def _available_memory() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 8 * GB


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.update(_thread_env(args.threads))  # before numpy is imported, inherited by the fork server
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT's save_pretrained would look the base model up online
    try:
        _, report = run(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from lorablend.errors import InputError

        if isinstance(exc, InputError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
