"""A dinov2-style training step (the shape of dinov2/train/ssl_meta_arch.py: forward_backward):
DINO on the CLS token (global and local crops), iBOT on masked patch tokens, KoLeo, and the
teacher updated by EMA. Backbone: a timm ViT; tiny sizes."""
import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern.compat.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss


class Head(nn.Module):
    """DINOHead-like: MLP, L2-normalized bottleneck, prototypes."""

    def __init__(self, dim, out_dim, hidden=128, bottleneck=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Backbone(nn.Module):
    def __init__(self, img_size, depth, dim=64):
        super().__init__()
        self.vit = timm.models.VisionTransformer(img_size=img_size, patch_size=8, embed_dim=dim, depth=depth,
                                                 num_heads=4, num_classes=0, dynamic_img_size=True)
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def forward(self, images, masks=None):
        x = self.vit.patch_embed(images)                       # (B, h, w, D)
        if masks is not None:
            x = torch.where(masks.view(x.shape[:-1]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.vit.norm(self.vit.blocks(self.vit._pos_embed(x)))
        return x[:, 0], x[:, self.vit.num_prefix_tokens:]      # CLS, patch tokens


def build(batch=4, out_dim=256, n_local=2, global_size=32, local_size=16, depth=2, seed=0):
    torch.manual_seed(seed)
    student = nn.ModuleDict(dict(backbone=Backbone(global_size, depth), head=Head(64, out_dim)))
    teacher = copy.deepcopy(student).requires_grad_(False)
    dino_loss, ibot_loss, koleo_loss = DINOLoss(out_dim), iBOTPatchLoss(out_dim), KoLeoLoss()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    n_patches = (global_size // 8) ** 2
    gen = torch.Generator().manual_seed(seed + 1)
    terms = n_local * 2 + 2  # dinov2: n_local_crops_loss_terms + n_global_crops_loss_terms

    def step(it):
        global_crops = torch.randn(2 * batch, 3, global_size, global_size, generator=gen)
        local_crops = torch.randn(n_local * batch, 3, local_size, local_size, generator=gen)
        masks = torch.rand(2 * batch, n_patches, generator=gen) < 0.3
        mask_indices_list = masks.flatten().nonzero().flatten()
        n_masked_patches = mask_indices_list.shape[0]
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        teacher_temp = 0.04 + 0.03 * min(it / 2, 1.0)

        with torch.no_grad():
            t_cls, t_patch = teacher["backbone"](global_crops)
            t_cls = torch.cat(t_cls.chunk(2)[::-1])            # A is matched to B
            t_cls = teacher["head"](t_cls)
            t_patch = teacher["head"](t_patch.flatten(0, 1)[mask_indices_list])

        s_cls_g, s_patch = student["backbone"](global_crops, masks)
        s_cls_l, _ = student["backbone"](local_crops)
        s_g, s_l = student["head"](s_cls_g), student["head"](s_cls_l)
        s_patch = student["head"](s_patch.flatten(0, 1)[mask_indices_list])

        loss = dino_loss.forward_fused(s_l.chunk(n_local), t_cls, teacher_temp) / terms
        loss = loss + dino_loss.forward_fused([s_g], t_cls, teacher_temp, update_center=False) * 2 / terms
        loss = loss + 0.1 * sum(koleo_loss(p) for p in s_cls_g.chunk(2))
        loss = loss + ibot_loss.forward_masked_fused(s_patch, t_patch, masks, teacher_temp,
                                                     n_masked_patches=n_masked_patches, masks_weight=masks_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # dinov2 SSLMetaArch.update_teacher
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            sslkern.ema_update_(t_params, s_params, 0.994)
        return loss.detach()

    return step


def main(steps=3):
    step = build()
    return [float(step(it)) for it in range(steps)]


if __name__ == "__main__":
    print(main())
