"""Issue 6 — property tests: coefficients, and readers of files from anywhere never fail with a bare exception.

Distances and the combination have their own property tests (test_distances.py, test_combine.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lorablend.coefficients import NeuralConfig, NeuralOperator, apply_operator
from lorablend.dataset import INPUT_KEYS, OUTPUT_KEYS, Dataset, load_dataset
from lorablend.errors import InputError

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- #
# Coefficients
# --------------------------------------------------------------------------- #

# Distances as the metrics give them: finite (MMD² may be slightly negative), +inf for excluded entries.
finite = st.floats(min_value=-1e3, max_value=1e6, allow_nan=False, allow_infinity=False)
distance = st.one_of(finite, finite, finite, st.just(math.inf))
rows = st.lists(distance, min_size=1, max_size=12).filter(lambda r: any(math.isfinite(x) for x in r)).map(np.array)
temperatures = st.floats(min_value=1e-3, max_value=1e3)


@st.composite
def cases(draw):
    """(distances, temperature, top_k, permutation) with top_k within the candidates."""
    d = draw(rows)
    n_finite = int(np.isfinite(d).sum())
    top_k = draw(st.one_of(st.none(), st.integers(1, n_finite)))
    perm = np.array(draw(st.permutations(range(len(d)))))
    return d, draw(temperatures), top_k, perm


_NEURAL: dict[int, NeuralOperator] = {}


def neural(seed: int) -> NeuralOperator:
    """An untrained but deterministic scalar MLP: enough to check the operator's structure."""
    if seed not in _NEURAL:
        op = NeuralOperator(NeuralConfig(hidden=8, seed=seed))
        op.net = op._build()
        _NEURAL[seed] = op
    return _NEURAL[seed]


def run(d, operator, temperature, top_k, seed=0):
    return apply_operator(d, operator, temperature, top_k, neural(seed) if operator == "neural" else None)


def boundary_tie(d: np.ndarray, top_k: int | None) -> bool:
    """Whether the k-th and (k+1)-th smallest finite distances are equal: top_k then keeps the one
    that comes first, so which entry is kept depends on the order (by design: deterministic)."""
    f = np.sort(d[np.isfinite(d)])
    return top_k is not None and top_k < len(f) and f[top_k - 1] == f[top_k]


OPERATORS = st.sampled_from(["attentional", "normalized", "neural"])
MANY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@MANY
@given(operator=OPERATORS, case=cases())
def test_coefficients_are_a_distribution_over_the_candidates(operator, case):
    d, temperature, top_k, _ = case
    c = run(d, operator, temperature, top_k)
    assert c.shape == d.shape and np.isfinite(c).all()
    assert (c >= 0).all()
    assert abs(c.sum() - 1) < 1e-9
    assert (c[~np.isfinite(d)] == 0).all(), "an excluded entry got weight"
    if top_k is not None:
        assert (c > 0).sum() <= top_k


@MANY
@given(operator=OPERATORS, case=cases())
def test_coefficients_are_permutation_equivariant(operator, case):
    d, temperature, top_k, perm = case
    assume(not boundary_tie(d, top_k))
    np.testing.assert_allclose(run(d[perm], operator, temperature, top_k), run(d, operator, temperature, top_k)[perm],
                               rtol=1e-9, atol=1e-12)


@FAST
@given(operator=st.sampled_from(["attentional", "normalized"]), d=rows, temperature=temperatures)
def test_top_k_with_ties_is_deterministic_and_keeps_k(operator, d, temperature):
    """Ties at the boundary: exactly k entries kept, the earliest of the tied ones, run after run."""
    d = np.concatenate([d, d])  # every finite distance now appears twice
    n_finite = int(np.isfinite(d).sum())
    for k in range(1, n_finite + 1):
        c = run(d, operator, temperature, k)
        assert (c > 0).sum() <= k and np.array_equal(c, run(d, operator, temperature, k))
        kept = np.flatnonzero(c > 0)
        order = np.argsort(d, kind="stable")
        assert set(kept) <= set(order[:k])


@FAST
@given(operator=OPERATORS, d=rows, temperature=temperatures)
def test_equal_distances_get_equal_weights(operator, d, temperature):
    d = np.concatenate([d, d[:1]])
    c = run(d, operator, temperature, None)
    if np.isfinite(d[0]):
        assert c[0] == pytest.approx(c[-1], rel=1e-9, abs=1e-15)


@FAST
@given(d=rows, temperature=temperatures, exponent=st.integers(-20, 20))
def test_normalized_is_scale_invariant(d, temperature, exponent):
    """z-scores do not change when every distance is multiplied by a power of two (an exact scaling)."""
    np.testing.assert_allclose(run(d * 2.0**exponent, "normalized", temperature, None),
                               run(d, "normalized", temperature, None), rtol=1e-9, atol=1e-12)


