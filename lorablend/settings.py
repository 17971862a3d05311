"""What a setting is: the dataclass (its fields carry the CLI's help), its label and every check of it.

A label names a setting in the bench's records and reports, and `lorablend generate --setting` runs it:
`sketch/metric/operator/combine[/T<t>][/top<k>][/rerank<m>][/r<rank>]`, with `auto` in place of T and
top to calibrate them on the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from lorablend.bank.fit import space_for
from lorablend.coefficients import OPERATORS
from lorablend.combine import METHODS
from lorablend.distances import METRICS
from lorablend.errors import InputError, suggest
from lorablend.runtime.scoring import CE_EXAMPLES
from lorablend.sketch import SKETCHES

UNIONS = tuple(f"grad+{m}" for m in METRICS)  # retrievers: first-order top m/2 ∪ the distance's top m/2
ALL_METRICS = METRICS + ("ce", "grad") + UNIONS
ALL_OPERATORS = OPERATORS + ("fit",)
FIT_CANDIDATES = 16  # the fit operator's candidates without --rerank or --top-k


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class Setting:
    """One way to turn a dataset into an adapter."""

    sketch: str = _help("Dataset representation: tokens | embeddings | target-tokens | target-embeddings.",
                        default="tokens")
    metric: str = _help("Distance: wd | kl | js | mmd; ce (the model's loss with each adapter); grad (its first-order "
                        "change, one backward pass for the whole bank); grad+js etc. (grad's top M/2 and js's top M/2, "
                        "for --rerank M).", default="js")
    operator: str = _help("Meta-operator: attentional | normalized | neural | fit.", default="normalized")
    combine: str = _help("Combination: svd (exact, truncated) | cat (exact) | paper (inexact).", default="svd")
    temperature: float = _help("Softmin temperature (> 0); lower is sharper.", default=1.0)
    top_k: int | None = _help("Combine only the k nearest entries.", default=None)
    rank: int | None = _help("Rank of the svd output (default: the bank's rank).", default=None)
    rerank: int | None = _help("Keep M entries by --metric, then rank them by ce on labelled examples.", default=None)
    auto: bool = _help("Choose --temperature and --top-k on the bank: those that best rebuild each bank adapter from "
                       "the others (cached per bank; attentional/normalized).", default=False)
    ce_examples: int = _help("Labelled train examples scored by ce / grad / rerank / fit.", default=CE_EXAMPLES)
    fit_budget: int = _help("Forward passes allowed to the fit operator's search.", default=40)

    def check(self) -> None:
        for value, choices, what in ((self.sketch, SKETCHES, "sketch"), (self.metric, ALL_METRICS, "metric"),
                                     (self.operator, ALL_OPERATORS, "operator"), (self.combine, METHODS, "combine")):
            if value not in choices:
                raise suggest(value, choices, what)
        if not self.temperature > 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        for name in ("top_k", "rank", "rerank", "ce_examples", "fit_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.rerank and self.metric == "ce":
            raise InputError("--rerank needs a retriever --metric (wd, kl, js, mmd, grad or grad+js ...) to retrieve "
                             "candidates with")
        if self.metric in UNIONS and not self.rerank:
            raise InputError(f"--metric {self.metric} retrieves candidates for --rerank; give --rerank M (e.g. 8)")
        if self.operator == "neural" and (self.distance != self.metric or self.rerank):
            raise InputError("the neural operator is fitted on a distributional metric; drop --rerank / --metric "
                             f"{self.metric}")
        if self.auto:
            self._check_auto()

    def _check_auto(self) -> None:
        """`--auto` picks T and top-k for a softmin over the bank's own distances: other operators and ce have none."""
        if self.operator not in ("attentional", "normalized"):
            raise InputError(f"--auto calibrates temperature and top-k for the attentional or normalized operator, not "
                             f"'{self.operator}'; drop --auto or choose one of those")
        if self.distance is None:
            raise InputError(f"--auto calibrates on the distances between the bank's datasets, which metric "
                             f"{self.metric} does not have; give --temperature and --top-k instead, or use --rerank "
                             "with a distributional metric")

    def capped(self, candidates: int) -> Setting:
        """The setting with --rerank at most `candidates` (a fixed default meeting a smaller bank; an explicit
        --rerank above the bank is refused instead, by `generate`)."""
        return replace(self, rerank=max(1, min(self.rerank, candidates))) if self.rerank else self

    @property
    def distance(self) -> str | None:
        """The distributional metric the setting measures (js for grad+js), None for ce and grad."""
        return self.metric.removeprefix("grad+") if self.metric not in ("ce", "grad") else None

    @property
    def first_order(self) -> bool:
        """Whether the setting ranks the bank by the first-order change of the examples' loss (grad, grad+…)."""
        return self.metric == "grad" or self.metric in UNIONS

    @property
    def uses_model(self) -> bool:
        """Whether the base model must score candidates on labelled examples (ce, grad, rerank, fit)."""
        return self.metric == "ce" or self.first_order or bool(self.rerank) or self.operator == "fit"

    @property
    def space(self) -> str:
        """The Gram space its neural fit and calibration use."""
        return space_for(self.combine)

    @property
    def has_top_k(self) -> bool:
        return self.auto or self.top_k is not None

    @property
    def label(self) -> str:
        parts = [self.sketch, self.metric, self.operator, self.combine]
        parts += ["auto"] if self.auto else [f"T{self.temperature:g}"] + ([f"top{self.top_k}"] if self.top_k else [])
        parts += [f"rerank{self.rerank}"] if self.rerank else []
        return "/".join(parts + ([f"r{self.rank}"] if self.rank else []))


