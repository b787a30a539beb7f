"""Precomputed image features, one file per image, in the layout the bottom-up features are
distributed in and ruotianluo/self-critical.pytorch's scripts write: `<image id>.npy`, a pooled
vector (feature_size,), or `<image id>.npz` with a `feat` array of regions (regions,
feature_size), their number varying from image to image.

A grid decoder reads regions with a mask channel last: (regions, feature_size + 1), 1 for a
region, 0 for padding. A batch pads every image's regions with zero rows to the most regions in
it (`stack_inputs`), so padding carries a 0 in that channel, and the decoders give it no weight.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SUFFIXES = (".npy", ".npz")


def read_feature_file(path):
    """A feature file's array as float32: (feature_size,) from .npy, (regions, feature_size)
    from .npz's `feat`; an error naming the file when it cannot be one."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle a downloaded file
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                data = data["feat"]
        array = np.asarray(data)
    except KeyError:
        raise ValueError(f"{path}: no 'feat' array (an .npz of regions holds one)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: feature file not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a feature file ({e})") from None
    if array.ndim != (1 if path.suffix == ".npy" else 2) or not np.issubdtype(
        array.dtype, np.number
    ):
        raise ValueError(
            f"{path}: features of shape {array.shape} and type {array.dtype}; an .npy holds one "
            "vector (feature_size,), an .npz's 'feat' the regions (regions, feature_size)"
        )
    return array.astype(np.float32)


def feature_path(folder, image_id):
    """The file of `image_id` in `folder`: <id>.npz or <id>.npy, whichever is there."""
    for suffix in SUFFIXES:
        path = Path(folder) / f"{image_id}{suffix}"
        if path.exists():
            return path
    return Path(folder) / f"{image_id}.npz"  # reading it says which file is missing


def folder_feature_size(folder):
    """The feature size of the first feature file in `folder` (by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: features folder not found")
    first = min((p for p in folder.iterdir() if p.suffix in SUFFIXES), default=None)
    if first is None:
        raise FileNotFoundError(f"{folder}: no feature files (<image id>.npy or .npz) in it")
    return read_feature_file(first).shape[-1]


def check_feature_files(folder, split, feature_size):
    """Raise unless every image of `split` has a feature file in `folder`, and its first one
    holds features of `feature_size`."""
    folder, ids = Path(folder), split.image_ids
    missing = [i for i in ids if not feature_path(folder, i).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no feature file for {len(missing)} of the {len(ids)} {split.name} "
            f"images, the first {missing[0]}.npy or {missing[0]}.npz"
        )
    if ids:
        path = feature_path(folder, ids[0])
        found = read_feature_file(path).shape[-1]
        if found != feature_size:
            raise ValueError(f"{path}: features of size {found}, the model's are {feature_size}")


class FeatureFiles:
    """The features of a split's images (`image_ids`) from their files in `folder`, read one at
    a time when indexed (in the loader's workers): pooled (feature_size,) vectors, a region
    file's mean; or, with `regions`, (regions, feature_size + 1) with the mask channel, a
    pooled file as one region. Pickles as the folder and ids only."""

    def __init__(self, folder, image_ids, regions):
        self.folder, self.image_ids, self.regions = str(folder), list(image_ids), regions

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        return model_input(feature_path(self.folder, self.image_ids[index]), self.regions)


def model_input(path, regions):
    """A feature file as a model reads it: a pooled vector (feature_size,), a region file's
    mean; or with `regions`, (regions, feature_size + 1) with the mask channel, a pooled file
    as one region."""
    array = read_feature_file(path)
    if not regions:
        return array if array.ndim == 1 else array.mean(axis=0)
    array = array.reshape(-1, array.shape[-1])  # (regions, feature_size): a vector, one region
    return np.concatenate([array, np.ones((len(array), 1), np.float32)], axis=1)


def stack_inputs(inputs):
    """One batch tensor of per-image inputs; regions of varying number padded with zero rows
    (their mask channel 0) to the most in the batch: (batch, regions, feature_size + 1)."""
    inputs = list(inputs)
    if len({tuple(x.shape) for x in inputs}) == 1:
        return torch.stack(inputs)
    most = max(len(x) for x in inputs)
    return torch.stack([nn.functional.pad(x, (0, 0, 0, most - len(x))) for x in inputs])


def split_mask(grid):
    """(grid (batch, positions, feature_size), mask (batch, positions), True for a region) of
    region features with their mask channel last."""
    return grid[..., :-1], grid[..., -1] > 0


class PrecomputedFeatures(nn.Module):
    """Where the CNN would be in a model that reads precomputed features: their size for the
    decoder, no weights, and no way to see an image."""

    def __init__(self, feature_size):
        super().__init__()
        self.out_features, self.blocks = feature_size, []

    def feature_map(self, images):
        raise ValueError(
            "this model reads precomputed features (TrainConfig.features_dir), not images: "
            "give it the features of an image"
        )

    forward = feature_map
