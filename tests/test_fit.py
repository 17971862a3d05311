"""bank/fit.py: the neural meta-operator fitted on the bank, then used by generate."""

import json
import shutil

from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.generate import generate
from lorablend.settings import Setting


def test_neural_operator_fits_and_generates(tiny_bank, user_dataset, tmp_path):
    from lorablend.bank.fit import fit_meta
    from lorablend.coefficients import NeuralConfig

    root = tmp_path / "bank"
    shutil.copytree(tiny_bank, root)
    bank = Bank.open(root)
    op, train, val = fit_meta(bank, NeuralConfig(hidden=16, epochs=40, metric="js"))
    assert len(train) + len(val) == 5 and op.history[-1] < op.history[0]
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(operator="neural"))
    assert abs(sum(res.provenance.coefficients.values()) - 1) < 1e-9
    assert json.loads((res.out / "lorablend.json").read_text())["operator"] == "neural"
