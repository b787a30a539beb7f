"""Datasets, transforms and loaders for captioning data, on any layout `annotations` reads
(the CVND call `get_loader` is the top-level data_loader.py, built on these)."""

import functools
import mmap
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as data
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from captioning.command import progress_disabled
from captioning.data.annotations import TokenizedCaptions, read_split
from captioning.data.feature_files import stack_inputs
from captioning.data.length_bucket_sampler import LengthBucketSampler
from captioning.data.vocabulary import Vocabulary
from captioning.errors import ImageLoadError
from captioning.timm_models import timm_data_config, timm_model_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_num_workers():
    """Loader processes per training process: its CPUs over LOCAL_WORLD_SIZE, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cpus or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_num_workers(num_workers):
    """`num_workers`, or `default_num_workers()` when it is None."""
    return default_num_workers() if num_workers is None else num_workers


class MappedRows:
    """Rows of an array file, memory-mapped on first use in each process; pickles as its path."""

    # Loader workers (spawn, forkserver) then open the map themselves: a pickled np.memmap
    # would carry the whole cache (gigabytes) to every worker, every epoch.

    def __init__(self, path, shape, dtype, offset=0, order="C"):
        self.path, self.shape, self.dtype = str(path), tuple(shape), np.dtype(dtype)
        self.offset, self.order = offset, order
        self._rows = None  # the map, opened in this process

    def rows(self):
        """The memory map (read-only), opened on first use."""
        if self._rows is None:
            self._rows = np.memmap(self.path, self.dtype, "r", self.offset, self.shape, self.order)
        return self._rows

    def __getstate__(self):
        return {**self.__dict__, "_rows": None}

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return self.rows()[index]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.rows(), dtype)


class ZeroRows:
    """`n` rows of zeros, made when read (a blind model's features): nothing to pickle."""

    def __init__(self, n, shape, dtype=np.float16):
        self.shape, self.dtype = (n, *shape), np.dtype(dtype)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return np.zeros(np.broadcast_to(np.int8(0), self.shape)[index].shape, self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.zeros(self.shape, dtype or self.dtype)


def mapped_rows(rows):
    """`rows` as a `MappedRows` when it is a whole memory-mapped file, else unchanged."""
    if isinstance(rows, np.memmap) and isinstance(rows.base, mmap.mmap) and rows.filename:
        order = "F" if rows.flags.f_contiguous and not rows.flags.c_contiguous else "C"
        return MappedRows(rows.filename, rows.shape, rows.dtype, rows.offset, order)
    return rows


class SharedEpoch:
    """An epoch number (and seed) in shared memory: loader workers see it change."""

    # Persistent workers keep the copy of the dataset they started with: a plain attribute set
    # later in the main process would never reach them.

    def __init__(self, seed=0):
        self.values = torch.tensor([0, seed], dtype=torch.int64).share_memory_()  # epoch, seed
        self._seeded = None  # the epoch this worker last seeded its generators for

    def __getstate__(self):
        return {**self.__dict__, "_seeded": None}

    def set(self, epoch, seed=None):
        """Make `epoch` (and `seed`) current, in every worker too."""
        self.values[0] = epoch
        if seed is not None:
            self.values[1] = seed

    def get(self):
        """The current epoch."""
        return int(self.values[0])

    def seed_worker(self):
        """In a loader worker, seed its generators from (seed, epoch, worker) once per epoch."""
        worker = data.get_worker_info()
        epoch = self.get()
        if worker is None or self._seeded == epoch:
            return
        # Persistent workers are seeded once by the DataLoader; seeded per epoch here, random
        # augmentation depends on the epoch only, so a resumed run draws what an unbroken one does.
        self._seeded = epoch
        entropy = [int(self.values[1]), epoch, worker.id]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)


def load_image(path, source=None):
    """The image at `path` as 8-bit RGB (grayscale, CMYK, RGBA and 16-bit inputs converted),
    turned upright by its EXIF orientation tag."""
    named_by = f" (named by {source})" if source else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                # Phones store portraits sideways with a rotation tag; training images too.
                ImageOps.exif_transpose(im, in_place=True)
                return to_rgb(im)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file not found{named_by}") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise ImageLoadError(f"{path}: cannot read image{named_by}: {e}") from None


def to_rgb(im):
    """8-bit RGB copy of a PIL image; transparency is composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / scale * 255.0, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


RESIZE_MODES = ("crop", "full")
# torchvision's Resize default, what every model was fed before records named the interpolation.
DEFAULT_INTERPOLATION = "bilinear"


def resize_steps(image_size, resize="crop", train=False, interpolation=DEFAULT_INTERPOLATION):
    """crop: shorter side to `image_size`, centre crop (random crop when training); full: the
    whole image to `image_size` x `image_size`, aspect not kept; flipped at random when training.
    Resampled by `interpolation` ("bilinear", "bicubic", "nearest"; antialiased)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize: {resize!r} is not one of {RESIZE_MODES}")
    mode = transforms.InterpolationMode(interpolation)
    if resize == "full":
        steps = [transforms.Resize((image_size, image_size), mode)]
    else:
        crop = transforms.RandomCrop if train else transforms.CenterCrop
        steps = [transforms.Resize(image_size, mode), crop(image_size)]
    return steps + [transforms.RandomHorizontalFlip()] * train


def make_pixel_transform(image_size=224, resize="crop", interpolation=DEFAULT_INTERPOLATION):
    """Resize (`resize_steps`) to uint8 pixels (3, H, W): what the image cache stores."""
    steps = resize_steps(image_size, resize, interpolation=interpolation)
    return transforms.Compose([*steps, transforms.PILToTensor()])


def pixels_to_input(pixels, transform=None):
    """Cached uint8 pixels (3, H, W) -> the model's input, bit for bit what `transform` (a
    `make_transform` of the pixels' size, resize and interpolation) gives: normalised by its
    Normalize step (without `transform`, ImageNet's mean and std)."""
    steps = getattr(transform, "transforms", ())
    norm = next((s for s in steps if isinstance(s, transforms.Normalize)), None)
    mean, std = (norm.mean, norm.std) if norm else (IMAGENET_MEAN, IMAGENET_STD)
    scaled = torch.from_numpy(np.array(pixels)).float().div(255)  # as ToTensor scales
    return transforms.functional.normalize(scaled, mean, std)


def make_transform(image_size=224, train=False, normalize=True, resize="crop", mean=None, std=None,
                   interpolation=DEFAULT_INTERPOLATION):  # fmt: skip
    """Resize (`resize_steps`) to a tensor, normalised by `mean` and `std` (default ImageNet's)."""
    steps = [*resize_steps(image_size, resize, train, interpolation), transforms.ToTensor()]
    if normalize:
        # Tuples whatever is given: the transform's repr keys the feature cache.
        mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def preprocessing(config):
    """What a model's images go through, from its `TrainConfig` (plain data: saved in checkpoints):
    ImageNet's mean and std, bilinear resizing; for a timm backbone, what its weights were
    trained with (`timm_models.timm_data_config`)."""
    record = {
        "image_size": config.image_size, "resize": config.resize,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "interpolation": DEFAULT_INTERPOLATION,
        "backbone": config.backbone, "grid_size": config.grid_size,
    }  # fmt: skip
    if timm_model_name(config.backbone) is not None:
        timm = timm_data_config(config.backbone)
        record.update(mean=list(timm["mean"]), std=list(timm["std"]),
                      interpolation=timm["interpolation"])  # fmt: skip
    return record


def preprocessing_transform(record, train=False):
    """The transform of a `preprocessing` record (`train`: with random crop and flip), as
    `preprocessing` makes it or `checkpoint.checkpoint_preprocessing` reads it."""
    return make_transform(
        record["image_size"], train, resize=record["resize"], mean=record["mean"],
        std=record["std"], interpolation=record["interpolation"],
    )  # fmt: skip


class CaptionDataset(data.Dataset):
    """One item per caption: (image tensor or cached image feature, caption ids).

    `features` (cached CNN features) or `pixels` (cached decoded images, uint8, one row per
    image of `split`) replace reading and transforming the image files.
    """

    def __init__(self, split, vocab, transform=None, features=None, tokens=None, pixels=None):
        self.split, self.vocab, self.transform = split, vocab, transform
        # Loader workers get the caches' paths, never their contents.
        self.features, self.pixels = mapped_rows(features), mapped_rows(pixels)
        self.shared_epoch = SharedEpoch()  # seeds the random transform in workers (`set_epoch`)
        tokens = split.tokenized() if tokens is None else tokens
        if not isinstance(tokens, TokenizedCaptions):
            tokens = TokenizedCaptions.from_lists(tokens)
        # Encoded all at once: each distinct word is looked up once, not once per use.
        lookup = np.array([vocab(w) for w in tokens.words] or [0], dtype=np.int64)
        self.token_ids, self.offsets = lookup[tokens.ids], tokens.offsets  # flat, as in `tokens`
        self.caption_lengths = tokens.lengths().tolist()  # words per caption, as in CVND
        self.sampler = None

    def __len__(self):
        return len(self.caption_lengths)

    def set_epoch(self, epoch, seed=0):
        """Seed the loader workers' random transform from (`seed`, `epoch`) (persistent ones too)."""
        self.shared_epoch.set(epoch, seed)

    def image_input(self, image_index):
        """Transformed image (or its cached feature) number `image_index` of the split."""
        if self.features is not None:
            # In the stored dtype (float16): cast on the device (`training_data.to_device`).
            return torch.from_numpy(np.array(self.features[image_index]))
        if self.pixels is not None:
            return pixels_to_input(self.pixels[image_index], self.transform)
        image = load_image(
            self.split.image_paths[image_index], self.split.describe_image(image_index)
        )
        self.shared_epoch.seed_worker()
        return self.transform(image) if self.transform else image

    def caption_ids(self, index):
        """Caption `index` as a tensor of ids, `<start>` ... `<end>`."""
        words = self.token_ids[self.offsets[index] : self.offsets[index + 1]]
        return torch.from_numpy(np.concatenate(([self.vocab.start_id], words, [self.vocab.end_id])))

    def __getitem__(self, index):
        return self.image_input(int(self.split.caption_image[index])), self.caption_ids(index)

    def get_train_indices(self, batch_size=None):
        """Indices of one random batch of equal caption length (the CVND call), from the buckets."""
        sampler = self.sampler or LengthBucketSampler(self.caption_lengths, batch_size or 1)
        return sampler.sample_batch()


class ImageCaptionsDataset(data.Dataset):
    """One item per image: (image tensor or cached feature, the ids of all its captions).

    Batches of these run the CNN once per image for all of its captions, and hold images in
    random order whatever their captions' lengths (batch norm then sees a fair sample).
    """

    def __init__(self, captions, captions_per_image=None, seed=0):
        self.captions = captions  # a CaptionDataset
        owners = np.asarray(captions.split.caption_image)
        order = np.argsort(owners, kind="stable")
        bounds = np.searchsorted(owners[order], np.arange(len(captions.split.image_ids) + 1))
        groups = np.split(order, bounds[1:-1])
        self.images = [i for i, group in enumerate(groups) if len(group)]
        self.groups = [groups[i] for i in self.images]
        self.vocab = captions.vocab
        self.captions_per_image, self.seed = captions_per_image, seed
        self.shared_epoch = SharedEpoch(seed)  # workers see `set_epoch`, persistent ones too

    @property
    def epoch(self):
        """The epoch whose subsets of captions `__getitem__` draws."""
        return self.shared_epoch.get()

    def set_epoch(self, epoch):
        """Draw another subset of captions per image, and reseed the workers' random transform."""
        self.shared_epoch.set(epoch)
        self.captions.set_epoch(epoch, self.seed)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        group = self.groups[index]
        if self.captions_per_image is not None and len(group) > self.captions_per_image:
            # Seeded by (seed, epoch, image): the same subset in every worker and after a resume.
            rng = np.random.default_rng((self.seed, self.epoch, index))
            group = np.sort(rng.choice(group, self.captions_per_image, replace=False))
        return (
            self.captions.image_input(self.images[index]),
            [self.captions.caption_ids(i) for i in group],
        )


class ImageDataset(data.Dataset):
    """One item per image: (image tensor, image id), or (original, transformed) in test mode.

    With `pixels` (the image cache of `split`) the tensors come from there, not the files; with
    `features` (the feature cache) the items are (cached features in their stored dtype, id).
    """

    def __init__(self, split, transform=None, with_original=False, pixels=None, features=None):
        self.split, self.transform, self.with_original = split, transform, with_original
        # Workers get the caches' paths, not their contents.
        self.pixels, self.features = mapped_rows(pixels), mapped_rows(features)

    def __len__(self):
        return len(self.split.image_ids)

    def __getitem__(self, index):
        if self.features is not None and not self.with_original:
            # Cast on the device (`training_data.to_device`), not here.
            return torch.from_numpy(np.array(self.features[index])), self.split.image_ids[index]
        if self.pixels is not None and not self.with_original:
            return pixels_to_input(self.pixels[index], self.transform), self.split.image_ids[index]
        image = load_image(self.split.image_paths[index], self.split.describe_image(index))
        tensor = self.transform(image) if self.transform else image
        if self.with_original:
            return np.array(image), tensor
        return tensor, self.split.image_ids[index]


class _ImageCheck(data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split.image_paths)

    def __getitem__(self, index):
        try:
            load_image(self.split.image_paths[index], self.split.describe_image(index))
            return ""
        except ImageLoadError as e:
            return str(e)


def find_unreadable_images(split, num_workers=0, progress=True):
    """{image index: error message} for every image of `split` that cannot be loaded."""
    from tqdm.auto import tqdm

    loader = data.DataLoader(
        _ImageCheck(split),
        batch_size=64,
        num_workers=resolve_num_workers(num_workers),
        collate_fn=list,
    )
    errors, start = {}, 0
    for messages in tqdm(
        loader,
        desc=f"checking {split.name} images",
        unit="batch",
        disable=progress_disabled(progress),
    ):
        errors.update((start + k, m) for k, m in enumerate(messages) if m)
        start += len(messages)
    return errors


def pad_collate(batch, pad_id=3):
    """Stack images (`stack_inputs`) and right-pad captions with `pad_id` to the longest."""
    images, captions = zip(*batch)
    captions = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True, padding_value=pad_id)
    return stack_inputs(images), captions  # captions: (batch, max_len)


