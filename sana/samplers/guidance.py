"""Guidance as a wrapper: turns a model evaluated on several conditioning branches into one VelocityFn.

The caller binds the conditioning (text embeddings, masks, any attention hook) into `model_fn`, which
evaluates all branches in one call on the batch stacked branch by branch: model_fn(cat([x] * n), cat([t] * n))
returns cat([out_0, ..., out_{n-1}]), each of x's batch size. The wrapper duplicates x and t, splits the
output and combines the branches. Samplers only ever see the resulting VelocityFn, never text.

Classifier-free guidance (Ho & Salimans, 2022) uses the branch order [uncond, cond], as the reference
pipeline does, and returns uncond + scale (cond - uncond). The reference only runs guidance for scale > 1:
for scale <= 1 it evaluates the conditional branch alone, at half the cost, so a pipeline matching it uses
its conditional velocity function directly instead of this wrapper (see `uses_guidance`).

`guided_velocity` is where a model that takes a `Conditioning` meets these wrappers, and the one place that
decides the branch order: [uncond] (when classifier-free guidance runs), [cond], [cond with perturbed
self-attention] (when perturbed-attention guidance runs, Ahn et al. 2024). It stacks the branches'
conditionings field by field (`Conditioning.stack`), so whatever a conditioning carries (text, a guidance
embedding, ControlNet residuals) reaches the model in the same order as the latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sana.types import Conditioning, VelocityFn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x stacked over branches, t) -> output
ConditionedModel = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]  # (x, t, cond) -> v


def uses_guidance(scale: float) -> bool:
    """The reference's rule: classifier-free guidance runs (and doubles the batch) only for scale > 1."""
    return scale > 1.0


def batched_guidance(model_fn: ModelFn, branches: int, combine: Callable[..., torch.Tensor]) -> VelocityFn:
    """A VelocityFn that evaluates `branches` conditionings in one model call and returns combine(*outputs).

    Outputs are upcast to at least float32 before combining (guidance differences are small; combining
    them in half precision loses them).
    """
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x] * branches), torch.cat([t] * branches))  # (branches*B, ...)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        return combine(*out.chunk(branches))  # each (B, ...)

    return velocity


def classifier_free_guidance(model_fn: ModelFn, scale: float) -> VelocityFn:
    """uncond + scale (cond - uncond), with model_fn evaluating the stacked batch [uncond; cond].

    At scale == 1 the conditional output is returned as is (no rounding through the formula).
    """

    def combine(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if scale == 1:
            return cond
        return uncond + scale * (cond - uncond)

    return batched_guidance(model_fn, 2, combine)


def guided_velocity(
    model: ConditionedModel,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    *,
    scale: float = 1.0,
    pag_scale: float = 0.0,
    pag_layers: Sequence[int] = (),
) -> VelocityFn:
    """The VelocityFn of `model` under classifier-free and perturbed-attention guidance, in one batch per step.

    uncond: the unconditional (negative-prompt) conditioning; given, classifier-free guidance runs with
    `scale` (the caller decides whether it runs, see `uses_guidance`). pag_scale > 0 adds the branch whose
    self-attention is the identity in `pag_layers`. Combinations, with u, c, p the branch outputs:
        cfg only  u + scale (c - u)          pag only  c + pag_scale (c - p)
        both      u + scale (c - u) + pag_scale (c - p)
    With neither, the model's own output is returned unchanged (no extra batch, no upcast).
    """
    pag = pag_scale > 0
    branches = ([uncond] if uncond is not None else []) + [cond] + ([cond.perturbed(pag_layers)] if pag else [])
    stacked = Conditioning.stack(branches)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, stacked)

    if len(branches) == 1:
        return model_fn
    if not pag:
        return classifier_free_guidance(model_fn, scale)
    if uncond is not None:
        combine = lambda u, c, p: u + scale * (c - u) + pag_scale * (c - p)
    else:
        combine = lambda c, p: c + pag_scale * (c - p)
    return batched_guidance(model_fn, len(branches), combine)
