"""Tests for download.py (COCO and Flickr8k) against a local HTTP server that can cut, corrupt or
ignore Range."""

import hashlib
import http.server
import json
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from captioning.data import download
from captioning.data.annotations import FLICKR_IMAGE_DIRS, KARPATHY_FILES, read_split
from captioning.data.download import (
    FLICKR8K_IMAGE_DIR,
    DownloadError,
    RemoteFile,
    download_coco,
    download_file,
    download_flickr8k,
    extract_archive,
)
from tests.flickr8k_folder import make_flickr8k_folder


@dataclass
class ServerBehaviour:
    """What the test server does next, and what it has been asked so far."""

    folder: Path
    cut_after: int | None = None  # close the connection after this many body bytes
    corrupt: bool = False  # flip the first bytes of every body
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    requests: list = field(default_factory=list)  # (path, Range header or None, body bytes sent)


class RangeFileHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from ServerBehaviour.folder with Range support and injectable faults."""

    def do_GET(self):
        behaviour = self.server.behaviour
        path = behaviour.folder / self.path.lstrip("/")
        range_header = self.headers.get("Range")
        if not path.is_file():
            behaviour.requests.append((self.path, range_header, 0))
            self.send_error(404)
            return
        data = path.read_bytes()
        if behaviour.corrupt:
            data = bytes(byte ^ 0xFF for byte in data[:64]) + data[64:]
        start = 0
        if range_header and not behaviour.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                behaviour.requests.append((self.path, range_header, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour.cut_after is not None:
            body = body[
                : behaviour.cut_after
            ]  # Content-Length promised more: the client sees a cut
            self.close_connection = True
        behaviour.requests.append((self.path, range_header, len(body)))
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format, *args):
        """Keep test output quiet."""


@pytest.fixture
def server(tmp_path):
    """Run a threaded local file server on 127.0.0.1; yield (base_url, behaviour)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeFileHandler)
    httpd.behaviour = ServerBehaviour(served)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.behaviour
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


ARCHIVE_MEMBERS = {
    "train2014/COCO_train2014_000000000009.jpg": bytes(range(256))
    * 200,  # 51 KB, so cuts land mid-file
    "train2014/nested/deeper.jpg": b"\xff\xd8nested jpeg\xff\xd9",
    "annotations/captions_train2014.json": json.dumps(
        {"annotations": [{"caption": "a cat"}]}
    ).encode(),
}


