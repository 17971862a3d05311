"""The neural meta-operator fitted on the bank itself (`lorablend bank fit-meta`), from the matrices of
`bank/matrices.py`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from lorablend.bank.manifest import Bank
from lorablend.bank.matrices import distance_matrix, gram
from lorablend.coefficients import NeuralConfig, NeuralOperator
from lorablend.sketch import index_dir

SPACES = ("params", "update")


def space_for(combine: str) -> str:
    """The Gram space matching a combination: the paper averages parameters, svd/cat the updates."""
    return "params" if combine == "paper" else "update"


def fit_meta(bank: Bank, config: NeuralConfig, *, holdout: float = 0.2, exclude: list[str] = (),
             D: np.ndarray | None = None, G: np.ndarray | None = None, save: bool = True):
    """Fit on (1 - holdout) of the entries not excluded; report the loss on the held-out rest."""
    D = distance_matrix(bank, config.sketch, config.metric, config.seed) if D is None else D
    G = gram(bank, config.space) if G is None else G
    usable = [i for i, n in enumerate(bank.names) if n not in set(exclude)]
    order = usable[:]
    random.Random(config.seed).shuffle(order)
    n_val = int(round(len(order) * holdout))
    train, val = sorted(order[n_val:]), sorted(order[:n_val])
    op = NeuralOperator(config).fit(D, G, train)
    if save:
        op.save(meta_path(bank, config.sketch, config.metric))
    return op, train, val


def meta_path(bank: Bank, sketch: str, metric: str) -> Path:
    return index_dir(bank) / f"neural-{sketch}-{metric}"
