"""Real calibration images that install offline: the sample photographs bundled in scikit-image's wheel.

``skimage.data`` loads these from files inside the package (no download); others in that module fetch
from the network on first use and are not used here. Grayscale images are repeated over three channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: bundled with the scikit-image wheel (skimage/data/*.png|jpg): no network needed
SAMPLE_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
)
#: normalisation of the vision towers' image processors (CLIP's; SigLIP's is 0.5 / 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def sample_images(names: tuple[str, ...] = SAMPLE_IMAGES) -> list[np.ndarray]:
    """The named scikit-image sample images as RGB ``uint8`` arrays ``[H, W, 3]``."""
    from skimage import data

    out = []
    for name in names:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out.append(np.ascontiguousarray(image[..., :3]))
    return out


def to_pixel_values(images: list[np.ndarray], size: int, *, siglip: bool = False) -> torch.Tensor:
    """Center-crop each image to a square, resize to ``size`` and normalise: ``[n, 3, size, size]`` float32."""
    from skimage.transform import resize

    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if siglip else (CLIP_MEAN, CLIP_STD)
    batch = []
    for image in images:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top : top + side, left : left + side]
        scaled = resize(square, (size, size), anti_aliasing=True, preserve_range=False)  # floats in [0, 1]
        batch.append((scaled - np.array(mean)) / np.array(std))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().contiguous()


def vision_pixel_values(vision_config: Any, count: int) -> torch.Tensor:
    """``count`` images (the samples, cycled) prepared for a vision tower with ``vision_config``."""
    images = sample_images()
    picked = [images[i % len(images)] for i in range(count)]
    siglip = "siglip" in str(getattr(vision_config, "model_type", ""))
    return to_pixel_values(picked, int(vision_config.image_size), siglip=siglip)
