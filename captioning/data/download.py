"""Fetch and unpack MS-COCO or Flickr8k (plus Karpathy's splits): resumable, checksum-verified,
restart-safe."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from captioning.command import add_debug_flag, command, progress_disabled
from captioning.errors import DownloadError


class RemoteFile(NamedTuple):
    """Where an archive lives and what it must hash to."""

    url: str
    md5: str | None
    size: int | None


COCO_ZIPS = "http://images.cocodataset.org/zips/"
COCO_ANNOTATIONS = "http://images.cocodataset.org/annotations/"
KARPATHY_ARCHIVE = "caption_datasets.zip"
# No official checksum list exists, so each md5 is the value that public download scripts agree
# on: twsl/pytorchcocotools (utils/coco/files.py) plus at least one of salesforce/LAVIS
# download_coco.py, MLPerf download_dataset.sh, PaddleNLP COCOCaptions, keras-contrib coco.py.
# Sizes are the Content-Length in public wget/keras download logs; None where none was found.
COCO_FILES = {
    name: RemoteFile(base + name, md5, size)
    for name, base, md5, size in [
        ("train2014.zip", COCO_ZIPS, "0da8c0bd3d6becc4dcb32757491aca88", 13510573713),
        ("val2014.zip", COCO_ZIPS, "a3d79f5ed8d289b7a7554ce06a5782b3", 6645013297),
        ("test2014.zip", COCO_ZIPS, "04127eef689ceac55e3a572c2c92f264", 6660437059),
        ("train2017.zip", COCO_ZIPS, "cced6f7f71b7629ddf16f17bbcfab6b2", 19336861798),
        ("val2017.zip", COCO_ZIPS, "442b8da7639aecaf257c1dceb8ba8c80", 815585330),
        ("test2017.zip", COCO_ZIPS, "77ad2c53ac5d0aea611d422c0938fb35", 6646970404),
        (
            "annotations_trainval2014.zip",
            COCO_ANNOTATIONS,
            "0a379cfc70b0e71301e0f377548639bd",
            252872794,
        ),
        (
            "annotations_trainval2017.zip",
            COCO_ANNOTATIONS,
            "f4bbac642086de4f52a3fdda2de5fa2c",
            252907541,
        ),
        # The old msvocds.blob.core.windows.net copy hashed to f3366b66...; this is the current host's.
        ("image_info_test2014.zip", COCO_ANNOTATIONS, "25304cbbafb2117fb801c0f7218fdbba", 763464),
        ("image_info_test2017.zip", COCO_ANNOTATIONS, "85da7065e5e600ebfee8af1edb634eb5", None),
        # Single public source (mlverse/torchvision R/dataset-flickr.R); size unknown.
        (
            KARPATHY_ARCHIVE,
            "http://cs.stanford.edu/people/karpathy/deepimagesent/",
            "4fa8c08369d22fe16e41dc124bd1adc2",
            None,
        ),
    ]
}

FLICKR8K_IMAGES = "Flickr8k_Dataset.zip"
FLICKR8K_SPLIT_FILE = "dataset_flickr8k.json"  # Karpathy's Flickr8k splits, in KARPATHY_ARCHIVE
# The images archive's own folder, misspelt as published; the karpathy reader looks there
# (annotations.FLICKR_IMAGE_DIRS).
FLICKR8K_IMAGE_DIR = "Flicker8k_Dataset"
# The copy of Flickr8k's images most download scripts use (jbrownlee/Datasets' GitHub release). Its
# md5 is the value of mlverse/torchvision (R/dataset-flickr.R) and prabhuomkar/pytorch-cpp
# (cmake/fetch_flickr8k.cmake); no byte size was found published, only mlverse/torchvision's
# "~1GB" (APPROXIMATE_SIZES). Its Flickr8k_text.zip, the original captions and splits, is not
# fetched: Karpathy's split file, the one published results use, holds both.
FLICKR8K_FILES = {
    FLICKR8K_IMAGES: RemoteFile(
        "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/" + FLICKR8K_IMAGES,
        "f18a1e2920de5bd84dae7cf08ec78978",
        None,
    ),
    KARPATHY_ARCHIVE: COCO_FILES[KARPATHY_ARCHIVE],
}
# Sizes stated in words where no byte count is published, for telling users what a download costs.
APPROXIMATE_SIZES = {FLICKR8K_IMAGES: 1_000_000_000}


def download_file(
    url, dest, *, md5=None, sha256=None, size=None, progress=True, chunk_size=1 << 20, timeout=60
) -> Path:
    """Download url to dest through a resumable dest.part, verified before it is renamed into place."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if not find_mismatches(dest, md5=md5, sha256=sha256, size=size):
            return dest
        dest.unlink()  # stale or foreign file: fetch a clean copy rather than trust it
    dest.parent.mkdir(parents=True, exist_ok=True)
    resume_from = part.stat().st_size if part.exists() else 0
    if size is not None and resume_from > size:
        part.unlink()  # longer than the real file, so it can never verify
        resume_from = 0
    expected_size = fetch_into(
        url, part, resume_from, progress=progress, chunk_size=chunk_size, timeout=timeout
    )
    mismatches = find_mismatches(
        part, md5=md5, sha256=sha256, size=size if size is not None else expected_size
    )
    if mismatches:
        part.unlink()  # resuming a corrupt part would only append to garbage
        raise DownloadError(
            f"{url}: download for {dest} failed verification ({'; '.join(mismatches)}); "
            f"deleted the partial file {part} so the next try starts clean"
        )
    os.replace(part, dest)
    return dest


