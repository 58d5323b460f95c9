"""Shared pytest fixtures. Tests run on the CPU, on tiny ViTs, and never need the network."""
import os
import sys
import tarfile

import pytest

# the project root: import vit, mae, ...
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402,F401  (registers vit.MODELS["vit_mini"])

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def _slice_of_cifar10(dst, per_class_train, per_class_val):
    """Copy the first images of each class from ../shared/data/cifar10.tar.gz (real 32x32 JPEGs)."""
    counts = {}
    with tarfile.open(os.path.join(SHARED, "cifar10.tar.gz")) as tar:
        for m in tar:
            parts = m.name.split("/")  # cifar10/<split>/<class>/<file>
            if not m.isfile() or len(parts) != 4:
                continue
            split, cls = parts[1], parts[2]
            limit = per_class_train if split == "train" else per_class_val
            if counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            os.makedirs(os.path.join(dst, split, cls), exist_ok=True)
            with open(os.path.join(dst, split, cls, parts[3]), "wb") as f:
                f.write(tar.extractfile(m).read())


def _generated(dst, per_class_train, per_class_val, classes=10):
    """Fallback on a clone without ../shared: small coloured-noise JPEGs, one colour per class."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c in range(classes):
            os.makedirs(os.path.join(dst, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                base = np.array([(c * 37) % 255, (c * 91) % 255, (c * 53) % 255])
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(os.path.join(dst, split, f"class{c}", f"{i:04d}.jpg"))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """An ImageNet-layout folder (train/<class>/*.jpg, val/<class>/*.jpg): 10 classes x 16 train, x 8 val images."""
    dst = str(tmp_path_factory.mktemp("images"))
    if os.path.isfile(os.path.join(SHARED, "cifar10.tar.gz")):
        _slice_of_cifar10(dst, 16, 8)
    else:
        _generated(dst, 16, 8)
    return dst
