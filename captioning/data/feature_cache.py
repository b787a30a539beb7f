"""On-disk caches of per-image inputs, memory-mapped, one file per image set: frozen-CNN
features (float16) and decoded, resized images (uint8)."""

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from captioning import distributed
from captioning.command import progress_disabled
from captioning.data.annotations import default_cache_dir
from captioning.data.loading import ImageDataset, make_pixel_transform, resolve_num_workers
from captioning.errors import CacheSpaceError


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
        repr(transform),  # its size and resize mode
        "upright",  # caches of images read before `load_image` applied EXIF rotation are not reused
    ]
    if encoder is not None and encoder.grid:  # pooled caches keep the keys they always had
        parts.append(f"grid {encoder.grid_size}")
    text = json.dumps(parts)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def image_loader(dataset, batch_size, num_workers, pin_memory=False):
    """Images in order, through a loader with its own generator: building a cache must not draw
    from the global RNG, or a run that builds one would train differently from one that reads it."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=resolve_num_workers(num_workers),
        pin_memory=pin_memory, generator=torch.Generator(),
    )  # fmt: skip


def npy_header(shape, dtype):
    """The .npy header `np.save` writes before an array of `shape` and `dtype` (C order)."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}  # fmt: skip
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def check_free_space(folder, needed, world=1):
    """Raise `CacheSpaceError` unless `folder` has `needed` bytes free (on every rank's disk)."""
    free = shutil.disk_usage(folder).free
    if world > 1:
        free = int(distributed.min_value(free))
    if free < needed:
        raise CacheSpaceError(
            f"{folder}: the cache needs {needed} bytes ({needed / 2**30:.2f} GiB) but {free} bytes "
            f"({free / 2**30:.2f} GiB) are free; free some space or set $CAPTIONING_CACHE to a "
            "bigger disk"
        )


# Seconds a rank waits to see a file rank 0 made or renamed: a shared file system's client may
# answer from its cache for a while (NFS caches a name's absence until the folder's attributes
# are read again, up to a minute by default).
SHARED_FILE_WAIT = 90.0