def fetch_into(url, part, resume_from, *, progress, chunk_size, timeout):
    """Stream url into part, resuming at resume_from when the server honours Range; return the full size."""
    headers = {"Range": f"bytes={resume_from}-"} if resume_from else {}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as error:
        if error.code == 416 and resume_from:
            # Nothing left past resume_from: the part is already whole (verification decides).
            return total_size_from(error.headers.get("Content-Range")) or resume_from
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        kept = f"partial file {part} kept, rerun to resume" if resume_from else "rerun to retry"
        raise DownloadError(f"{url}: cannot connect ({error}); {kept}") from error
    with response:
        if response.status == 206:
            expected_size = total_size_from(response.headers.get("Content-Range"))
        else:  # a 200 to a Range request means the server sends the whole file again
            resume_from = 0
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length else None
        received = resume_from
        with (
            open(part, "ab" if resume_from else "wb") as out,
            tqdm(
                total=expected_size,
                initial=resume_from,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(part).stem,
                disable=progress_disabled(progress),
            ) as bar,
        ):
            try:
                while chunk := response.read(chunk_size):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"{url}: connection lost after {received} bytes ({error!r}); "
                    f"partial file {part} kept, rerun to resume"
                ) from error
    if expected_size is not None and received < expected_size:
        raise DownloadError(
            f"{url}: connection closed after {received} of {expected_size} bytes; "
            f"partial file {part} kept, rerun to resume"
        )
    return expected_size


def total_size_from(content_range):
    """Return the total from a Content-Range header like 'bytes 0-9/10' or 'bytes */10', else None."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def find_mismatches(path, *, md5=None, sha256=None, size=None) -> list[str]:
    """List how path differs from the expected size and checksums (empty when it matches)."""
    actual_size = Path(path).stat().st_size
    if size is not None and actual_size != size:
        return [
            f"size expected {size} bytes, got {actual_size}"
        ]  # no point hashing a wrong-sized file
    expected = {
        name: digest.lower() for name, digest in (("md5", md5), ("sha256", sha256)) if digest
    }
    hashers = {name: hashlib.new(name) for name in expected}
    if hashers:
        with open(path, "rb") as source:
            while block := source.read(1 << 22):
                for hasher in hashers.values():
                    hasher.update(block)
    return [
        f"{name} expected {digest}, got {hashers[name].hexdigest()}"
        for name, digest in expected.items()
        if hashers[name].hexdigest() != digest
    ]


def extraction_marker(dest_dir, archive_name) -> Path:
    """Return the file whose presence says archive_name was fully extracted into dest_dir."""
    return Path(dest_dir) / f".{archive_name}.extracted"


def extract_archive(archive, dest_dir, members=None) -> Path:
    """Extract a zip (only `members`, when given) into dest_dir via a staging folder, writing the
    completion marker last."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = extraction_marker(dest_dir, archive.name)
    if marker.exists():
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            for name in names:
                refuse_unsafe_member(archive, name)
            if members is not None:
                missing = sorted(set(members) - set(names))
                if missing:
                    raise DownloadError(
                        f"{archive}: no member {', '.join(missing)} in the archive; "
                        "delete it and download again"
                    )
                names = list(members)
            # The resource forks a Mac adds to the zips it makes (__MACOSX/) are no data.
            names = [name for name in names if not name.startswith("__MACOSX/")]
            # Staging inside dest_dir keeps the final moves on one filesystem, hence cheap renames.
            with tempfile.TemporaryDirectory(
                dir=dest_dir, prefix=f".{archive.name}.staging-"
            ) as staging:
                zipped.extractall(staging, members=names)
                merge_tree(Path(staging), dest_dir)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise DownloadError(
            f"{archive} is not a valid zip archive ({error}); delete it and download again"
        ) from error
    marker.touch()
    return dest_dir