PAPER_SETTING = Setting()  # the paper's input-token JS softmin, with lorablend's exact combination
# The bench's best at its cost on labelled examples (docs/RESULTS-labelled.md): the 4 bank adapters with the lowest
# first-order loss change (one backward pass) and the 4 nearest by answer-token JS, then the one with the lowest ce.
DEFAULT_SETTING = Setting(sketch="target-tokens", metric="grad+js", top_k=1, rerank=8)
NEAREST = Setting(sketch="target-tokens", metric="js", top_k=1)  # the best setting without a forward pass
GRAMMAR = ("sketch/metric/operator/combine[/T1][/top8][/rerank16][/r8] or .../auto, e.g. "
           "tokens/js/normalized/svd/T1/top8")


def help_of(name: str) -> str:
    """A field's help text, for the CLI's option of the same name."""
    return next(f.metadata["help"] for f in fields(Setting) if f.name == name)


def parse_setting(text: str) -> Setting:
    """A label back into its setting (checked): `Setting.label` inverted."""
    parts = [p for p in text.strip().split("/") if p]
    if len(parts) < 4:
        raise InputError(f"setting '{text}': expected {GRAMMAR}")
    sketch, metric, operator, combine, *rest = parts
    kw: dict = {}
    for p in rest:
        try:
            if p == "auto":
                kw["auto"] = True
            elif p.startswith("top"):
                kw["top_k"] = int(p[3:])
            elif p.startswith("rerank"):
                kw["rerank"] = int(p[6:])
            elif p.startswith("T"):
                kw["temperature"] = float(p[1:])
            elif p.startswith("r") and p[1:].isdigit():
                kw["rank"] = int(p[1:])
            else:
                raise ValueError(p)
        except ValueError:
            raise InputError(f"setting '{text}': cannot read '{p}' (use T<temperature>, top<k>, rerank<m>, r<rank> "
                             "or auto)") from None
    if kw.get("auto") and {"temperature", "top_k"} & set(kw):
        raise InputError(f"setting '{text}': auto chooses T and top-k; drop T/top or auto")
    setting = Setting(sketch, metric, operator, combine, **kw)
    try:
        setting.check()
    except InputError as e:
        raise InputError(f"setting '{text}': {e}" if setting.auto else str(e)) from None
    return setting


def from_options(text: str | None, options: dict, *, auto: bool = False, ce_examples: int = CE_EXAMPLES,
                 fit_budget: int = 40) -> tuple[Setting, bool]:
    """What `lorablend generate` runs, and whether it is the default: a label (`--setting`, 'paper' for the
    paper's), or the options given one by one (None: not given), or, with neither, DEFAULT_SETTING."""
    given = {k: v for k, v in options.items() if v is not None}
    if auto and {"temperature", "top_k"} & set(given):
        raise InputError("--auto chooses --temperature and --top-k on the bank; drop them or drop --auto")
    defaulted = text is None and not given and not auto
    if text is not None or defaulted:
        if given or auto:
            clash = [f"--{k.replace('_', '-')}" for k in given] + (["--auto"] if auto else [])
            raise InputError(f"--setting already gives the sketch, metric, operator, combine, T, top-k, rerank and "
                             f"rank; drop {clash[0]} or drop --setting")
        label = DEFAULT_SETTING.label if defaulted else PAPER_SETTING.label if text == "paper" else text
        setting = parse_setting(label)
    else:
        setting = Setting(**given, auto=auto)
    setting = replace(setting, ce_examples=ce_examples, fit_budget=fit_budget)
    setting.check()
    return setting, defaulted