def inputs_collate(batch):
    """Per-image inputs stacked (`stack_inputs`: regions padded) and their ids as a tensor."""
    inputs, ids = zip(*batch)
    return stack_inputs(inputs), torch.as_tensor(ids)


def image_captions_collate(batch, pad_id=3):
    """Images, all their captions right-padded with `pad_id`, and the image of each caption."""
    images, groups = zip(*batch)
    sizes = torch.tensor([len(g) for g in groups])
    owners = torch.repeat_interleave(torch.arange(len(groups)), sizes)  # (captions,)
    captions = torch.nn.utils.rnn.pad_sequence(
        [c for g in groups for c in g], batch_first=True, padding_value=pad_id
    )  # (captions, max_len)
    return stack_inputs(images), captions, owners


def make_image_captions_loader(
    dataset, batch_size, shuffle=True, seed=0, num_workers=0, num_replicas=1, rank=0
):
    """DataLoader of `batch_size` images with all their captions over an `ImageCaptionsDataset`."""
    # DistributedSampler also serves one process: a seeded shuffle per epoch (set_epoch).
    sampler = data.DistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
    num_workers = resolve_num_workers(num_workers)
    return data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(image_captions_collate, pad_id=dataset.vocab.pad_id),
        generator=torch.Generator().manual_seed(seed),
    )


