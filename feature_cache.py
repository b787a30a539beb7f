"""On-disk caches of per-image inputs, memory-mapped, one file per image set: frozen-CNN
features (float16) and decoded, resized images (uint8)."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
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


def build_cache(path, shape, dtype, batches_between, batch_size, desc, progress=True, rank=0,
                world=1):  # fmt: skip
    """Write `shape` rows to `path` (.npy) under a temporary name, then rename; an open memmap.

    `batches_between(first, last)` yields the rows of batches first to last - 1 (each
    `batch_size` rows). With several processes (`world` > 1) each computes and writes its own
    contiguous share of the batches into one shared file, so none waits on the others' share
    (a build by rank 0 alone can outlast the collective timeout), and every batch is the one a
    single process would compute: the file is byte for byte the same.
    """
    path = Path(path)
    batches = -(-shape[0] // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    if world == 1:
        with atomic_path(path) as tmp:
            _write_rows(tmp, True, shape, dtype, batches_between(0, batches), 0, batch_size, desc,
                        progress)  # fmt: skip
        return np.load(path, mmap_mode="r")
    # Every rank writes into the same temporary file: its name must not depend on the process.
    tmp = path.with_name(f".{path.stem}.tmp-shared{path.suffix}")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_rows(tmp, True, shape, dtype, (), 0, batch_size, desc, False)  # header, no rows
    dist.barrier()
    _write_rows(tmp, False, shape, dtype, batches_between(first, last), first, batch_size,
                f"{desc} (rank {rank})", progress)  # fmt: skip
    dist.barrier()  # every share is on disk
    if rank == 0:
        os.replace(tmp, path)
    dist.barrier()
    return np.load(path, mmap_mode="r")


def _write_rows(tmp, create, shape, dtype, batches, first_batch, batch_size, desc, progress):
    """Write batches, from batch `first_batch` on, into the .npy memmap at `tmp` (made if
    `create`)."""
    mode = "w+" if create else "r+"
    out = np.lib.format.open_memmap(tmp, mode=mode, dtype=dtype, shape=shape if create else None)
    start = first_batch * batch_size
    for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        out[start : start + len(rows)] = rows
        start += len(rows)
    out.flush()
    del out


def open_cache(path, shape, world=1):
    """The cache at `path` if it is complete and `shape`d, else None; with several processes,
    None unless every one of them finds it (they then build it together)."""
    rows = None
    if path.exists():
        rows = np.load(path, mmap_mode="r")
        rows = rows if rows.shape == shape else None
    if world > 1:
        missing = torch.tensor([float(rows is None)])
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
        rows = None if missing.item() else rows
    return rows


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
    rank=0,
    world=1,
):
    """(num_images, feature_size) float16 memmap of `split`'s images, computed on first use;
    (num_images, positions, feature_size) for an encoder that gives the grid (attention).

    With several processes (`rank` of `world`), each computes its share (`build_cache`).
    """
    path = (
        Path(cache_dir or default_cache_dir())
        / "features"
        / f"{cache_key(encoder, split, transform)}.npy"
    )
    shape = (len(split.image_ids), *feature_shape(encoder, transform))
    features = open_cache(path, shape, world)
    if features is not None:
        return features
    batches_between = _batches_between(
        ImageDataset(split, transform), batch_size, num_workers,
        lambda images: encoder.backbone_features(images.to(device)).float().cpu().numpy(),
    )  # fmt: skip
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return build_cache(path, shape, np.float16, batches_between, batch_size,
                               f"caching {split.name} features", progress, rank, world)  # fmt: skip
    finally:
        encoder.train(was_training)


def _batches_between(dataset, batch_size, num_workers, convert):
    """`build_cache`'s `batches_between` over `dataset`: each batch of images, `convert`ed."""

    def batches_between(first, last):
        stop = min(last * batch_size, len(dataset))
        rows = torch.utils.data.Subset(dataset, range(first * batch_size, stop))
        return (convert(images) for images, _ in image_loader(rows, batch_size, num_workers))

    return batches_between


def cached_images(
    split, image_size, cache_dir=None, batch_size=64, num_workers=0, progress=True, rank=0, world=1
):
    """(num_images, 3, image_size, image_size) uint8 memmap of `split`'s images, resized and
    centre-cropped, decoded on first use; `data_loader.pixels_to_input` makes model inputs of it.

    For a CNN trained on images without augmentation: each epoch then reads these rows instead
    of decoding and resizing every file again. `rank` and `world` as in `cached_features`.
    """
    transform = make_pixel_transform(image_size)
    path = (
        Path(cache_dir or default_cache_dir())
        / "images"
        / f"{cache_key(None, split, transform)}.npy"
    )
    shape = (len(split.image_ids), 3, image_size, image_size)
    pixels = open_cache(path, shape, world)
    if pixels is not None:
        return pixels
    batches_between = _batches_between(
        ImageDataset(split, transform), batch_size, num_workers, lambda images: images.numpy()
    )
    return build_cache(path, shape, np.uint8, batches_between, batch_size,
                       f"caching {split.name} images", progress, rank, world)  # fmt: skip
