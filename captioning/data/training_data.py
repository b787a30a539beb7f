"""The data one training run reads: image inputs (cached or not), training and validation loaders."""

import numpy as np
import torch

from captioning.data.annotations import TokenizedCaptions
from captioning.data.loading import (
    CaptionDataset,
    ImageCaptionsDataset,
    ImageDataset,
    ZeroRows,
    inputs_collate,
    make_caption_loader,
    make_image_captions_loader,
    preprocessing,
    preprocessing_transform,
    resolve_num_workers,
)
from captioning.data.feature_cache import cached_features, cached_images
from captioning.data.feature_files import FeatureFiles


def to_device(tensors, device):
    """`tensors` on `device` (copied non-blocking), floating ones cast to float32 there."""
    # Cached features travel as float16 and are widened on the device, not in the workers.
    moved = [t.to(device, non_blocking=True) for t in tensors]
    return [t.float() if t.is_floating_point() else t for t in moved]


def cut_captions(tokens, max_words):
    """(`tokens` with each caption cut to its first `max_words` words, how many were longer)."""
    lengths = tokens.lengths()
    kept = np.minimum(lengths, max_words)
    offsets = np.concatenate(([0], np.cumsum(kept)))
    # Kept token k of caption i sits at offsets[i] + k; in `tokens`, at tokens.offsets[i] + k.
    positions = np.repeat(tokens.offsets[:-1] - offsets[:-1], kept) + np.arange(offsets[-1])
    cut = TokenizedCaptions(tokens.words, tokens.ids[positions], offsets)
    return cut, int((lengths > max_words).sum())


def image_inputs(config, encoder, splits, rank, world, device):
    """Per split, {"features": ...} or {"pixels": ...} that replace reading image files, or {}."""
    if config.features_dir is not None:  # precomputed: read from their files, per image
        regions = encoder.grid  # the grid decoders read regions with their mask channel
        return [
            {"features": FeatureFiles(config.features_dir, s.image_ids, regions)} for s in splits
        ]
    if config.blind:
        # A blind model sees zero features whatever it is given (`CaptionModel.encode`), so its
        # data is zeros too: no image is read and no CNN runs.
        shape = (1, encoder.feature_size) if encoder.grid else (encoder.feature_size,)
        return [{"features": ZeroRows(len(s.image_ids), shape)} for s in splits]
    options = dict(
        batch_size=config.batch_size, num_workers=config.num_workers, progress=config.progress
    )
    # Every process computes its share of a missing cache (feature_cache.build_cache).
    options.update(rank=rank, world=world)
    record = preprocessing(config)  # its backbone's mean, std and interpolation
    if encoder.frozen:
        transform = preprocessing_transform(record)
        caches = [cached_features(encoder, s, transform, device=device, **options) for s in splits]
        return [{"features": c} for c in caches]
    if config.cache_images:
        size, resize, interpolation = config.image_size, config.resize, record["interpolation"]
        caches = [
            cached_images(s, size, resize=resize, interpolation=interpolation, **options)
            for s in splits
        ]
        return [{"pixels": c} for c in caches]
    return [{} for _ in splits]


class IndexedImages(torch.utils.data.Dataset):
    """(image input, image index) for every image of a `CaptionDataset` that has captions."""

    def __init__(self, captions):
        self.captions = captions
        self.images = np.unique(captions.split.caption_image)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = int(self.images[index])
        return self.captions.image_input(image), image


def make_image_loader(captions, config, num_replicas=1, rank=0):
    """Batches of `config.batch_size` training images with their indices, shuffled per epoch."""
    dataset = IndexedImages(captions)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas, rank, shuffle=True, seed=config.seed
    )
    workers = resolve_num_workers(config.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(config.seed), collate_fn=inputs_collate,
    )  # fmt: skip


