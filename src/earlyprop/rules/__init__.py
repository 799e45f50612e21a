"""Learning rules: each writes parameter gradients into ``.grad`` (DESIGN principle 3)."""

from earlyprop.cost import Cost
from earlyprop.rules.base import LearningRule, Relaxation, StepResult, accumulate_grads
from earlyprop.rules.contrastive import STDP, STDP_FORMS, VARIANTS, EquilibriumProp
from earlyprop.rules.reference import BPTT, Backprop, RecurrentBackprop

RULES = ("stdp", "stdp-symmetric", "stdp-random-sign", "ep", "ep-negative", "ep-random-sign", "ep-symmetric", "bptt",
         "rbp", "backprop")


def make_rule(name: str, *, beta: float = 1.0, relaxation: Relaxation | None = None, cost: Cost | None = None,
              stdp_form: str = "plain", truncation: int | None = None) -> LearningRule:
    """Build a rule from its CLI name (``--rule``)."""
    eps_variants = {"ep": "positive", "ep-negative": "negative", "ep-random-sign": "random_sign",
                    "ep-symmetric": "centered", "ep-centered": "centered"}
    if name in eps_variants:
        return EquilibriumProp(beta, eps_variants[name], relaxation, cost)
    if name.startswith("stdp"):
        variant = {"stdp": "positive", "stdp-symmetric": "centered", "stdp-random-sign": "random_sign"}.get(name)
        if variant is None:
            raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
        return STDP(beta, stdp_form, variant, relaxation, cost)
    if name == "bptt":
        return BPTT(truncation, relaxation, cost)
    if name == "rbp":
        return RecurrentBackprop(relaxation=relaxation, cost=cost)
    if name == "backprop":
        return Backprop(relaxation, cost)
    raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")


__all__ = ["BPTT", "RULES", "STDP", "STDP_FORMS", "VARIANTS", "Backprop", "EquilibriumProp", "LearningRule",
           "RecurrentBackprop", "Relaxation", "StepResult", "accumulate_grads", "make_rule"]
