"""On-disk cache of frozen-CNN image features (float16, memory-mapped), one file per image set."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from annotations import default_cache_dir
from data_loader import ImageDataset


def encoder_fingerprint(encoder):
    """Hash of the backbone's weights and architecture: a changed CNN never reuses a cache."""
    digest = hashlib.sha1(type(encoder.backbone).__name__.encode())
    for name, tensor in encoder.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(encoder, split, transform):
    """Key of one (CNN weights, image list, transform) combination."""
    text = json.dumps([encoder_fingerprint(encoder), [str(p) for p in split.image_paths],
                       repr(transform)])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cached_features(encoder, split, transform, cache_dir=None, batch_size=64, num_workers=0,
                    device="cpu", progress=True, write=True):
    """(num_images, feature_size) float16 memmap of `split`'s images, computed on first use.

    With `write=False` (distributed ranks other than 0) the cache must already exist.
    """
    path = Path(cache_dir or default_cache_dir()) / "features" / f"{cache_key(encoder, split, transform)}.npy"
    if path.exists():
        features = np.load(path, mmap_mode="r")
        if features.shape == (len(split.image_ids), encoder.feature_size):
            return features
    if not write:
        raise FileNotFoundError(f"{path}: feature cache missing (rank 0 writes it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                    shape=(len(split.image_ids), encoder.feature_size))
    loader = torch.utils.data.DataLoader(ImageDataset(split, transform), batch_size=batch_size,
                                         num_workers=num_workers)
    was_training = encoder.training
    encoder.eval()
    start = 0
    try:
        with torch.no_grad():
            for images, _ in tqdm(loader, desc=f"caching {split.name} features", unit="batch",
                                  disable=not progress):
                feats = encoder.extract(images.to(device)).float().cpu().numpy()
                out[start:start + len(feats)] = feats
                start += len(feats)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        encoder.train(was_training)
    return np.load(path, mmap_mode="r")
