"""Text conditioning with a pooled vector, carried through the one ``(B, L, D)`` tensor of the Denoiser seam.

SD1.x and SD2.x condition the UNet on one tensor, the text encoder's hidden states ``(B, 77, D)``. SDXL adds a
second input: the pooled, projected output of its second text encoder (CLIP-G, ``(B, 1280)``), which the UNet
receives through its added ("adm") embedding together with the image size. Every method of the pack (first-step
score, calibration, token significance, embedding mitigation) treats the conditioning as one tensor: it
concatenates conditional and unconditional rows, clones it, differentiates and optimizes it. So that all of them
run on SDXL unchanged, and so that embedding mitigation steers *both* inputs, an SDXL denoiser *packs* the pooled
vector as one extra row::

    packed (B, L + 1, D) = [hidden (B, L, D) ; [pooled (B, P), zeros (B, D - P)]]

and unpacks it in ``predict_noise``. ``P <= D`` always holds for SDXL (1280 <= 2048). The padding columns are
never read: a gradient there is 0, so an optimizer leaves them at 0. Methods that look at rows by token
position (token significance reads rows ``1..n``) never reach row ``L``.

Denoisers without a pooled input (SD1.x, SD2.x, the testbed) use plain ``(B, L, D)`` tensors; only the
denoiser knows which layout it speaks; core's methods never unpack.
"""

from __future__ import annotations

import torch

from .errors import DejaGuardError


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``hidden (B, L, D)`` and ``pooled (B, P)`` with ``P <= D`` -> packed ``(B, L + 1, D)`` (module doc)."""
    if hidden.dim() != 3 or pooled.dim() != 2 or pooled.shape[0] != hidden.shape[0]:
        raise DejaGuardError(f"cannot pack pooled {tuple(pooled.shape)} with hidden states {tuple(hidden.shape)}")
    width = hidden.shape[2]
    if pooled.shape[1] > width:
        raise DejaGuardError(f"pooled width {pooled.shape[1]} exceeds the hidden width {width}")
    row = torch.nn.functional.pad(pooled.to(hidden.dtype), (0, width - pooled.shape[1]))
    return torch.cat([hidden, row.unsqueeze(1)], dim=1)


def unpack_pooled(packed: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(B, L + 1, D)`` -> ``hidden (B, L, D)``, ``pooled (B, pooled_width)``; differentiable."""
    if packed.dim() != 3 or packed.shape[1] < 2 or not 0 < pooled_width <= packed.shape[2]:
        raise DejaGuardError(f"conditioning {tuple(packed.shape)} does not carry a pooled vector of width "
                             f"{pooled_width} (was it encoded by this model?)")
    return packed[:, :-1], packed[:, -1, :pooled_width]
