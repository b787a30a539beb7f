"""Caption annotations in the layouts the project reads: COCO 2014/2017, Karpathy splits, CSV.

Every layout is read into one `CaptionSplit`: the split's images (ids and paths) and its
captions (text and the image each belongs to). Tokenisation is cached per set of captions.
"""

import contextlib
import csv
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nltk.tokenize import TreebankWordTokenizer

from captioning.atomic_file import atomic_path
from captioning.errors import AnnotationError

KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")
CSV_FILES = ("captions.txt", "captions.csv")
CSV_IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "flickr30k_images", ".")
FLICKR_IMAGE_DIRS = (
    "Images",
    "images",
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "flickr30k_images",
    "flickr30k-images",
    ".",
)
LAYOUTS = ("auto", "coco", "karpathy", "csv")
TOKENIZER_VERSION = "treebank-lower/2"
_TOKENIZER = TreebankWordTokenizer()


def is_punctuation(token):
    """Whether a token holds no letter or digit ("." "," "``" "--"), so is no word."""
    return not any(character.isalnum() for character in token)


def tokenize(caption, strip_punctuation=False):
    """Lower-case word tokens of a caption (NLTK Treebank rules, no punkt data needed);
    `strip_punctuation`: words only, as the published COCO recipes train on."""
    tokens = _TOKENIZER.tokenize(caption.lower())
    return [t for t in tokens if not is_punctuation(t)] if strip_punctuation else tokens


@dataclass
class CaptionSplit:
    """One split of a captioning dataset: images and their captions."""

    name: str
    layout: str
    source: Path
    image_ids: list
    image_paths: list  # str paths
    captions: list = field(default_factory=list)
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_rows: list = field(default_factory=list)
    strip_punctuation: bool = False  # what `tokenized` gives: words only (`tokenize`)

    def references(self):
        """Captions per image id, for scoring."""
        refs = {i: [] for i in self.image_ids}
        for text, img in zip(self.captions, self.caption_image):
            refs[self.image_ids[img]].append(text)
        return refs

    def tokenized(self, cache_dir=None):
        """Token lists of all captions (words only with `strip_punctuation`), read from the cache
        when these captions were tokenised so before."""
        return tokenize_cached(self, cache_dir)

    def describe_image(self, image_index):
        """Where an image was named, for error messages."""
        rows = self.image_rows
        return f"{self.source}, images row {rows[image_index]}" if rows else str(self.source)

    def without_images(self, image_indices):
        """A copy without the given images and their captions (skipping unreadable files)."""
        drop = set(int(i) for i in image_indices)
        keep = [i for i in range(len(self.image_ids)) if i not in drop]
        new_index = np.full(len(self.image_ids), -1, np.int64)
        new_index[keep] = np.arange(len(keep))
        kept = [k for k, img in enumerate(self.caption_image) if new_index[img] >= 0]
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return CaptionSplit(
            self.name,
            self.layout,
            self.source,
            pick(self.image_ids),
            pick(self.image_paths),
            [self.captions[k] for k in kept],
            new_index[self.caption_image[kept]],
            pick(self.image_rows) if self.image_rows else [],
            self.strip_punctuation,
        )


def default_cache_dir():
    """Folder for derived files (token and feature caches)."""
    return Path(os.environ.get("CAPTIONING_CACHE", Path.home() / ".cache" / "captioning"))


def detect_layout(data_dir):
    """Which layout `data_dir` holds: 'coco', 'karpathy' or 'csv'."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data folder not found")
    if list((data_dir / "annotations").glob("captions_*20[0-9][0-9].json")):
        return "coco"
    if any((data_dir / f).exists() for f in KARPATHY_FILES):
        return "karpathy"
    if any((data_dir / f).exists() for f in CSV_FILES):
        return "csv"
    raise FileNotFoundError(
        f"{data_dir}: no captions found; expected annotations/captions_<split><year>.json (COCO), "
        f"one of {', '.join(KARPATHY_FILES)} (Karpathy splits) or {' / '.join(CSV_FILES)} "
        "(image,caption CSV)"
    )


def read_split(data_dir, split="train", layout="auto", strip_punctuation=False):
    """The `split` ('train', 'val' or 'test') of the dataset under `data_dir`; its captions
    tokenise to words only with `strip_punctuation` (TrainConfig.strip_punctuation)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir) if layout == "auto" else layout
    read = {"coco": _read_coco_split, "karpathy": _read_karpathy_split, "csv": _read_csv_split}
    captions = read[layout](data_dir, split)
    captions.strip_punctuation = strip_punctuation
    return captions


