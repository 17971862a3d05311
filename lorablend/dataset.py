"""Stage 1 — datasets: read a user's labelled examples from the formats people have.

Every reader yields the same `Example` records; everything downstream (sketches,
training, evaluation) sees only `Dataset`. Errors name the file, the line or
record, and the fix, because these files come from everywhere.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lorablend.atomic import atomic_file
from lorablend.errors import InputError

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
INPUT_KEYS = ("input", "inputs", "prompt", "question")
OUTPUT_KEYS = ("output", "outputs", "target", "targets", "answer", "completion")
INSTRUCTION_KEYS = ("instruction", "task_prefix", "definition")
MAX_FIELD_CHARS = 1_000_000
# csv's own field limit (128 KiB) would refuse fields lorablend accepts: raise it past ours,
# so a long field meets the same clear limit in every format.
csv.field_size_limit(max(csv.field_size_limit(), 4 * MAX_FIELD_CHARS + 1))


def _short(value, limit: int = 60) -> str:
    """A user-supplied value, clipped and with control characters escaped, for a one-line error message."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(keys, limit: int = 8) -> str:
    keys = [_short(k, 40) for k in keys]
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass(frozen=True)
class Example:
    input: str
    outputs: tuple[str, ...]
    instruction: str = ""

    @property
    def target(self) -> str:
        """The first reference: the one the paper (and training) uses."""
        return self.outputs[0]


@dataclass
class Dataset:
    name: str
    splits: dict[str, list[Example]]
    sha256: str
    source: str = ""
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits or not self.splits[name]:
            have = ", ".join(k for k, v in self.splits.items() if v) or "none"
            raise InputError(f"{self.source or self.name}: no '{name}' split (splits present: {have})")
        return self.splits[name]

    @property
    def instruction(self) -> str:
        """The dataset-level instruction: the one shared by its examples, if any."""
        found = {e.instruction for s in self.splits.values() for e in s}
        return found.pop() if len(found) == 1 else ""

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a dataset file (.jsonl, .json, .csv, .parquet, task.json)")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: not a valid gzip file ({exc}); re-compress it or give the plain file") from None
    return raw


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save the file as UTF-8"
        ) from None


