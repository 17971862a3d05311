"""Stage 4 — meta-operators: a row of distances → one coefficient per bank adapter.

All three operators end in a softmin, so coefficients are non-negative and sum
to 1. Excluded entries carry distance +inf and get weight 0. `temperature`
sharpens or flattens the softmin (the paper has none: with WD or KL its softmin
is one-hot, with JS nearly uniform); `top_k` keeps the k nearest entries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lorablend.errors import InputError, suggest

OPERATORS = ("attentional", "normalized", "neural")


def softmin(d: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    z = np.where(finite, -(d - d[finite].min()) / temperature, -np.inf)
    w = np.exp(z)
    return w / w.sum()


def zscore(d: np.ndarray) -> np.ndarray:
    """Standardise the finite part of a distance row; +inf (excluded) stays +inf."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    x = d[finite]
    scale = np.abs(x).max() if x.size else 0.0
    if scale > 0:  # z-scores are scale-free; dividing first keeps the mean of huge distances finite
        x = x / scale
    mu, sd = x.mean(), x.std()
    z = np.full_like(d, np.inf)
    z[finite] = (x - mu) / (sd if sd > 0 else 1.0)
    return z


def keep_top_k(d: np.ndarray, k: int | None) -> np.ndarray:
    """+inf beyond the k smallest distances (ties broken by position, so it is deterministic)."""
    if k is None:
        return d
    finite = np.flatnonzero(np.isfinite(d))  # excluded (non-finite) entries are never among the k kept
    order = finite[np.argsort(d[finite], kind="stable")]
    out = np.full_like(d, np.inf)
    out[order[:k]] = d[order[:k]]
    return out


def check_options(n_candidates: int, temperature: float, top_k: int | None) -> None:
    if not temperature > 0:
        raise InputError(f"--temperature must be > 0, got {temperature}")
    if n_candidates < 1:
        raise InputError("no bank entry is left to combine after exclusions; use a bank with more entries")
    if top_k is not None:
        check_count("--top-k", top_k, n_candidates)


def check_count(option: str, value: int, n_candidates: int) -> None:
    """A count of entries to keep (--top-k, --rerank) must fit the candidates: more would silently mean all."""
    if not 1 <= value <= n_candidates:
        raise InputError(f"{option} must be between 1 and {n_candidates} (the candidate entries), got {value}")


def apply_operator(
    d: np.ndarray,
    operator: str = "normalized",
    temperature: float = 1.0,
    top_k: int | None = None,
    neural: "NeuralOperator | None" = None,
) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    check_options(int(np.isfinite(d).sum()), temperature, top_k)
    if operator not in OPERATORS:
        raise suggest(operator, OPERATORS, "operator")
    d = keep_top_k(d, top_k)
    if operator == "attentional":
        return softmin(d, temperature)
    z = zscore(d)
    if operator == "normalized":
        return softmin(z, temperature)
    if neural is None:
        raise InputError("the neural operator needs a fitted meta-operator; run `lorablend bank fit-meta BANK --metric M`")
    return softmin(neural.predict(z), temperature)


@dataclass
class NeuralConfig:
    hidden: int = 64
    epochs: int = 40
    lr: float = 1e-3
    seed: int = 0
    sketch: str = "tokens"
    metric: str = "js"
    space: str = "params"


