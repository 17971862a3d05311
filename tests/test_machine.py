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


def test_busy_cores_counts_the_work_between_two_samples():
    # user nice system idle iowait irq softirq steal, in clock ticks
    a = [100, 0, 50, 1000, 10, 0, 0, 0]
    b = [250, 0, 100, 1100, 10, 0, 0, 0]  # 200 busy and 100 idle ticks of 300: two thirds of 2 cores
    assert abs(machine.busy_between(a, b, 2) - 4 / 3) < 1e-9
    assert machine.busy_between(a, a, 2) == 0.0
    assert 0.0 <= machine.busy_cores(0.05) <= (__import__("os").cpu_count() or 1)


def test_llamacpp_threads_leave_the_busy_cores_alone(monkeypatch):
    from lorablend.runtime import llamacpp

    monkeypatch.delenv(llamacpp.THREADS_ENV, raising=False)
    monkeypatch.setattr(llamacpp.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in ((0.1, 2), (1.0, 1), (2.0, 1), (0.6, 1), (0.4, 2)):
        monkeypatch.setattr(llamacpp, "busy_cores", lambda busy=busy: busy)
        assert llamacpp.default_threads() == threads, busy
