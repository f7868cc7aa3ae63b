"""SimCLR pretraining of a small ViT on sslkern ops (Chen et al. 2020, arXiv:2002.05709).

    python recipes/simclr.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/simclr.py  # data-parallel; negatives from every rank

One step, as in SimCLR (google-research ``simclr``, lightly ``NTXentLoss``):
  1. views      two augmented views of every image
  2. encoder    backbone → projector MLP (Linear + BatchNorm + ReLU, Linear): z1, z2
  3. loss       NT-Xent over the 2N views: each view's positive is the other view of its
                image, the other 2N − 2 views are its negatives, its own similarity is left
                out; cosine similarities / τ, cross-entropy, mean over the 2N views
                (``sslkern.info_nce_loss(..., nt_xent=True)``); ``--loss rince``: RINCE over
                the same logits (chingyaoc/RINCE ``simclr_module.py: sym_loss``:
                ``((λ·Σ_{j≠i} e^{s_ij})^q − e^{q·s⁺})/q``, q 0.1, λ 0.01), the NT-Xent value
                logged beside it as ``infonce``
  4. step       AdamW, warm-up + cosine lr

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/simclr.md for what
was tried): AdamW instead of LARS; projector 96 → 512 → 128 (SimCLR v1: 2048 → 128); τ = 0.2
(SimCLR: 0.1 at batch 4,096, lightly: 0.5); the projector input is the mean of the patch
tokens; crops of area (0.3, 1) with ±10° rotation, no flips (RGB data gets flips and the
colour pipeline).
"""
from __future__ import annotations

import torch

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_loss_arguments, add_view_arguments, check_loss_arguments,
                                 check_view_arguments, encoder, joint_health, joint_verdict, mlp,
                                 positive_int_options, rince_of, two_views)


class SimCLR(Method):
    """SimCLR: the two views of an image attract, every other view in the batch repels."""

    name, title = "simclr", "SimCLR"
    defaults = dict(epochs=40, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low"}
    presets = {"paper": dict(
        _doc="SimCLR on a ViT-B/16 at 224: the optimizer is MoCo v3's ViT recipe (moco-v3 CONFIG.md: AdamW, lr "
             "1.5e-4 x batch / 256, here for batch 4,096, weight decay 0.1, 40 warm-up of 300 epochs), the task is "
             "SimCLR's (google-research simclr README): batch 4,096, temperature 0.1, projector 2,048 wide with 128 "
             "outputs, crop 0.08-1, CLS token. Not reproduced: LARS (lr 0.3 x batch / 256, weight decay 1e-6) on a "
             "ResNet-50, and SimCLR's colour distortion of strength 1 with symmetric blur (the recipe renders "
             "BYOL's asymmetric augmentations)",
        model="vit_base_patch16_224", image_size=224, batch_size=4096, epochs=300, lr=2.4e-3, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, hidden_dim=2048, out_dim=128, temperature=0.1,
        pool="cls", crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projector MLP width (SimCLR: 2048)")
        g.add_argument("--out-dim", type=int, default=128, help="(SimCLR: 128)")
        g.add_argument("--temperature", type=float, default=0.2, help="τ (SimCLR: 0.1 at batch 4,096; lightly: 0.5)")
        add_loss_arguments(g, rince_q=0.1)
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim"))
        if a.temperature <= 0:
            error(f"--temperature expected > 0, got {a.temperature}")
        check_loss_arguments(a, error)
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = encoder(build_vit(a, data.channels), mlp(a.dim, a.hidden_dim, a.out_dim, 2), a.pool)
        self.loss = sslkern.nn.InfoNCELoss(a.temperature, nt_xent=True, gather_distributed=True, rince=rince_of(a))
        self.infonce = sslkern.nn.InfoNCELoss(a.temperature, nt_xent=True, gather_distributed=True)
        self.views = two_views(a, data)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def forward(self, images, ctx):
        views = ctx.views(images, self.views)                                      # 1. two views
        z = self.encoder(views)                                                  # 2. encoder (2B, out)
        z1, z2 = z.chunk(2)
        loss = self.loss(z1, z2)                                                 # 3. NT-Xent or RINCE
        metrics = joint_health(z)                                                #    (negatives from every rank)
        if self.a.loss == "rince":                                               #    NT-Xent beside RINCE
            with torch.no_grad():
                metrics["infonce"] = self.infonce(z1, z2)
        return loss, metrics

    def verdict(self, health):
        return joint_verdict(health)


if __name__ == "__main__":
    run(SimCLR)
