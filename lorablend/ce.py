"""Model-based distance (`ce`) and weight fitting (`fit`): what each adapter does to the user's examples.

The paper compares datasets; what matters is whether an adapter's model fits the
user's data. CE(data, model_i) = KL(data ‖ model_i) + H(data), so the mean
per-token cross-entropy of the targets under base + adapter i, minus the base
model's, is that KL up to a constant.

One base model is loaded once. Candidate adapters are applied as low-rank updates
through forward hooks on the adapted Linear layers: for weights w, the layer adds
x Aᵀ diag(w ⊗ s) Bᵀ (stacked factors of all candidates), which is exactly the
`cat` combination with coefficients w. Scoring a candidate, or any mixture of
candidates, is one forward pass; nothing is reloaded. No gradient is taken.

Cost: one bf16 pass over the k examples per candidate (and per fit step). The examples'
common prefix (chat header and task instruction, ~125 of ~205 tokens per NI example) runs
once per pass and the suffixes attend to its KV cache: 1.65–2.5× fewer CPU-s per candidate
than whole prompts on five default-bank tasks, 1.9–5.7 CPU-s each (k = 16, 1 thread; table
and command in docs/PERFORMANCE.md, "ce"). `--rerank 16` thus costs ~30–100 CPU-s. Mistral-7B
has ~66× SmolLM2's non-embedding weights: ~2–7 CPU-min per candidate, estimated, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .adapter import AdapterReader
from .dataset import Example
from .errors import InputError
from .prompts import PromptFormat, common_prefix, pad_pairs, training_pair

CE_EXAMPLES = 16


@dataclass
class _Stack:
    """One adapted Linear: the candidates' factors side by side."""

    A: "torch.Tensor"  # (R, k): rows of all candidates
    B: "torch.Tensor"  # (d, R)
    owner: "torch.Tensor"  # (R,): index of the candidate each rank belongs to
    scale: "torch.Tensor"  # (R,): that candidate's own scaling


class MixtureScorer:
    """Loss of k labelled examples under base + Σ_i w_i · (adapter i), for any weights w."""

    def __init__(self, model, tokenizer, readers: list[AdapterReader], examples: list[Example],
                 fmt: PromptFormat = PromptFormat(), bf16: bool = True, share_prefix: bool = True):
        import torch

        if not examples:
            raise InputError("the ce distance and the fit operator need labelled train examples; the dataset has none")
        self.model, self.bf16 = model, bf16
        self.weights = torch.zeros(len(readers))
        self.evaluations = 0
        self._stacks = {m: self._stack(readers, m) for m in readers[0].modules}
        self._hooks = [model.get_submodule(m).register_forward_hook(self._hook(m)) for m in self._stacks]
        pairs = [training_pair(tokenizer, e, fmt) for e in examples]
        # The chat header and task instruction every example starts with (~60% of NI tokens) run once per
        # pass; it ends inside every prompt, so all targets are predicted from the suffixes.
        shared = 0
        if share_prefix:
            shared = max(0, min([common_prefix(pairs[0][0], ids) for ids, _ in pairs]
                                + [_prompt_len(lab) - 1 for _, lab in pairs]))
        self._prefix = torch.tensor([pairs[0][0][:shared]]) if shared else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._ids, self._labels, self._mask = pad_pairs([(ids[shared:], lab[shared:]) for ids, lab in pairs], pad)

    @staticmethod
    def _stack(readers: list[AdapterReader], module: str) -> _Stack:
        import torch

        fs = [r.factors(module) for r in readers]
        return _Stack(
            A=torch.from_numpy(np.concatenate([f.A for f in fs])),
            B=torch.from_numpy(np.concatenate([f.B for f in fs], axis=1)),
            owner=torch.tensor([i for i, f in enumerate(fs) for _ in range(f.rank)]),
            scale=torch.tensor([f.scale for f in fs for _ in range(f.rank)], dtype=torch.float32),
        )

    def _hook(self, module: str):
        def add_update(_layer, inputs, output):
            if not self.weights.any():
                return output
            st = self._stacks[module]
            coef = (self.weights[st.owner] * st.scale).to(output.dtype)
            x = inputs[0]
            return output + ((x @ st.A.to(x.dtype).T) * coef) @ st.B.to(x.dtype).T

        return add_update

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def loss(self, weights) -> float:
        """Mean per-token cross-entropy of the targets (logits only at target positions)."""
        import torch

        from .models import target_loss

        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.evaluations += 1
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            mask, cache = self._mask, None
            if self._prefix is not None:
                cache = self.model.base_model(input_ids=self._prefix, use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(self._ids))
                mask = torch.cat([torch.ones(len(mask), self._prefix.shape[1], dtype=mask.dtype), mask], dim=1)
            return float(target_loss(self.model, self._ids, mask, self._labels, past_key_values=cache))

    def ce_row(self) -> np.ndarray:
        """CE with each candidate alone, minus the base model's CE (lower = fits better)."""
        n = len(self.weights)
        base = self.loss(np.zeros(n))
        return np.array([self.loss(np.eye(n)[i]) for i in range(n)]) - base

    def fit(self, init: np.ndarray, budget: int = 40, penalty: float = 0.01, seed: int = 0) -> np.ndarray:
        """Gradient-free search of mixture weights (Nelder–Mead on softmax logits), started at `init`.

        Only the candidates `init` weighs (> 0) are searched: a top-k start fits k weights, and the
        budget is not spent on the simplex's steps along dimensions that start at zero. The entropy
        penalty favours few adapters; the budget bounds forward passes.
        """
        from scipy.optimize import minimize

        from .coefficients import softmin

        init = np.asarray(init, dtype=np.float64)
        active = np.flatnonzero(init > 0)
        w = np.zeros(len(init))
        if len(active) < 2:
            w[active] = 1.0
            return w
        z0 = np.log(init[active] / init[active].sum())

        def weights(z):
            w[active] = softmin(-z)
            return w.copy()

        def objective(z):
            x = weights(z)
            return self.loss(x) + penalty * float(-(x[active] * np.log(x[active] + 1e-12)).sum())

        rng = np.random.default_rng(seed)
        simplex = np.vstack([z0, z0 + np.eye(len(z0)) * 1.0 + rng.normal(0, 1e-3, (len(z0), len(z0)))])
        res = minimize(objective, z0, method="Nelder-Mead",
                       options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4})
        return weights(res.x)  # Nelder–Mead returns the best point it evaluated, z0 included


def _prompt_len(labels: list[int]) -> int:
    """Tokens before the first target token."""
    return next((i for i, t in enumerate(labels) if t != -100), len(labels))