class TrainingData:
    """The loaders one run needs: training, validation loss, and validation images to caption
    (`val_images`: this rank's contiguous share of the scored images; `val_references` hold
    every scored image's references)."""

    def __init__(self, config, model, vocab, train_split, val_split, rank, world, device):
        self.train_split, self.val_split = train_split, val_split
        train_inputs, val_inputs = image_inputs(
            config, model.encoder, (train_split, val_split), rank, world, device
        )
        record = preprocessing(config)  # its backbone's mean, std and interpolation
        train_transform = preprocessing_transform(record, train=config.augment)
        transform = preprocessing_transform(record)
        self.grouped, self.seed = config.batch_by == "image", config.seed
        sharding = dict(num_replicas=world, rank=rank)
        # With cut_captions, no caption is longer than decoding can give (`<end>` is added to the
        # words kept); the validation loss scores the same task. `train` prints the count.
        train_tokens, val_tokens = train_split.tokenized(), val_split.tokenized()
        self.captions_cut = None
        if config.cut_captions:
            words = config.max_caption_len - 2
            (train_tokens, cut), (val_tokens, _) = (
                cut_captions(t, words) for t in (train_tokens, val_tokens)
            )
            self.captions_cut = (cut, len(train_tokens))
        train_captions = CaptionDataset(
            train_split, vocab, train_transform, tokens=train_tokens, **train_inputs
        )
        self.train_captions = train_captions
        self.train = self.make_loader(
            config, train_captions, True, config.captions_per_image, **sharding
        )
        # The self-critical stage reads images (each with its index, for its references).
        self.images = None
        if config.scst_epochs:
            self.images = make_image_loader(train_captions, config, **sharding)
        self.val = self.make_loader(
            config,
            CaptionDataset(val_split, vocab, transform, tokens=val_tokens, **val_inputs),
            False,
            None,
            **sharding,
        )
        n_val = len(val_split.image_ids)
        n_val = n_val if config.val_images is None else min(config.val_images, n_val)
        # Every rank captions its share; rank 0 scores them all (`train.validation_cider`).
        share = range(rank * n_val // world, (rank + 1) * n_val // world)
        self.val_images = self.val_image_loader(config, val_split, transform, val_inputs, share)
        scored_ids = set(val_split.image_ids[:n_val])
        self.val_references = {i: r for i, r in val_split.references().items() if i in scored_ids}

    def make_loader(self, config, captions, shuffle, captions_per_image, num_replicas, rank):
        """Batches of images with their captions (batch_by=image) or of equal-length captions."""
        common = dict(
            shuffle=shuffle, seed=config.seed, num_workers=config.num_workers,
            num_replicas=num_replicas, rank=rank,
        )  # fmt: skip
        if self.grouped:
            dataset = ImageCaptionsDataset(captions, captions_per_image, config.seed)
            return make_image_captions_loader(dataset, config.batch_size, **common)
        return make_caption_loader(captions, config.batch_size, **common)

    @staticmethod
    def val_image_loader(config, split, transform, inputs, indices):
        """(image inputs, image ids) of the validation images at `indices`, for CIDEr; cached
        features stay in their memory map and stored dtype (cast per batch on the device)."""
        images = ImageDataset(split, transform, **inputs)
        images = torch.utils.data.Subset(images, indices)
        workers = resolve_num_workers(config.num_workers)
        return torch.utils.data.DataLoader(
            images, batch_size=config.batch_size, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            collate_fn=inputs_collate,
        )  # fmt: skip

    def start_epoch(self, epoch):
        """Reshuffle (and redraw caption subsets) for `epoch`, the same way on a resume."""
        if self.grouped:
            self.train.sampler.set_epoch(epoch)
            self.train.dataset.set_epoch(epoch)
        else:
            self.train.batch_sampler.set_epoch(epoch)
            self.train_captions.set_epoch(epoch, self.seed)  # reseeds the workers' augmentation
        self.train.generator.manual_seed(self.seed * 100003 + epoch)
        if self.images is not None:
            self.images.sampler.set_epoch(epoch)