@FAST
@given(
    d=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=8).map(np.array),
    operator=st.sampled_from(["attentional", "normalized", "neural", "softmax"]),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.one_of(st.none(), st.integers(-3, 12)),
)
@example(d=np.array([8.98846567e307, 8.98846567e307]), operator="normalized", temperature=1.0, top_k=None)  # mean overflowed
@example(d=np.array([0.0, -np.inf]), operator="attentional", temperature=1.0, top_k=1)  # top-k kept a non-finite entry
def test_coefficients_either_work_or_raise_input_error(d, operator, temperature, top_k):
    try:
        with np.errstate(all="ignore"):
            c = run(d, operator, temperature, top_k)
    except InputError:
        return
    assert (c >= 0).all() and abs(c.sum() - 1) < 1e-9


# --------------------------------------------------------------------------- #
# Dataset readers: a Dataset or an InputError, never another exception
# --------------------------------------------------------------------------- #

KEYS = st.sampled_from(INPUT_KEYS + OUTPUT_KEYS + ("instruction", "split", "task_prefix", "examples", "data")) | st.text(max_size=8)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(
    ["train", "valid", "test", "dev", "TEST", "\ud800", ""])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                    max_leaves=20)
RECORD = st.fixed_dictionaries(
    {},
    optional={"input": JSON, "output": JSON, "target": JSON, "split": JSON, "instruction": JSON, "prompt": JSON},
)


def _json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def json_file():
    return st.one_of(
        st.binary(max_size=200),
        JSON.map(_json_bytes),
        st.lists(RECORD, max_size=6).map(_json_bytes),
        st.fixed_dictionaries({"examples": st.lists(RECORD, max_size=6)}, optional={"task_prefix": JSON}).map(_json_bytes),
    )


def jsonl_file():
    lines = st.lists(st.one_of(RECORD.map(_json_bytes), JSON.map(_json_bytes), st.binary(max_size=30), st.just(b"")),
                     max_size=6)
    return st.one_of(st.binary(max_size=200), lines.map(b"\n".join))


@st.composite
def csv_file(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    header = draw(st.lists(KEYS, min_size=1, max_size=4))
    body = draw(st.lists(st.lists(st.text(max_size=12), max_size=5), max_size=5))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def parquet_file(draw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if draw(st.booleans()):
        junk = draw(st.binary(max_size=200))
        return b"PAR1" + junk + b"PAR1" if draw(st.booleans()) else junk
    n = draw(st.integers(0, 4))
    columns = {}
    for name in draw(st.lists(KEYS.filter(bool), min_size=1, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["text", "int", "list", "binary", "null", "float"]))
        values = {
            "text": st.one_of(st.none(), st.text(max_size=10)),
            "int": st.one_of(st.none(), st.integers(-10, 10)),
            "list": st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3)),
            "binary": st.one_of(st.none(), st.binary(max_size=5)),
            "null": st.none(),
            "float": st.one_of(st.none(), st.floats()),
        }[kind]
        columns[name] = draw(st.lists(values, min_size=n, max_size=n))
    try:
        table = pa.table(columns)
    except (pa.ArrowException, UnicodeEncodeError):  # e.g. a surrogate hypothesis drew
        return b"PAR1"
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _check_loads_or_refuses(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            ds = load_dataset(path)
        except InputError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            return
    assert isinstance(ds, Dataset) and len(ds) >= 1
    for split in ds.splits.values():
        for e in split:
            assert isinstance(e.input, str) and e.outputs and all(isinstance(o, str) for o in e.outputs)
            e.input.encode("utf-8")  # no lone surrogates get through to tokenizers


@FAST
@given(data=jsonl_file())
def test_jsonl_reader_never_crashes(data):
    _check_loads_or_refuses(".jsonl", data)


@FAST
@given(data=json_file())
def test_json_reader_never_crashes(data):
    _check_loads_or_refuses(".json", data)


@FAST
@given(data=csv_file())
def test_csv_reader_never_crashes(data):
    _check_loads_or_refuses(".csv", data)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=parquet_file())
def test_parquet_reader_never_crashes(data):
    _check_loads_or_refuses(".parquet", data)


@FAST
@given(data=st.one_of(st.binary(max_size=100), jsonl_file()), suffix=st.sampled_from([".jsonl.gz", ".json.gz", ".csv.gz"]),
       compress=st.booleans())
def test_gzip_reader_never_crashes(data, suffix, compress):
    import gzip

    _check_loads_or_refuses(suffix, gzip.compress(data, mtime=0) if compress else data)


