"""vqt_jax.data.imaging against TensorFlow: the decoder and resize of the TF-free pipelines.

`resize` must equal ``tf.image.resize(method='bilinear')`` (TF2: half-pixel centres, no
antialias) in float32 to 1e-5 and, rounded to uint8 (the big_vision protocol), bit for bit;
`decode` must give ``tf.io.decode_image(channels=3, expand_animations=False)``'s pixels.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vqt_jax.data import content, folder, imaging
from vqt_jax.data import pipeline as pipeline_lib

tf = pytest.importorskip("tensorflow")

SIZES = [  # (in height, in width, out size): odd sizes, up and down, wide and tall.
    (37, 53, 224), (224, 224, 224), (500, 375, 224), (7, 3, 5), (1, 1, 4), (300, 17, 8),
    (13, 13, 224), (9, 900, 17), (2, 2, 3), (225, 223, 224), (640, 480, 33),
]  # fmt: skip


def _tf_uint8(resized) -> np.ndarray:
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("h, w, size", SIZES)
def test_resize_equals_tf_image_resize(h, w, size, dtype):
    rng = np.random.default_rng(h * 1000 + w)
    image = (rng.integers(0, 256, (h, w, 3)) if dtype in (np.uint8, np.uint16)
             else rng.uniform(0, 255, (h, w, 3))).astype(dtype)
    expected = tf.image.resize(image, [size, size], method="bilinear")
    got = imaging.resize(image, size, round_resized=False)
    assert got.dtype == np.float32 and got.shape == (size, size, 3)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    rounded = imaging.resize(image, size)
    assert rounded.dtype == np.uint8
    np.testing.assert_array_equal(rounded, _tf_uint8(expected))


def test_rounding_is_half_to_even_like_tf():
    # 2 -> 4 upsampling of [1, 2] gives 1.25, 1.75 and 2 -> 1 of [1, 2] gives 1.5; [2, 3] 2.5.
    image = np.array([[[1, 2, 0], [2, 3, 0]]], np.uint8).transpose(1, 0, 2)  # [2, 1, 3]
    for size in (1, 3, 4, 5):
        expected = _tf_uint8(tf.image.resize(image, [size, size]))
        np.testing.assert_array_equal(imaging.resize(image, size), expected)
    np.testing.assert_array_equal(imaging.resize(image, 1)[0, 0], [2, 2, 0])  # 1.5, 2.5 -> 2, 2


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(out, fmt, **kwargs)
    return out.getvalue()


def _tf_decode(encoded: bytes) -> np.ndarray:
    return tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 ``[H, W, C]`` (PIL writes 16 bits for gray only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    h, w, channels = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)  # color type
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


_RGB = np.random.default_rng(0).integers(0, 256, (21, 34, 3), np.uint8)
_GRAY16 = np.random.default_rng(1).integers(0, 65536, (21, 34)).astype(np.uint16)
_RGBA16 = np.random.default_rng(3).integers(0, 65536, (21, 34, 4)).astype(np.uint16)
_RGBA = np.dstack([_RGB, _RGB[..., 1:2]])
_CMYK = io.BytesIO()  # Random ink, black included (PIL's RGB to CMYK would leave K at 0).
Image.merge("CMYK", [Image.fromarray(x) for x in (_RGBA16 >> 8).astype(np.uint8).transpose(
    2, 0, 1)]).save(_CMYK, "JPEG", quality=90)
_ROTATED = Image.Exif()
_ROTATED[0x0112] = 6  # EXIF Orientation: rotate 90 degrees clockwise to display.
EXACT = {
    "png": _encode(_RGB, "PNG"),
    "png_gray": _encode(_RGB[..., 0], "PNG"),
    "png_rgba": _encode(np.dstack([_RGB, _RGB[..., :1]]), "PNG"),
    "png_palette": _encode(_RGB, "PNG", mode="P"),
    "png_16bit_gray": _encode(_GRAY16, "PNG"),
    "bmp": _encode(_RGB, "BMP"),
    "gif": _encode(_RGB, "GIF"),
    "webp_lossless": _encode(_RGB, "WEBP", lossless=True),
    "webp_lossy": _encode(_RGB, "WEBP", quality=80),
    "jpeg_444": _encode(_RGB, "JPEG", quality=90, subsampling=0),
    "jpeg_gray": _encode(_RGB[..., 0], "JPEG", quality=90),
    # Edge cases (docs/caching.md, "Decoding"): alpha and transparency dropped, 16 bits to
    # their high byte (TF: uint16 // 256), CMYK by TF's formula.
    "png_16bit_rgb": _png16(_RGBA16[..., :3]),
    "png_16bit_rgba": _png16(_RGBA16),
    "png_16bit_gray_alpha": _png16(_RGBA16[..., :2]),
    "png_palette_trns_index": _encode(_RGB, "PNG", mode="P", transparency=3),
    "png_palette_trns_alpha": _encode(_RGBA, "PNG", mode="P"),  # tRNS of per-entry alphas.
    "png_gray_alpha": _encode(_RGBA[..., 2:], "PNG"),  # 'LA'
    "png_gray_trns": _encode(_RGB[..., 0], "PNG", transparency=5),
    "png_rgb_trns": _encode(_RGB, "PNG", transparency=(1, 2, 3)),
    "png_1bit": _encode(_RGB[..., 0], "PNG", mode="1"),
    "jpeg_cmyk": _CMYK.getvalue(),
    "jpeg_mpo": _encode(_RGB, "MPO", quality=90, subsampling=0, save_all=True,  # TF: 1st image
                        append_images=[Image.fromarray(_RGB[::-1])]),
    # TF ignores EXIF orientation and so do we: the stored 21 x 34, not the displayed 34 x 21.
    "jpeg_exif_rotated": _encode(_RGB, "JPEG", quality=90, subsampling=0, exif=_ROTATED),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_decode_equals_tf_decode_image(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns of dropped palette alphas: not per image.
        got = imaging.decode(EXACT[name])
    assert got.dtype == np.uint8 and got.shape == (21, 34, 3)
    np.testing.assert_array_equal(got, _tf_decode(EXACT[name]))


def _jpegs_420() -> dict[str, bytes]:
    """Chroma-subsampled JPEGs: photographs shipped with matplotlib/scikit-learn (when found)
    and smooth synthetic images, as most VTAB JPEGs are."""
    out = {}
    for module, rel in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                        ("sklearn", "datasets/images/china.jpg")):
        try:
            path = os.path.join(os.path.dirname(__import__(module).__file__), rel)
            with open(path, "rb") as f:
                out[os.path.basename(path)] = f.read()
        except (ImportError, OSError):
            pass
    base = np.random.default_rng(2).integers(0, 256, (30, 40, 3), np.uint8)
    smooth = _tf_uint8(tf.image.resize(base, [237, 311]))
    for quality in (75, 95):
        out[f"smooth_q{quality}"] = _encode(smooth, "JPEG", quality=quality, subsampling=2)
    return out


@pytest.mark.parametrize("name", list(_jpegs_420()))
def test_subsampled_jpeg_is_close_to_tf(name):
    # TF: fast integer IDCT + smooth upsampling; PIL has no such pair, so these decode with
    # its accurate IDCT: the same upsampling, a slightly different rounding.
    encoded = _jpegs_420()[name]
    diff = np.abs(imaging.decode(encoded).astype(int) - _tf_decode(encoded).astype(int))
    assert diff.max() <= 16 and diff.mean() <= 2.0, (diff.max(), diff.mean())


def test_animated_gif_and_webp_give_the_first_frame():
    frames = [Image.fromarray(np.full((6, 5, 3), v, np.uint8)) for v in (40, 200)]
    for fmt, kwargs in (("GIF", {}), ("WEBP", {"lossless": True})):
        out = io.BytesIO()
        frames[0].save(out, fmt, save_all=True, append_images=frames[1:], **kwargs)
        np.testing.assert_array_equal(imaging.decode(out.getvalue()), frames[0])


def test_channels_one_keeps_gray():
    gray = _RGB[..., 0]
    np.testing.assert_array_equal(imaging.decode(_encode(gray, "PNG"), 1), gray[..., None])


@pytest.mark.parametrize("fmt, says", [("PNG", "Invalid PNG data"), ("JPEG", "Invalid JPEG data")])
def test_truncated_image_reason(fmt, says):
    encoded = _encode(_RGB, fmt)
    with pytest.raises(imaging.DecodeError, match=says) as info:
        imaging.decode(encoded[: len(encoded) // 2])
    assert ")" not in str(info.value)  # Messages quote it inside parentheses.
    with pytest.raises(imaging.DecodeError, match="Invalid image data"):
        imaging.decode(b"not an image")


def test_cache_key_names_the_implementation(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        os.makedirs(root / split / "a")
        Image.fromarray(_RGB).save(root / split / "a" / "0.png")
    key = content.content_key("folder", str(root), "val")
    assert key["pipeline"] == imaging.IMPLEMENTATION
    assert list(folder.dataset(folder.listing(str(root), "val", "train")))[0]["image"].shape == (
        21, 34, 3)


def test_tfrecord_only_dataset_says_how_to_convert(tmp_path):
    from tests.test_data import _fake_prepare  # noqa: PLC0415 - metadata only, as TFRecord.

    data_dir = str(tmp_path / "tfds")
    _fake_prepare(data_dir, "dtd:3.*.*")
    with pytest.raises(pipeline_lib.DatasetNotPreparedError) as info:
        pipeline_lib.validate("dtd", data_dir, "val")
    message = str(info.value)
    assert "TFRecord" in message and "out_file_format='array_record'" in message
    assert "--out_file_format=array_record" in message and "'.[prepare]'" in message
    assert "file_format='array_record').download_and_prepare()" in message


def test_unprepared_message_asks_for_array_record(tmp_path):
    with pytest.raises(pipeline_lib.DatasetNotPreparedError) as info:
        pipeline_lib.validate("dtd", str(tmp_path), "val")
    message = str(info.value)
    assert "pip install -e '.[prepare]' in the vqt_jax checkout" in message
    assert (f"tfds.builder('dtd:3.*.*', data_dir='{tmp_path}', file_format='array_record')"
            ".download_and_prepare()") in message
    assert f"--data_dir={tmp_path} --file_format=array_record" in message


def test_a_folder_walk_follows_links_each_real_folder_once(tmp_path):
    """predict's listing of a folder: a link to a folder elsewhere is searched, a link loop
    does not list an image once per trip around it."""
    from vqt_jax.data import folder as folder_lib

    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (root / "a.png", root / "sub" / "b.png", elsewhere / "c.png"):
        path.write_bytes(b"")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    files, skipped = folder_lib.image_files([str(root)])
    assert sorted(os.path.basename(f) for f in files) == ["a.png", "b.png", "c.png"]
    assert skipped == []
