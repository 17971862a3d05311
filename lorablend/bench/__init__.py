"""`lorablend bench`: the leave-one-out study over a bank, with honest controls, resumable records and a report."""

from lorablend.bench.plan import DEFAULT_PRESETS, PRESETS, BenchConfig
from lorablend.bench.records import RecordStore, export_csv
from lorablend.bench.run import BenchRun, Reporter, run_bench

__all__ = ["DEFAULT_PRESETS", "PRESETS", "BenchConfig", "BenchRun", "RecordStore", "Reporter", "export_csv", "run_bench"]
