"""Records on disk, one JSON file each, and their export to scores.csv and coefficients.json."""

from __future__ import annotations

import json
from pathlib import Path

from lorablend.atomic import write_json


class RecordStore:
    """One JSON file per (entry, holdout, label), written atomically: a killed run loses at most the
    record being computed. Readable while workers write (progress is a count of files)."""

    def __init__(self, results: Path):
        self.root = Path(results) / "records"

    def path(self, entry: str, holdout: str, label: str) -> Path:
        return self.root / entry / f"{holdout}__{label.replace('/', '~')}.json"

    def write(self, rec: dict) -> None:
        write_json(self.path(rec["entry"], rec["holdout"], rec["label"]), rec)

    def load(self, entry: str) -> dict[tuple[str, str], dict]:
        out = {}
        for p in sorted((self.root / entry).glob("*.json")):
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except ValueError:
                continue  # not ours (atomic writes never leave half a record)
            out[(rec["holdout"], rec["label"])] = rec
        return out

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []

    def all(self) -> list[dict]:
        return [rec for e in self.entries() for rec in self.load(e).values()]

    def missing(self, entries: list[str], slots: list) -> dict[str, int]:
        """Per entry, how many of these slots have no record yet."""
        return {e: sum(not self.path(e, s.holdout, s.label).exists() for s in slots) for e in entries}

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0

    def restore(self, csv_path: Path) -> int:
        """Records from a committed scores.csv, when the records themselves are gone (they are scratch; the CSV
        is what is committed): a study grows over sessions. Restored records carry no answers and no
        answers (`restored`: true), but their coefficient vectors when coefficients.json lies beside the CSV; a new
        record of the same adapter reuses their scores."""
        import csv

        ints, floats = ("rank", "top_k", "n", "max_new_tokens", "passes"), (
            "temperature", "rouge_l", "rouge_lsum", "exact_match", "seconds_generate", "seconds_adapter", "cost_s")

        def number(k: str, v: str):  # passes are whole but for training (1.5 a step) and validation
            return None if v == "" else int(v) if k in ints and v.lstrip("-").isdigit() else float(v)

        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        coefs_path = Path(csv_path).with_name("coefficients.json")
        coefs = json.loads(coefs_path.read_text(encoding="utf-8")) if coefs_path.exists() else {}
        for row in rows:
            rec = {k: (v if k not in ints + floats else number(k, v)) for k, v in row.items()}
            c = coefs.get(row["holdout"], {}).get(row["label"], {}).get(row["entry"], {})
            rec.update(reused=row.get("reused") == "True", coefficients=c, answers=None, restored=True)
            self.write(rec)
        return len(rows)


CSV_COLUMNS = ("entry", "family", "holdout", "label", "setting", "control", "sketch", "metric", "combine", "rank",
               "temperature", "top_k", "rouge_l", "rouge_lsum", "exact_match", "n", "max_new_tokens",
               "seconds_generate", "seconds_adapter", "reused", "cost_s", "passes", "eval_key")


def export_csv(store: RecordStore, results: Path) -> Path:
    """Every record as a row of scores.csv, and the coefficient vectors as coefficients.json
    ({holdout: {label: {entry: {bank entry: weight}}}}), both written atomically."""
    import csv
    import io

    from lorablend.atomic import atomic_file

    records = sorted(store.all(), key=lambda r: (r["entry"], r["holdout"], r["label"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS} for r in records)
    path = results / "scores.csv"
    with atomic_file(path, "w") as fh:
        fh.write(buf.getvalue())
    coefs: dict = {}
    for r in records:
        coefs.setdefault(r["holdout"], {}).setdefault(r["label"], {})[r["entry"]] = r["coefficients"]
    write_json(results / "coefficients.json", coefs)
    return path
