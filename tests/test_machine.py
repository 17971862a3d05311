"""lorablend.machine: what a measurement records, and whether bf16 is native."""

from pathlib import Path

from lorablend import machine


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    for flags, native in (("fpu avx2 fma", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)):
        machine.native_bf16.cache_clear()
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n")
        assert machine.native_bf16() is native
    machine.native_bf16.cache_clear()


def test_native_bf16_is_false_without_cpuinfo(monkeypatch):
    def missing(self, *a, **k):
        raise OSError("no /proc")

    machine.native_bf16.cache_clear()
    monkeypatch.setattr(Path, "read_text", missing)
    assert machine.native_bf16() is False
    machine.native_bf16.cache_clear()


def test_machine_names_cores_ram_and_versions():
    info = machine.machine()
    assert info["nproc"] >= 1 and info["ram_gib"] > 0 and info["torch"] and info["python"]
