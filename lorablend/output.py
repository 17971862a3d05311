"""The output: an adapter directory with its provenance, checked before any work and written all-or-nothing."""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorablend.adapter import write_adapter
from lorablend.atomic import atomic_dir, write_json
from lorablend.bank.combination import combination
from lorablend.bank.manifest import Bank, check_output
from lorablend.combine import Factors
from lorablend.errors import InputError, LorablendError

PROVENANCE = "lorablend.json"


@dataclass
class Provenance:
    """`lorablend.json` beside the PEFT files: how the adapter was made."""

    lorablend_version: str
    dataset: str
    dataset_sha256: str
    bank: str
    bank_manifest_sha256: str
    sketch: str
    metric: str
    operator: str
    temperature: float
    top_k: int | None
    combine: str
    rank: int
    excluded: list[str]
    coefficients: dict[str, float]
    seed: int = 0
    rerank: int | None = None
    ce_examples: int | None = None  # labelled train examples scored (ce, rerank, fit)
    fit_budget: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None  # --auto: the (T, top-k) chosen on the bank and their reconstruction loss
    validation: dict | None = None  # the candidates' scores on held-out examples and the one written (validate.py)
    refinement: dict | None = None  # --refine-steps: the training steps run from the blend and their losses
    budget: dict | None = None  # --budget: the plan (blend tier, start, steps), the passes spent and the training record
    scoring: str | None = None  # where the model-based steps ran: torch or llamacpp (the why is printed, not kept)


def write_combination(bank: Bank, coefs: dict[str, float], out: Path, combine: str, rank: int | None = None, *,
                      readers: dict | None = None, provenance: Provenance | None = None, force: bool = False,
                      dtype: str = "float32", gguf: bool = False) -> int:
    """Combine the bank with `coefs`, write the PEFT adapter to `out` and return its rank.

    The step after the coefficients, used by `generate` (`lorablend bench` calls `combination`
    directly, with readers that keep the factors in memory, and never writes its adapters).
    `provenance`, when given, is written as lorablend.json with the output rank filled in.
    """
    modules = combination(bank, coefs, combine, rank, readers=readers)
    out_rank = max(f.rank for f in modules.values())
    if provenance is not None:
        provenance.rank = out_rank
    write_output(out, modules, bank.manifest.base_model, provenance, force=force, dtype=dtype, gguf=gguf)
    return out_rank


def check_out(out: Path, force: bool, keep: list[Path] = ()) -> None:
    """Refuse an --out that cannot be written, before any work: it exists (without --force), it is a
    file, replacing it would delete the bank or the dataset, its parent is not a writable directory, or
    it lies inside a bank or has too long a name (`check_output`)."""
    if os.path.lexists(out):
        if not force:
            raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it")
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory; --force only replaces an adapter directory: "
                             "choose another --out")
        target = out.resolve()
        for path in keep:
            path = Path(path).resolve()
            if path == target or target in path.parents:
                raise InputError(f"{out}: --force would delete {path} (the bank or the dataset); choose another --out")
    parent = out.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{out}: cannot write there ({parent} is not a directory); choose a writable --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: cannot write there ({parent} is not writable); choose a writable --out")
    check_output(out)


def write_output(out: Path, modules: dict[str, Factors], base_model: str, prov: Provenance | None, *, force: bool,
                 dtype: str, gguf: bool = False) -> None:
    """The PEFT files plus lorablend.json (when `prov` is given) and, with `gguf`, adapter.gguf made from the
    same factors in memory (llama.cpp --lora), all-or-nothing. Timings are left out of the file so reruns are
    byte-identical."""
    try:
        with atomic_dir(out, force=force) as tmp:
            write_adapter(tmp, modules, base_model, dtype=dtype)
            if gguf:
                from lorablend.runtime.gguf import GGUF_NAME, write_gguf

                write_gguf(modules, base_model, tmp / GGUF_NAME, name=out.name)
            if prov is not None:
                write_json(tmp / PROVENANCE, {k: v for k, v in asdict(prov).items() if k != "timings"})
    except FileExistsError as exc:
        if exc.filename is None:  # atomic_dir: the target appeared while we worked
            raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it") from None
        raise InputError(f"{out}: cannot write there ({exc.strerror}: {exc.filename}); choose a writable --out") from None
    except (PermissionError, NotADirectoryError, IsADirectoryError) as exc:
        raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None
    except OSError as exc:  # a full disk, a quota, an I/O error: atomic_dir has removed what it wrote
        if exc.errno == errno.EROFS:
            raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None
        raise LorablendError(f"{out}: writing the adapter failed ({exc.strerror or exc}); nothing was written: "
                             "free some space or choose another --out") from None
