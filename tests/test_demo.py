"""demo.py: `lorablend demo` end to end on the tiny bank."""

import json

from conftest import run_cli

from lorablend.bank.manifest import Bank


def test_demo_runs_the_default_generate_on_family_out_tasks(tiny_bank, tmp_path, capfd):
    """`lorablend demo` end to end (the README's main command), on the tiny bank with PyTorch: the fixed tasks,
    each with its family left out, validated, scored beside the base model and the own LoRA, then the mean."""
    from lorablend.demo import demo_tasks

    bank = Bank.open(tiny_bank)
    tasks = demo_tasks(bank)
    assert tasks == ["animals", "code", "music"]  # the first task by name of the first families by name
    out = tmp_path / "demo-out"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--n", "3", "--out", str(out), "--backend", "torch"],
                                capfd)
    assert code == 0, err
    flat = " ".join(stdout.split())
    for word in tasks + ["base", "generated", "own LoRA", "mean", "PyTorch"]:
        assert word in flat, stdout
    for task in tasks:
        provenance = json.loads((out / task / "lorablend.json").read_text())
        family = bank.entry(task).family
        used = {n for n, c in provenance["coefficients"].items() if c > 0}
        assert used and not {n for n in used if bank.entry(n).family == family}  # the whole family left out
        assert provenance["validation"]["written"] and provenance["metric"] == "grad+js"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--task", "math", "--n", "2", "--out", str(out),
                                 "--backend", "torch"], capfd)
    assert code == 0 and (out / "math" / "adapter_model.safetensors").is_file() and "mean" not in stdout
