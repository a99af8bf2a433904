"""Bad and unusual input files of image folders, and the unprepared-TFDS advice.

Broken images must fail `data.validate` (before any training) with their paths, whichever side
of the split they are on; every format TensorFlow decodes is read; files that are skipped are
counted in a warning, never dropped silently. The fixture makers are module-level functions so
other tests can build the same bad inputs.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import shlex
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tests.train_utils import make_image_folder, tiny_config
from vqt_jax import data
from vqt_jax.data import folder as folder_lib

# ---------------------------------------------------------------------------------------------
# Fixture makers.
# ---------------------------------------------------------------------------------------------


def noise(size: int = 16, seed: int = 0) -> np.ndarray:
    """A uint8 [size, size, 3] image of random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_image(path: str | os.PathLike, pixels: np.ndarray, fmt: str, **save_args) -> str:
    """Writes `pixels` with PIL in format `fmt` ('PNG', 'BMP', 'GIF', 'WEBP', 'TIFF', ...)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **save_args)
    return str(path)


def _write_truncated(path: str | os.PathLike, fmt: str, keep: float) -> str:
    buffer = io.BytesIO()
    Image.fromarray(noise(32)).save(buffer, format=fmt)
    encoded = buffer.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encoded[: int(len(encoded) * keep)])
    return str(path)


def write_truncated_png(path: str | os.PathLike, keep: float = 0.5) -> str:
    """A PNG cut after `keep` of its bytes, as an interrupted copy leaves it."""
    return _write_truncated(path, "PNG", keep)


def write_truncated_jpeg(path: str | os.PathLike, keep: float = 0.5) -> str:
    """A JPEG cut after `keep` of its bytes."""
    return _write_truncated(path, "JPEG", keep)


def truncate_in_place(path: str | os.PathLike, keep: float = 0.5) -> str:
    """Cuts an existing file after `keep` of its bytes."""
    with open(path, "rb") as f:
        encoded = f.read()
    with open(path, "wb") as f:
        f.write(encoded[: int(len(encoded) * keep)])
    return str(path)


def small_folder(root: str | os.PathLike) -> str:
    """ROOT/{train,val,test}/class{0,1,2}/*.png with 2, 1 and 1 images per class."""
    return make_image_folder(root, counts=(("train", 2), ("val", 1), ("test", 1)), size=8)


WRITE_TRUNCATED = {"png": write_truncated_png, "jpeg": write_truncated_jpeg}
DECODER_SAYS = {"png": "Invalid PNG data", "jpeg": "Invalid JPEG data"}


# ---------------------------------------------------------------------------------------------
# Files that do not decode.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize(
    "where, split", [("train", "val"), ("val", "val"), ("val", "test"), ("test", "test")]
)
def test_truncated_image_fails_validate_with_its_path(tmp_path, where, split, fmt):
    root = small_folder(tmp_path)
    bad = WRITE_TRUNCATED[fmt](tmp_path / where / "class1" / f"broken.{fmt}")
    message = (
        rf"^Cannot decode 1 image in {re.escape(root)} \({re.escape(bad)}: "
        rf"[^)]*{DECODER_SAYS[fmt]}[^)]*\); fix or remove it\.$"
    )
    with pytest.raises(ValueError, match=message):
        data.validate("folder", root, split)


def test_many_bad_images_are_counted_and_the_first_named(tmp_path):
    root = small_folder(tmp_path)
    bad = sorted(
        write_truncated_png(tmp_path / "test" / "class0" / f"b{i}.png") for i in range(5)
    )
    with pytest.raises(ValueError) as info:
        data.validate("folder", root, "test")
    message = str(info.value)
    assert message.startswith(f"Cannot decode 5 images in {root} (e.g. {bad[0]}: ")
    assert message.endswith("; and 2 more); fix or remove them.")
    assert bad[2] in message and bad[3] not in message


def test_bad_test_image_stops_training_before_it_starts(tmp_path):
    root = small_folder(tmp_path / "images")
    bad = write_truncated_png(tmp_path / "images" / "test" / "class2" / "cut.png")
    workdir = tmp_path / "workdir"
    from vqt_jax.training import train  # Heavy; only this test needs it.

    config = tiny_config(data_dir=root, split="test")
    with pytest.raises(ValueError, match=re.escape(bad)):
        train.train_and_evaluate(config, str(workdir))
    written = [os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files]
    assert not [f for f in written if "results" in f or "checkpoint" in f], written
    assert not [d for d, _, _ in os.walk(workdir) if re.search(r"/\d+$|checkpoint", d)]


def test_image_broken_after_validate_is_named_by_the_pipeline(tmp_path):
    root = small_folder(tmp_path)
    data.validate("folder", root, "test")
    # The check passed; now a file changes under the running job.
    bad_test = truncate_in_place(tmp_path / "test" / "class1" / "0.png")
    with pytest.raises(ValueError, match=rf"Cannot decode 1 image .*{re.escape(bad_test)}"):
        list(data.make_eval_iterator("folder", root, "test", global_batch_size=2,
                                     image_size=8, process_index=0, process_count=1))
    bad_train = truncate_in_place(tmp_path / "val" / "class0" / "0.png")
    with pytest.raises(ValueError, match=rf"Cannot decode 1 image .*{re.escape(bad_train)}"):
        data.load_train_examples("folder", root, "test", image_size=8)


def test_a_passing_check_is_remembered_until_a_file_changes(tmp_path):
    root = small_folder(tmp_path)
    with mock.patch.object(
        folder_lib, "find_undecodable", wraps=folder_lib.find_undecodable
    ) as check:
        data.validate("folder", root, "val")
        data.validate("folder", root, "val")
        assert check.call_count == 1
        path = tmp_path / "val" / "class0" / "0.png"
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        data.validate("folder", root, "val")
        assert check.call_count == 2


# ---------------------------------------------------------------------------------------------
# Formats.
# ---------------------------------------------------------------------------------------------


def test_webp_is_supported_by_this_tensorflow():
    # If a TF without WebP is ever installed, .webp files count as skipped instead.
    assert ".webp" in folder_lib.IMAGE_EXTENSIONS
    assert hasattr(tf.io, "decode_webp")


def _animated_gif(path: str | os.PathLike) -> str:
    frames = [Image.fromarray(noise(10, seed=s)) for s in (1, 2)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    return str(path)


def test_bmp_gif_webp_are_read_like_pil_reads_them(tmp_path):
    root = small_folder(tmp_path)
    cls = tmp_path / "test" / "class0"
    lossless = [
        write_image(cls / "a.bmp", noise(12, seed=1), "BMP"),
        write_image(cls / "b.gif", noise(12, seed=2) // 64 * 64, "GIF"),  # Few colours: exact.
        write_image(cls / "c.webp", noise(12, seed=3), "WEBP", lossless=True),
        write_image(cls / "d.BMP", noise(9, seed=4), "BMP"),
        _animated_gif(cls / "e.gif"),
        write_image(cls / "f.webp", noise(12, seed=5)[..., :2].repeat(2, -1)[..., :3],
                    "WEBP", lossless=True),
    ]
    # A test class made only of the newly read formats, so it cannot vanish.
    only_new = [
        write_image(tmp_path / "test" / "class2" / "g.gif", noise(8, seed=6) // 64 * 64, "GIF"),
        write_image(tmp_path / "test" / "class2" / "h.webp", noise(8, seed=7), "WEBP",
                    lossless=True),
    ]
    data.validate("folder", root, "test")
    files = folder_lib.listing(root, "test", "eval")
    assert set(lossless + only_new) <= set(files.paths)
    assert data.get_num_examples("folder", root, "test", "eval") == 3 + len(lossless + only_new)
    decoded = {
        path: (example["image"], int(example["label"]))
        for path, example in zip(files.paths, folder_lib.dataset(files), strict=True)
    }
    for path in lossless + only_new:
        with Image.open(path) as image:  # An animated GIF opens at its first frame.
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decoded[path][0], expected, err_msg=path)
    assert decoded[only_new[0]][1] == 2
    labels = [
        label
        for batch in data.make_eval_iterator("folder", root, "test", global_batch_size=4,
                                             image_size=8, process_index=0, process_count=1)
        for label, mask in zip(batch["label"], batch["mask"], strict=True) if mask
    ]  # fmt: skip
    assert labels.count(2) == 1 + len(only_new)


# ---------------------------------------------------------------------------------------------
# Skipped files.
# ---------------------------------------------------------------------------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_skipped_files_are_counted_in_one_warning_per_side(tmp_path, caplog):
    root = small_folder(tmp_path)
    skipped_train = [
        str(tmp_path / "train" / "class0" / "notes.txt"),
        write_image(tmp_path / "val" / "class1" / "scan.tiff", noise(8), "TIFF"),
        write_image(tmp_path / "val" / "class2" / "scan2.tiff", noise(8), "TIFF"),
    ]
    (tmp_path / "train" / "class0" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "class1" / "nested").mkdir()
    skipped_test = [write_image(tmp_path / "test" / "class0" / "x.tif", noise(8), "TIFF")]
    # Hidden files are ignored silently.
    (tmp_path / "train" / "class0" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "test" / "class0" / "._0.png").write_bytes(b"\0")

    with caplog.at_level(logging.WARNING):
        data.validate("folder", root, "test")
        assert data.get_num_examples("folder", root, "test", "train") == 9
    messages = _warnings(caplog)
    assert len(messages) == 2, messages  # Once per side, however often the folders are listed.
    train_msg, test_msg = messages
    assert train_msg.startswith(
        f"Skipping 4 files in {tmp_path}/train and {tmp_path}/val, not "
        ".jpg/.jpeg/.png/.bmp/.gif/.webp images (.tiff: 2, "
    )
    assert ".txt: 1" in train_msg and "(subfolder): 1" in train_msg
    assert skipped_train[0] in train_msg
    assert test_msg.startswith(f"Skipping 1 file in {tmp_path}/test, not ")
    assert "(.tif: 1; e.g. " + skipped_test[0] in test_msg
    assert "DS_Store" not in " ".join(messages) and "._0" not in " ".join(messages)


def test_eval_class_of_only_unreadable_files_is_an_error(tmp_path):
    root = small_folder(tmp_path)
    lost = tmp_path / "test" / "class2"
    for f in lost.iterdir():
        f.unlink()
    write_image(lost / "a.tiff", noise(8), "TIFF")
    (lost / "b.heic").write_bytes(b"\0" * 10)
    # Without the error, class2 would silently be left out of the test accuracy.
    data.validate("folder", root, "val")
    message = (
        rf"Class folder {re.escape(str(lost))} holds 2 files but no "
        r"\.jpg/.*/\.webp images \((\.tiff: 1, \.heic: 1|\.heic: 1, \.tiff: 1); e\.g\. .*\), "
        r"so class 'class2' would be missing from the test/ data"
    )
    with pytest.raises(ValueError, match=message):
        data.validate("folder", root, "test")
    with pytest.raises(ValueError, match=message):
        data.make_eval_iterator("folder", root, "test", global_batch_size=2, image_size=8,
                                process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# Unprepared TFDS datasets.
# ---------------------------------------------------------------------------------------------


def _prepare_code(message: str) -> str:
    """The Python code of the first command the message suggests."""
    command = message.splitlines()[1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"], command
    return argv[2]


@pytest.mark.parametrize("subdir", ["data", "my data $HOME 'x'"])
def test_unprepared_message_suggests_python_first(tmp_path, subdir):
    data_dir = str(tmp_path / subdir)
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.validate("dtd", data_dir, "test")
    message = str(info.value)
    command = message.splitlines()[1].strip()
    if subdir == "data":
        assert command == (
            'python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('dtd:3.*.*', data_dir='{data_dir}', file_format='array_record')"
            ".download_and_prepare()\""
        )
    code = _prepare_code(message)
    ast.parse(code)
    # The code runs here: the builder exists in this environment (only the download is mocked).
    with mock.patch.object(
        tfds.core.DatasetBuilder, "download_and_prepare", autospec=True
    ) as prepare:
        exec(code, {})  # noqa: S102 - our own message.
    prepare.assert_called_once()
    builder = prepare.call_args.args[0]
    assert builder.name == "dtd"
    assert builder.data_dir.startswith(data_dir)
    assert not os.path.exists(data_dir) or os.listdir(data_dir) == []


def test_unprepared_message_keeps_the_manual_download_note(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.validate("resisc45", str(tmp_path), "test")
    lines = str(info.value).splitlines()
    assert lines[1].strip().startswith("python -c ")
    assert "NWPU-RESISC45.rar" in lines[-1] and "manual dir" in lines[-1]
    ast.parse(_prepare_code(str(info.value)))
