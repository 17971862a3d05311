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

from lorablend.atomic import sha256_file, write_json
from lorablend.errors import InputError

BANK_FORMAT = "lorablend-bank"
BANK_DIRS = ("adapters", "datasets", "index")  # what an interrupted first build leaves before bank.json
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
    return Path(__file__).resolve().parents[2] / "banks" / "default"


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

    def first_of_each_family(self) -> list[str]:
        """The first entry (by name) of every family (an entry without one is its own), families in the order
        of those names: a choice of tasks fixed before any result (the bench's quick preset, the demo)."""
        seen, out = set(), []
        for e in sorted(self.entries, key=lambda e: e.name):
            key = e.family or e.name
            if key not in seen:
                seen.add(key)
                out.append(e.name)
        return out

    def check_nonempty(self) -> None:
        """An empty bank has nothing to index, retrieve or combine: say so before any work."""
        if not self.entries:
            raise InputError(f"{self.root}: the bank has no entries; add some with `lorablend bank build --out "
                             f"{self.root}` or `lorablend bank import-lots-of-loras`, or choose another bank")

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


def check_bank_out(root: Path) -> None:
    """`bank build` / `bank import-lots-of-loras --out`: a bank (resumed), a new or empty directory, or what an
    interrupted first build left; never a directory of someone's other files, which the bank would mix with."""
    root = Path(root)
    if (root / MANIFEST).exists() or not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir() if p.name not in BANK_DIRS and not p.name.startswith("."))
    if foreign:
        raise InputError(f"{root}: exists and is not a lorablend bank (it holds {foreign[0]} and no {MANIFEST}); "
                         "choose a new or empty --out")


def confined(rel: str, where: Path, label: str, key: str) -> str:
    """`rel` if it names a path inside the bank of manifest `where`: a shared bank must never make lorablend read,
    hash or load files outside it (no absolute paths, no `..` out of it, no symlink leading out)."""
    inside = where.parent.resolve()
    try:
        target = (inside / rel).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop: nothing lorablend could open
        target = None
    if "\\" in rel or os.path.isabs(rel) or target is None or inside not in target.parents:
        raise InputError(f"{where}: {label}: '{key}' {rel[:200]!r} points outside the bank (paths in {MANIFEST} must be "
                         "relative, with '/', and stay inside the bank, symlinks included); restore the file or "
                         "rebuild the bank")
    return rel


TMP_EXTRA = len("..12345678.tmp")  # atomic_file / atomic_dir write `.NAME.XXXXXXXX.tmp` beside the target


def check_output(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output path inside a bank (banks are shared and checked against
    their hashes: lorablend never writes into one, --force or not) or a name the file system refuses."""
    out = Path(out)
    name_max = _name_max(out)
    parts = [p for p in out.absolute().parts if p != os.sep]
    limits = [name_max] * (len(parts) - 1) + [name_max - TMP_EXTRA]
    for part, limit in zip(parts, limits):
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{out}: file name too long ({len(os.fsencode(part))} bytes, at most {limit} here); "
                             f"choose a shorter {option}")
    resolved = out.resolve()
    bank = next((p for p in (resolved, *resolved.parents) if (p / MANIFEST).is_file()), None)
    if bank is not None:
        raise InputError(f"{out}: is inside the bank {bank}, and lorablend never writes into a bank; choose a "
                         f"{option} outside it")


def _name_max(path: Path) -> int:
    """The longest file name the file system holding `path` (its nearest existing parent) accepts."""
    parent = path.absolute().parent
    while not os.path.isdir(parent) and parent != parent.parent:  # isdir: False, not an error, on a too-long name
        parent = parent.parent
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


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
        adapter_dir, dataset = (confined(rec[k], where, label, k) for k in ("adapter_dir", "dataset"))
        entries.append(
            BankEntry(
                name=rec["name"],
                adapter_dir=adapter_dir,
                dataset=dataset,
                family=rec.get("family"),
                files={confined(rel, where, label, "files"): digest for rel, digest in rec.get("files", {}).items()},
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