def refuse_unsafe_member(archive, name):
    """Raise DownloadError if a zip member would land outside the extraction folder (zip slip)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise DownloadError(
            f"{archive}: refusing unsafe member path {name!r} (absolute or contains '..')"
        )


def merge_tree(source, target):
    """Move everything under source into target, merging folders that already exist there."""
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            merge_tree(entry, destination)  # e.g. annotations/ filled by several archives
            continue
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(entry, destination)


def coco_archive_names(year, splits, karpathy) -> list[str]:
    """Name the archives that make up the requested COCO year, splits and Karpathy file."""
    names = [f"{split}{year}.zip" for split in splits]
    if {"train", "val"} & set(splits):
        names.append(f"annotations_trainval{year}.zip")
    if "test" in splits:
        names.append(f"image_info_test{year}.zip")
    return (names + [KARPATHY_ARCHIVE]) if karpathy else names


def expected_layout(root, year, splits, karpathy) -> list[Path]:
    """List the paths a finished download_coco leaves under root."""
    paths = [root / f"{split}{year}" for split in splits]
    paths += [
        root / "annotations" / f"captions_{split}{year}.json" for split in splits if split != "test"
    ]
    paths += [root / "annotations" / f"image_info_test{year}.json"] if "test" in splits else []
    return (paths + [root / "dataset_coco.json"]) if karpathy else paths


def fetch_archives(root, remote_files, names, members=None, progress=True):
    """Download, verify and extract each archive of `names` (keys of `remote_files`) into root,
    skipping those already extracted; `members`: {archive: the only members to extract}."""
    for name in names:
        if extraction_marker(root, name).exists():
            continue  # already unpacked; the zip itself may have been deleted to save space
        remote = remote_files[name]
        archive = download_file(
            remote.url,
            root / "downloads" / name,
            md5=remote.md5,
            size=remote.size,
            progress=progress,
        )
        extract_archive(archive, root, (members or {}).get(name))


def check_layout(paths):
    """Raise DownloadError naming every one of `paths` that the extracted archives left missing."""
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise DownloadError(
            f"archives extracted but these expected paths are missing: {', '.join(missing)}"
        )


def download_coco(root, year=2014, splits=("train", "val"), karpathy=True, progress=True) -> Path:
    """Download, verify and extract COCO into root's official layout, skipping finished archives."""
    root = Path(root)
    if year not in (2014, 2017) or not splits or not set(splits) <= {"train", "val", "test"}:
        raise ValueError(f"unsupported COCO request: year={year!r}, splits={splits!r}")
    fetch_archives(root, COCO_FILES, coco_archive_names(year, splits, karpathy), progress=progress)
    check_layout(expected_layout(root, year, splits, karpathy))
    return root


def flickr8k_archive_names() -> list[str]:
    """Name the archives that make up Flickr8k: its images and Karpathy's split files."""
    return [FLICKR8K_IMAGES, KARPATHY_ARCHIVE]


def flickr8k_layout(root) -> list[Path]:
    """List the paths a finished download_flickr8k leaves under root."""
    return [Path(root) / FLICKR8K_IMAGE_DIR, Path(root) / FLICKR8K_SPLIT_FILE]


def download_flickr8k(root, progress=True) -> Path:
    """Download, verify and extract Flickr8k's images and Karpathy's Flickr8k split file into root,
    the layout the karpathy reader reads, skipping finished archives."""
    root = Path(root)
    # Flickr8k's split file alone: where dataset_coco.json is too, the karpathy reader reads that.
    members = {KARPATHY_ARCHIVE: [FLICKR8K_SPLIT_FILE]}
    fetch_archives(root, FLICKR8K_FILES, flickr8k_archive_names(), members, progress)
    check_layout(flickr8k_layout(root))
    return root


@command
def main(argv=None):
    """Command-line entry point: python download.py --root data/coco --year 2014, or
    python download.py --dataset flickr8k --root data/flickr8k."""
    parser = argparse.ArgumentParser(
        description="Download and extract MS-COCO or Flickr8k, with Karpathy's splits."
    )
    parser.add_argument(
        "--dataset", choices=("coco", "flickr8k"), default="coco",
        help="coco: MS-COCO (--year, --splits); flickr8k: its images and Karpathy's split file",
    )  # fmt: skip
    parser.add_argument(
        "--root", type=Path, default=None, help="where (default: data/coco or data/flickr8k)"
    )
    parser.add_argument(
        "--year", type=int, choices=(2014, 2017), default=None, help="COCO: release (default: 2014)"
    )
    parser.add_argument(
        "--splits", nargs="+", choices=("train", "val", "test"), default=None,
        help="COCO: image archives (default: train val)",
    )  # fmt: skip
    parser.add_argument(
        "--no-karpathy", action="store_true", help="COCO: skip Karpathy's caption_datasets.zip"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.dataset == "flickr8k":
        given = {"--year": args.year, "--splits": args.splits, "--no-karpathy": args.no_karpathy}
        coco_only = [flag for flag, value in given.items() if value not in (None, False)]
        if coco_only:
            parser.error(f"{', '.join(coco_only)}: COCO's options, not Flickr8k's")
        root = download_flickr8k(args.root or Path("data/flickr8k"), not args.no_progress)
        print(f"Flickr8k ready in {root}")
        return root
    year, splits = args.year or 2014, tuple(args.splits or ("train", "val"))
    root = download_coco(
        args.root or Path("data/coco"), year, splits, not args.no_karpathy, not args.no_progress
    )
    print(f"COCO {year} ready in {root}")
    return root
