"""Attribution patching: a first-order estimate of every site's ablation effect from one backward pass.

For a metric ``m`` (here the summed log-probability of each fact's target) and an activation ``a`` at a site,
replacing ``a`` by a reference ``a'`` changes the metric by about ``(a' - a) · ∂m/∂a`` (Nanda, 2023,
"Attribution Patching: Activation Patching At Industrial Scale"; Syed et al., 2023, "Attribution Patching
Outperforms Automated Circuit Discovery"). One forward and one backward pass give the estimate for all sites at
once, where activation patching needs a forward pass per site.

Scores here are the estimated *drop* of the mean target log-probability, ``(a - a') · ∂m/∂a``, summed over token
positions (an edit ablates a site at every position) and averaged over facts. With zero ablation ``a' = 0``.

Warning:
    The estimate is linear. It is good for small changes and can be poor for sites whose ablation moves the
    model far (large activations, saturated softmax). Check it against real ablations with
    :func:`excise.locate.validate.validate` before trusting a ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import iter_batches
from excise.data.facts import Domain, Fact
from excise.locate.attribution import Attribution
from excise.sites import head_hooks, neuron_hooks

SiteTarget = Literal["neuron", "head"]
Positions = Literal["all", "last"]
SITE_TARGETS: tuple[SiteTarget, ...] = get_args(SiteTarget)
POSITIONS: tuple[Positions, ...] = get_args(Positions)


def attribution_patching(
    model: HookedTransformer,
    domain: Domain,
    *,
    kind: SiteTarget = "neuron",
    sets: Sequence[str] = ("forget", "retain"),
    positions: Positions = "all",
    batch_size: int = 16,
) -> Attribution:
    """Score every neuron (or head) of ``model`` by its estimated zero-ablation effect on each fact set.

    The ranking score is the selectivity ``forget - retain`` when both sets are scored, else the first set's score.

    Args:
        model: Any HookedTransformer with a tokenizer; its weights and gradients are not changed.
        domain: Facts to score.
        kind: ``"neuron"`` for ``blocks.L.mlp.hook_post`` or ``"head"`` for ``blocks.L.attn.hook_z``.
        sets: Fact sets to score; each must be non-empty.
        positions: ``"all"`` sums over every position of prompt and target (as a weight edit acts), ``"last"`` keeps
            only the last prompt position.
        batch_size: Facts per forward and backward pass.
    """
    if kind not in SITE_TARGETS:
        raise ValueError(f"kind must be one of {SITE_TARGETS}, got {kind!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not sets:
        raise ValueError("sets must name at least one fact set, e.g. ('forget', 'retain')")
    hooks = neuron_hooks(model) if kind == "neuron" else head_hooks(model)

    set_scores: dict[str, dict[str, Tensor]] = {}
    for which in sets:
        facts = domain.facts(which)  # type: ignore[arg-type]
        if not facts:
            raise ValueError(f"fact set {which!r} of domain {domain.name!r} is empty; score other sets")
        set_scores[which] = fact_attributions(model, facts, hooks, positions=positions, batch_size=batch_size)

    if "forget" in set_scores and "retain" in set_scores:
        scores = {h: set_scores["forget"][h] - set_scores["retain"][h] for h in hooks}
        ranking = "forget - retain"
    else:
        scores = dict(set_scores[sets[0]])
        ranking = sets[0]
    return Attribution(
        method="attribution_patching",
        metric="target_logprob",
        kind=kind,
        scores=scores,
        set_scores=set_scores,
        settings={
            "ablation": "zero",
            "positions": positions,
            "ranking": ranking,
            "n_facts": {which: len(domain.facts(which)) for which in sets},  # type: ignore[arg-type]
        },
    )


def fact_attributions(
    model: HookedTransformer,
    facts: Sequence[Fact],
    hooks: Sequence[str],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
) -> dict[str, Float[Tensor, " component"]]:
    """Estimated drop in mean target log-probability when each component of each hook is zeroed."""
    totals: dict[str, Tensor] = {}
    prompts = [fact.prompt for fact in facts]
    targets = [fact.target for fact in facts]
    n_batches = -(-len(facts) // batch_size)
    for _, batch in tqdm(
        iter_batches(model, prompts, targets, batch_size), total=n_batches, desc="attribution patching", leave=False
    ):
        activations: dict[str, Tensor] = {}

        def start_graph(embedding: Tensor, hook: HookPoint) -> Tensor:
            # Gradients start here, so parameters need no grad and their .grad fields are never written.
            return embedding.detach().requires_grad_(True)

        def keep(activation: Tensor, hook: HookPoint, store: dict[str, Tensor] = activations) -> None:
            store[hook.name] = activation  # type: ignore[index]

        fwd_hooks = [(name, keep) for name in hooks]
        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", start_graph), *fwd_hooks]):
            logits = model(batch.tokens)
            metric = batch.completion_logprobs(logits).sum()
            grads = torch.autograd.grad(metric, [activations[name] for name in hooks])

        if positions == "all":
            mask = _real_token_mask(batch.tokens.shape[1], batch.prompt_lengths + batch.completion_lengths)
        else:
            mask = torch.zeros(batch.tokens.shape, dtype=torch.bool, device=batch.tokens.device)
            mask[torch.arange(len(batch)), batch.last_prompt_positions] = True
        for name, grad in zip(hooks, grads, strict=True):
            # Zero ablation: drop = (a - 0) · grad, summed over the selected positions of every fact in the batch.
            product = (activations[name].detach() * grad)[mask]  # (tokens, component[, d_head])
            per_component = product.flatten(1).reshape(product.shape[0], product.shape[1], -1).sum(dim=(0, 2))
            totals[name] = totals.get(name, 0) + per_component.float().cpu()
    return {name: totals[name] / len(facts) for name in hooks}


def _real_token_mask(width: int, lengths: Tensor) -> Tensor:
    # Padding tokens come after the completion; the completion's last token predicts nothing we score, but
    # ablation there has no effect on the metric, so its gradient is zero and including it is harmless.
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
