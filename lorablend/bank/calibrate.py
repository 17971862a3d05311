"""Temperature and top-k chosen on the bank itself, never on a test split.

The paper has no temperature: with WD or KL its softmin is one-hot, with JS it is
nearly uniform. `calibrate` picks (T, k) from a small grid by the criterion the
neural operator is trained with: how well the coefficient-weighted bank
reconstructs an adapter it was not given,

    ||Σ_j c_j θ_j − θ_t||² / ||θ_t||²  =  (cᵀGc − 2 cᵀG[:, t] + G[t, t]) / G[t, t],

computed from the Gram matrix G = ΘΘᵀ alone (`bank/matrices.gram`), so it costs
nothing next to an evaluation. The division by ||θ_t||² keeps adapters with large
norms from deciding alone. Each usable entry t plays the new dataset in turn,
with t itself (and, in family mode, t's whole family) removed from its
candidates, as the study removes them. `lorablend bench` calls this with the
entry it scores (and its family) already left out of `usable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorablend.coefficients import apply_operator
from lorablend.errors import InputError

TEMPERATURES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
TOP_KS = (1, 2, 4, 8, 16, None)  # None: every candidate


@dataclass(frozen=True)
class Calibration:
    temperature: float
    top_k: int | None
    loss: float  # mean relative reconstruction error over the usable entries


def reconstruction_loss(c: np.ndarray, G: np.ndarray, t: int) -> float:
    """||Σ_j c_j θ_j − θ_t||² / ||θ_t||², from the Gram matrix."""
    return float((c @ G @ c - 2 * c @ G[:, t] + G[t, t]) / G[t, t])


def query_rows(D: np.ndarray, usable: list[int], families: list[str | None] | None = None) -> dict[int, np.ndarray]:
    """Each usable entry's distance row, +inf outside `usable`, on itself and (with `families`) on its family."""
    allowed = np.zeros(len(D), dtype=bool)
    allowed[usable] = True
    rows = {}
    for t in usable:
        keep = allowed.copy()
        keep[t] = False
        if families is not None and families[t] is not None:
            keep &= np.array([f != families[t] for f in families])
        rows[t] = np.where(keep, np.asarray(D[t], dtype=np.float64), np.inf)
    return rows


def calibrate(D: np.ndarray, G: np.ndarray, usable: list[int], operator: str = "normalized",
              families: list[str | None] | None = None, temperatures=TEMPERATURES, top_ks=TOP_KS) -> Calibration:
    """The (T, k) of the grid with the lowest mean reconstruction loss (ties: the first in grid order)."""
    if operator not in ("attentional", "normalized"):
        raise InputError(f"calibration needs the attentional or normalized operator, got '{operator}'")
    rows = {t: r for t, r in query_rows(D, usable, families).items() if np.isfinite(r).sum() >= 1 and G[t, t] > 0}
    if len(rows) < 2:
        raise InputError("calibrating temperature and top-k needs at least 3 usable bank entries")
    best = None
    for T in temperatures:
        for k in top_ks:
            losses = []
            for t, d in rows.items():
                kk = None if k is None else min(k, int(np.isfinite(d).sum()))
                losses.append(reconstruction_loss(apply_operator(d, operator, T, kk), G, t))
            loss = float(np.mean(losses))
            if best is None or loss < best.loss - 1e-12:
                best = Calibration(T, k, loss)
    return best
