"""render_views: every backend against torchvision's functional ops on fixed parameters (each op
alone and the whole chain), against the reference on random parameters (odd sizes, grey images,
rotations, bf16 / fp16 output), opcheck, torch.compile, host syncs, bad input."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import sslkern
from sslkern import RaggedImages
from sslkern.ops.render_views import dispatch
from sslkern.views import ViewParams, ViewSpec, draw_view_params, dino_multicrop

from conftest import SyncCounter, backend_params

BACKENDS = backend_params(dispatch, include_reference=True)
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]

# Tolerances (fp32 output): the backends and torchvision differ by rounding only — resampling
# weights (ATen computes them in fp32, the C++ kernel in fp64, Triton per tap in fp32), the
# order of sums (separable vs 2-D blur, vertical-first resampling), the contrast mean. Every op
# is continuous (the hue rotation too), so a rounding difference stays a rounding difference.
TOL = dict(atol=2e-5, rtol=1e-5)
TOL_CHAIN = dict(atol=1e-4, rtol=1e-4)       # eight ops, values up to ~2.6 after normalising


def images_of(shapes, channels=3, seed=0):
    """Smooth random content with edges (so resampling and blur have something to do)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for H, W in shapes:
        base = torch.rand(channels, max(H // 4, 1) + 1, max(W // 4, 1) + 1, generator=g)
        smooth = torch.nn.functional.interpolate(base[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        edges = (torch.rand(channels, H, W, generator=g) > 0.9).float() * 0.5
        out.append(((smooth * 0.7 + edges) * 255).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous())
    return out


def fixed_params(boxes, src=None, angle=None, flip=None, jitter=None, order=None, gray=None, sigma=None, solarize=None):
    V = len(boxes)
    return ViewParams(
        src=torch.tensor(src if src is not None else [0] * V, dtype=torch.int64),
        box=torch.tensor(boxes, dtype=torch.float32),
        angle=torch.tensor(angle if angle is not None else [0.0] * V, dtype=torch.float32),
        flip=torch.tensor(flip if flip is not None else [False] * V),
        jitter=torch.tensor(jitter if jitter is not None else [[1.0, 1.0, 1.0, 0.0]] * V, dtype=torch.float32),
        jitter_order=torch.tensor(order if order is not None else [[0, 1, 2, 3]] * V, dtype=torch.int64),
        gray=torch.tensor(gray if gray is not None else [False] * V),
        blur_sigma=torch.tensor(sigma if sigma is not None else [0.0] * V, dtype=torch.float32),
        solarize=torch.tensor(solarize if solarize is not None else [False] * V))


def as_float(img):
    return img.permute(2, 0, 1).float() / 255.0


def render(backend, images, params, size, mean=None, std=None, **kw):
    name, device = backend
    C = images.channels
    return sslkern.render_views(images.to(device), params.to(device), size, mean=mean or ZERO[:C], std=std or ONE[:C],
                                backend=name, **kw).cpu()


def small(name):
    return name == "triton"  # the interpreter runs one program per tile: keep its cases small


CROPS = [  # (H, W, box, size): integer boxes through resized_crop(antialias=True)
    (37, 50, (0, 0, 37, 50), 16),       # whole image, downscale
    (37, 50, (3, 5, 20, 30), 29),       # upscale
    (50, 197, (7, 11, 40, 150), 37),    # ViT-ish sizes, anisotropic
    (1, 37, (0, 2, 1, 30), 9),          # one-pixel-high image
    (37, 1, (4, 0, 30, 1), 9),          # one-pixel-wide image
    (20, 20, (9, 9, 1, 1), 5),          # a one-pixel crop
    (9, 13, (0, 0, 9, 13), 13),         # identity rows, downscaled columns
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_crop_resize_matches_torchvision(backend, flip):
    name, _ = backend
    for H, W, box, S in CROPS[:4] if small(name) else CROPS:
        img = images_of([(H, W)])[0]
        out = render(backend, RaggedImages.from_list([img]), fixed_params([box], flip=[flip]), S)[0]
        want = TF.resized_crop(as_float(img), *box, [S, S], antialias=True)
        if flip:
            want = TF.horizontal_flip(want)
        torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"{(H, W, box, S)}: {m}")


def _identity_view(img, **kw):
    """The whole image at its own size (the AA weights are then exactly the identity)."""
    H, W = img.shape[:2]
    assert H == W
    return fixed_params([(0, 0, H, W)], **kw), H


OPS = {  # name: (view parameters, torchvision on the float image)
    "brightness": (dict(jitter=[[1.35, 1, 1, 0]]), lambda x: TF.adjust_brightness(x, 1.35)),
    "brightness_dark": (dict(jitter=[[0.6, 1, 1, 0]]), lambda x: TF.adjust_brightness(x, 0.6)),
    "contrast": (dict(jitter=[[1, 1.4, 1, 0]]), lambda x: TF.adjust_contrast(x, 1.4)),
    "contrast_low": (dict(jitter=[[1, 0.3, 1, 0]]), lambda x: TF.adjust_contrast(x, 0.3)),
    "saturation": (dict(jitter=[[1, 1, 1.8, 0]]), lambda x: TF.adjust_saturation(x, 1.8)),
    "desaturate": (dict(jitter=[[1, 1, 0.2, 0]]), lambda x: TF.adjust_saturation(x, 0.2)),
    "hue_plus": (dict(jitter=[[1, 1, 1, 0.1]]), lambda x: TF.adjust_hue(x, 0.1)),
    "hue_minus": (dict(jitter=[[1, 1, 1, -0.37]]), lambda x: TF.adjust_hue(x, -0.37)),
    "hue_half": (dict(jitter=[[1, 1, 1, 0.5]]), lambda x: TF.adjust_hue(x, 0.5)),
    "grayscale": (dict(gray=[True]), lambda x: TF.rgb_to_grayscale(x, 3)),
    "blur_small": (dict(sigma=[0.4]), lambda x: TF.gaussian_blur(x, [3, 3], [0.4, 0.4])),
    "blur": (dict(sigma=[1.7]), lambda x: TF.gaussian_blur(x, [13, 13], [1.7, 1.7])),
    "solarize": (dict(solarize=[True]), lambda x: TF.solarize(x, 0.5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_each_op_matches_torchvision(backend, op):
    name, _ = backend
    kw, tv = OPS[op]
    img = images_of([(16, 16) if small(name) else (29, 29)])[0]
    params, S = _identity_view(img, **kw)
    out = render(backend, RaggedImages.from_list([img]), params, S)[0]
    torch.testing.assert_close(out, tv(as_float(img)), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_kernel_size_and_normalize(backend):
    """blur_kernel_size fixes the kernel (dinov2's 9); mean / std as torchvision's Normalize."""
    img = images_of([(20, 20)])[0]
    params, S = _identity_view(img, sigma=[1.9])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = render(backend, RaggedImages.from_list([img]), params, S, mean=mean, std=std, blur_kernel_size=9)[0]
    want = TF.normalize(TF.gaussian_blur(as_float(img), [9, 9], [1.9, 1.9]), mean, std)
    torch.testing.assert_close(out, want, **TOL)


def torchvision_chain(img, box, flip, jitter, order, gray, sigma, solarize, S, mean, std, kernel_size=None):
    """The views of DataAugmentationDINO-style pipelines in torchvision's functional ops, in the
    renderer's order; ColorJitter.forward's loop (a None factor is skipped) on the given order."""
    x = TF.resized_crop(as_float(img), *box, [S, S], antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    b, c, s, h = jitter
    for fn in order:
        if fn == 0 and b != 1:
            x = TF.adjust_brightness(x, b)
        elif fn == 1 and c != 1:
            x = TF.adjust_contrast(x, c)
        elif fn == 2 and s != 1:
            x = TF.adjust_saturation(x, s)
        elif fn == 3 and h != 0:
            x = TF.adjust_hue(x, h)
    if gray:
        x = TF.rgb_to_grayscale(x, 3)
    if sigma > 0:
        k = kernel_size or 2 * math.ceil(3 * sigma) + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if solarize:
        x = TF.solarize(x, 0.5)
    return TF.normalize(x, mean, std)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_chain_matches_torchvision(backend):
    """Every op on, in several orders (contrast first, last, between: its mean is the current
    image's), flip, gray, blur, solarize, ImageNet normalisation."""
    name, _ = backend
    S = 16 if small(name) else 37
    imgs = images_of([(50, 61), (40, 40), (197, 50)])
    boxes = [(3, 4, 40, 50), (0, 0, 40, 40), (20, 3, 150, 40), (10, 10, 30, 41)]
    views = dict(
        src=[0, 1, 2, 0],
        flip=[True, False, True, False],
        jitter=[[1.3, 0.7, 1.2, 0.08], [0.8, 1.35, 0.9, -0.1], [1.1, 1.2, 0.5, 0.02], [0.7, 0.6, 1.3, -0.05]],
        order=[[1, 0, 3, 2], [0, 2, 3, 1], [3, 1, 0, 2], [2, 0, 1, 3]],
        gray=[False, True, False, False],
        sigma=[0.0, 1.3, 0.6, 1.9],
        solarize=[True, False, False, True])
    params = fixed_params(boxes, **views)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = render(backend, RaggedImages.from_list(imgs), params, S, mean=mean, std=std)
    for v in range(4):
        want = torchvision_chain(imgs[views["src"][v]], boxes[v], views["flip"][v], views["jitter"][v],
                                 views["order"][v], views["gray"][v], views["sigma"][v], views["solarize"][v], S,
                                 mean, std)
        torch.testing.assert_close(out[v], want, **TOL_CHAIN, msg=lambda m: f"view {v}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grey_images(backend):
    """C = 1: saturation, hue and grayscale do nothing (torchvision), contrast blends with the
    image's own mean, blur and solarize as usual."""
    name, _ = backend
    imgs = images_of([(30, 23), (16, 16)], channels=1)
    boxes = [(2, 1, 25, 20), (0, 0, 16, 16)]
    views = dict(src=[0, 1], flip=[True, False], jitter=[[1.2, 0.6, 1.7, 0.3], [0.9, 1.3, 0.4, -0.2]],
                 order=[[3, 1, 2, 0], [1, 2, 0, 3]], gray=[True, True], sigma=[0.8, 0.0], solarize=[False, True])
    S = 14
    out = render(backend, RaggedImages.from_list(imgs), fixed_params(boxes, **views), S, mean=[0.5], std=[0.25])
    assert out.shape == (2, 1, S, S)
    for v in range(2):
        want = torchvision_chain(imgs[v], boxes[v], views["flip"][v], views["jitter"][v], views["order"][v], False,
                                 views["sigma"][v], views["solarize"][v], S, [0.5], [0.25])
        torch.testing.assert_close(out[v], want, **TOL_CHAIN)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation(backend):
    """angle != 0: the box turned about its centre, bilinear, border padding; on the whole image
    at its own size that is torchvision's rotate away from the border (rotate fills with 0)."""
    name, _ = backend
    S = 24
    img = images_of([(S, S)])[0]
    out = render(backend, RaggedImages.from_list([img]), fixed_params([(0, 0, S, S)] * 2, angle=[0.3, -0.15]), S)
    for v, deg in enumerate((math.degrees(0.3), math.degrees(-0.15))):
        want = TF.rotate(as_float(img), deg, interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[v][:, 7:17, 7:17], want[:, 7:17, 7:17], atol=1e-4, rtol=1e-4)


def random_views(spec, images, V, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, len(images), (V,), generator=g)
    u = torch.rand(V, spec.num_uniforms, generator=g, dtype=torch.float64)
    return draw_view_params(spec, images.hw, u, src)


CASES = {
    "dino_global": (dino_multicrop()[1], 24),
    "dino_local": (dino_multicrop(local_size=12)[2], 12),
    "rotated_continuous": (ViewSpec(16, scale=(0.3, 1.0), integer_boxes=False, degrees=15, flip_p=0.5, jitter_p=1.0,
                                    gray_p=0.3, blur_p=0.5, solarize_p=0.3), 16),
    "tiny_upscale": (ViewSpec(17, scale=(0.005, 0.05), ratio=(0.3, 3.0), flip_p=0.5, jitter_p=1.0, blur_p=1.0,
                              blur_sigma=(0.5, 4.0)), 17),   # kernels wider than the view: reflect folds twice
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_backends_match_reference_random_params(backend, case, channels):
    name, _ = backend
    spec, S = CASES[case]
    shapes = [(50, 37), (37, 197), (1, 40), (64, 64), (13, 5)]
    imgs = RaggedImages.from_list(images_of(shapes, channels=channels, seed=3))
    V = 5 if small(name) else 24
    params = random_views(spec, imgs, V, seed=hash(case) % 1000)
    mean, std = [0.485, 0.456, 0.406][:channels], [0.229, 0.224, 0.225][:channels]
    want = render(("reference", "cpu"), imgs, params, S, mean=mean, std=std)
    out = render(backend, imgs, params, S, mean=mean, std=std)
    torch.testing.assert_close(out, want, **TOL_CHAIN)


@pytest.mark.skipif(not any(b.id == "triton" and not b.marks for b in BACKENDS), reason="triton unavailable")
def test_triton_wide_row_path():
    """Rows wider than GATHER_MAX take the horizontal blur through a second scratch (stores, a
    barrier, shifted loads) instead of register gathers: forced here on small views."""
    from sslkern.triton_ops.render_views import render_views_triton

    imgs = RaggedImages.from_list(images_of([(40, 33), (20, 50)]))
    params = random_views(CASES["tiny_upscale"][0], imgs, 3, seed=6)
    params.blur_sigma[0] = 0.0
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = render(("reference", "cpu"), imgs, params, 17, mean=mean, std=std)
    p = params
    out = render_views_triton(imgs.data, imgs.offsets, imgs.hw, p.src, p.box, p.angle, p.flip, p.jitter,
                              p.jitter_order, p.gray, p.blur_sigma, p.solarize, 3, 17, mean, std, torch.float32, 0,
                              gather_max=0)
    torch.testing.assert_close(out, want, **TOL_CHAIN)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_outputs(backend, dtype):
    """bf16 / fp16 output: the fp32 result rounded once (at most one rounding step apart where the
    fp32 values of two backends straddle a rounding boundary)."""
    name, _ = backend
    imgs = RaggedImages.from_list(images_of([(40, 33), (20, 50)]))
    params = random_views(dino_multicrop()[0], imgs, 3 if small(name) else 8, seed=5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = render(("reference", "cpu"), imgs, params, 16, mean=mean, std=std)
    out = render(backend, imgs, params, 16, mean=mean, std=std, out_dtype=dtype)
    assert out.dtype == dtype and out.shape == want.shape
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), want, atol=1e-4, rtol=eps)


def test_ragged_images():
    imgs = images_of([(5, 7), (3, 2), (1, 1)])
    r = RaggedImages.from_list(imgs)
    assert len(r) == 3 and r.channels == 3 and r.offsets.tolist() == [0, 105, 123] and r.data.numel() == 126
    assert r.hw.tolist() == [[5, 7], [3, 2], [1, 1]]
    for n, im in enumerate(imgs):
        assert torch.equal(r.image(n), im)
    assert torch.equal(r.to("cpu").data, r.data)
    grey = RaggedImages.from_list([torch.zeros(4, 4, 1, dtype=torch.uint8)])
    assert grey.channels == 1
    bad = RaggedImages(r.data[:-1], r.offsets, r.hw, 3)
    with pytest.raises(sslkern.ArgumentError, match=r"offsets\[2\] \+ H·W·C = 126 .* expected <= len\(data\) = 125"):
        bad.validate()
    with pytest.raises(sslkern.ArgumentError, match=r"hw expected sizes >= 1"):
        RaggedImages(r.data, r.offsets, torch.tensor([[5, 7], [0, 2], [1, 1]]), 3).validate()
    with pytest.raises(sslkern.ArgumentError, match=r"channels expected 1 or 3"):
        RaggedImages(r.data, r.offsets, r.hw, 2).validate()
    with pytest.raises(TypeError, match=r"data expected dtype"):
        RaggedImages(r.data.float(), r.offsets, r.hw, 3).validate()
    with pytest.raises(sslkern.ArgumentError, match=r"images\[1\] expected 3 channels"):
        RaggedImages.from_list([imgs[0], torch.zeros(2, 2, 1, dtype=torch.uint8)])


def _op_args(images, params, size=8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), dtype=torch.float32, k=0):
    p = params
    return (images.data, images.offsets, images.hw, p.src, p.box, p.angle, p.flip, p.jitter, p.jitter_order, p.gray,
            p.blur_sigma, p.solarize, images.channels, size, list(mean), list(std), dtype, k, "")


def test_opcheck():
    imgs = RaggedImages.from_list(images_of([(20, 17), (9, 30)]))
    params = random_views(dino_multicrop()[1], imgs, 3, seed=1)
    for args in [_op_args(imgs, params), _op_args(imgs, params, size=5, dtype=torch.bfloat16, k=3)]:
        torch.library.opcheck(torch.ops.sslkern.render_views.default, args)


def test_compile_fullgraph_equals_eager():
    imgs = RaggedImages.from_list(images_of([(20, 17), (9, 30)]))
    params = random_views(dino_multicrop()[0], imgs, 4, seed=2)

    def views(data, offsets, hw, box, sigma):
        p = ViewParams(params.src, box, params.angle, params.flip, params.jitter, params.jitter_order, params.gray,
                       sigma, params.solarize)
        return sslkern.render_views(RaggedImages(data, offsets, hw, 3), p, 8, mean=[0.5] * 3, std=[0.25] * 3) * 2.0

    args = (imgs.data, imgs.offsets, imgs.hw, params.box, params.blur_sigma)
    eager = views(*args)
    compiled = torch.compile(views, fullgraph=True, backend="inductor")(*args)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_no_host_sync_unchecked(backend, monkeypatch):
    """check_values=False: no tensor value is read on the host (nothing to sync on a GPU): no
    ``.item()`` / ``bool()`` / ``int()`` (counted by the dispatch mode) and no ``.tolist()``."""
    name, device = backend
    imgs = RaggedImages.from_list(images_of([(20, 17), (9, 30)])).to(device)
    params = random_views(dino_multicrop()[1], imgs, 2, seed=4).to(device)
    tolist = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist.append(self.shape) or real(self))
    with SyncCounter() as counter:
        sslkern.render_views(imgs, params, 8, mean=[0.5] * 3, std=[0.2] * 3, check_values=False, backend=name)
    assert counter.n == 0 and tolist == []
    sslkern.render_views(imgs, params, 8, mean=[0.5] * 3, std=[0.2] * 3, backend=name)
    assert len(tolist) == 1  # checked: every value check in one reduction, read once


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_unchecked_bad_values_stay_in_bounds(backend):
    """check_values=False with a source index outside the batch and boxes outside the image (NaN,
    huge, negative): the C++ kernel refuses them, the Triton kernel clamps them into the batch /
    image (finite output, short loops)."""
    name, device = backend
    imgs = RaggedImages.from_list(images_of([(20, 17), (9, 30)]))
    nan = float("nan")
    params = fixed_params([(0, 0, 9, 30), (5, 5, 50, 60), (nan, 1e30, 1e30, nan), (-5, -1e9, 3, 4)], src=[7, 0, 1, 0])
    run = lambda: render(backend, imgs, params, 6, check_values=False)  # noqa: E731
    if name == "cpu":
        with pytest.raises(RuntimeError, match=r"params.src expected values in \[0, 2\)"):
            run()
    else:
        assert torch.isfinite(run()).all()


def _params(**over):
    p = fixed_params([(0, 0, 10, 12), (1, 2, 5, 5)], src=[0, 1])
    for k, v in over.items():
        setattr(p, k, v)
    return p


IMGS = RaggedImages.from_list(images_of([(10, 12), (8, 8)]))


@pytest.mark.parametrize("call,match", [
    (lambda: sslkern.render_views("x", _params(), 8, mean=ZERO, std=ONE), r"images expected a RaggedImages"),
    (lambda: sslkern.render_views(IMGS, "p", 8, mean=ZERO, std=ONE), r"params expected a ViewParams"),
    (lambda: sslkern.render_views(IMGS, _params(), 0, mean=ZERO, std=ONE), r"size expected >= 1"),
    (lambda: sslkern.render_views(IMGS, _params(), 8.0, mean=ZERO, std=ONE), r"size expected an int"),
    (lambda: sslkern.render_views(IMGS, _params(), 8, mean=[0.5], std=ONE), r"mean expected 3 values"),
    (lambda: sslkern.render_views(IMGS, _params(), 8, mean=ZERO, std=[1, 0, 1]), r"std expected values > 0"),
    (lambda: sslkern.render_views(IMGS, _params(), 8, mean=ZERO, std=ONE, out_dtype=torch.float64),
     r"out_dtype expected float32, bfloat16 or float16"),
    (lambda: sslkern.render_views(IMGS, _params(), 8, mean=ZERO, std=ONE, blur_kernel_size=4),
     r"blur_kernel_size expected an odd int"),
    (lambda: sslkern.render_views(RaggedImages(IMGS.data, IMGS.offsets, IMGS.hw, 2), _params(), 8, mean=ZERO, std=ONE),
     r"images.channels expected 1 or 3"),
    (lambda: sslkern.render_views(RaggedImages(IMGS.data.float(), IMGS.offsets, IMGS.hw, 3), _params(), 8, mean=ZERO,
                                  std=ONE), r"images.data expected dtype"),
    (lambda: sslkern.render_views(RaggedImages(IMGS.data[:-1], IMGS.offsets, IMGS.hw, 3), _params(), 8, mean=ZERO,
                                  std=ONE), r"images.offsets\[1\] \+ H·W·C"),
    (lambda: sslkern.render_views(IMGS, _params(src=torch.tensor([0, 2])), 8, mean=ZERO, std=ONE),
     r"params.src expected values in \[0, 2\)"),
    (lambda: sslkern.render_views(IMGS, _params(src=torch.tensor([0, 1], dtype=torch.int32)), 8, mean=ZERO, std=ONE),
     r"params.src expected dtype"),
    (lambda: sslkern.render_views(IMGS, _params(box=torch.tensor([[0, 0, 10, 12], [1, 2, 8, 5.0]])), 8, mean=ZERO,
                                  std=ONE), r"params.box expected .* got params.box\[1\] = \[1.0, 2.0, 8.0, 5.0\] "
                                            r"\(image 1 of size \[8, 8\]\)"),
    (lambda: sslkern.render_views(IMGS, _params(box=torch.tensor([[0, 0, 10, 12], [1, 2, 0, 5.0]])), 8, mean=ZERO,
                                  std=ONE), r"params.box expected"),
    (lambda: sslkern.render_views(IMGS, _params(box=torch.zeros(2, 3)), 8, mean=ZERO, std=ONE),
     r"params.box expected shape \(2, 4\)"),
    (lambda: sslkern.render_views(IMGS, _params(jitter_order=torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3]])), 8, mean=ZERO,
                                  std=ONE), r"params.jitter_order expected a permutation"),
    (lambda: sslkern.render_views(IMGS, _params(jitter=torch.tensor([[1, 1, 1, 0.7], [1, 1, 1, 0]])), 8, mean=ZERO,
                                  std=ONE), r"params.jitter expected .* hue shift in \[-0.5, 0.5\]"),
    (lambda: sslkern.render_views(IMGS, _params(blur_sigma=torch.tensor([0.0, -1.0])), 8, mean=ZERO, std=ONE),
     r"params.blur_sigma expected values in \[0, 1000\]"),
    (lambda: sslkern.render_views(IMGS, _params(blur_sigma=torch.tensor([0.0, 1e4])), 8, mean=ZERO, std=ONE),
     r"params.blur_sigma expected values in \[0, 1000\]"),
    (lambda: sslkern.render_views(IMGS, _params(), 8, mean=ZERO, std=ONE, blur_kernel_size=8193),
     r"blur_kernel_size expected an odd int in \[1, 8191\]"),
    (lambda: sslkern.render_views(IMGS, _params(angle=torch.tensor([0.0, float("nan")])), 8, mean=ZERO, std=ONE),
     r"params.angle expected finite"),
    (lambda: sslkern.render_views(IMGS, _params(flip=torch.tensor([0, 1])), 8, mean=ZERO, std=ONE),
     r"params.flip expected dtype"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