def test_deeply_nested_json_is_refused():
    _check_loads_or_refuses(".json", b"[" * 100_000 + b"]" * 100_000)
    _check_loads_or_refuses(".jsonl", b"[" * 100_000 + b"]" * 100_000)


# --------------------------------------------------------------------------- #
# Bank manifests and adapter configs from anywhere
# --------------------------------------------------------------------------- #

ENTRY = st.fixed_dictionaries(
    {}, optional={"name": JSON, "adapter_dir": JSON, "dataset": JSON, "family": JSON, "files": JSON, "info": JSON})
MANIFEST = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"format": st.just("lorablend-bank")},
        optional={"version": JSON | st.integers(-2, 3), "base_model": JSON, "tokenizer": JSON,
                  "entries": st.lists(ENTRY, max_size=3) | JSON, "info": JSON},
    ),
)


@FAST
@given(raw=MANIFEST)
def test_bank_manifest_parser_never_crashes(raw):
    from lorablend.bank.manifest import BankManifest, _parse_manifest

    try:
        m = _parse_manifest(raw, Path("bank.json"))
    except InputError:
        return
    assert isinstance(m, BankManifest) and all(isinstance(e.name, str) for e in m.entries)


CONFIG = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={"peft_type": st.sampled_from(["LORA", "lora", "LOHA"]) | JSON, "r": JSON | st.integers(-1, 16),
                  "lora_alpha": JSON, "use_dora": JSON, "use_rslora": JSON, "target_modules": JSON,
                  "rank_pattern": JSON, "alpha_pattern": JSON, "base_model_name_or_path": JSON,
                  "modules_to_save": JSON},
    ),
)


@FAST
@given(cfg=CONFIG)
def test_adapter_config_reader_never_crashes(cfg):
    from lorablend.adapter import read_spec

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_bytes(_json_bytes(cfg))
        try:
            spec = read_spec(tmp)
        except InputError:
            return
    assert spec.r >= 1 and math.isfinite(spec.alpha)


PART = st.sampled_from(["..", ".", "", "adapters", "a", "b..", "...", "/", "\\", "..\\..", "C:", "~"])
PATH = st.builds(lambda lead, parts, seps: lead + "".join(p + s for p, s in zip(parts, seps)),
                 st.sampled_from(["", "/", "\\", "//", "./"]), st.lists(PART, max_size=6),
                 st.lists(st.sampled_from(["/", "\\", "//"]), min_size=6, max_size=6))


def _manifest_with(root: Path, **fields) -> Path:
    entry = {"name": "x", "adapter_dir": "adapters/x", "dataset": "datasets/x.jsonl.gz", **fields}
    (root / "bank.json").write_text(json.dumps({"format": "lorablend-bank", "version": 1, "base_model": "m",
                                                "entries": [entry]}))
    return root


@FAST
@example(rel="../outside/x")
@example(rel="/etc/passwd")
@example(rel="adapters\\..\\..\\x")
@example(rel="adapters/../adapters/x")
@given(rel=PATH)
def test_bank_paths_are_confined_to_the_bank(rel):
    """Every entry path the manifest loader accepts names a path strictly inside the bank; the rest are
    refused with one line naming the entry and the field (no symlinks here, so the lexical form decides)."""
    import posixpath

    from lorablend.bank.manifest import Bank

    inside = not ("\\" in rel or rel.startswith("/") or posixpath.normpath(rel).split("/")[0] in ("..", "."))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        for key in ("adapter_dir", "dataset"):
            _manifest_with(root, **{key: rel})
            try:
                bank = Bank.open(root)
            except InputError as exc:
                assert not inside and f"entry 0 (x): '{key}'" in str(exc) and "points outside the bank" in str(exc)
                continue
            assert inside
            path = (bank.root / getattr(bank.entries[0], key)).resolve()
            assert root in path.parents


def test_bank_paths_through_symlinks_are_confined(tmp_path):
    """A symlink inside the bank may lead elsewhere inside it, never out of it."""
    from lorablend.bank.manifest import Bank

    root, outside = tmp_path / "bank", tmp_path / "outside"
    (root / "adapters" / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "adapters" / "in").symlink_to(root / "adapters" / "real")
    (root / "adapters" / "out").symlink_to(outside)
    assert Bank.open(_manifest_with(root, adapter_dir="adapters/in")).entries[0].adapter_dir == "adapters/in"
    with pytest.raises(InputError, match=r"entry 0 \(x\): 'adapter_dir' 'adapters/out' points outside the bank"):
        Bank.open(_manifest_with(root, adapter_dir="adapters/out"))
    with pytest.raises(InputError, match=r"entry 0 \(x\): 'files' 'adapters/out/w' points outside the bank"):
        Bank.open(_manifest_with(root, files={"adapters/out/w": "0" * 64}))
