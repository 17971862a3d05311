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

Cost: one pass over the k examples per candidate (and per fit step), in bf16 where the CPU computes it natively
(`machine.native_bf16`), else fp32. The examples' common prefix (chat header and task instruction) runs once per
pass and the suffixes attend to its KV cache; measured in docs/PERFORMANCE.md ("ce").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from lorablend.adapter import AdapterReader, check_shapes
from lorablend.dataset import Example
from lorablend.errors import InputError
from lorablend.machine import native_bf16
from lorablend.runtime.prompts import PromptFormat, common_prefix, pad_pairs, prompt_len, training_pair

CE_EXAMPLES = 16
FIRST_ORDER_PASSES = 3  # forward-pass equivalents of one forward + backward pass (a backward costs ~2 forwards)
FIRST_ORDER_TOKENS = 256  # padded tokens per backward slice: bounds the activations it keeps (7B shapes: docs/PERFORMANCE.md)
# Over a quantized base each slice dequantizes every weight twice (forward and backward), so slices are larger there;
# the gradient, summed in the compute dtype like a float base's, leaves room for their activations.
QUANTIZED_FIRST_ORDER_TOKENS = 512


@dataclass
class Batch:
    """k labelled examples as padded suffixes after their shared prefix (chat header and task instruction,
    ~60 % of NI tokens), which runs once per pass; it ends inside every prompt, so all targets are
    predicted from the suffixes."""

    prefix: "torch.Tensor | None"  # (1, P) or None
    ids: "torch.Tensor"  # (k, S)
    labels: "torch.Tensor"  # (k, S), -100 off targets
    mask: "torch.Tensor"  # (k, S)

    def slices(self, tokens: int):
        """The batch cut into runs of examples of at most `tokens` padded tokens (at least one example each),
        each trimmed to its own longest example: one backward pass each."""
        lengths = self.mask.sum(dim=1).tolist()
        start = 0
        while start < len(lengths):
            end = start + 1
            while end < len(lengths) and (end + 1 - start) * max(lengths[start:end + 1]) <= tokens:
                end += 1
            width = max(lengths[start:end])
            yield Batch(self.prefix, self.ids[start:end, :width], self.labels[start:end, :width],
                        self.mask[start:end, :width])
            start = end

    @property
    def targets(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    def loss(self, model, bf16: bool = True, prefix_kv=None):
        """Mean per-token target cross-entropy (a tensor, differentiable outside inference mode). `prefix_kv`:
        the prefix's keys and values per layer, computed once by the caller, else the prefix runs here."""
        import torch

        from lorablend.runtime.models import target_loss

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mask, cache = self.mask, None
            if self.prefix is not None:
                cache = _repeated(self.prefix_kv(model) if prefix_kv is None else prefix_kv, len(self.ids))
                mask = torch.cat([torch.ones(len(mask), self.prefix.shape[1], dtype=mask.dtype), mask], dim=1)
            return target_loss(model, self.ids, mask, self.labels, past_key_values=cache)

    def prefix_kv(self, model) -> list[tuple]:
        """The shared prefix's (keys, values) per layer, for a batch of one (call under the loss's autocast)."""
        cache = model.base_model(input_ids=self.prefix, use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]


def _repeated(kv: list[tuple], n: int):
    """A KV cache holding `kv` once per example (differentiable: gradients flow back into `kv`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0), i)
    return cache


def require_examples(examples: list[Example]) -> None:
    if not examples:
        raise InputError("the model-based steps (ce, grad, rerank, fit) need labelled train examples; the dataset has none")


def encode(tokenizer, examples: list[Example], fmt: PromptFormat = PromptFormat(), share_prefix: bool = True) -> Batch:
    import torch

    require_examples(examples)
    pairs = [training_pair(tokenizer, e, fmt) for e in examples]
    shared = 0
    if share_prefix:
        shared = max(0, min([common_prefix(pairs[0][0], ids) for ids, _ in pairs]
                            + [prompt_len(lab) - 1 for _, lab in pairs]))
    prefix = torch.tensor([pairs[0][0][:shared]]) if shared else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Batch(prefix, *pad_pairs([(ids[shared:], lab[shared:]) for ids, lab in pairs], pad))


@dataclass
class _Stack:
    """One adapted Linear: the candidates' factors side by side."""

    A: "torch.Tensor"  # (R, k): rows of all candidates
    B: "torch.Tensor"  # (d, R)
    owner: "torch.Tensor"  # (R,): index of the candidate each rank belongs to
    scale: "torch.Tensor"  # (R,): that candidate's own scaling


class Scorer:
    """The loss of k labelled examples under the base plus any mixture of candidate adapters, one pass per loss;
    subclasses run the pass (torch hooks here, llama.cpp's runtime LoRA in `llamacpp.LlamaCppScorer`)."""

    evaluations: int
    weights: "torch.Tensor | np.ndarray"

    @property
    def passes(self) -> int:
        """Forward-pass equivalents run so far: one per loss evaluated."""
        return self.evaluations

    def loss(self, weights) -> float:
        """Mean per-token cross-entropy of the targets with the candidates at `weights`."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def losses(self) -> np.ndarray:
        """The loss with each candidate alone, one pass each: all a ranking needs (the operators are invariant to
        a shift of the row, so the base model's loss, the same for every candidate, is not computed)."""
        n = len(self.weights)
        return np.array([self.loss(np.eye(n)[i]) for i in range(n)])

    def ce_row(self) -> np.ndarray:
        """CE with each candidate alone, minus the base model's CE (lower = fits better): the values, one pass more."""
        return self.losses() - self.loss(np.zeros(len(self.weights)))

    def fit(self, init: np.ndarray, budget: int = 40, penalty: float = 0.01, seed: int = 0) -> np.ndarray:
        """Gradient-free search of mixture weights (Nelder–Mead on softmax logits), started at `init`.

        Only the candidates `init` weighs (> 0) are searched: a top-k start fits k weights, and the
        budget is not spent on the simplex's steps along dimensions that start at zero. The entropy
        penalty favours few adapters; the budget bounds forward passes.
        """
        from scipy.optimize import minimize

        from lorablend.coefficients import softmin

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


class MixtureScorer(Scorer):
    """Loss of k labelled examples under base + Σ_i w_i · (adapter i), for any weights w."""

    def __init__(self, model, tokenizer, readers: list[AdapterReader], examples: list[Example],
                 fmt: PromptFormat = PromptFormat(), bf16: bool | None = None, share_prefix: bool = True):
        import torch

        self.model, self.bf16 = model, native_bf16() if bf16 is None else bf16
        self.weights = torch.zeros(len(readers))
        self.evaluations = 0
        self._batch = encode(tokenizer, examples, fmt, share_prefix)
        self._stacks = {m: self._stack(readers, m, model.get_submodule(m).weight) for m in readers[0].modules}
        self._hooks = [model.get_submodule(m).register_forward_hook(self._hook(m)) for m in self._stacks]

    @staticmethod
    def _stack(readers: list[AdapterReader], module: str, weight) -> _Stack:
        import torch

        fs = [r.factors(module) for r in readers]
        check_shapes(module, [str(r.path.parent) for r in readers], fs, tuple(weight.shape))
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

        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.evaluations += 1
        with torch.inference_mode():
            return float(self._batch.loss(self.model, self.bf16))

class FirstOrderScorer:
    """Every adapter's first-order change of the examples' loss, from one backward pass at the base model.

    Adapter i adds s_i·B_i·A_i to W, so Δce_i ≈ s_i·⟨∂L/∂W, B_i A_i⟩ summed over the adapted modules:
    after the pass, an adapter costs r·d·k multiply-adds per module, whatever the model's depth in
    tokens. The gradient only ranks candidates (its values overstate gains and miss the sign of
    adapters that hurt); no weight is ever changed. Only the adapted weights get a gradient, kept in
    their own dtype (bf16 at 7B: 1.6 GB for q/k/v), and the examples run in slices of at most `tokens`
    padded tokens, so the activations kept for the backward pass stay bounded whatever k is.

    Over a quantized base (bitsandbytes int8 or NF4: a 7B pass fits a 16 GB laptop, where llama.cpp scores) the
    weights take no gradient; hooks sum ∂L/∂W = Σₜ δₜ xₜᵀ from each adapted layer's inputs and output gradients
    instead, in slices of QUANTIZED_FIRST_ORDER_TOKENS unless `tokens` says otherwise.
    """

    def __init__(self, model, tokenizer, modules: list[str], examples: list[Example],
                 fmt: PromptFormat = PromptFormat(), bf16: bool | None = None, share_prefix: bool = True,
                 tokens: int | None = None):
        import torch

        bf16 = native_bf16() if bf16 is None else bf16
        t0, cpu0 = time.perf_counter(), time.process_time()
        full = encode(tokenizer, examples, fmt, share_prefix)
        layers = {m: model.get_submodule(m) for m in modules}
        weights = {m: layer.weight for m, layer in layers.items() if layer.weight.is_floating_point()}
        hooks, summed = [], {m: torch.zeros(layer.out_features, layer.in_features,
                                            dtype=torch.bfloat16 if bf16 else torch.float32)
                             for m, layer in layers.items() if m not in weights}
        if tokens is None:
            tokens = FIRST_ORDER_TOKENS if not summed else QUANTIZED_FIRST_ORDER_TOKENS
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in flags:
                p.requires_grad_(False)
            for w in weights.values():
                w.requires_grad_(True)
                w.grad = None
            hooks = [layers[m].register_forward_hook(_summing(g)) for m, g in summed.items()]
            # The prefix runs once: each slice's backward stops at detached copies of its keys and values and
            # leaves their gradients there; one backward pass through the prefix then takes them all.
            kv = leaves = None
            if full.prefix is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    kv = full.prefix_kv(model)
                leaves = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kv]
            for part in full.slices(tokens):
                (part.loss(model, bf16, leaves) * (part.targets / full.targets)).backward()
            if kv is not None:  # (keys of a layer whose k_proj is not adapted depend on no adapted weight)
                ends = [(t, leaf.grad) for pair, copies in zip(kv, leaves) for t, leaf in zip(pair, copies)
                        if t.requires_grad and leaf.grad is not None]
                if ends:
                    torch.autograd.backward([t for t, _ in ends], [g for _, g in ends])
            self.gradients = {m: weights[m].grad if m in weights else summed[m] for m in modules}
            self.seconds, self.cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0  # the backward pass
        finally:
            for hook in hooks:
                hook.remove()
            for w in weights.values():
                w.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)

    def scores(self, readers: list[AdapterReader], chunk: int = 64) -> np.ndarray:
        """Δce estimates of these adapters (lower = better), streamed a module at a time. Each module's factors
        are stacked `chunk` adapters at a time into one matrix product G·Aᵀ in the gradient's dtype (bf16 at 7B,
        where it runs on the CPU's bf16 units like the forward pass; float32 otherwise), summed in float32."""
        import torch

        out = torch.zeros(len(readers), dtype=torch.float64)
        for module, G in self.gradients.items():
            for start in range(0, len(readers), chunk):
                part = readers[start:start + chunk]
                fs = [r.factors(module) for r in part]
                check_shapes(module, [str(r.path.parent) for r in part], fs, tuple(G.shape))
                A = torch.from_numpy(np.concatenate([f.A for f in fs])).to(G.dtype)  # (R, k)
                B = torch.from_numpy(np.concatenate([f.B for f in fs], axis=1))  # (d, R)
                per_rank = ((G @ A.T).float() * B).sum(dim=0)  # ⟨G, b_j a_jᵀ⟩ for every rank j
                owner = torch.tensor([i for i, f in enumerate(fs) for _ in range(f.rank)])
                scale = torch.tensor([f.scale for f in fs], dtype=torch.float64)
                out[start:start + len(part)] += torch.zeros(len(part), dtype=torch.float64).index_add_(
                    0, owner, per_rank.double()) * scale
                for r in part:
                    r.release(module)
        return out.numpy()


def _summing(gradient):
    """A forward hook adding this call's ∂L/∂W (its output gradient times its input) to `gradient` during the
    backward pass. The first hooked layer's output is where the graph starts: nothing before it takes a gradient."""

    def hook(_layer, inputs, output):
        x = inputs[0].detach()

        def add(d):
            dtype = gradient.dtype
            gradient.addmm_(d.reshape(-1, d.shape[-1]).T.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype))

        if not output.requires_grad:
            output.requires_grad_()
        output.register_hook(add)

    return hook
