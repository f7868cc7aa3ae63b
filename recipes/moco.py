"""MoCo v3 pretraining of a small ViT on sslkern ops (Chen, Xie & He 2021, arXiv:2104.02057).

    python recipes/moco.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/moco.py  # data-parallel; keys gathered from every rank

One step, as in moco-v3 ``moco/builder.py: MoCo_ViT`` and ``main_moco.py``:
  1. views      two augmented views of every image
  2. queries    base encoder (ViT → projector MLP) → predictor MLP on both views: q1, q2
  3. keys       the momentum encoder (EMA of ViT + projector) on both views: k1, k2
  4. loss       symmetric InfoNCE, τ = 0.2: ctr(q1, k2) + ctr(q2, k1), where ctr is the
                cross-entropy of the L2-normalised q·kᵀ/τ against the matching key (the keys
                of every rank are the negatives), × 2τ as moco-v3 (``sslkern.info_nce_loss``);
                ``--loss rince``: RINCE over the same logits (chingyaoc/RINCE ``moco-v3``:
                ``((λ·Σ_j e^{s_j})^q − e^{q·s⁺})/q``, × 2τ, q 0.6, λ 0.01), the InfoNCE value
                logged beside it as ``infonce``
  5. step       AdamW, warm-up + cosine lr
  6. momentum   momentum encoder ← EMA of the base encoder (``sslkern.nn.EMATeacher``),
                m cosine from m0 = 0.99 to 1

The patch projection is a frozen random layer (moco-v3 ``stop_grad_conv1``: "random patch
projection" stabilises ViT training); the MLPs are moco-v3's: Linear (no bias) + BatchNorm
+ ReLU, BatchNorm without affine on the outputs; projector 3 layers, predictor 2.

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/moco.md for what
was tried): MLP width 512 and output 128 (moco-v3: 4096, 256); the projector input is the
mean of the patch tokens (moco-v3: CLS); learned position embeddings (moco-v3: fixed 2-D
sin-cos); the momentum encoder is updated after the optimizer step (the loop's EMA) rather
than at the start of the next forward — the same sequence of weights, with the momentum of
step t instead of t + 1; crops of area (0.3, 1) with ±10° rotation, no flips (RGB data gets
flips and the colour pipeline).
"""
from __future__ import annotations

import torch

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_loss_arguments, add_view_arguments, check_loss_arguments,
                                 check_view_arguments, encoder, joint_health, joint_verdict, mlp,
                                 positive_int_options, rince_of, two_views)


class MoCoV3(Method):
    """MoCo v3: queries from a ViT + predictor contrast against a momentum encoder's keys."""

    name, title = "moco", "MoCo v3"
    defaults = dict(epochs=40, lr=1e-3, weight_decay=0.1, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low"}
    presets = {"paper": dict(
        _doc="MoCo v3 ViT-B/16 on ImageNet, 300 epochs (moco-v3 CONFIG.md, main_moco.py): AdamW, lr 1.5e-4 x "
             "batch / 256 (here for batch 4,096; scale it with --batch-size), weight decay 0.1, 40 warm-up epochs, "
             "MLPs 4,096 wide with 256 outputs, temperature 0.2, momentum 0.99 -> 1, CLS token, BYOL's augmentations "
             "with crop 0.08-1, frozen random patch projection. Not reproduced: the fixed 2-D sin-cos position "
             "embedding (learned here)",
        model="vit_base_patch16_224", image_size=224, batch_size=4096, epochs=300, lr=2.4e-3, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, hidden_dim=4096, out_dim=256, temperature=0.2,
        momentum_encoder=0.99, pool="cls", crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projector / predictor MLP width (moco-v3: 4096)")
        g.add_argument("--out-dim", type=int, default=128, help="(moco-v3: 256)")
        g.add_argument("--temperature", type=float, default=0.2, help="τ (moco-v3 ViT: 0.2)")
        g.add_argument("--momentum-encoder", type=float, default=0.99, help="m0, cosine to 1 (moco-v3 ViT: 0.99)")
        g.add_argument("--train-patch-embed", dest="frozen_patch_embed", action="store_false",
                       help="learn the patch projection (moco-v3 freezes it at its random init)")
        add_loss_arguments(g, rince_q=0.6)
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim"))
        if a.temperature <= 0:
            error(f"--temperature expected > 0, got {a.temperature}")
        if not 0 <= a.momentum_encoder <= 1:
            error(f"--momentum-encoder expected in [0, 1], got {a.momentum_encoder}")
        check_loss_arguments(a, error)
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        vit = build_vit(a, data.channels)
        if a.frozen_patch_embed:  # moco-v3 vits.py: random patch projection, never trained
            vit.patch_embed.proj.requires_grad_(False)
        self.base = encoder(vit, mlp(a.dim, a.hidden_dim, a.out_dim, 3, last_bn=True), a.pool)
        self.predictor = mlp(a.out_dim, a.hidden_dim, a.out_dim, 2, last_bn=True)
        self.momentum = sslkern.nn.EMATeacher(self.base)  # frozen copy; EMA of every trained parameter
        self.loss = sslkern.nn.InfoNCELoss(a.temperature, gather_distributed=True, scale=2 * a.temperature,
                                           rince=rince_of(a))
        self.infonce = sslkern.nn.InfoNCELoss(a.temperature, gather_distributed=True, scale=2 * a.temperature)
        self.views = two_views(a, data)

    def schedule(self, ctx):
        return {"momentum": sslkern.schedules.cosine_schedule(ctx.step, ctx.total_steps, self.a.momentum_encoder, 1.0)}

    def ema_pairs(self):
        return [(self.momentum, self.base)]

    def encoders(self):
        return {"teacher": self.momentum.module.backbone, "student": self.base.backbone}

    def forward(self, images, ctx):
        views = ctx.views(images, self.views)                                      # 1. two views
        z = self.base(views)
        q1, q2 = self.predictor(z).chunk(2)                                      # 2. queries
        with torch.no_grad():
            k1, k2 = self.momentum(views).chunk(2)                               # 3. keys
        loss = self.loss(q1, k2) + self.loss(q2, k1)                             # 4. symmetric InfoNCE
        metrics = joint_health(z)
        if self.a.loss == "rince":                                               #    (or RINCE)
            with torch.no_grad():
                metrics["infonce"] = self.infonce(q1, k2) + self.infonce(q2, k1)
        return loss, metrics

    def verdict(self, health):
        return joint_verdict(health)


if __name__ == "__main__":
    run(MoCoV3)
