"""Test/bench-only eager port of SlowFast's HOG targets (SlowFast is not installed here).

Written from facebookresearch/SlowFast ``slowfast/models/operators.py: HOGLayerC``,
``slowfast/models/utils.py: get_gkern`` and ``slowfast/models/masked.py:
MaskMViT._get_hog_label_2d`` (the unfolding of the HOG map into per-patch targets and the
selection of the masked ones), with the same arithmetic: grouped ``F.conv2d`` Sobel filters,
``atan2``, ``scatter_add_`` into a (B, C, nbins, H, W) map, ``unfold`` sums per cell,
``F.normalize`` over the bins. One change: HOGLayerC hard-codes 3 colour channels
(``weight_x.repeat(3, 1, 1, 1)``, ``groups=3``); here the filters are repeated for the
image's C channels (C = 3 is HOGLayerC exactly). Inputs must be fp32 (HOGLayerC's conv
weights and its fp32 ``out`` buffer refuse other dtypes).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def get_gkern(kernlen, std):
    """Returns a 2D Gaussian kernel array."""

    def _gaussian_fn(kernlen, std):
        n = torch.arange(0, kernlen).float()
        n -= n.mean()
        n /= std
        w = torch.exp(-0.5 * n**2)
        return w

    gkern1d = _gaussian_fn(kernlen, std)
    gkern2d = torch.outer(gkern1d, gkern1d)
    return gkern2d / gkern2d.sum()


class HOGLayerC(nn.Module):
    def __init__(self, nbins=9, pool=7, gaussian_window=0, channels=3):
        super(HOGLayerC, self).__init__()
        self.nbins = nbins
        self.pool = pool
        self.pi = math.pi
        self.channels = channels
        weight_x = torch.FloatTensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]])
        weight_x = weight_x.view(1, 1, 3, 3).repeat(channels, 1, 1, 1)
        weight_y = weight_x.transpose(2, 3)
        self.register_buffer("weight_x", weight_x)
        self.register_buffer("weight_y", weight_y)

        self.gaussian_window = gaussian_window
        if gaussian_window:
            gkern = get_gkern(gaussian_window, gaussian_window // 2)
            self.register_buffer("gkern", gkern)

    @torch.no_grad()
    def forward(self, x):
        # input is RGB image with shape [B 3 H W]
        x = F.pad(x, pad=(1, 1, 1, 1), mode="reflect")
        gx_rgb = F.conv2d(x, self.weight_x, bias=None, stride=1, padding=0, groups=self.channels)
        gy_rgb = F.conv2d(x, self.weight_y, bias=None, stride=1, padding=0, groups=self.channels)
        norm_rgb = torch.stack([gx_rgb, gy_rgb], dim=-1).norm(dim=-1)
        phase = torch.atan2(gx_rgb, gy_rgb)
        phase = phase / self.pi * self.nbins  # [-9, 9]

        b, c, h, w = norm_rgb.shape
        out = torch.zeros((b, c, self.nbins, h, w), dtype=torch.float, device=x.device)
        phase = phase.view(b, c, 1, h, w)
        norm_rgb = norm_rgb.view(b, c, 1, h, w)
        if self.gaussian_window:
            if h != self.gaussian_window:
                assert h % self.gaussian_window == 0, "h {} gw {}".format(h, self.gaussian_window)
                repeat_rate = h // self.gaussian_window
                temp_gkern = self.gkern.repeat([repeat_rate, repeat_rate])
            else:
                temp_gkern = self.gkern
            norm_rgb *= temp_gkern

        out.scatter_add_(2, phase.floor().long() % self.nbins, norm_rgb)

        out = out.unfold(3, self.pool, self.pool)
        out = out.unfold(4, self.pool, self.pool)
        out = out.sum(dim=[-1, -2])

        out = torch.nn.functional.normalize(out, p=2, dim=2)

        return out  # B 3 nbins H W


def maskfeat_hog_labels(hog, input_frames, feat_size, output_mask=None):
    """MaskMViT._get_hog_label_2d for one pretrain depth and one HOG layer: (B, N, F), or
    ``[output_mask]`` of it (rows of the masked patches, image-major) when a mask is given."""
    tmp_hog = hog(input_frames).flatten(1, 2)  # return B C H W
    unfold_size = tmp_hog.shape[-1] // feat_size
    tmp_hog = (
        tmp_hog.permute(0, 2, 3, 1)
        .unfold(1, unfold_size, unfold_size)
        .unfold(2, unfold_size, unfold_size)
        .flatten(1, 2)
        .flatten(2)
    )
    if output_mask is not None:
        tmp_hog = tmp_hog[output_mask]
    return tmp_hog
