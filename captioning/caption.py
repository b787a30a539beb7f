"""Caption your own images with a trained checkpoint (greedy, beam search, diverse beam search
or sampling); CLI on top."""

import argparse
import sys
import warnings
from pathlib import Path

import torch

from captioning.command import add_debug_flag, command
from captioning.decoding import DecodingOptions
from captioning.distributed import resolve_device
from captioning.errors import ImageLoadError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(inputs):
    """Image files named in `inputs`, folders expanded (sorted, non-recursive)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    return files


def image_batches(paths, preprocessing, batch_size, device, unreadable=None):
    """(paths, model inputs) in chunks of `batch_size` images, made as the `preprocessing` record
    (`model.preprocessing` of a loaded checkpoint) says. An image that cannot be read raises;
    with an `unreadable` dict, it is left out and its error kept there, by path."""
    from captioning.data.loading import load_image, preprocessing_transform
    from captioning.errors import ImageLoadError

    transform = preprocessing_transform(preprocessing)
    for start in range(0, len(paths), batch_size):
        chunk, inputs = [], []
        for path in paths[start : start + batch_size]:
            try:
                inputs.append(transform(load_image(path)))
                chunk.append(path)
            except ImageLoadError as error:
                if unreadable is None:
                    raise
                unreadable[str(path)] = error
        if chunk:
            yield chunk, torch.stack(inputs).to(device)


def feature_batches(inputs, features_dir, regions, batch_size, device):
    """(inputs, model inputs) in chunks of `batch_size` for a model of precomputed features:
    each input an image id, read from `features_dir`, or a feature file (.npy, .npz)."""
    from captioning.data.feature_files import SUFFIXES, feature_path, model_input, stack_inputs

    def path_of(item):
        given = Path(str(item))
        return given if given.suffix in SUFFIXES else feature_path(features_dir, item)

    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        arrays = [torch.from_numpy(model_input(path_of(i), regions)) for i in chunk]
        yield chunk, stack_inputs(arrays).to(device)


def model_batches(model, config, inputs, batch_size, device, unreadable=None):
    """(inputs, what the decoder reads) in chunks: the encoded images, or the precomputed
    features of image ids (config.features_dir)."""
    from captioning.checkpoint import GRID_DECODERS

    if config.features_dir is not None:
        regions = config.decoder in GRID_DECODERS
        for chunk, x in feature_batches(inputs, config.features_dir, regions, batch_size, device):
            yield chunk, model.encode(x, cached=True)
        return
    for chunk, images in image_batches(inputs, model.preprocessing, batch_size, device, unreadable):
        yield chunk, model.encode(images)  # (batch, embed) or a grid; zeros seen if blind


@torch.no_grad()
def caption_images(checkpoint, paths, beam_size=1, max_len=None, batch_size=32, device=None,
                   length_penalty=None, options=None, unreadable=None):  # fmt: skip
    """{path: caption} for image files, using the model saved in `checkpoint`, or
    {path: [captions]} when `options` (`decoding.DecodingOptions`, None: the defaults) are
    `listed` (samples, groups); `max_len`, `length_penalty` (None): the checkpoint's
    config's. For a model of precomputed features, `paths` are image ids (their files in its
    features_dir) or feature files. An unreadable image raises, or with an `unreadable` dict is
    left out, its error kept there. Warns, as `evaluate` does, when most of two or more
    images get the same (first) caption."""
    from captioning.checkpoint import load_trained
    from captioning.decoding import decode_captions, per_image
    from captioning.evaluation.caption_health import describe_same_caption, measure_health

    device = resolve_device(device or "auto")
    model, vocab, config = load_trained(checkpoint, device)
    options = options or DecodingOptions()
    captions = {}
    for chunk, features in model_batches(model, config, paths, batch_size, device, unreadable):
        _, texts = decode_captions(
            model.decoder, features, vocab, beam_size,
            config.max_caption_len if max_len is None else max_len,
            config.choose_length_penalty(length_penalty), options,
        )  # fmt: skip
        captions.update(zip(map(str, chunk), per_image(texts, options)))
    # One image always shares its caption with itself: nothing to tell from it.
    if len(captions) > 1:
        first = {path: texts[0] if options.listed else texts for path, texts in captions.items()}
        same_caption = describe_same_caption(measure_health(first), config)
        if same_caption:
            warnings.warn(same_caption, stacklevel=2)
    return captions


@torch.no_grad()
def attention_maps(checkpoint, paths, beam_size=1, max_len=None, batch_size=32, device=None,
                   length_penalty=None, options=None, layer=None, head=None):  # fmt: skip
    """{path: (words, weights (words, positions))}: each generated word of an attention or
    transformer model's caption, `<end>` included, and where it looked (a transformer: the
    cross-attention of decoder layer `layer`, None: the last, from its head `head`, None: averaged
    over the heads); `options`, `max_len` and `length_penalty` as for `caption_images`, but one
    caption per image, searched: no samples, no groups."""
    from captioning.checkpoint import GRID_DECODERS, load_trained
    from captioning.decoding import decode_ids, vocab_options

    options = options or DecodingOptions()
    if options.listed:
        raise ValueError("attention maps follow one searched caption per image: no samples, "
                         "no groups")  # fmt: skip

    device = resolve_device(device or "auto")
    model, vocab, config = load_trained(checkpoint, device, decoder=GRID_DECODERS)
    if (layer, head) != (None, None):
        if config.decoder != "transformer":
            raise ValueError(f"layer={layer}, head={head}: only a transformer has layers and heads")
        if layer is not None:
            model.decoder.attention_layer = layer
        model.decoder.attention_head = head
    max_len = config.max_caption_len if max_len is None else max_len
    length_penalty = config.choose_length_penalty(length_penalty)
    options = vocab_options(options, vocab)
    maps = {}
    for chunk, grids in model_batches(model, config, paths, batch_size, device):
        ids, weights = decode_ids(model.decoder, grids, beam_size, max_len, length_penalty,
                                  vocab.pad_id, options, with_attention=True)  # fmt: skip
        for path, row, row_weights in zip(chunk, ids.tolist(), weights.cpu()):
            words = [vocab.idx2word[i] for i in row[1:]]
            words = words[: words.index(vocab.end_word) + 1] if vocab.end_word in words else words
            maps[str(path)] = (words, row_weights[: len(words)])
    return maps


def caption_upload(checkpoint, data, name="upload.png", beam_size=1, device=None, options=None):
    """(caption, figure) for the bytes of an uploaded image file: its caption, and a figure of
    the image with it (a grid decoder: each word's attention map), as `caption_images` and
    `attention_maps` make them. EXIF rotation is applied, as for files."""
    import tempfile

    from captioning.checkpoint import GRID_DECODERS, load_checkpoint
    from captioning.data.loading import load_image
    from captioning.plots import plot_attention, plot_captioned_images

    with tempfile.TemporaryDirectory(prefix="captioning-upload-") as folder:
        path = Path(folder) / Path(name).name  # the suffix tells the format; no folder parts
        path.write_bytes(bytes(data))
        image = load_image(path, source=f"the upload {name!r}")  # a bad file: one clear error
        caption = caption_images(checkpoint, [path], beam_size, device=device, options=options)
        caption = caption[str(path)]
        if load_checkpoint(checkpoint)["config"]["decoder"] in GRID_DECODERS:
            maps = attention_maps(checkpoint, [path], beam_size, device=device, options=options)
            words, weights = maps[str(path)]
            return caption, plot_attention(image, words, weights)
    return caption, plot_captioned_images([image], [caption], columns=1)


def upload_widget(checkpoint, beam_size=1, device=None, options=None):
    """A Jupyter upload button: each picture dropped on it is captioned (`caption_upload`), and
    shown with its caption or its attention maps below the button."""
    import ipywidgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    upload = ipywidgets.FileUpload(accept="image/*", multiple=True, description="Your image")
    shown = ipywidgets.Output()

    def on_upload(change):
        shown.clear_output()
        with shown:
            for item in change["new"]:
                try:
                    caption, figure = caption_upload(
                        checkpoint, item["content"], item["name"], beam_size, device, options
                    )
                except (OSError, ValueError) as error:  # an unreadable file: its message
                    print(error)
                    continue
                print(f"{item['name']}: {caption}")
                display(figure)
                plt.close(figure)

    upload.observe(on_upload, names="value")
    return ipywidgets.VBox([upload, shown])


def reads_precomputed_features(checkpoint):
    """Whether `checkpoint` holds a model of precomputed features (False if it cannot be read:
    captioning it then says why)."""
    from captioning.checkpoint import load_checkpoint

    try:
        return load_checkpoint(checkpoint)["config"].get("features_dir") is not None
    except (OSError, ValueError, RuntimeError, KeyError):
        return False


def draw_captions(captions, folder):
    """Save each image with its caption (or its captions, joined by " / ") under it as
    <folder>/<name>.png."""
    from captioning.data.loading import load_image
    from captioning.plots import plot_captioned_images

    folder = Path(folder)
    return [
        plot_captioned_images(
            [load_image(p)],
            [c if isinstance(c, str) else " / ".join(c)],
            folder / f"{Path(p).stem}.png",
            columns=1,
        )
        for p, c in captions.items()
    ]


def draw_attention(maps, folder):
    """Save each image's attention maps, one panel per word, as <folder>/<name>_attention.png."""
    from captioning.data.loading import load_image
    from captioning.plots import plot_attention

    folder = Path(folder)
    return [
        plot_attention(load_image(p), words, weights, folder / f"{Path(p).stem}_attention.png")
        for p, (words, weights) in maps.items()
    ]


@command
def main(argv=None):
    """python caption.py CHECKPOINT IMAGE_OR_FOLDER... [--beam K [--groups G]] [--sample N]
    [--json OUT] [--draw DIR] [--attention [--attention-layer K]]"""
    from captioning.atomic_file import write_json

    parser = argparse.ArgumentParser(description=caption_images.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    parser.add_argument(
        "--length-penalty", type=float,
        help="beam: rank by log-prob / length ** this (default: the checkpoint's "
        "TrainConfig.length_penalty; 0: the raw sum)",
    )  # fmt: skip
    parser.add_argument(
        "--max-len", type=int,
        help="most tokens per caption, <start> and <end> included (default: the checkpoint's)",
    )  # fmt: skip
    DecodingOptions.add_flags(parser)
    parser.add_argument(
        "--json",
        help="write {path: caption} here, {path: [captions]} with --sample N or --groups G "
        "(default captions.json when a folder is given)",
    )
    parser.add_argument("--draw", metavar="DIR", help="save each image with its caption here")
    parser.add_argument(
        "--attention", action="store_true",
        help="with --draw and an attention or transformer checkpoint: also each word's "
        "attention map",
    )  # fmt: skip
    parser.add_argument(
        "--attention-layer", type=int, metavar="K",
        help="with --attention and a transformer checkpoint: draw decoder layer K's "
        "cross-attention, counted from 1 (default: the last layer)",
    )  # fmt: skip
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.attention and not args.draw:
        parser.error("--attention draws the attention maps: give --draw DIR too")
    if args.attention_layer is not None and (not args.attention or args.attention_layer < 1):
        parser.error("--attention-layer K: K counts from 1, and goes with --attention")
    if args.attention and (args.sample or args.groups > 1):
        parser.error("--attention draws one searched caption per image: not with --sample or "
                     "--groups")  # fmt: skip
    try:
        paths, ids = find_images(args.inputs), False
    except FileNotFoundError:
        if not reads_precomputed_features(args.checkpoint):
            raise
        paths, ids = args.inputs, True  # image ids in the model's features_dir
    # The checkpoint is read here only once, and only where the answer matters.
    if args.draw and (ids or reads_precomputed_features(args.checkpoint)):
        parser.error("this model reads precomputed features, not images: nothing to draw")
    if not paths:
        parser.error("no images found in " + " ".join(args.inputs))
    options = DecodingOptions.from_flags(args)
    unreadable = {}  # one bad file among many: the others are captioned all the same
    captions = caption_images(
        args.checkpoint, paths, args.beam, args.max_len, length_penalty=args.length_penalty,
        options=options, unreadable=unreadable,
    )  # fmt: skip
    for path, texts in captions.items():
        if isinstance(texts, str):
            print(f"{path}: {texts}")
        else:  # several per image: numbered from 1, the order decode_captions gives
            print("\n".join(f"{path} ({k}): {text}" for k, text in enumerate(texts, 1)))
    json_path = args.json or (
        "captions.json" if any(Path(i).is_dir() for i in args.inputs) else None
    )
    if json_path:
        print(f"captions written to {write_json(captions, json_path)}")
    if args.draw:
        draw_captions(captions, args.draw)
        if args.attention:
            draw_attention(
                attention_maps(
                    args.checkpoint, paths, args.beam, args.max_len,
                    length_penalty=args.length_penalty, options=options,
                    layer=None if args.attention_layer is None else args.attention_layer - 1,
                ),
                args.draw,
            )  # fmt: skip
        print(f"captioned images saved in {args.draw}/")
    if unreadable:  # named each, then a failed exit: a script sees that some were not captioned
        for error in unreadable.values():
            print(f"not captioned: {error}", file=sys.stderr)
        raise ImageLoadError(
            f"{len(unreadable)} of {len(paths)} images could not be read (named above); the "
            f"other {len(captions)} are captioned"
        )
    return captions