def _text(value, where: str, key: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {type(value).__name__}; give text (outputs: a string "
                         "or a list of strings)")
    if len(value) > MAX_FIELD_CHARS:
        raise InputError(
            f"{where}: '{key}' has {len(value):,} characters, above the {MAX_FIELD_CHARS:,} limit; shorten or split it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. a JSON "\ud800" escape
        raise InputError(
            f"{where}: '{key}' is not valid Unicode (unpaired surrogate at character {exc.start}); fix the escape"
        ) from None
    return value


def _pick(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in record and record[key] is not None:
            return key, record[key]
    return None, None


def _example(record, where: str, instruction: str = "") -> tuple[Example, str | None]:
    """One record → an Example and its split name (None when the record names none)."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be an object with 'input' and 'output', got {type(record).__name__}")
    in_key, inp = _pick(record, INPUT_KEYS)
    if in_key is None:
        raise InputError(
            f"{where}: record has no 'input' field (fields: {_names(record) or 'none'}); "
            "each record needs 'input' and 'output' (or 'target')"
        )
    out_key, out = _pick(record, OUTPUT_KEYS)
    if out_key is None:
        raise InputError(
            f"{where}: record has no 'output' or 'target' field (fields: {_names(record)}); "
            "add the reference answer"
        )
    outputs = out if isinstance(out, list) else [out]
    if not outputs:
        raise InputError(f"{where}: '{out_key}' is an empty list; give at least one reference answer")
    outputs = tuple(_text(o, where, out_key) for o in outputs)
    _, instr = _pick(record, INSTRUCTION_KEYS)
    split = record.get("split")
    if split is not None and str(split).lower() not in SPLIT_ALIASES:
        raise InputError(f"{where}: unknown split '{_short(split)}'; use one of train, valid, test")
    return (
        Example(_text(inp, where, in_key), outputs, _text(instr, where, "instruction") if instr else instruction),
        SPLIT_ALIASES[str(split).lower()] if split is not None else None,
    )


def _records_jsonl(path: Path, text: str):
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                             "each line must be one JSON object") from None
        except RecursionError:
            raise InputError(f"{path}:{lineno}: JSON nested too deeply; a record is a flat object") from None
        yield f"{path}:{lineno}", record


def _records_json(path: Path, text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; give a list of flat records") from None
    prefix = ""
    if isinstance(data, dict):
        prefix = data.get("task_prefix", "") or ""
        for key in ("examples", "data", "records"):
            if key in data:
                data = data[key]
                break
        else:
            raise InputError(
                f"{path}: a JSON object needs an 'examples' list (BIG-bench task.json) or use a list of records"
            )
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records, got {type(data).__name__}")
    if prefix and not isinstance(prefix, str):
        raise InputError(f"{path}: 'task_prefix' must be a string")
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec, prefix.strip()


def _records_csv(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if not any(k in header for k in INPUT_KEYS) or not any(k in header for k in OUTPUT_KEYS):
            raise InputError(
                f"{path}: CSV header must name an 'input' and an 'output' (or 'target') column; "
                f"found: {_names(header) or 'no header'}"
            )
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except csv.Error as exc:
        if "field limit" in str(exc):
            raise InputError(f"{path}:{reader.line_num + 1}: a field is above the {MAX_FIELD_CHARS:,}-character "
                             "limit; shorten or split it") from None
        raise InputError(f"{path}:{reader.line_num}: invalid CSV ({exc}); re-export it as plain CSV") from None


def _records_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot read as Parquet ({first}); re-export it") from None
    cols = table.column_names
    if not any(k in cols for k in INPUT_KEYS) or not any(k in cols for k in OUTPUT_KEYS):
        raise InputError(
            f"{path}: Parquet file needs an 'input' and an 'output' (or 'target') column; found: {_names(cols)}"
        )
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def _split_seeded(examples: list[Example], seed: int, valid_fraction: float, test_fraction: float):
    """Shuffle with a private RNG (order-independent of global state) and cut train/valid/test."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = int(round(n * test_fraction)) if n >= 3 else 0
    n_valid = int(round(n * valid_fraction)) if n >= 3 else 0
    if n_test == 0 and test_fraction > 0 and n >= 2:
        n_test = 1
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return {
        "test": pick(order[:n_test]),
        "valid": pick(order[n_test : n_test + n_valid]),
        "train": pick(order[n_test + n_valid :]),
    }


def load_dataset(
    path: str | Path,
    *,
    seed: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    name: str | None = None,
) -> Dataset:
    """Read any supported file; split it (seeded) unless its records carry a `split`."""
    path = Path(path)
    raw = _read_bytes(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        rows = ((w, r, "") for w, r in _records_parquet(path))
    else:
        text = _decode(path, raw)
        if kind == ".csv":
            rows = ((w, r, "") for w, r in _records_csv(path, text))
        elif kind == ".json":
            rows = _records_json(path, text)
        elif kind in (".jsonl", ".ndjson"):
            rows = ((w, r, "") for w, r in _records_jsonl(path, text))
        else:
            raise InputError(
                f"{path}: unknown dataset format '{kind or path.name}'; use .jsonl, .json, .csv, .parquet "
                "(optionally .gz) or a BIG-bench task.json"
            )
    examples, splits = [], []
    for where, rec, prefix in rows:
        ex, split = _example(rec, where, prefix)
        examples.append(ex)
        splits.append(split)
    if not examples:
        raise InputError(f"{path}: no records; a dataset needs records with 'input' and 'output'")
    if any(s is not None for s in splits):
        if any(s is None for s in splits):
            raise InputError(f"{path}: some records have a 'split' field and others not; give it on all or none")
        by_split = {s: [e for e, t in zip(examples, splits) if t == s] for s in SPLITS}
    else:
        by_split = _split_seeded(examples, seed, valid_fraction, test_fraction)
    return Dataset(
        name=name or dataset_name(path),
        splits=by_split,
        sha256=hashlib.sha256(raw).hexdigest(),
        source=str(path),
    )


def dataset_name(path: Path) -> str:
    """`foo/task.json` → `foo`; `bar.jsonl.gz` → `bar`."""
    stem = path.name.split(".")[0]
    return path.parent.name if stem == "task" else stem


def save_dataset(dataset: Dataset, path: str | Path) -> None:
    """lorablend's own format: gzipped JSONL, one record per example with its split.

    gzip's header timestamp is fixed to 0 so the same dataset gives the same bytes.
    """
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for split in SPLITS:
            for ex in dataset.splits.get(split, []):
                rec = {"input": ex.input, "output": list(ex.outputs), "split": split}
                if ex.instruction:
                    rec["instruction"] = ex.instruction
                gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    with atomic_file(path) as fh:
        fh.write(buf.getvalue())
