"""Differentiable augmentation for the discriminators (DiffAugment, Zhao et al. 2020).

With 300 paintings the painting discriminator memorises them. DiffAugment shows it every image
through random colour, translation and cutout changes that gradients pass through, so the
generators still learn from it. Every image a discriminator sees, real or fake, in the
generators' step and in its own, goes through the same augmentation: one draw per step
(`Augment.draw`), applied alike to every batch of that step (`Augment.__call__`).

Policies, comma-separated in `train.diffaugment` (empty: off):
- color: brightness ±0.5, saturation ×[0, 2], contrast ×[0.5, 1.5], per image;
- translation: a shift of up to 1/8 of the side in x and y, zeros coming in;
- cutout: a zeroed square of half the side at a random place.
"""
from __future__ import annotations

import torch

class Augment:
    def __init__(self, policy: tuple[str, ...]):
        """policy: names from params.DIFFAUGMENT_POLICIES (Train.diffaugment_policy); () is off."""
        self.policy = policy

    def __bool__(self) -> bool:
        return bool(self.policy)

    def draw(self, n: int, size: int, device: torch.device, gen: torch.Generator | None = None) -> dict:
        """The random parameters of one step for n images of size×size."""
        rand = lambda *shape: torch.rand(*shape, device=device, generator=gen)  # noqa: E731
        params = {}
        if "color" in self.policy:
            params["color"] = (rand(n, 1, 1, 1) - 0.5, rand(n, 1, 1, 1) * 2, rand(n, 1, 1, 1) + 0.5)
        if "translation" in self.policy:
            reach = int(size * 0.125 + 0.5)
            params["translation"] = torch.randint(-reach, reach + 1, (2, n), device=device, generator=gen)
        if "cutout" in self.policy:
            side = int(size * 0.5 + 0.5)
            params["cutout"] = (side, torch.randint(0, size + (1 - side % 2), (2, n), device=device, generator=gen))
        return params

    def __call__(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """x (N×3×H×W in [-1, 1]) augmented with `params` from `draw`; differentiable in x."""
        if "color" in params:
            brightness, saturation, contrast = (p.to(x.dtype) for p in params["color"])
            x = x + brightness
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * saturation + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean
        if "translation" in params:
            x = _translate(x, *params["translation"])
        if "cutout" in params:
            x = _cutout(x, *params["cutout"])
        return x


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift image i by (dy[i], dx[i]) pixels; what comes in from outside is zero."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # a zero border to point outside pixels at
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None] + 1).clamp(0, h + 1)  # (n, h)
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None] + 1).clamp(0, w + 1)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # gather in N×H×W×C (advanced indexing keeps the gradient), then back to N×C×H×W
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, side: int, centres: torch.Tensor) -> torch.Tensor:
    """Zero a side×side square centred at centres[:, i] (clipped at the borders) in image i."""
    n, _, h, w = x.shape
    cy, cx = centres
    ys = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - side // 2)  # (n, h)
    xs = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - side // 2)
    inside = ((ys >= 0) & (ys < side))[:, :, None] & ((xs >= 0) & (xs < side))[:, None, :]  # (n, h, w)
    return x * (~inside)[:, None].to(x.dtype)
