"""Caption your own images with a trained checkpoint (greedy or beam search); CLI on top."""

import argparse
from pathlib import Path

import torch

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


@torch.no_grad()
def caption_images(
    checkpoint, paths, beam_size=1, max_len=None, batch_size=32, device=None, length_penalty=1.0
):
    """{path: caption} for image files, using the model saved in `checkpoint`."""
    from checkpoint import load_trained
    from data_loader import load_image, make_transform
    from decoding import decode_captions

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, vocab, config = load_trained(checkpoint, device)
    transform = make_transform(config.image_size)
    captions = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([transform(load_image(p)) for p in chunk]).to(device)
        features = model.encode(images)  # (batch, embed); zeros seen if blind
        _, texts = decode_captions(
            model.decoder,
            features,
            vocab,
            beam_size,
            max_len or config.max_caption_len,
            length_penalty,
        )
        captions.update(zip(map(str, chunk), texts))
    return captions


def draw_captions(captions, folder):
    """Save each image with its caption under it as <folder>/<name>.png."""
    from data_loader import load_image
    from plots import plot_captioned_images

    folder = Path(folder)
    return [
        plot_captioned_images([load_image(p)], [c], folder / f"{Path(p).stem}.png", columns=1)
        for p, c in captions.items()
    ]


def main(argv=None):
    """python caption.py CHECKPOINT IMAGE_OR_FOLDER... [--beam K] [--json OUT] [--draw DIR]"""
    from atomic_file import write_json

    parser = argparse.ArgumentParser(description=caption_images.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    parser.add_argument("--max-len", type=int)
    parser.add_argument(
        "--json", help="write {path: caption} here (default captions.json when a folder is given)"
    )
    parser.add_argument("--draw", metavar="DIR", help="save each image with its caption here")
    args = parser.parse_args(argv)
    paths = find_images(args.inputs)
    if not paths:
        parser.error("no images found in " + " ".join(args.inputs))
    captions = caption_images(args.checkpoint, paths, args.beam, args.max_len)
    for path, text in captions.items():
        print(f"{path}: {text}")
    json_path = args.json or (
        "captions.json" if any(Path(i).is_dir() for i in args.inputs) else None
    )
    if json_path:
        print(f"captions written to {write_json(captions, json_path)}")
    if args.draw:
        draw_captions(captions, args.draw)
        print(f"captioned images saved in {args.draw}/")
    return captions


if __name__ == "__main__":
    main()
