"""A timm ViT trained by masked self-distillation against an EMA teacher: the student
encodes the kept patches only, the teacher the full image; tiny sizes by default."""
import timm
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3


def encode_kept(vit, images, ids_keep):
    """timm's embedding, then the kept patch tokens (prefix tokens first), then the blocks."""
    x = vit._pos_embed(vit.patch_embed(images))
    P = vit.num_prefix_tokens
    kept = torch.gather(x[:, P:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return vit.norm(vit.blocks(torch.cat([x[:, :P], kept], dim=1)))


def build(name="vit_small_patch16_224", img_size=32, batch=4, mask_ratio=0.5, seed=0, **vit_args):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **vit_args)
    ema = ModelEmaV3(model, decay=0.999, use_warmup=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_patches, P = model.patch_embed.num_patches, model.num_prefix_tokens
    gen = torch.Generator().manual_seed(seed + 1)

    def step(i):
        images = torch.randn(batch, 3, img_size, img_size, generator=gen)
        noise = torch.rand(batch, n_patches, generator=gen)
        ids_keep = noise.argsort(dim=1)[:, : int(n_patches * (1 - mask_ratio))]
        student = encode_kept(model, images, ids_keep)[:, P:]
        with torch.no_grad():
            target = ema.module.forward_features(images)[:, P:]
            target = torch.gather(target, 1, ids_keep.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        loss = F.smooth_l1_loss(student, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=i)
        return loss.detach()

    return step


def main(steps=3, **kw):
    kw = dict(dict(depth=2), **kw)  # tiny for CI; build(depth=12) is ViT-S/16
    step = build(**kw)
    return [float(step(i)) for i in range(steps)]


if __name__ == "__main__":
    print(main())
