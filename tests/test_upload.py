"""Your own image in 3_Inference: the upload button's callback (`caption.caption_upload`) on the
bytes of a PNG and of a JPEG that an EXIF tag rotates, and the button itself."""

import datetime
import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from captioning.caption import caption_images, caption_upload, upload_widget
from captioning.data.annotations import read_split
from captioning.errors import ImageLoadError
from captioning.training.train import train
from tests.helpers import tiny_config

GRID = dict(decoder="transformer", encoder_layers=1, decoder_layers=1, heads=2, feed_forward=32)
STAMP = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)  # a file's time
ROTATED = 6  # EXIF orientation: the stored pixels must turn 90 degrees clockwise to stand upright


@pytest.fixture(scope="module")
def checkpoints(demo_root, tmp_path_factory):
    """{decoder: best.pt} of a tiny Show-and-Tell and a tiny transformer model."""
    out = tmp_path_factory.mktemp("upload")
    train(tiny_config(demo_root, out / "showtell", epochs=1))
    train(tiny_config(demo_root, out / "transformer", epochs=1, **GRID))
    return {
        "showtell": out / "showtell" / "best.pt",
        "transformer": out / "transformer" / "best.pt",
    }


@pytest.fixture(scope="module")
def upright(demo_root, tmp_path_factory):
    """A wide picture (64 x 40) cut from a demo test image, saved as PNG: (path, pixels)."""
    path = read_split(demo_root, "test").image_paths[0]
    image = Image.open(path).convert("RGB").crop((0, 12, 64, 52))
    saved = tmp_path_factory.mktemp("photos") / "wide.png"
    image.save(saved)
    return saved, np.asarray(image)


def shown_pixels(figure):
    """The pixels of the figure's first drawn image."""
    return next(ax.images[0].get_array() for ax in figure.axes if ax.images)


@pytest.mark.parametrize("decoder", ["showtell", "transformer"])
def test_an_uploaded_png_is_captioned_as_its_file_is(checkpoints, upright, decoder):
    path, pixels = upright
    caption, figure = caption_upload(checkpoints[decoder], path.read_bytes(), "photo.png")
    assert caption == caption_images(checkpoints[decoder], [path])[str(path)]
    assert np.array_equal(np.asarray(shown_pixels(figure))[..., :3], pixels)
    if decoder == "transformer":  # a panel per word, each with its attention map over it
        panels = len([ax for ax in figure.axes if ax.images])
        assert panels - len(caption.split()) in (0, 1)  # and `<end>`, if the caption has one
    plt.close(figure)


def test_an_uploaded_jpeg_stands_upright_by_its_exif_tag(checkpoints, upright):
    path, pixels = upright
    sideways = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)  # stored 40 x 64
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    data = io.BytesIO()
    sideways.save(data, "JPEG", quality=100, exif=exif)
    caption, figure = caption_upload(checkpoints["showtell"], data.getvalue(), "phone.jpg")
    shown = np.asarray(shown_pixels(figure))
    assert shown.shape[:2] == (40, 64)  # upright again, as the file would be read
    assert np.abs(shown[..., :3].astype(int) - pixels).mean() < 8  # JPEG's loss only
    assert isinstance(caption, str) and caption
    plt.close(figure)


def test_an_upload_that_is_no_image_names_itself(checkpoints):
    with pytest.raises(ImageLoadError, match="the upload 'notes.png'"):
        caption_upload(checkpoints["showtell"], b"not an image", "notes.png")


def test_the_button_captions_what_is_dropped_on_it(checkpoints, upright, capsys):
    path, _ = upright
    widget = upload_widget(checkpoints["showtell"])
    button = widget.children[0]
    content = path.read_bytes()
    button.value = (
        {"name": "dropped.png", "type": "image/png", "size": len(content),
         "content": memoryview(content), "last_modified": STAMP},
        {"name": "bad.png", "type": "image/png", "size": 3, "content": memoryview(b"bad"),
         "last_modified": STAMP},
    )  # fmt: skip
    printed = capsys.readouterr().out
    expected = caption_images(checkpoints["showtell"], [path])[str(path)]
    assert f"dropped.png: {expected}" in printed
    assert "the upload 'bad.png'" in printed  # named, and the button goes on