def build_cache(path, shape, dtype, batches_between, batch_size, desc, progress=True, rank=0,
                world=1):  # fmt: skip
    """Write `shape` rows to `path` (.npy) under a temporary name, then rename; an open memmap.

    `batches_between(first, last)` yields the rows (tensors, in `dtype`, on any device) of
    batches first to last - 1 (each `batch_size` rows). With several processes (`world` > 1)
    each computes and writes its own contiguous share of the batches, with ordinary writes at
    its own offsets of one shared file, so none waits on the others' share (a build by rank 0
    alone can outlast the collective timeout), and every batch is the one a single process would
    compute: the file is byte for byte the same. The file is renamed only once every row is
    written; an error on any rank stops every rank with the same message.
    """
    path, dtype = Path(path), np.dtype(dtype)
    header = npy_header(shape, dtype)
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    size = len(header) + shape[0] * row_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, size, world)
    batches = -(-shape[0] // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    # One name for every rank, unique to this build: a file left by a killed build, or by
    # another machine's build in a folder that is not shared, never passes for this one's.
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    token = distributed.broadcast_text(token if rank == 0 else "") if world > 1 else token
    tmp = path.with_name(f".{path.stem}.tmp-{token}{path.suffix}")
    failed = path.with_name(f".{path.stem}.tmp-{token}.failed")  # a rank's share went wrong
    try:
        error = None
        if rank == 0:
            try:
                _create(tmp, header, size)
            except OSError as e:
                error = e
        _together(error, world)
        if rank != 0 and not _appears(tmp):
            error = FileNotFoundError(
                f"{path.parent}: rank {rank} does not see the file rank 0 made there ({tmp.name}); "
                "every process must share the cache folder (on several machines: a shared file "
                "system, $CAPTIONING_CACHE)"
            )
        _together(error, world)
        share = _Share(tmp, len(header) + first * batch_size * row_bytes, row_bytes)
        try:
            rows = batches_between(first, last)
            rows = tqdm(rows, desc=desc if world == 1 else f"{desc} (rank {rank})", unit="batch",
                        total=last - first, disable=progress_disabled(progress))  # fmt: skip
            _write_share(share, failed, rows, shape[1:], dtype)
        except Exception as e:  # any rank's failure stops every rank (not only this one)
            error = e
            with contextlib.suppress(OSError):
                failed.touch()  # the other ranks stop their shares early
        _together(error, world)
        _together(share.check(), world)  # after every rank's writes: no neighbour wrote over it
        written = share.rows
        total = int(distributed.sum_values([written])[0]) if world > 1 else written
        if rank == 0:
            on_disk = os.stat(tmp).st_size
            if total != shape[0] or on_disk != size:
                error = OSError(
                    f"{tmp}: incomplete cache: {total} of {shape[0]} rows written, "
                    f"{on_disk} of {size} bytes on disk"
                )
            else:
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    error = e
        _together(error, world)
        if rank != 0 and not _appears(path):
            error = FileNotFoundError(f"{path}: rank {rank} does not see the finished cache")
        _together(error, world)
    finally:
        if rank == 0:
            tmp.unlink(missing_ok=True)
            failed.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def _together(error, world):
    """Raise `error` (or None) here and, with several processes, on every rank."""
    if world > 1:
        distributed.raise_together(error)
    elif error is not None:
        raise error


def _create(tmp, header, size):
    """The cache file at `tmp`: its header, then zeros (sparse) up to `size` bytes."""
    with open(tmp, "xb") as f:
        f.write(header)
        f.truncate(size)


def _appears(tmp):
    """Whether `tmp` exists, waiting a little for a shared file system's caches to notice it."""
    deadline = time.monotonic() + SHARED_FILE_WAIT
    while not tmp.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class _Share:
    """One rank's contiguous rows of a cache file: where they start, how many are written, and
    the bytes of the first and last row, read back once every rank has written (`check`)."""

    def __init__(self, path, offset, row_bytes):
        self.path, self.offset, self.row_bytes = path, offset, row_bytes
        self.rows, self.first, self.last = 0, b"", b""

    def check(self):
        """None if the share's first and last rows on disk are what this rank wrote, else an
        OSError naming the file: a file system that wrote back a whole page over a
        neighbour's rows (an NFS client's read-modify-write) would show there."""
        if not self.rows:
            return None
        end = self.offset + self.rows * self.row_bytes
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            first = f.read(self.row_bytes)
            f.seek(end - self.row_bytes)
            last = f.read(self.row_bytes)
        if (first, last) == (self.first, self.last):
            return None
        return OSError(
            f"{self.path}: rows at bytes {self.offset} to {end} were changed after they were "
            "written (another process wrote over them): the cache folder's file system does not "
            "keep concurrent writes to one file apart; build the cache with one process or on a "
            "local disk ($CAPTIONING_CACHE)"
        )


def _write_share(share, failed, batches, row_shape, dtype):
    """Write `batches` of rows into the share's file from its offset on, counting `share.rows`."""
    pending, buffers, offset = None, [], share.offset
    # Write-only: a file opened for reading too lets an NFS client read a partly written page
    # and write all of it back, over the rows another rank wrote there meanwhile.
    with open(os.open(share.path, os.O_WRONLY), "wb", buffering=0) as f:  # unbuffered: errors
        for k, rows in enumerate(batches):  # are raised by the write that meets them
            rows = torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows
            if tuple(rows.shape[1:]) != tuple(row_shape) or rows.dtype != _torch_dtype(dtype):
                raise ValueError(f"{share.path}: rows {tuple(rows.shape)} {rows.dtype}, expected "
                                 f"(n, {', '.join(map(str, row_shape))}) {dtype}")  # fmt: skip
            staged = _stage(rows, buffers, k)  # the copy to the host starts, the GPU goes on
            if pending is not None:  # lag one: batch k - 1 is written while batch k computes
                offset = _write_at(f, offset, pending, share)
            pending = staged
            if failed.exists():  # another rank failed: stop, it is raising for all of us
                return
        if pending is not None:
            _write_at(f, offset, pending, share)


def _torch_dtype(dtype):
    """The torch dtype of a numpy dtype."""
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _stage(rows, buffers, k):
    """(host rows, event or None): start copying batch `k`'s `rows` to the host, not waiting."""
    if not _asynchronous(rows):
        return rows.cpu(), None
    # Two pinned buffers in turn: buffer k % 2 held batch k - 2, written by now.
    slot = k % 2
    if len(buffers) <= slot or len(buffers[slot]) < len(rows):
        buffers[slot : slot + 1] = [_pinned(rows.shape, rows.dtype)]
    host = buffers[slot][: len(rows)]
    host.copy_(rows, non_blocking=True)
    return host, _recorded_event()


def _asynchronous(rows):
    """Whether `rows` are copied to the host asynchronously (from CUDA)."""
    return rows.device.type == "cuda"


def _pinned(shape, dtype):
    """An empty page-locked host tensor (the device copies into it without the host waiting)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _recorded_event():
    """A CUDA event recorded on the current stream: done once the work queued so far is."""
    event = torch.cuda.Event()
    event.record()
    return event


def _write_at(f, offset, staged, share):
    """Write staged rows at byte `offset` of the raw file `f`, keeping the share's first and last
    row and count; the offset after them."""
    host, event = staged
    if event is not None:
        event.synchronize()  # its copy was queued one batch ago: normally long done
    data = memoryview(host.contiguous().numpy()).cast("B")
    if len(host):
        share.first = share.first or bytes(data[: share.row_bytes])
        share.last, share.rows = bytes(data[-share.row_bytes :]), share.rows + len(host)
    try:
        f.seek(offset)
        while data:  # a raw write may write less than it was given
            data = data[f.write(data) :]
    except OSError as e:  # a full disk, a lost mount: name the file (the error names none)
        raise OSError(e.errno, f"{share.path}: cannot write the cache: {e.strerror or e}") from e
    return f.tell()


def open_cache(path, shape, world=1, dtype=None):
    """The cache at `path` if it is complete and `shape`d, else None; with several processes,
    None unless every one of them finds it (they then build it together)."""
    rows = None
    if path.exists():
        try:
            rows = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # too short for its header: not a finished cache
            rows = None
        complete = rows is not None and rows.shape == tuple(shape)
        if complete and dtype is not None:
            complete = rows.dtype == np.dtype(dtype)
        if complete:
            complete = os.path.getsize(path) == rows.offset + rows.nbytes
        rows = rows if complete else None
    if world > 1 and distributed.any_rank(rows is None):
        rows = None
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
    features = open_cache(path, shape, world, np.float16)
    if features is not None:
        return features
    device = torch.device(device)

    def features(images):  # cast to the stored dtype on the device; `build_cache` copies it
        images = images.to(device, non_blocking=True)
        return encoder.backbone_features(images).float().to(torch.float16)

    batches_between = _batches_between(
        ImageDataset(split, transform), batch_size, num_workers, features, device.type == "cuda"
    )
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return build_cache(path, shape, np.float16, batches_between, batch_size,
                               f"caching {split.name} features", progress, rank, world)  # fmt: skip
    finally:
        encoder.train(was_training)


def _batches_between(dataset, batch_size, num_workers, convert, pin_memory=False):
    """`build_cache`'s `batches_between` over `dataset`: each batch of images, `convert`ed."""

    def batches_between(first, last):
        stop = min(last * batch_size, len(dataset))
        rows = torch.utils.data.Subset(dataset, range(first * batch_size, stop))
        loader = image_loader(rows, batch_size, num_workers, pin_memory)
        return (convert(images) for images, _ in loader)

    return batches_between


def cached_images(
    split, image_size, cache_dir=None, batch_size=64, num_workers=0, progress=True, rank=0, world=1,
    resize="crop", interpolation="bilinear",
):  # fmt: skip
    """(num_images, 3, image_size, image_size) uint8 memmap of `split`'s images, resized as
    `resize` and `interpolation` say, decoded on first use; `data_loader.pixels_to_input` makes
    model inputs of it.

    For a CNN trained on images without augmentation: each epoch then reads these rows instead
    of decoding and resizing every file again. `rank` and `world` as in `cached_features`.
    """
    transform = make_pixel_transform(image_size, resize, interpolation)
    path = (
        Path(cache_dir or default_cache_dir())
        / "images"
        / f"{cache_key(None, split, transform)}.npy"
    )
    shape = (len(split.image_ids), 3, image_size, image_size)
    pixels = open_cache(path, shape, world, np.uint8)
    if pixels is not None:
        return pixels
    batches_between = _batches_between(
        ImageDataset(split, transform), batch_size, num_workers, lambda images: images
    )
    return build_cache(path, shape, np.uint8, batches_between, batch_size,
                       f"caching {split.name} images", progress, rank, world)  # fmt: skip
