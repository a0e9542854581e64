"""Planted knowledge: tiny models in which the sites that carry each fact are known by construction.

A locate method that cannot find a planted site in a two-layer model cannot be trusted to find a real one. These
models are the ground truth for the trust tests of every method, and a quick check for a new method.

Each fact is ``"recall <subject>" -> " <answer>"``. One site per fact (an MLP neuron or one channel of an
attention head) is written into a randomly initialised tiny model:

- ``kind="neuron"``: neuron ``i`` of layer ``layer`` reads the MLP input with weights solved by least squares.
  Its pre-activation is -1 (0 after the ReLU) at every position of every fact except the last prompt position of
  fact ``i``, where it is 1. Its output weights write the unembedding direction of fact ``i``'s target.
- ``kind="head"``: query head ``head`` of layer ``layer`` attends uniformly (zero query weights); its
  value channel ``i`` is 1 on fact ``i``'s subject token and 0 on every other token, and its output weights map
  channel ``i`` to the target's unembedding direction. In grouped-query models the value weights belong to the key/
  value head that ``head`` shares with other query heads; only ``head`` gets the large output weights, so a
  method that confuses query and key/value heads points at the wrong head.

The target's direction is written with ``strength`` times the typical norm of the final residual stream, so the
model ranks each fact's target first, and ablating a planted site removes the facts it carries. With ``strength``
well above 1 the target's probability saturates near 1, which hides the site from gradient-based estimates (a
case the trust tests use on purpose).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.completions import make_text_batch
from excise.data.facts import Domain, Fact
from excise.models.tiny import tiny_model, word_tokenizer
from excise.sites import Site, kv_head_of

PlantedKind = Literal["neuron", "head"]
PLANTED_KINDS: tuple[PlantedKind, ...] = get_args(PlantedKind)


@dataclasses.dataclass(frozen=True)
class PlantedModel:
    """A tiny model with known knowledge sites.

    Attributes:
        model: The model.
        domain: ``forget`` and ``retain`` facts (and ``neighbour`` facts when asked for).
        sites: Per fact id, the site that carries it.
        kind: ``"neuron"`` or ``"head"``.
        layer: The block the sites are in.
    """

    model: HookedTransformer
    domain: Domain
    sites: dict[str, Site]
    kind: PlantedKind
    layer: int

    def sites_of(self, which: str) -> list[Site]:
        """Return the planted sites of one fact set, in fact order (a head carries several facts, listed once)."""
        facts = self.domain.facts(which)  # type: ignore[arg-type]
        return list(dict.fromkeys(self.sites[fact.id] for fact in facts))


def planted_model(
    kind: PlantedKind = "neuron",
    *,
    n_forget: int = 4,
    n_retain: int = 4,
    n_neighbour: int = 0,
    layer: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_key_value_heads: int | None = None,
    head: int | None = None,
    strength: float = 1.0,
    seed: int = 0,
) -> PlantedModel:
    """Build a tiny model whose facts are each carried by one known site.

    Args:
        kind: ``"neuron"``: one neuron per fact, all in block ``layer``. ``"head"``: one query head carries the
            forget facts and another the retain and neighbour facts, both in block ``layer``.
        n_forget: Forget facts.
        n_retain: Retain facts.
        n_neighbour: Neighbour facts.
        layer: Block of the planted sites.
        n_layers: Blocks of the model.
        d_model: Width; must exceed twice the number of facts so the least-squares fits are exact.
        n_heads: Query heads.
        n_key_value_heads: Key/value heads (grouped-query attention when below ``n_heads``).
        head: Query head carrying the forget facts (``"head"`` only); default the last head. The retain and
            neighbour facts go to the head before it.
        strength: Norm of the written target direction, in units of the typical final residual norm.
        seed: Seed of the random weights.
    """
    if kind not in PLANTED_KINDS:
        raise ValueError(f"kind must be one of {PLANTED_KINDS}, got {kind!r}")
    n_facts = n_forget + n_retain + n_neighbour
    if n_forget < 1 or n_retain < 0 or n_neighbour < 0:
        raise ValueError(
            f"need n_forget >= 1 and n_retain, n_neighbour >= 0; got {n_forget}, {n_retain}, {n_neighbour}"
        )
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
    if d_model <= 2 * n_facts:
        raise ValueError(f"d_model ({d_model}) must exceed twice the number of facts ({n_facts}); raise d_model")
    d_head = d_model // n_heads
    if kind == "head" and d_head < n_facts:
        raise ValueError(f"d_head ({d_head}) must be at least the number of facts ({n_facts}); raise d_model")
    head = n_heads - 1 if head is None else head
    if kind == "head" and not 1 <= head < n_heads:
        raise ValueError(f"head must be in [1, {n_heads}) so the head before it can carry the kept facts, got {head}")

    subjects = [f"subject{i}" for i in range(n_facts)]
    answers = [f"answer{i}" for i in range(n_facts)]
    tokenizer = word_tokenizer(["recall", *subjects, *answers])
    model = tiny_model(
        tokenizer,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=n_key_value_heads,
        d_mlp=4 * d_model,
        act_fn="relu",
        normalization_type="LN",
        seed=seed,
    )
    facts = [
        Fact(
            id=f"fact{i}",
            prompt=f"recall {subjects[i]}",
            target=f" {answers[i]}",
            distractors=tuple(f" {answers[(i + j) % n_facts]}" for j in (1, 2, 3)),
            subject=subjects[i],
            relation="planted",
        )
        for i in range(n_facts)
    ]
    answer_ids = [int(tokenizer.convert_tokens_to_ids(answer)) for answer in answers]  # type: ignore[arg-type]
    sites: dict[str, Site] = {}
    with torch.no_grad():
        if kind == "neuron":
            _plant_neurons(model, facts, answer_ids, layer, strength)
            sites = {fact.id: Site.neuron(layer, i) for i, fact in enumerate(facts)}
        else:
            heads = {head: list(range(n_forget)), head - 1: list(range(n_forget, n_facts))}
            _plant_heads(model, facts, answer_ids, layer, heads, strength)
            sites = {fact.id: Site.head(layer, head) for fact in facts[:n_forget]}
            sites.update({fact.id: Site.head(layer, head - 1) for fact in facts[n_forget:]})
    domain = Domain(
        name="planted",
        forget=tuple(facts[:n_forget]),
        retain=tuple(facts[n_forget : n_forget + n_retain]),
        neighbour=tuple(facts[n_forget + n_retain :]),
    )
    return PlantedModel(model, domain, sites, kind, layer)


def _normalized_inputs(model: HookedTransformer, facts: list[Fact], layer: int, which: str) -> Tensor:
    """Return the input of ``blocks.layer.{which}`` after its LayerNorm, per fact and position: ``fact pos d_model``."""
    tokens, _ = make_text_batch(model, [fact.prompt for fact in facts])
    norm = getattr(model.blocks[layer], which)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.{which}.hook_normalized")
    return cache[f"blocks.{layer}.{which}.hook_normalized"] * norm.w + norm.b


def _answer_direction(model: HookedTransformer, answer_id: int) -> Tensor:
    column = model.W_U[:, answer_id]
    return column / column.norm()


def _typical_residual_norm(model: HookedTransformer, facts: list[Fact]) -> float:
    tokens, _ = make_text_batch(model, [fact.prompt for fact in facts])
    final = model(tokens, stop_at_layer=model.cfg.n_layers)
    return float(final.norm(dim=-1).mean())


def _plant_neurons(
    model: HookedTransformer, facts: list[Fact], answer_ids: list[int], layer: int, strength: float
) -> None:
    inputs = _normalized_inputs(model, facts, layer, "ln2")  # (fact, pos, d_model); every prompt has 2 tokens
    n_facts, n_pos, d_model = inputs.shape
    design = inputs.reshape(n_facts * n_pos, d_model)
    targets = torch.zeros(n_facts * n_pos, n_facts)
    for i in range(n_facts):
        targets[i * n_pos + n_pos - 1, i] = 1.0  # fire at the last prompt position of fact i only
    weights = torch.linalg.lstsq(design, targets).solution  # (d_model, fact): exact, rows < d_model
    size = strength * _typical_residual_norm(model, facts)
    mlp: Any = model.blocks[layer].mlp  # an MLP with W_in, b_in and W_out; typed as a plain Module
    for i in range(n_facts):
        # Pre-activation 2 * (x·w) - 1: +1 where fact i fires, -1 elsewhere, so ReLU gives 1 or 0.
        mlp.W_in[:, i] = 2.0 * weights[:, i]
        mlp.b_in[i] = -1.0
        mlp.W_out[i] = size * _answer_direction(model, answer_ids[i])


def _plant_heads(
    model: HookedTransformer,
    facts: list[Fact],
    answer_ids: list[int],
    layer: int,
    heads: dict[int, list[int]],
    strength: float,
) -> None:
    inputs = _normalized_inputs(model, facts, layer, "ln1")  # (fact, pos, d_model)
    n_facts, n_pos, d_model = inputs.shape
    design = inputs.reshape(n_facts * n_pos, d_model)
    # Value channel i is 1 on fact i's subject token (position 1) and 0 on every other token. All planted heads
    # share these value weights, so query heads of one key/value group can carry different facts.
    targets = torch.zeros(n_facts * n_pos, model.cfg.d_head)
    for i in range(n_facts):
        targets[i * n_pos + 1, i] = 1.0
    value_weights = torch.linalg.lstsq(design, targets).solution  # (d_model, d_head): exact, rows < d_model
    size = strength * _typical_residual_norm(model, facts) * n_pos  # uniform attention averages over positions
    attn: Any = model.blocks[layer].attn
    grouped = model.cfg.n_key_value_heads is not None
    # Grouped-query attention keeps one value matrix per key/value head in _W_V; W_V is an expanded copy.
    value, value_bias = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
    for head, channels in heads.items():
        kv = kv_head_of(model, head)
        attn.W_Q[head] = 0.0  # zero queries: every score is 0, so attention is uniform over the prefix
        attn.b_Q[head] = 0.0
        value[kv] = value_weights
        value_bias[kv] = 0.0
        attn.W_O[head] = 0.0
        for channel in channels:
            attn.W_O[head, channel] = size * _answer_direction(model, answer_ids[channel])
