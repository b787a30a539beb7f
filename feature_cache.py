"""On-disk caches of per-image inputs, memory-mapped, one file per image set: frozen-CNN
features (float16) and decoded, resized images (uint8)."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from annotations import default_cache_dir
from atomic_file import atomic_path
from data_loader import ImageDataset, make_pixel_transform


def encoder_fingerprint(encoder):
    """Hash of the backbone's weights and architecture: a changed CNN never reuses a cache."""
    digest = hashlib.sha1(type(encoder.backbone).__name__.encode())
    for name, tensor in encoder.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_signatures(split):
    """(path, size, mtime) of every image: a file rewritten in place never reuses a cache."""
    signatures = []
    for path in split.image_paths:
        try:
            st = os.stat(path)
            signatures.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:  # reading it will fail with a message that names it
            signatures.append((str(path), -1, -1))
    return signatures


def cache_key(encoder, split, transform):
    """Key of one (CNN weights, image files, transform) combination; `encoder` None for pixels."""
    parts = [
        encoder_fingerprint(encoder) if encoder is not None else "pixels",
        file_signatures(split),
        repr(transform),
    ]
    if encoder is not None and encoder.grid:  # pooled caches keep the keys they always had
        parts.append(f"grid {encoder.grid_size}")
    text = json.dumps(parts)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def image_loader(dataset, batch_size, num_workers):
    """Images in order, through a loader with its own generator: building a cache must not draw
    from the global RNG, or a run that builds one would train differently from one that reads it."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator()
    )


def build_cache(path, shape, dtype, batches, desc, progress=True):
    """Write the rows that `batches` yields to `path` (.npy) under a temporary name, then rename."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        start = 0
        for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            out[start : start + len(rows)] = rows
            start += len(rows)
        out.flush()
        del out
    return np.load(path, mmap_mode="r")


def open_cache(path, shape, write):
    """The cache at `path` if it is complete and `shape`d, else None (or an error if not `write`)."""
    if path.exists():
        rows = np.load(path, mmap_mode="r")
        if rows.shape == shape:
            return rows
    if not write:
        raise FileNotFoundError(f"{path}: cache missing (rank 0 writes it first)")
    return None


def feature_shape(encoder, transform):
    """Shape of one image's cached features: (feature_size,) or (positions, feature_size)."""
    if not encoder.grid:
        return (encoder.feature_size,)
    size = next(t.size for t in transform.transforms if hasattr(t, "size"))
    size = size if isinstance(size, int) else size[0]
    was_training = encoder.training
    with torch.no_grad():
        blank = torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device)
        grid = encoder.eval().extract_grid(blank, encoder.grid_size)
    encoder.train(was_training)
    return tuple(grid.shape[1:])


def cached_features(
    encoder,
    split,
    transform,
    cache_dir=None,
    batch_size=64,
    num_workers=0,
    device="cpu",
    progress=True,
    write=True,
):
    """(num_images, feature_size) float16 memmap of `split`'s images, computed on first use;
    (num_images, positions, feature_size) for an encoder that gives the grid (attention).

    With `write=False` (distributed ranks other than 0) the cache must already exist.
    """
    path = (
        Path(cache_dir or default_cache_dir())
        / "features"
        / f"{cache_key(encoder, split, transform)}.npy"
    )
    shape = (len(split.image_ids), *feature_shape(encoder, transform))
    features = open_cache(path, shape, write)
    if features is not None:
        return features
    loader = image_loader(ImageDataset(split, transform), batch_size, num_workers)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            batches = (
                encoder.backbone_features(images.to(device)).float().cpu().numpy()
                for images, _ in loader
            )
            return build_cache(
                path, shape, np.float16, batches, f"caching {split.name} features", progress
            )
    finally:
        encoder.train(was_training)


def cached_images(
    split, image_size, cache_dir=None, batch_size=64, num_workers=0, progress=True, write=True
):
    """(num_images, 3, image_size, image_size) uint8 memmap of `split`'s images, resized and
    centre-cropped, decoded on first use; `data_loader.pixels_to_input` makes model inputs of it.

    For a CNN trained on images without augmentation: each epoch then reads these rows instead
    of decoding and resizing every file again. `write` as in `cached_features`.
    """
    transform = make_pixel_transform(image_size)
    path = (
        Path(cache_dir or default_cache_dir())
        / "images"
        / f"{cache_key(None, split, transform)}.npy"
    )
    shape = (len(split.image_ids), 3, image_size, image_size)
    pixels = open_cache(path, shape, write)
    if pixels is not None:
        return pixels
    loader = image_loader(ImageDataset(split, transform), batch_size, num_workers)
    return build_cache(
        path,
        shape,
        np.uint8,
        (images.numpy() for images, _ in loader),
        f"caching {split.name} images",
        progress,
    )
