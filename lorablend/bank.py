"""The bank: a directory of PEFT LoRA adapters, each with the dataset it was trained on.

On disk: `BANK/bank.json` (the `BankManifest` below), `BANK/adapters/NAME/` (PEFT
adapter dirs), `BANK/datasets/NAME.jsonl.gz` (lorablend dataset files) and
`BANK/index/` (cached sketches, fitted meta-operators). Paths in the manifest are
relative to BANK so a bank can be moved or committed as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import sha256_file, write_json
from .errors import InputError

BANK_FORMAT = "lorablend-bank"
BANK_VERSION = 1
MANIFEST = "bank.json"


@dataclass
class BankEntry:
    name: str
    adapter_dir: str
    dataset: str
    family: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    info: dict = field(default_factory=dict)  # training time, steps, own/base Rouge-L, seed


@dataclass
class BankManifest:
    base_model: str
    tokenizer: str
    entries: list[BankEntry] = field(default_factory=list)
    format: str = BANK_FORMAT
    version: int = BANK_VERSION
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def default_bank_path() -> Path:
    """`--bank default`: the bank committed with lorablend (repo `banks/default`)."""
    env = os.environ.get("LORABLEND_DEFAULT_BANK")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "banks" / "default"


class Bank:
    """A loaded manifest plus the directory it lives in."""

    def __init__(self, root: Path, manifest: BankManifest):
        self.root = root
        self.manifest = manifest

    # -- loading / saving -------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Bank":
        root = default_bank_path() if str(path) == "default" else Path(path)
        mpath = root / MANIFEST
        if not mpath.exists():
            hint = "build it with `lorablend bank build` or import one" if root.exists() else "check the path"
            raise InputError(f"{mpath}: bank manifest not found; {hint}")
        try:
            raw = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{mpath}: invalid JSON ({exc}); restore the file or rebuild the bank") from None
        except RecursionError:
            raise InputError(f"{mpath}: invalid JSON (nested too deeply); restore the file or rebuild the bank") from None
        except OSError as exc:
            raise InputError(f"{mpath}: cannot read the bank manifest ({exc.strerror or exc})") from None
        return cls(root, _parse_manifest(raw, mpath))

    @classmethod
    def create(cls, root: str | Path, base_model: str, tokenizer: str | None = None) -> "Bank":
        root = Path(root)
        if (root / MANIFEST).exists():
            return cls.open(root)
        return cls(root, BankManifest(base_model=base_model, tokenizer=tokenizer or base_model))

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest.to_dict())

    # -- entries ------------------------------------------------------------
    @property
    def entries(self) -> list[BankEntry]:
        return self.manifest.entries

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> BankEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise InputError(f"{self.root}: no entry named '{name}' (entries: {', '.join(self.names[:6])}…)")

    def adapter_path(self, entry: BankEntry) -> Path:
        return self.root / entry.adapter_dir

    def dataset_path(self, entry: BankEntry) -> Path:
        return self.root / entry.dataset

    def add(self, entry: BankEntry) -> None:
        """Record an entry whose files are already in place (hashes taken now)."""
        entry.files = {
            str(p.relative_to(self.root)): sha256_file(p)
            for p in sorted(self.adapter_path(entry).iterdir())
            if p.is_file()
        }
        entry.files[entry.dataset] = sha256_file(self.dataset_path(entry))
        self.manifest.entries = [e for e in self.entries if e.name != entry.name] + [entry]
        self.manifest.entries.sort(key=lambda e: e.name)

    @property
    def sha256(self) -> str:
        return sha256_file(self.root / MANIFEST)


def _parse_manifest(raw, where: Path) -> BankManifest:
    if not isinstance(raw, dict) or raw.get("format") != BANK_FORMAT:
        raise InputError(f"{where}: not a lorablend bank manifest (no \"format\": \"{BANK_FORMAT}\")")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{where}: manifest has no valid 'version' (got {version!r}); restore the file or rebuild the bank")
    if version > BANK_VERSION:
        raise InputError(
            f"{where}: bank format version {version!r} is newer than this lorablend supports ({BANK_VERSION}); "
            "upgrade lorablend"
        )
    for key in ("base_model", "entries"):
        if key not in raw:
            raise InputError(f"{where}: manifest has no '{key}' field")
    if not isinstance(raw["entries"], list):
        raise InputError(f"{where}: 'entries' must be a list of entries, got {type(raw['entries']).__name__}")
    for key in ("base_model", "tokenizer"):
        if not isinstance(raw.get(key, ""), str):
            raise InputError(f"{where}: '{key}' must be a string (a hub id or a local dir)")
    entries, seen = [], set()
    for i, rec in enumerate(raw["entries"]):
        missing = [k for k in ("name", "adapter_dir", "dataset") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise InputError(f"{where}: entry {i} lacks {', '.join(missing)}")
        label = f"entry {i} ({str(rec['name'])[:60]})"
        for key, kind, what in (("name", str, "a string"), ("adapter_dir", str, "a string"), ("dataset", str, "a string"),
                                ("family", (str, type(None)), "a string or null"), ("files", dict, "an object"),
                                ("info", dict, "an object")):
            if key in rec and not isinstance(rec[key], kind):
                raise InputError(f"{where}: {label}: '{key}' must be {what}, got {type(rec[key]).__name__}; "
                                 "restore the file or rebuild the bank")
        if rec["name"] in seen:
            raise InputError(f"{where}: duplicate entry name '{rec['name']}'; entry names must be unique")
        seen.add(rec["name"])
        entries.append(
            BankEntry(
                name=rec["name"],
                adapter_dir=rec["adapter_dir"],
                dataset=rec["dataset"],
                family=rec.get("family"),
                files=dict(rec.get("files", {})),
                info=dict(rec.get("info", {})),
            )
        )
    return BankManifest(
        base_model=raw["base_model"],
        tokenizer=raw.get("tokenizer", raw["base_model"]),
        entries=entries,
        version=version,
        info=dict(raw["info"]) if isinstance(raw.get("info"), dict) else {},
    )