def read_captions(annotations_file):
    """(image id, caption) pairs of a COCO captions file."""
    s = read_coco_file(annotations_file, image_dir=Path(annotations_file).parent, name="file")
    return [(s.image_ids[i], c) for c, i in zip(s.captions, s.caption_image)]


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotations file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: malformed JSON ({e})") from None


def _check_caption(path, row, caption, rows="row"):
    if not isinstance(caption, str) or not caption.strip():
        raise AnnotationError(f"{path}, {rows} {row}: caption is empty or not text: {caption!r}")
    return caption.strip()


def read_coco_file(path, image_dir, name, layout="coco"):
    """A COCO captions (or image-info) JSON file through pycocotools."""
    from pycocotools.coco import COCO  # deferred: importing it pulls in matplotlib

    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not a COCO annotations file (no 'images' list)")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationError(f"{path}: 'annotations' is not a list")
    for row, a in enumerate(annotations):
        missing = [k for k in ("image_id", "caption") if not isinstance(a, dict) or k not in a]
        if missing:
            raise AnnotationError(f"{path}, annotations row {row}: missing key(s) {missing}")
    # pycocotools indexes annotations by 'id'; hand-made caption files often leave it out.
    data["annotations"] = [
        a if "id" in a else {**a, "id": row} for row, a in enumerate(annotations)
    ]
    for row, im in enumerate(data["images"]):
        missing = [k for k in ("id", "file_name") if not isinstance(im, dict) or k not in im]
        if missing:
            raise AnnotationError(f"{path}, images row {row}: missing key(s) {missing}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    image_ids = sorted(coco.imgs)
    position = {img: k for k, img in enumerate(image_ids)}
    image_row = {im["id"]: row for row, im in enumerate(data["images"])}
    captions, owners = [], []
    for row, a in enumerate(data.get("annotations", [])):
        if a["image_id"] not in position:
            raise AnnotationError(
                f"{path}, annotations row {row}: image_id {a['image_id']} is not in the images list"
            )
        captions.append(_check_caption(path, row, a["caption"]))
        owners.append(position[a["image_id"]])
    # Plain strings: building 100k+ Path objects is a visible share of loader start-up.
    folder = str(image_dir)
    paths = [os.path.join(folder, coco.imgs[i]["file_name"]) for i in image_ids]
    return CaptionSplit(
        name,
        layout,
        Path(path),
        image_ids,
        paths,
        captions,
        np.asarray(owners, np.int64),
        [image_row[i] for i in image_ids],
    )


def _read_coco_split(data_dir, split):
    ann = data_dir / "annotations"
    for year in ("2017", "2014"):
        for stem in (f"captions_{split}{year}", f"image_info_{split}{year}"):
            if (ann / f"{stem}.json").exists():
                return read_coco_file(ann / f"{stem}.json", data_dir / f"{split}{year}", split)
    raise FileNotFoundError(
        f"{ann}: no captions_{split}2017.json or captions_{split}2014.json "
        f"(nor image_info_{split}<year>.json) for split '{split}'"
    )


def _find_image_dir(data_dir, names, first_file):
    for d in names:
        if (data_dir / d / first_file).exists():
            return data_dir / d
    return data_dir / names[0]


def _is_text(value):
    return isinstance(value, str) and bool(value.strip())


def _check_karpathy_image(path, row, im):
    """The (image id, file name, captions) of entry `row` of a Karpathy file's images list."""
    where = f"{path}, images row {row}"
    if not isinstance(im, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(im).__name__}")
    missing = [k for k in ("filename", "sentences") if k not in im]
    if "cocoid" not in im and "imgid" not in im:
        missing.append("cocoid/imgid")
    if missing:
        raise AnnotationError(f"{where}: missing key(s) {missing}")
    image_id = im["cocoid"] if "cocoid" in im else im["imgid"]
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise AnnotationError(f"{where}: image id is not a number or text: {image_id!r}")
    if "split" in im and not _is_text(im["split"]):
        raise AnnotationError(f"{where}: 'split' is empty or not text: {im['split']!r}")
    if not isinstance(im.get("filepath", ""), str):
        raise AnnotationError(f"{where}: 'filepath' is not text: {im['filepath']!r}")
    if not _is_text(im["filename"]):
        raise AnnotationError(f"{where}: 'filename' is empty or not text: {im['filename']!r}")
    sentences = im["sentences"]
    if not isinstance(sentences, list):
        raise AnnotationError(
            f"{where}: 'sentences' is not a list (got {type(sentences).__name__})"
        )
    captions = []
    for k, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
        captions.append(_check_caption(path, f"{row}, sentence {k}", raw, "images row"))
    return image_id, im["filename"], captions


def _read_karpathy_split(data_dir, split):
    path = next((data_dir / f for f in KARPATHY_FILES if (data_dir / f).exists()), None)
    if path is None:
        raise FileNotFoundError(f"{data_dir}: none of {', '.join(KARPATHY_FILES)} found")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not a Karpathy split file (no 'images' list)")
    wanted = {"train": ("train", "restval")}.get(split, (split,))
    image_dir = None
    ids, paths, captions, owners, image_rows = [], [], [], [], []
    # Every entry is checked, not only this split's: a file is either readable or refused.
    for row, im in enumerate(data["images"]):
        image_id, filename, sentences = _check_karpathy_image(path, row, im)
        if im.get("split") not in wanted:
            continue
        if "filepath" in im:
            image_path = os.path.join(data_dir, im["filepath"], filename)
        else:
            image_dir = image_dir or _find_image_dir(data_dir, FLICKR_IMAGE_DIRS, filename)
            image_path = os.path.join(image_dir, filename)
        captions += sentences
        owners += [len(ids)] * len(sentences)
        ids.append(image_id)
        paths.append(image_path)
        image_rows.append(row)
    return CaptionSplit(
        split,
        "karpathy",
        path,
        ids,
        paths,
        captions,
        np.asarray(owners, np.int64),
        image_rows,
    )


def csv_split_of(image_name):
    """Deterministic 80/10/10 train/val/test assignment for CSV datasets without splits."""
    bucket = zlib.crc32(image_name.encode("utf-8")) % 10
    return "test" if bucket == 9 else "val" if bucket == 8 else "train"


def _read_csv_rows(path):
    """(line number, [image, caption]) of each record of a captions CSV after its header."""
    rows = []
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if header[:2] != ["image", "caption"]:
                raise AnnotationError(
                    f"{path}, row 1: expected the header 'image,caption', got {header}"
                )
            # Line numbers, not record numbers: a quoted caption may span lines.
            line = reader.line_num + 1  # where the next record starts
            for r in reader:
                if r:  # blank lines give []
                    rows.append((line, r))
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise AnnotationError(f"{path}, row {reader.line_num}: malformed CSV ({e})") from None
    for line, r in rows:
        if len(r) < 2:
            raise AnnotationError(f"{path}, row {line}: expected 'image,caption', got {r}")
        if not r[0].strip():
            raise AnnotationError(f"{path}, row {line}: image name is empty")
        r[1:] = [_check_caption(path, line, ",".join(r[1:]))]
    return rows


def _read_csv_split(data_dir, split):
    path = next((data_dir / f for f in CSV_FILES if (data_dir / f).exists()), None)
    if path is None:
        raise FileNotFoundError(f"{data_dir}: none of {', '.join(CSV_FILES)} found")
    rows = _read_csv_rows(path)
    all_images = sorted({r[0] for _, r in rows})
    image_id = {name: k for k, name in enumerate(all_images)}
    names = [n for n in all_images if csv_split_of(n) == split]
    position = {n: k for k, n in enumerate(names)}
    image_dir = _find_image_dir(data_dir, CSV_IMAGE_DIRS, names[0]) if names else data_dir
    captions, owners, first_row = [], [], {}
    for line, (name, caption) in rows:
        if name in position:
            first_row.setdefault(name, line)
            captions.append(caption)
            owners.append(position[name])
    return CaptionSplit(
        split,
        "csv",
        path,
        [image_id[n] for n in names],
        [os.path.join(image_dir, n) for n in names],
        captions,
        np.asarray(owners, np.int64),
        [first_row[n] for n in names],
    )


class TokenizedCaptions:
    """Token lists of captions, stored flat: caption i is `words[ids[offsets[i]:offsets[i + 1]]]`.

    Indexing and iterating give lists of strings; the arrays serve the fast paths (counting
    words, encoding) that start a loader on COCO's 400k+ captions in a second or two.
    """

    def __init__(self, words, ids, offsets):
        self.words = list(words)  # distinct tokens, in order of first use
        self.ids = np.asarray(ids, dtype=np.int32)  # (total tokens,)
        self.offsets = np.asarray(offsets, dtype=np.int64)  # (captions + 1,)

    @classmethod
    def from_lists(cls, token_lists):
        """Flat form of a list of token lists."""
        index, ids, offsets = {}, [], [0]
        for tokens in token_lists:
            ids.extend(index.setdefault(t, len(index)) for t in tokens)
            offsets.append(len(ids))
        return cls(index, ids, offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        words = self.words
        return [words[j] for j in self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        return list(self) == list(other)

    def lengths(self):
        """Tokens per caption (captions,)."""
        return np.diff(self.offsets)

    def counts(self):
        """{word: occurrences} over all captions."""
        return dict(zip(self.words, np.bincount(self.ids, minlength=len(self.words)).tolist()))


def _cache_key(split):
    """Hash of the captions' text itself (and the tokeniser's version and settings): an edited
    annotations file never reuses tokens, even one rewritten at the same size within one clock
    tick or with its old modification time restored (`cp -p`, `rsync -t`, archives), nor do
    tokens kept with punctuation serve a split that strips it, or the reverse."""
    # Unchanged without stripping: the token and CIDEr-D caches made before it stay valid.
    version = TOKENIZER_VERSION + ("+words-only" if split.strip_punctuation else "")
    digest = hashlib.sha1(f"{version}|{len(split.captions)}|".encode())
    # The lengths make the joined text unambiguous whatever characters the captions hold.
    digest.update(np.fromiter(map(len, split.captions), np.int64, len(split.captions)).tobytes())
    digest.update("\0".join(split.captions).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:20]


def tokenize_cached(split, cache_dir=None):
    """`TokenizedCaptions` of a split; tokenised once per set of captions, then cached (.npz)."""
    cache = Path(cache_dir or default_cache_dir()) / "tokens" / f"{_cache_key(split)}.npz"
    if cache.exists():
        # Plain arrays only (allow_pickle=False): a planted file cannot run code.
        with np.load(cache, allow_pickle=False) as z:
            offsets = z["offsets"]
            if len(offsets) == len(split.captions) + 1:
                words = bytes(z["words"]).decode("utf-8").split("\n") if z["words"].size else []
                return TokenizedCaptions(words, z["ids"], offsets)
    strip = split.strip_punctuation
    tokens = TokenizedCaptions.from_lists(tokenize(c, strip) for c in split.captions)
    words = np.frombuffer("\n".join(tokens.words).encode("utf-8"), dtype=np.uint8)
    with atomic_path(cache) as tmp:
        np.savez(tmp, words=words, ids=tokens.ids, offsets=tokens.offsets)
    return tokens