class NeuralOperator:
    """The paper's scalar MLP (1 → h → h → 1, LayerNorm + ReLU) applied to each z-scored distance.

    `fit` uses the paper's loss, ||Σ_j c_j θ_j − θ_t||² / P over training tasks t,
    written with the Gram matrix G = Θ Θᵀ of the flattened adapters, so the bank
    is never stacked: G is accumulated module by module (see `generate.gram`).
    The paper's width is 4000; the default 64 keeps the bank's index small.
    """

    def __init__(self, config: NeuralConfig = NeuralConfig()):
        self.config = config
        self.net = None
        self.history: list[float] = []

    def _build(self):
        import torch
        from torch import nn

        torch.manual_seed(self.config.seed)
        h = self.config.hidden
        return nn.Sequential(
            nn.Linear(1, h), nn.LayerNorm(h), nn.ReLU(),
            nn.Linear(h, h), nn.LayerNorm(h), nn.ReLU(),
            nn.Linear(h, 1),
        ).double()

    def _scores(self, z):
        import torch

        finite = torch.isfinite(z)
        s = self.net(torch.where(finite, z, torch.zeros_like(z)).unsqueeze(-1)).squeeze(-1)
        return torch.where(finite, s, torch.full_like(s, float("inf")))

    def _loss(self, D, G, queries: list[int], candidates: list[int]):
        """Mean over queries t of ||Σ_j c_j θ_j − θ_t||², with j over the candidates other than t."""
        import torch

        q, c = torch.tensor(queries), torch.tensor(candidates)
        Dq = torch.tensor(D, dtype=torch.float64)[q][:, c]
        Dq[q[:, None] == c[None, :]] = float("inf")  # a task never uses its own adapter
        Z = torch.stack([torch.tensor(zscore(row.numpy())) for row in Dq])
        C = torch.softmax(-self._scores(Z), dim=1)
        G = torch.tensor(G, dtype=torch.float64)
        Gcc, Gcq = G[c][:, c], G[c][:, q]
        return (torch.einsum("ti,ij,tj->t", C, Gcc, C) - 2 * (C * Gcq.T).sum(1) + G[q, q]).mean()

    def fit(self, D: np.ndarray, G: np.ndarray, train: list[int]) -> "NeuralOperator":
        """D: (N, N) distances (row = query task); G: (N, N) Gram matrix; train: task indices to fit on."""
        import torch

        if len(train) < 3:
            raise InputError("fitting the neural operator needs at least 3 bank entries")
        self.net = self._build()
        opt = torch.optim.Adam(self.net.parameters(), lr=self.config.lr)
        for _ in range(self.config.epochs):
            loss = self._loss(D, G, train, train)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.history.append(float(loss.detach()))
        return self

    def loss(self, D: np.ndarray, G: np.ndarray, queries: list[int], candidates: list[int]) -> float:
        import torch

        with torch.no_grad():
            return float(self._loss(D, G, queries, candidates))

    def predict(self, z: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._scores(torch.tensor(np.asarray(z, dtype=np.float64))).numpy()

    # -- on disk: safetensors weights + json config ------------------------------
    def save(self, path: Path) -> None:
        """Weights, then the config with the weights' sha256: a crash between the two atomic writes
        leaves a pair that `load` recognises as mismatched, never a silently wrong operator."""
        import hashlib

        from safetensors.torch import save

        from lorablend.atomic import atomic_file, write_json

        blob = save({k: v.contiguous() for k, v in self.net.state_dict().items()})
        with atomic_file(path.with_suffix(".safetensors")) as fh:
            fh.write(blob)
        write_json(path.with_suffix(".json"), {**asdict(self.config), "history": self.history,
                                                "weights_sha256": hashlib.sha256(blob).hexdigest()})

    @classmethod
    def load(cls, path: Path) -> "NeuralOperator":
        from safetensors.torch import load

        from lorablend.atomic import sha256_file

        cfg_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not cfg_path.exists():
            raise InputError(f"{cfg_path}: no fitted neural operator; run `lorablend bank fit-meta` first")
        refit = "run `lorablend bank fit-meta` again"
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            history = raw.pop("history", [])
            digest = raw.pop("weights_sha256", None)
            config = NeuralConfig(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"{cfg_path}: unreadable neural operator config ({exc}); {refit}") from None
        if not weights.exists():
            raise InputError(f"{weights}: the neural operator's weights are missing; {refit}")
        if digest is not None and sha256_file(weights) != digest:
            raise InputError(f"{weights}: does not match {cfg_path.name} (an interrupted fit?); {refit}")
        op = cls(config)
        op.net = op._build()
        try:
            op.net.load_state_dict(load(weights.read_bytes()))
        except Exception as exc:  # safetensors / torch errors for a corrupt or mismatched file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{weights}: unreadable neural operator weights ({first}); {refit}") from None
        op.history = history
        return op