def make_caption_loader(
    dataset,
    batch_size,
    shuffle=True,
    seed=0,
    num_workers=0,
    num_replicas=1,
    rank=0,
    drop_last=False,
):
    """DataLoader of equal-length caption batches over a `CaptionDataset`."""
    dataset.sampler = LengthBucketSampler(
        dataset.caption_lengths, batch_size, shuffle, seed, drop_last, num_replicas, rank
    )
    num_workers = resolve_num_workers(num_workers)
    # Its own generator: making an iterator must not draw from the global RNG (resumability).
    return data.DataLoader(
        dataset,
        batch_sampler=dataset.sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=functools.partial(pad_collate, pad_id=dataset.vocab.pad_id),
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def load_or_build_vocab(
    data_dir=None,
    vocab_file="./vocab.json",
    vocab_threshold=None,
    vocab_from_file=True,
    start_word="<start>",
    end_word="<end>",
    unk_word="<unk>",
    layout="auto",
    train_split=None,
    tokens=None,
):
    """The vocabulary in `vocab_file`, or one built from the training captions and saved there."""
    if vocab_from_file and vocab_file and Path(vocab_file).exists():
        return Vocabulary.load(vocab_file)
    if train_split is None:
        if data_dir is None:
            raise ValueError("load_or_build_vocab: give data_dir or train_split to build from")
        train_split = read_split(Path(data_dir), "train", layout)
    tokens = train_split.tokenized() if tokens is None else tokens
    threshold = 5 if vocab_threshold is None else vocab_threshold
    return Vocabulary(
        threshold, vocab_file, start_word, end_word, unk_word, captions=tokens,
        strip_punctuation=train_split.strip_punctuation,
    )  # fmt: skip
