"""Real calibration images that install offline: the sample photographs bundled in scikit-image's wheel.

They are read straight from the files inside the installed package (``skimage/data/*.png|jpg``), so
nothing is ever downloaded (some other ``skimage.data`` images fetch from the network on first use; none
of those is used). Grayscale images are repeated over three channels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: sample photographs inside the scikit-image wheel (``skimage/data``), read from the installed files
SAMPLE_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "immunohistochemistry": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "colorwheel": "color.png",
    "camera": "camera.png",
    "coins": "coins.png",
    "moon": "moon.png",
    "page": "page.png",
    "text": "text.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}
SAMPLE_IMAGES = tuple(SAMPLE_FILES)
#: normalisation of the vision towers' image processors (CLIP's; SigLIP's is 0.5 / 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def data_dir() -> Path:
    """The folder of sample images inside the installed scikit-image package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-image is not installed: pip install 'scikit-image>=0.24,<0.27'")
    return Path(spec.submodule_search_locations[0]) / "data"


def sample_images(names: tuple[str, ...] = SAMPLE_IMAGES) -> list[np.ndarray]:
    """The named scikit-image sample images as RGB ``uint8`` arrays ``[H, W, 3]``."""
    from skimage import io

    out = []
    for name in names:
        image = io.imread(data_dir() / SAMPLE_FILES[name])
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
        # floats in [0, 1]
        scaled: np.ndarray = resize(square, (size, size), anti_aliasing=True, preserve_range=False)
        batch.append((scaled - np.array(mean)) / np.array(std))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().contiguous()


def vision_pixel_values(vision_config: Any, count: int) -> torch.Tensor:
    """``count`` images (the samples, cycled) prepared for a vision tower with ``vision_config``."""
    images = sample_images()
    picked = [images[i % len(images)] for i in range(count)]
    siglip = "siglip" in str(getattr(vision_config, "model_type", ""))
    return to_pixel_values(picked, int(vision_config.image_size), siglip=siglip)
