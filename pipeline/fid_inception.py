"""The FID Inception-v3 graph (the TF `2015-12-05` Inception, as Kaggle's MiFID uses it), with no
weights: pytorch-fid's port built from pytorch-fid's own blocks, and the forward pass of
pytorch-fid's `InceptionV3` wrapper up to the 2048-d average pool: bilinear resize to 299 px
(align_corners=False), [0, 1] -> [-1, 1]. Where the weights come from is `fid_weights`' job."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_fid import inception as _pf
from torch import nn

FEATURE_DIM = 2048
FID_IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75  # smallest input the Inception-v3 stem and reductions accept


def build_fid_inception() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` without the download: torchvision's Inception3
    (1008 classes, no aux head, torchvision's weight init skipped) with the FID-patched blocks."""
    net = _pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = _pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _pf.FIDInceptionE_1(1280)
    net.Mixed_7c = _pf.FIDInceptionE_2(2048)
    return net


class FIDInceptionPool(nn.Module):
    """pytorch-fid's `InceptionV3` forward up to the 2048-d average pool (block index 3):
    float N×3×H×W in [0, 1] -> N×2048."""

    def __init__(self, inception: nn.Module, image_size: int = FID_IMAGE_SIZE):
        super().__init__()
        self.inception = inception
        self.image_size = int(image_size)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.inception
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1                                     # [0, 1] -> [-1, 1]
        x = n.Conv2d_1a_3x3(x)                            # block 0
        x = n.Conv2d_2a_3x3(x)
        x = n.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = n.Conv2d_3b_1x1(x)                            # block 1
        x = n.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,   # block 2
                      n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):              # block 3
            x = block(x)
        return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
