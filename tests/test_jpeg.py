"""Decoding only the rows a crop needs (ssvit.jpeg): the same pixels as a whole decode, or no cut at all."""

import io
import random

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from ssvit.jpeg import band, layout

from conftest import IMAGENET_SAMPLE


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: every MCU row has real detail in all three channels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def sources():
    """Odd sizes (partial MCUs), every chroma subsampling, grayscale; the shared photographs where present."""
    images = [photo(w, h, k) for k, (w, h) in enumerate([(333, 250), (250, 333), (320, 320), (97, 41)])]
    if IMAGENET_SAMPLE.exists():
        images += [Image.open(p).convert("RGB") for p in sorted(IMAGENET_SAMPLE.glob("*/*"))[:6]]
    out = [encode(img, restart_marker_rows=1, subsampling=s) for img in images for s in (0, 1, 2)]
    return out + [encode(images[0].convert("L"), restart_marker_rows=1)]


def test_a_band_decodes_to_the_same_pixels_as_the_whole_image():
    rng, cut = random.Random(0), 0
    for data in sources():
        lay = layout(data)
        assert lay is not None
        whole = simplejpeg.decode_jpeg(data, "RGB")
        for _ in range(8):
            h = rng.randint(1, lay.height)
            top = rng.randint(0, lay.height - h)
            part, start, height = band(data, lay, top, top + h)
            decoded = simplejpeg.decode_jpeg(part, "RGB")
            assert decoded.shape[0] == height and start <= top and top + h <= start + height
            assert np.array_equal(decoded[top - start : top - start + h], whole[top : top + h])  # bit-identical
            cut += height < lay.height
    assert cut > 50  # most boxes were decoded from a band, not the whole image


def test_what_cannot_be_cut_is_left_whole():
    img = photo(200, 150, 0)
    assert layout(encode(img)) is None  # no restart markers
    assert layout(encode(img, progressive=True, restart_marker_rows=1)) is None
    assert layout(encode(img, restart_marker_blocks=5)) is None  # intervals that do not divide a row of MCUs
    assert layout(encode(img, restart_marker_rows=2)) is None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert layout(buf.getvalue()) is None and layout(b"") is None and layout(encode(img)[:100]) is None
    data = encode(img, restart_marker_rows=1)
    assert all(layout(data[:n]) is None for n in range(0, layout(data).scan, 7))  # any truncated header
    # Markers missing from the data (DRI promises them): the band is the whole image, as it came.
    data = encode(img, restart_marker_rows=1)
    lay = layout(data)
    broken = data[: lay.scan] + data[lay.scan :].replace(b"\xff\xd3", b"\x00\x00")
    assert band(broken, lay, 100, 120) == (broken, 0, lay.height)


def test_decode_crop_gives_the_same_images_with_and_without_bands(monkeypatch):
    """The end of the fast path: the training images are bit-identical whether bands are cut or not."""
    import ssvit.jpeg
    from ssvit.data import Augmentation, decode_crop, item_rng

    augment = Augmentation(64, (0.08, 1.0))
    data = [encode(photo(333, 250, k), restart_marker_rows=1) for k in range(4)]
    images = {}
    for cut in (True, False):
        if not cut:
            monkeypatch.setattr(ssvit.jpeg, "layout", lambda data: None)
        images[cut] = [decode_crop(d, lambda h, w, k=k: augment.draw(h, w, item_rng(0, 0, k)), 64) for k in range(40) for d in data]
    assert all(torch.equal(a, b) for a, b in zip(images[True], images[False]))


@pytest.mark.parametrize("subsampling", [0, 2])
def test_band_renumbers_the_restart_markers(subsampling):
    """A band starting at MCU row 3 carries markers RST3, RST4...: they must read RST0, RST1... in the new JPEG."""
    data = encode(photo(160, 400, 1), restart_marker_rows=1, subsampling=subsampling)
    lay = layout(data)
    part, start, height = band(data, lay, 3 * lay.mcu_height + 1, 20 * lay.mcu_height)
    assert start == 3 * lay.mcu_height
    markers = [part[k + 1] for k in range(layout(part).scan, len(part) - 2) if part[k] == 0xFF and 0xD0 <= part[k + 1] <= 0xD7]
    assert markers == [0xD0 + n % 8 for n in range(len(markers))] and len(markers) == height // lay.mcu_height - 1