def write_zip(path, members):
    """Write a stored (uncompressed) zip so its size, and thus the cut points, are predictable."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return path


def digests(path):
    """Return (md5, sha256) hex digests of a file."""
    data = Path(path).read_bytes()
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


@pytest.fixture
def archive(server):
    """A small COCO-like zip served at /sample.zip; yields (url, local path, md5, sha256)."""
    base_url, behaviour = server
    path = write_zip(behaviour.folder / "sample.zip", ARCHIVE_MEMBERS)
    md5, sha256 = digests(path)
    return f"{base_url}/sample.zip", path, md5, sha256


def test_complete_download_verifies_and_extracts_layout(archive, tmp_path):
    url, source, md5, sha256 = archive
    dest = download_file(
        url, tmp_path / "dl" / "sample.zip", md5=md5, sha256=sha256, progress=False
    )
    assert dest.read_bytes() == source.read_bytes()
    assert not dest.with_name("sample.zip.part").exists()

    root = tmp_path / "coco"
    assert extract_archive(dest, root) == root
    for name, data in ARCHIVE_MEMBERS.items():
        assert (root / name).read_bytes() == data
    assert (root / ".sample.zip.extracted").exists()
    assert sorted(p.name for p in root.iterdir()) == [
        ".sample.zip.extracted",
        "annotations",
        "train2014",
    ]


def test_interrupted_download_keeps_part_then_resumes_with_range(archive, server, tmp_path):
    url, source, md5, sha256 = archive
    _, behaviour = server
    dest = tmp_path / "sample.zip"
    part = tmp_path / "sample.zip.part"

    behaviour.cut_after = 20_000
    with pytest.raises(DownloadError, match="partial file .* kept, rerun to resume"):
        download_file(url, dest, md5=md5, sha256=sha256, progress=False, chunk_size=4096)
    assert not dest.exists()
    assert 0 < part.stat().st_size <= 20_000
    resumed_from = part.stat().st_size

    behaviour.cut_after = None
    download_file(url, dest, md5=md5, sha256=sha256, progress=False, chunk_size=4096)
    _, range_header, body_bytes = behaviour.requests[-1]
    assert range_header == f"bytes={resumed_from}-"
    assert body_bytes == source.stat().st_size - resumed_from
    assert dest.read_bytes() == source.read_bytes()
    assert not part.exists()


def test_corrupted_download_raises_deletes_part_and_extracts_nothing(
    archive, server, tmp_path, monkeypatch
):
    url, _, md5, _ = archive
    base_url, behaviour = server
    behaviour.corrupt = True
    dest = tmp_path / "sample.zip"
    with pytest.raises(DownloadError) as raised:
        download_file(url, dest, md5=md5, progress=False)
    message = str(raised.value)
    assert url in message and str(dest) in message and "sample.zip.part" in message
    assert f"md5 expected {md5}, got " in message
    assert not dest.exists() and not dest.with_name("sample.zip.part").exists()

    monkeypatch.setattr(download, "COCO_FILES", {"train2014.zip": RemoteFile(url, md5, None)})
    root = tmp_path / "coco"
    with pytest.raises(DownloadError, match="md5 expected"):
        download_coco(root, splits=("train",), karpathy=False, progress=False)
    assert [p.name for p in root.iterdir()] == ["downloads"]
    assert list((root / "downloads").iterdir()) == []


def test_size_mismatch_is_reported_before_hashing(archive, tmp_path):
    url, source, md5, _ = archive
    with pytest.raises(
        DownloadError, match=f"size expected {source.stat().st_size + 1} bytes, got "
    ):
        download_file(
            url, tmp_path / "sample.zip", md5=md5, size=source.stat().st_size + 1, progress=False
        )
    assert not (tmp_path / "sample.zip.part").exists()


def test_server_ignoring_range_restarts_from_zero(archive, server, tmp_path):
    url, source, md5, sha256 = archive
    _, behaviour = server
    behaviour.ignore_range = True
    part = tmp_path / "sample.zip.part"
    part.write_bytes(b"not the real prefix" * 100)  # appending to this would fail the checksum
    dest = download_file(url, tmp_path / "sample.zip", md5=md5, sha256=sha256, progress=False)
    assert behaviour.requests[-1][1] == f"bytes={len(b'not the real prefix') * 100}-"
    assert dest.read_bytes() == source.read_bytes()


def test_complete_part_gets_416_and_is_verified_into_place(archive, server, tmp_path):
    url, source, md5, _ = archive
    _, behaviour = server
    (tmp_path / "sample.zip.part").write_bytes(source.read_bytes())
    dest = download_file(url, tmp_path / "sample.zip", md5=md5, progress=False)
    assert behaviour.requests[-1][2] == 0  # the server sent no body: 416
    assert dest.read_bytes() == source.read_bytes()


def test_existing_verified_dest_is_not_downloaded_again(archive, server, tmp_path):
    url, source, md5, sha256 = archive
    _, behaviour = server
    dest = download_file(url, tmp_path / "sample.zip", md5=md5, sha256=sha256, progress=False)
    behaviour.requests.clear()
    assert download_file(url, dest, md5=md5, sha256=sha256, progress=False) == dest
    assert behaviour.requests == []

    dest.write_bytes(b"damaged")  # a dest that no longer verifies is fetched again
    download_file(url, dest, md5=md5, progress=False)
    assert len(behaviour.requests) == 1 and dest.read_bytes() == source.read_bytes()


def test_extract_is_idempotent_via_marker(archive, tmp_path):
    _, source, _, _ = archive
    root = tmp_path / "coco"
    extract_archive(source, root)
    (root / "train2014" / "nested" / "deeper.jpg").unlink()
    extract_archive(source, root)  # the marker says done, so nothing is rewritten
    assert not (root / "train2014" / "nested" / "deeper.jpg").exists()
    assert not [p for p in root.iterdir() if "staging" in p.name]


@pytest.mark.parametrize(
    "unsafe_name", ["../evil.txt", "train2014/../../evil.txt", "/abs/evil.txt"]
)
def test_extract_refuses_zip_slip(tmp_path, unsafe_name):
    zip_path = tmp_path / "slip.zip"
    with zipfile.ZipFile(zip_path, "w") as zipped:
        zipped.writestr("train2014/ok.jpg", b"ok")
        zipped.writestr(zipfile.ZipInfo(unsafe_name), b"evil")
    root = tmp_path / "out" / "coco"
    with pytest.raises(DownloadError, match="slip.zip: refusing unsafe member path"):
        extract_archive(zip_path, root)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (root / ".slip.zip.extracted").exists() and not (root / "train2014").exists()


def test_extract_reports_corrupt_zip_by_name(tmp_path):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DownloadError, match="broken.zip is not a valid zip archive"):
        extract_archive(broken, tmp_path / "coco")
    assert not (tmp_path / "coco" / ".broken.zip.extracted").exists()


def test_extract_reports_damaged_member_and_leaves_nothing(tmp_path):
    zip_path = write_zip(tmp_path / "damaged.zip", ARCHIVE_MEMBERS)
    data = bytearray(zip_path.read_bytes())
    offset = data.index(bytes(range(256)))  # inside the stored jpeg body: the CRC check catches it
    data[offset : offset + 8] = b"XXXXXXXX"
    zip_path.write_bytes(bytes(data))
    root = tmp_path / "coco"
    with pytest.raises(DownloadError, match="damaged.zip is not a valid zip archive"):
        extract_archive(zip_path, root)
    assert list(root.iterdir()) == []


def test_download_coco_builds_official_layout(server, tmp_path, monkeypatch):
    base_url, behaviour = server
    fake_archives = {
        "train2014.zip": {"train2014/COCO_train2014_000000000009.jpg": b"train jpeg"},
        "val2014.zip": {"val2014/COCO_val2014_000000000042.jpg": b"val jpeg"},
        "annotations_trainval2014.zip": {
            "annotations/captions_train2014.json": b'{"annotations": []}',
            "annotations/captions_val2014.json": b'{"annotations": []}',
        },
        "caption_datasets.zip": {
            "dataset_coco.json": b'{"images": []}',
            "dataset_flickr8k.json": b"{}",
        },
    }
    table = {}
    for name, members in fake_archives.items():
        md5, _ = digests(write_zip(behaviour.folder / name, members))
        table[name] = RemoteFile(
            f"{base_url}/{name}", md5, (behaviour.folder / name).stat().st_size
        )
    monkeypatch.setattr(download, "COCO_FILES", table)

    root = tmp_path / "data" / "coco"
    assert download_coco(root, year=2014, splits=("train", "val"), progress=False) == root
    assert (root / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes() == b"train jpeg"
    assert (root / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes() == b"val jpeg"
    assert (root / "annotations" / "captions_train2014.json").is_file()
    assert (root / "annotations" / "captions_val2014.json").is_file()
    assert (root / "dataset_coco.json").read_bytes() == b'{"images": []}'
    assert sorted(p.name for p in (root / "downloads").iterdir()) == sorted(fake_archives)
    assert len(behaviour.requests) == len(fake_archives)

    behaviour.requests.clear()
    for archive_path in (root / "downloads").iterdir():
        archive_path.unlink()  # once extracted, the markers alone say the work is done
    download_coco(root, year=2014, splits=("train", "val"), progress=False)
    assert behaviour.requests == []


def test_download_coco_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unsupported COCO request"):
        download_coco(tmp_path, splits=("training",))


def test_coco_table_covers_every_archive_download_coco_can_ask_for():
    for year in (2014, 2017):
        for name in download.coco_archive_names(year, ("train", "val", "test"), karpathy=True):
            remote = download.COCO_FILES[name]
            assert remote.url.endswith("/" + name)
            assert remote.md5 is None or len(remote.md5) == 32


def test_cli_downloads_into_root(server, tmp_path, monkeypatch, capsys):
    base_url, behaviour = server
    members = {"val2014/a.jpg": b"jpeg", "annotations/captions_val2014.json": b"{}"}
    table = {}
    for name in ("val2014.zip", "annotations_trainval2014.zip"):
        md5, _ = digests(write_zip(behaviour.folder / name, members))
        table[name] = RemoteFile(f"{base_url}/{name}", md5, None)
    monkeypatch.setattr(download, "COCO_FILES", table)
    root = tmp_path / "coco"
    download.main(
        ["--root", str(root), "--year", "2014", "--splits", "val", "--no-karpathy", "--no-progress"]
    )
    assert (root / "val2014" / "a.jpg").is_file()
    assert str(root) in capsys.readouterr().out


def test_cli_reports_unreachable_server_as_error(tmp_path, monkeypatch, capsys):
    table = {
        "val2014.zip": RemoteFile("http://127.0.0.1:9/val2014.zip", None, None)
    }  # port 9: discard
    monkeypatch.setattr(download, "COCO_FILES", table)
    with pytest.raises(SystemExit) as exited:
        download.main(
            ["--root", str(tmp_path), "--splits", "val", "--no-karpathy", "--no-progress"]
        )
    assert exited.value.code == 1
    assert "cannot connect" in capsys.readouterr().err


def flickr8k_archives(folder, karpathy_members=None):
    """Write Flickr8k_Dataset.zip (the images under Flicker8k_Dataset/, with the __MACOSX/ forks a
    Mac adds) and caption_datasets.zip (Karpathy's three split files) into folder, from a small
    Flickr8k folder; return its split file."""
    staging = make_flickr8k_folder(folder / "flickr8k-source")
    images = {
        f"{FLICKR8K_IMAGE_DIR}/{path.name}": path.read_bytes()
        for path in sorted((staging / FLICKR8K_IMAGE_DIR).iterdir())
    }
    forks = {
        f"__MACOSX/{FLICKR8K_IMAGE_DIR}/._{name.split('/')[1]}": b"\0\5\26\7" for name in images
    }
    write_zip(folder / download.FLICKR8K_IMAGES, {**images, **forks})
    split_file = (staging / download.FLICKR8K_SPLIT_FILE).read_text()
    # A COCO split file beside Flickr8k's, as in the real archive: the karpathy reader would read
    # it first, so a Flickr8k folder must not get it.
    coco_image = {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg",
                  "cocoid": 42, "split": "test", "sentences": [{"raw": "a cat on a mat"}]}  # fmt: skip
    write_zip(folder / download.KARPATHY_ARCHIVE, karpathy_members or {
        "dataset_coco.json": json.dumps({"images": [coco_image]}).encode(),
        download.FLICKR8K_SPLIT_FILE: split_file.encode(),
        "dataset_flickr30k.json": b'{"images": []}',
    })  # fmt: skip
    return json.loads(split_file)


def serve_flickr8k(server, monkeypatch, karpathy_members=None):
    """Serve the Flickr8k archives as FLICKR8K_FILES, with their md5 and size; the split file."""
    base_url, behaviour = server
    split_file = flickr8k_archives(behaviour.folder, karpathy_members)
    table = {}
    for name in download.flickr8k_archive_names():
        path = behaviour.folder / name
        table[name] = RemoteFile(f"{base_url}/{name}", digests(path)[0], path.stat().st_size)
    monkeypatch.setattr(download, "FLICKR8K_FILES", table)
    return split_file


def test_download_flickr8k_resumes_checks_and_leaves_what_the_karpathy_reader_reads(
    server, tmp_path, monkeypatch
):
    _, behaviour = server
    split_file = serve_flickr8k(server, monkeypatch)
    root = tmp_path / "data" / "flickr8k"
    behaviour.cut_after = 20_000  # the images' archive stops part way
    with pytest.raises(DownloadError, match="Flickr8k_Dataset.zip.part kept, rerun to resume"):
        download_flickr8k(root, progress=False)
    kept = (root / "downloads" / "Flickr8k_Dataset.zip.part").stat().st_size
    assert 0 < kept <= 20_000
    behaviour.cut_after = None
    assert download_flickr8k(root, progress=False) == root
    assert behaviour.requests[1][:2] == ("/Flickr8k_Dataset.zip", f"bytes={kept}-")
    assert sorted(p.name for p in root.iterdir()) == sorted([
        ".Flickr8k_Dataset.zip.extracted", ".caption_datasets.zip.extracted", "downloads",
        FLICKR8K_IMAGE_DIR, "dataset_flickr8k.json",
    ])  # fmt: skip
    for split, count in (("train", 24), ("val", 6), ("test", 6)):
        captions = read_split(root, split)
        assert (captions.layout, len(captions.image_ids)) == ("karpathy", count)
        assert all(os.path.isfile(path) for path in captions.image_paths)
        assert {os.path.dirname(path) for path in captions.image_paths} == {
            str(root / FLICKR8K_IMAGE_DIR)
        }
    names = [im["filename"] for im in split_file["images"] if im["split"] == "test"]
    assert [os.path.basename(p) for p in read_split(root, "test").image_paths] == names

    behaviour.requests.clear()
    download_flickr8k(root, progress=False)  # a second run: every archive already extracted
    for archive_path in (root / "downloads").iterdir():
        archive_path.unlink()
    download_flickr8k(root, progress=False)  # the markers alone say the work is done
    assert behaviour.requests == []


def test_download_flickr8k_reports_a_split_file_missing_from_karpathys_archive(
    server, tmp_path, monkeypatch
):
    serve_flickr8k(server, monkeypatch, karpathy_members={"dataset_coco.json": b"{}"})
    root = tmp_path / "flickr8k"
    with pytest.raises(DownloadError) as raised:
        download_flickr8k(root, progress=False)
    assert str(raised.value) == (
        f"{root / 'downloads' / 'caption_datasets.zip'}: no member dataset_flickr8k.json in the "
        "archive; delete it and download again"
    )
    assert not (root / ".caption_datasets.zip.extracted").exists()
    assert not (root / "dataset_coco.json").exists()


def test_download_flickr8k_names_the_paths_the_archives_left_missing(server, tmp_path, monkeypatch):
    base_url, behaviour = server
    serve_flickr8k(server, monkeypatch)
    # An images archive whose folder is not the one the karpathy reader looks in.
    renamed = write_zip(behaviour.folder / "renamed.zip", {"Images8k/a.jpg": b"jpeg"})
    table = {**download.FLICKR8K_FILES}
    table["Flickr8k_Dataset.zip"] = RemoteFile(f"{base_url}/renamed.zip", digests(renamed)[0], None)
    monkeypatch.setattr(download, "FLICKR8K_FILES", table)
    root = tmp_path / "flickr8k"
    with pytest.raises(DownloadError) as raised:
        download_flickr8k(root, progress=False)
    assert str(raised.value) == (
        f"archives extracted but these expected paths are missing: {root / FLICKR8K_IMAGE_DIR}"
    )


def test_flickr8k_table_and_layout_agree_with_the_reader():
    assert download.flickr8k_archive_names() == ["Flickr8k_Dataset.zip", "caption_datasets.zip"]
    for name, remote in download.FLICKR8K_FILES.items():
        assert remote.url.endswith("/" + name) and len(remote.md5) == 32
    assert FLICKR8K_IMAGE_DIR in FLICKR_IMAGE_DIRS
    assert download.FLICKR8K_SPLIT_FILE in KARPATHY_FILES


def test_cli_downloads_flickr8k_into_root(server, tmp_path, monkeypatch, capsys):
    serve_flickr8k(server, monkeypatch)
    root = tmp_path / "flickr8k"
    download.main(["--dataset", "flickr8k", "--root", str(root), "--no-progress"])
    assert len(read_split(root, "val").image_ids) == 6
    assert f"Flickr8k ready in {root}" in capsys.readouterr().out


def test_cli_defaults_per_dataset_and_refuses_cocos_options_for_flickr8k(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(download, "download_coco", lambda *args: calls.append(args) or args[0])
    monkeypatch.setattr(download, "download_flickr8k", lambda *args: calls.append(args) or args[0])
    download.main(["--no-progress"])
    download.main(["--dataset", "flickr8k"])
    assert calls == [
        (Path("data/coco"), 2014, ("train", "val"), True, False),
        (Path("data/flickr8k"), True),
    ]
    for flags in (["--year", "2017"], ["--splits", "val"], ["--no-karpathy"]):
        with pytest.raises(SystemExit) as exited:
            download.main(["--dataset", "flickr8k", *flags])
        assert exited.value.code == 2
        assert f"{flags[0]}: COCO's options, not Flickr8k's" in capsys.readouterr().err
    assert len(calls) == 2
