"""Stage 2 — sketches: a dataset as a probability distribution, and the bank's cached index.

Two representations, each of two texts:
- `tokens`, the paper's: the token ids of input + first output (bank tokenizer,
  no truncation) as a histogram over the vocabulary.
- `embeddings`: one vector per example, the mean-pooled last hidden state of an
  encoder (the bank's base model by default; recorded in the index). A point
  cloud in a space where distances mean something, unlike token-id order.
- `target-tokens` / `target-embeddings`: the same on the first output alone.
  Input-side similarity measures the domain; the task shows in what is answered
  (a yes/no task and a QA task on one passage share their inputs).

`BANK/index/` caches the bank side: `index.json` (the `IndexManifest`),
`tokens.npz` (sparse count rows), `embeddings.npz` (float16 clouds + a k-means
codebook that turns clouds into histograms for KL/JS). Entries whose dataset
hash changed are recomputed; the rest are reused.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lorablend.atomic import atomic_file, write_json
from lorablend.bank.manifest import Bank
from lorablend.dataset import Dataset, Example, load_dataset
from lorablend.distances import measure
from lorablend.errors import InputError, suggest

SKETCHES = ("tokens", "embeddings", "target-tokens", "target-embeddings")
INDEX_VERSION = 1
EMBED_EXAMPLES = 16
EMBED_MAX_TOKENS = 256
CODEBOOK_SIZE = 32
TOKEN_EXAMPLES = 2000


@dataclass
class IndexManifest:
    """What `BANK/index/` holds and how it was computed."""

    tokenizer: str = ""
    vocab_size: int = 0
    encoder: str = ""
    embed_examples: int = EMBED_EXAMPLES
    embed_max_tokens: int = EMBED_MAX_TOKENS
    codebook_size: int = CODEBOOK_SIZE
    datasets: dict[str, str] = field(default_factory=dict)  # entry -> dataset sha256 the sketches came from
    sketches: list[str] = field(default_factory=list)
    version: int = INDEX_VERSION


@dataclass
class BankSketches:
    """The bank side of one sketch, rows in the order of `names`."""

    names: list[str]
    counts: sp.csr_matrix | None = None  # tokens: (N, vocab)
    clouds: list[np.ndarray] | None = None  # embeddings: N arrays (n_i, d)
    codebook: np.ndarray | None = None


# --------------------------------------------------------------------------- #
# Computing sketches of one dataset
# --------------------------------------------------------------------------- #


def _texts(examples: list[Example], target_only: bool = False) -> list[str]:
    """The paper's text of an example (input followed by its first output), or the output alone."""
    return [e.target if target_only else f"{e.input} {e.target}" for e in examples]


def is_token_sketch(kind: str) -> bool:
    return kind.endswith("tokens")


def token_counts(tokenizer, examples: list[Example], target_only: bool = False) -> np.ndarray:
    ids = tokenizer(_texts(examples[:TOKEN_EXAMPLES], target_only), add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64)
    return np.bincount(flat, minlength=len(tokenizer)).astype(np.float64)


