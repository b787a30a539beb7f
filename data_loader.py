"""`get_loader`, called as in the Udacity CVND project, over the datasets of captioning/data/."""

import torch
import torch.utils.data as data

from captioning.data.annotations import read_split
from captioning.data.loading import (
    CaptionDataset,
    ImageDataset,
    load_or_build_vocab,
    make_caption_loader,
    make_transform,
    resolve_num_workers,
)
from captioning.demo.dataset import resolve_data_dir

__all__ = ["get_loader", "make_transform"]


def get_loader(
    transform,
    mode="train",
    batch_size=1,
    vocab_threshold=None,
    vocab_file="./vocab.json",
    start_word="<start>",
    end_word="<end>",
    unk_word="<unk>",
    vocab_from_file=True,
    num_workers=0,
    cocoapi_loc=None,
    data_dir=None,
    split=None,
    layout="auto",
    shuffle=True,
    seed=0,
    features=None,
    num_replicas=1,
    rank=0,
    drop_last=False,
):
    """DataLoader over `data_dir` (default: the demo dataset), called as in the CVND project.

    mode='train': batches of (images, captions) whose captions share one length, every
    caption once per epoch (`features` replaces images with cached CNN features).
    mode='val': (images, image_ids) per image. mode='test': (original image, image).
    `split` defaults to the mode's own split; `cocoapi_loc` is accepted and ignored.
    """
    if mode not in ("train", "val", "test"):
        raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
    data_dir = resolve_data_dir(data_dir)
    split_data = read_split(data_dir, split or mode, layout)
    if mode == "train":
        tokens = split_data.tokenized()
        train_split = split_data if split_data.name == "train" else None
        vocab = load_or_build_vocab(
            data_dir,
            vocab_file,
            vocab_threshold,
            vocab_from_file or split_data.name != "train",
            start_word,
            end_word,
            unk_word,
            layout,
            train_split,
            tokens if train_split else None,
        )
        dataset = CaptionDataset(split_data, vocab, transform, features, tokens)
        return make_caption_loader(
            dataset, batch_size, shuffle, seed, num_workers, num_replicas, rank, drop_last
        )
    vocab = load_or_build_vocab(
        data_dir, vocab_file, vocab_threshold, True, start_word, end_word, unk_word, layout
    )
    dataset = ImageDataset(split_data, transform, with_original=(mode == "test"))
    dataset.vocab = vocab
    num_workers = resolve_num_workers(num_workers)
    return data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
