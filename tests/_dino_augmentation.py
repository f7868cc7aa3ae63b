"""An eager port of DINO's multi-crop augmentation, the benchmark peer of ``render_views``.

dino ``main_dino.py: DataAugmentationDINO`` with ``utils.py: GaussianBlur`` and
``utils.py: Solarization`` (PIL images, torchvision v1 transforms): per crop RandomResizedCrop
with bicubic interpolation, RandomHorizontalFlip(0.5), RandomApply(ColorJitter(0.4, 0.4, 0.2,
0.1), p=0.8), RandomGrayscale(0.2), PIL's GaussianBlur(radius=U(0.1, 2)) with p 1.0 / 0.1 / 0.5
(global 1 / global 2 / local), PIL's solarize with p 0.2 on global crop 2, ToTensor, Normalize.
The only change: ``vit_utils`` imports inlined.
"""
import random

from PIL import ImageFilter, ImageOps
from torchvision import transforms


class GaussianBlur(object):
    """Apply Gaussian Blur to the PIL image (dino ``utils.py``)."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        do_it = random.random() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization(object):
    """Apply Solarization to the PIL image (dino ``utils.py``)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class DataAugmentationDINO(object):
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=10):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(1.0),
            normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.1),
            Solarization(0.2),
            normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(96, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(p=0.5),
            normalize,
        ])

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops
