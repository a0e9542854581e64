"""CounterFact-style scores of fact edits (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

For each rewrite request, on the edited model:

- **efficacy**: the edit works on the prompt it was made for. For a rewrite, the new target gets a higher
  probability than the old one; for "make unknown", the old target no longer ranks first among its choices.
- **paraphrase**: the same test on the fact's paraphrases (generalisation).
- **neighbourhood**: facts that must not change (other subjects, nearby topics) still rank their true target
  first; reported before and after, because only the change is the edit's doing.
- **fluency**: weighted bi- and tri-gram entropy of greedy generations (ROME's ``2/3 H_2 + 4/3 H_3``, averaged,
  in bits over whitespace words), before and after. A drop means the model repeats itself.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from excise.completions import completion_logprobs, tokenize_prompt
from excise.data.facts import Fact
from excise.edit.rewrite import RewriteRequest
from excise.verify.accuracy import score_facts


@dataclasses.dataclass(frozen=True)
class RewriteScores:
    """Scores of one set of rewrite requests on an edited model.

    Attributes:
        table: One row per request and prompt kind (``"prompt"`` or ``"paraphrase"``) with ``success``,
            ``old_logprob`` and ``new_logprob`` (NaN for "make unknown") and the old target's ``rank``.
        efficacy: Fraction of requests whose prompt test succeeds.
        paraphrase: Fraction of paraphrase tests that succeed (NaN when no fact has paraphrases).
        neighbourhood_before: Accuracy on the neighbourhood facts before the edit.
        neighbourhood_after: The same after the edit.
        fluency_before: n-gram entropy of greedy generations before the edit, in bits.
        fluency_after: The same after the edit.
    """

    table: pd.DataFrame
    efficacy: float
    paraphrase: float
    neighbourhood_before: float
    neighbourhood_after: float
    fluency_before: float
    fluency_after: float

    def summary(self) -> dict[str, float]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "table"}


def rewrite_scores(
    original: HookedTransformer,
    edited: HookedTransformer,
    requests: Sequence[RewriteRequest],
    neighbourhood: Sequence[Fact] = (),
    *,
    fluency_prompts: Sequence[str] | None = None,
    max_new_tokens: int = 30,
) -> RewriteScores:
    """Score ``requests`` on ``edited`` (a baked copy, or ``original`` inside an edit's ``hooks()`` block).

    Args:
        original: The model before the edit (for the neighbourhood and fluency baselines).
        edited: The model after the edit.
        requests: The rewrite requests the edit was made for.
        neighbourhood: Facts whose targets should still rank first.
        fluency_prompts: Prompts for the generations; default the requests' prompts.
        max_new_tokens: Length of each greedy generation.
    """
    if not requests:
        raise ValueError("rewrite_scores needs at least one request")
    rows = []
    for request in requests:
        fact = request.fact
        for kind, prompt in [("prompt", fact.prompt), *(("paraphrase", p) for p in fact.paraphrases)]:
            rows.append({"id": fact.id, "kind": kind, **_test(edited, request, prompt)})
    table = pd.DataFrame(rows, columns=["id", "kind", "success", "old_logprob", "new_logprob", "rank"])
    paraphrases = table[table["kind"] == "paraphrase"]
    prompts = list(fluency_prompts) if fluency_prompts is not None else [r.fact.prompt for r in requests]
    neighbours = list(neighbourhood)
    return RewriteScores(
        table=table,
        efficacy=_mean(table[table["kind"] == "prompt"]["success"]),
        paraphrase=_mean(paraphrases["success"]),
        neighbourhood_before=score_facts(original, neighbours).accuracy if neighbours else math.nan,
        neighbourhood_after=score_facts(edited, neighbours).accuracy if neighbours else math.nan,
        fluency_before=generation_entropy(original, prompts, max_new_tokens=max_new_tokens),
        fluency_after=generation_entropy(edited, prompts, max_new_tokens=max_new_tokens),
    )


def _mean(values: Any) -> float:
    return float(values.astype(float).to_numpy().mean()) if len(values) else math.nan


def _test(model: HookedTransformer, request: RewriteRequest, prompt: str) -> dict[str, float | bool]:
    fact = dataclasses.replace(request.fact, prompt=prompt)
    ranked = score_facts(model, [fact]).table.to_dict("records")[0]
    if request.new_target is None:
        return {
            "success": bool(ranked["rank"] > 0),
            "old_logprob": float(ranked["target_logprob"]),
            "new_logprob": math.nan,
            "rank": int(ranked["rank"]),
        }
    old, new = completion_logprobs(model, [prompt, prompt], [fact.target, request.new_target]).tolist()
    return {"success": new > old, "old_logprob": old, "new_logprob": new, "rank": int(ranked["rank"])}


@torch.no_grad()
def greedy_generations(model: HookedTransformer, prompts: Sequence[str], max_new_tokens: int = 30) -> list[str]:
    """Greedy continuations of each prompt (without the prompt), one prompt at a time so no padding is involved."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with one or call model.set_tokenizer(...)")
    texts = []
    for prompt in prompts:
        tokens = torch.tensor([tokenize_prompt(model, prompt)], device=model.cfg.device)
        output = model.generate(
            tokens, max_new_tokens=max_new_tokens, do_sample=False, verbose=False, stop_at_eos=False
        )
        assert isinstance(output, torch.Tensor)  # generate returns tokens when given tokens
        texts.append(tokenizer.decode(output[0, tokens.shape[1] :].tolist()))
    return texts


def ngram_entropy(text: str, weights: dict[int, float] | None = None) -> float:
    """Weighted mean of the n-gram entropies (bits) of ``text``'s whitespace words; ROME's weights by default."""
    weights = weights or {2: 2 / 3, 3: 4 / 3}
    words = text.split()
    values = []
    for n, weight in weights.items():
        counts = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def generation_entropy(model: HookedTransformer, prompts: Sequence[str], max_new_tokens: int = 30) -> float:
    """Mean :func:`ngram_entropy` of the greedy generations of ``prompts``; NaN for no prompts."""
    if not prompts:
        return math.nan
    return sum(ngram_entropy(text) for text in greedy_generations(model, prompts, max_new_tokens)) / len(prompts)
