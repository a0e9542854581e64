"""Find MLP neurons with massive activations at the first token, which no first-order score can be trusted on.

Many language models route attention to the first token of every sequence (an "attention sink") and build that
token's residual stream with a few neurons whose activation there is orders of magnitude above their typical
value (Sun et al., 2024, "Massive Activations in Large Language Models"). SmolLM2-135M-Instruct has such neurons:
one in layer 28 averages about 2400 at the first position and about 0 elsewhere.

Attribution patching and integrated gradients estimate an ablation's effect to first order. For these neurons the
real effect is far from linear: zeroing them changes what every later attention head reads from the sink, and
accuracy on every fact set falls. Excluding them from a top-k ablation is the cheap fix; checking the estimate
with :func:`excise.locate.validate.validate` is the thorough one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from excise.completions import make_text_batch
from excise.sites import Site


def massive_activation_neurons(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    ratio: float = 10.0,
    floor: float = 5.0,
    batch_size: int = 16,
) -> list[Site]:
    """Return the MLP neurons whose mean absolute activation at the first token is massive.

    A neuron is returned when, over ``texts``, its mean ``|activation|`` at position 0 is above ``floor`` and more
    than ``ratio`` times its mean ``|activation|`` at the other positions.

    Args:
        model: Any HookedTransformer with a tokenizer; not changed.
        texts: Texts to read activations from; a few dozen prompts are enough.
        ratio: How many times larger than elsewhere the first-token activation must be.
        floor: Smallest mean ``|activation|`` at the first token that counts as massive.
        batch_size: Texts per forward pass.
    """
    if not texts:
        raise ValueError("texts is empty; pass a few dozen prompts to read activations from")
    if ratio <= 0 or floor < 0:
        raise ValueError(f"ratio must be > 0 and floor >= 0, got ratio={ratio}, floor={floor}")
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    d_mlp = model.cfg.d_mlp or 0
    first = torch.zeros(len(hooks), d_mlp)
    rest = torch.zeros(len(hooks), d_mlp)
    n_rest = 0
    for start in range(0, len(texts), batch_size):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size])
        # Positions 1 .. length-1 of each row; padding is excluded.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        later = (positions[None, :] >= 1) & (positions[None, :] < lengths[:, None])
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        for i, hook in enumerate(hooks):
            values = cache[hook].abs().float().cpu()
            first[i] += values[:, 0].sum(0)
            rest[i] += values[later.cpu()].sum(0)
        n_rest += int(later.sum())
    first /= len(texts)
    rest /= max(n_rest, 1)
    massive = (first > floor) & (first > ratio * rest)
    return [Site(hooks[layer], index, "neuron") for layer, index in torch.nonzero(massive).tolist()]