def embed(model, tokenizer, examples: list[Example], n: int = EMBED_EXAMPLES, max_tokens: int = EMBED_MAX_TOKENS,
          batch_size: int = 8, target_only: bool = False) -> np.ndarray:
    """Mean-pooled last hidden states of the first `n` examples (train splits are already shuffled)."""
    import torch

    texts = _texts(examples[:n], target_only)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [pad] for t in texts[start : start + batch_size]]
        width = max(map(len, ids))
        x = torch.tensor([r + [pad] * (width - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=torch.float32)
        with torch.inference_mode():
            hidden = model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        rows.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().numpy())
    return np.concatenate(rows).astype(np.float32)


class Sketcher:
    """Computes sketches with the bank's tokenizer and encoder, loading each once."""

    def __init__(self, tokenizer_id: str, encoder_id: str):
        self.tokenizer_id = tokenizer_id
        self.encoder_id = encoder_id
        self._model = None

    @property
    def tokenizer(self):
        from lorablend.runtime.models import load_tokenizer

        try:
            return load_tokenizer(self.tokenizer_id)
        except InputError as exc:
            cause = exc.__cause__ or exc
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise InputError(
                f"cannot load the bank's tokenizer '{self.tokenizer_id}' ({reason}); make it available offline "
                "(a local dir or the Hugging Face cache) or fix 'tokenizer' in the bank's bank.json"
            ) from None

    def sketch(self, kind: str, dataset: Dataset, manifest: IndexManifest | None) -> np.ndarray:
        """A token histogram (1-D) or an embedding cloud (2-D) of the dataset's train split."""
        from lorablend.runtime.models import load_model, load_tokenizer

        target_only = kind.startswith("target-")
        train = dataset.split("train")
        if is_token_sketch(kind):
            return token_counts(self.tokenizer, train, target_only)
        if self._model is None:
            self._model = load_model(self.encoder_id)
        manifest = manifest or IndexManifest()
        return embed(self._model, load_tokenizer(self.encoder_id), train, manifest.embed_examples,
                     manifest.embed_max_tokens, target_only=target_only)


# --------------------------------------------------------------------------- #
# The bank's index on disk
# --------------------------------------------------------------------------- #


def index_dir(bank: Bank) -> Path:
    return bank.root / "index"


def read_manifest(bank: Bank) -> IndexManifest | None:
    path = index_dir(bank) / "index.json"
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return IndexManifest(**raw)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: unreadable index ({exc}); rebuild it with `lorablend bank index {bank.root}`") from None


def save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_file(path) as fh:
        fh.write(buf.getvalue())


def load_sketches(bank: Bank, kind: str) -> tuple[IndexManifest, BankSketches]:
    """The cached bank side of `kind`; a clear error when the index is missing, stale or damaged."""
    bank.check_nonempty()
    if kind not in SKETCHES:

        raise suggest(kind, SKETCHES, "sketch")
    manifest = read_manifest(bank)
    if manifest is None or kind not in manifest.sketches:
        raise InputError(f"{bank.root}: no '{kind}' sketches in the index; run `lorablend bank index {bank.root} --sketch {kind}`")
    if kind == "tokens" and manifest.tokenizer and manifest.tokenizer != bank.manifest.tokenizer:
        raise InputError(
            f"{index_dir(bank) / 'index.json'}: the 'tokens' index was built with tokenizer '{manifest.tokenizer}' but "
            f"the bank uses '{bank.manifest.tokenizer}'; re-index with `lorablend bank index {bank.root} --sketch tokens`"
        )
    stale = [e.name for e in bank.entries if manifest.datasets.get(e.name) != e.files.get(e.dataset)]
    if stale:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise InputError(f"{bank.root}: index is stale for {stale[0]}{more}; run `lorablend bank index {bank.root}`")
    path = index_dir(bank) / f"{kind}.npz"
    sk = read_sketches(path, kind, bank.root)
    names = sk.names
    order = {n: i for i, n in enumerate(names)}
    missing = [e.name for e in bank.entries if e.name not in order]
    if missing:
        raise InputError(f"{path}: no sketch for entry {missing[0]}; run `lorablend bank index {bank.root}`")
    return manifest, _reorder(sk, [order[e.name] for e in bank.entries], bank.names)


def _reorder(sk: BankSketches, rows: list[int], names: list[str]) -> BankSketches:
    return BankSketches(
        names=names,
        counts=sk.counts[rows] if sk.counts is not None else None,
        clouds=[sk.clouds[i] for i in rows] if sk.clouds is not None else None,
        codebook=sk.codebook,
    )


def build_index(bank: Bank, kinds: tuple[str, ...] = SKETCHES, encoder: str | None = None, progress=None) -> IndexManifest:
    """Compute (or reuse) every entry's sketches and write `BANK/index/` atomically, file by file."""
    bank.check_nonempty()
    old = read_manifest(bank)
    manifest = IndexManifest(tokenizer=bank.manifest.tokenizer, encoder=encoder or (old.encoder if old else "") or bank.manifest.base_model)
    if old and (old.encoder != manifest.encoder or old.tokenizer != manifest.tokenizer):
        old = None
    sketcher = Sketcher(manifest.tokenizer, manifest.encoder)
    manifest.vocab_size = len(sketcher.tokenizer)
    fresh = {e.name for e in bank.entries if not old or old.datasets.get(e.name) != e.files.get(e.dataset)}
    for kind in kinds:
        cached = _cached_rows(bank, kind) if old and kind in old.sketches else {}
        rows = []
        for e in bank.entries:
            if e.name not in fresh and e.name in cached:
                rows.append(cached[e.name])
            else:
                rows.append(sketcher.sketch(kind, _entry_dataset(bank, e), manifest))
            if progress:
                progress(kind, e.name)
        write_sketches(bank, kind, rows)
        manifest.sketches.append(kind)
    manifest.sketches = sorted(set(manifest.sketches) | (set(old.sketches) - set(kinds) if old else set()))
    manifest.datasets = {e.name: e.files.get(e.dataset, "") for e in bank.entries}
    write_json(index_dir(bank) / "index.json", asdict(manifest))
    return manifest


def _entry_dataset(bank: Bank, entry) -> Dataset:
    """A bank entry's dataset; errors name the entry."""
    path = bank.dataset_path(entry)
    if not path.is_file():
        raise InputError(f"entry {entry.name}: {path}: dataset file is missing; restore it, or rebuild / re-import the entry")
    try:
        return load_dataset(path, name=entry.name)
    except InputError as exc:
        raise InputError(f"entry {entry.name}: {exc}; or restore the file, or rebuild / re-import the entry") from None


def read_sketches(path: Path, kind: str, root: Path) -> BankSketches:
    """The sketches in `path` (of the bank at `root`); a cut-short, damaged or inconsistent file is an
    InputError naming the fix."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            if is_token_sketch(kind):
                counts = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(int(n) for n in z["shape"]))
                if counts.shape[0] != len(names):
                    raise ValueError(f"{counts.shape[0]} histograms for {len(names)} names")
                return BankSketches(names, counts=counts)
            vectors, offsets, codebook = z["vectors"], z["offsets"], z["codebook"]
            if (vectors.ndim != 2 or codebook.ndim != 2 or codebook.shape[1] != vectors.shape[1]
                    or offsets.shape != (len(names) + 1,) or offsets[0] != 0 or offsets[-1] != len(vectors)
                    or np.any(np.diff(offsets) < 0)):
                raise ValueError(f"arrays of inconsistent shapes (vectors {vectors.shape}, offsets {offsets.shape}, "
                                 f"codebook {codebook.shape}, {len(names)} names)")
            clouds = np.split(vectors.astype(np.float32), offsets[1:-1])
            return BankSketches(names, clouds=clouds, codebook=codebook.astype(np.float32))
    except (OSError, EOFError, KeyError, ValueError, TypeError, IndexError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: unreadable or damaged index file ({reason}); rebuild it with "
                         f"`lorablend bank index {root}`") from None


def _cached_rows(bank: Bank, kind: str) -> dict[str, np.ndarray]:
    """Whatever rows the cache holds, by entry name (for incremental re-indexing)."""
    path = index_dir(bank) / f"{kind}.npz"
    if not path.exists():
        return {}
    try:
        sk = read_sketches(path, kind, bank.root)
    except InputError:  # a damaged cache is what `bank index` is run to repair: recompute every row
        return {}
    if is_token_sketch(kind):
        return {n: sk.counts[i].toarray().ravel().astype(np.float64) for i, n in enumerate(sk.names)}
    return dict(zip(sk.names, sk.clouds))


def write_sketches(bank: Bank, kind: str, rows: list[np.ndarray]) -> None:
    names = np.array(bank.names)
    path = index_dir(bank) / f"{kind}.npz"
    if is_token_sketch(kind):
        counts = sp.csr_matrix(np.vstack(rows).astype(np.int32))
        save_npz(path, names=names, data=counts.data, indices=counts.indices, indptr=counts.indptr,
                  shape=np.array(counts.shape))
    else:
        from lorablend.distances import fit_codebook

        offsets = np.cumsum([0] + [len(r) for r in rows])
        stacked = np.concatenate(rows)
        codebook = fit_codebook(stacked.astype(np.float64), CODEBOOK_SIZE, seed=0)
        save_npz(path, names=names, vectors=stacked.astype(np.float16), offsets=offsets,
                  codebook=codebook.astype(np.float32))


def query_sketch(bank: Bank, sketch: str, dataset: Dataset):

    manifest = read_manifest(bank)
    sketcher = Sketcher(bank.manifest.tokenizer, manifest.encoder if manifest else bank.manifest.base_model)
    return sketcher.sketch(sketch, dataset, manifest)


def check_vocab(bank: Bank, sketch: str, sk: BankSketches, query) -> None:
    """A token histogram must have the index's width: else the tokenizer changed since the bank was indexed."""
    if sk.counts is not None and np.shape(query)[-1] != sk.counts.shape[1]:
        raise InputError(
            f"tokenizer {bank.manifest.tokenizer} has {np.shape(query)[-1]} tokens but the '{sketch}' index has "
            f"{sk.counts.shape[1]}; re-index with `lorablend bank index {bank.root} --sketch {sketch}`"
        )


def distances_to_bank(sk: BankSketches, metric: str, query, seed: int = 0) -> np.ndarray:
    bank_side = sk.counts if sk.counts is not None else sk.clouds
    return measure(metric, query, bank_side, codebook=sk.codebook, seed=seed)
