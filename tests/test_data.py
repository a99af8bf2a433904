"""Tests of vqt_jax.data: the VTAB-1k task table, conversions, streams and image folders.

No test touches the network. TFDS reads (`as_data_source`, ArrayRecord) go through
`tfds.testing.mock_data` over a data dir where the datasets look prepared (metadata only, written
by `_fake_prepare`); the "not prepared" tests use a real, empty data dir.
"""

from __future__ import annotations

import fnmatch
import io
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.testing import mocking

from vqt_jax import data

# The VTAB-1k table of /work/shared/reference/vtab-1k.md, written out independently of the
# code: task -> (TFDS name, classes, group, train800, val200, test).
VTAB = {
    "caltech101": ("caltech101:3.*.*", 102, "natural", "train[:800]", "train[2754:2954]", "test"),
    "cifar100": ("cifar100:3.*.*", 100, "natural", "train[:800]", "train[45000:45200]", "test"),
    "dtd": ("dtd:3.*.*", 47, "natural", "train[:800]", "validation[:200]", "test"),
    "oxford_flowers102": (
        "oxford_flowers102:2.*.*", 102, "natural", "train[:800]", "validation[:200]", "test"),
    "oxford_iiit_pet": (
        "oxford_iiit_pet:3.*.*", 37, "natural", "train[:800]", "train[2944:3144]", "test"),
    "svhn": ("svhn_cropped:3.*.*", 10, "natural", "train[:800]", "train[65931:66131]", "test"),
    "sun397": ("sun397/tfds:4.*.*", 397, "natural", "train[:800]", "validation[:200]", "test"),
    "patch_camelyon": (
        "patch_camelyon:2.*.*", 2, "specialized", "train[:800]", "validation[:200]", "test"),
    "eurosat": (
        "eurosat/rgb:2.*.*", 10, "specialized", "train[:800]", "train[16200:16400]",
        "train[21600:]"),
    "resisc45": (
        "resisc45:3.*.*", 45, "specialized", "train[:800]", "train[18900:19100]",
        "train[25200:]"),
    "diabetic_retinopathy": (
        "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5, "specialized", "train[:800]",
        "validation[:200]", "test"),
    "clevr_count": (
        "clevr:3.*.*", 8, "structured", "train[:800]", "train[63000:63200]", "validation"),
    "clevr_distance": (
        "clevr:3.*.*", 6, "structured", "train[:800]", "train[63000:63200]", "validation"),
    "dmlab": ("dmlab:2.0.1", 6, "structured", "train[:800]", "validation[:200]", "test"),
    "kitti_distance": ("kitti:3.1.0", 4, "structured", "train[:800]", "validation[:200]", "test"),
    "dsprites_location": (
        "dsprites:2.*.*", 16, "structured", "train[:800]", "train[589824:590024]",
        "train[663552:]"),
    "dsprites_orientation": (
        "dsprites:2.*.*", 16, "structured", "train[:800]", "train[589824:590024]",
        "train[663552:]"),
    "smallnorb_azimuth": (
        "smallnorb:2.*.*", 18, "structured", "train[:800]", "test[:200]", "test[50%:]"),
    "smallnorb_elevation": (
        "smallnorb:2.*.*", 9, "structured", "train[:800]", "test[:200]", "test[50%:]"),
}  # fmt: skip

# Split sizes of the fake-prepared datasets: big enough for every VTAB slice.
FAKE_SPLIT_SIZES = {"train": 800_000, "validation": 20_000, "test": 30_000}


def _fake_prepare(data_dir: str, tfds_name: str, sizes: dict[str, int] = FAKE_SPLIT_SIZES):
    """Writes the metadata of `tfds_name` into data_dir, so TFDS sees it as prepared.

    Only the metadata: reading the examples has to go through `tfds.testing.mock_data`.
    """
    name, _, version = tfds_name.partition(":")
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        version_dir = builder.data_path
    except AssertionError:
        # This TFDS cannot build that version (oxford_iiit_pet 3.*.*): relabel the code
        # version's metadata, as a copy prepared by an older TFDS would be.
        builder = tfds.builder(name, data_dir=data_dir)
        version_dir = builder.data_path.parent / version.replace("*", "0")
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    version_dir.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(version_dir)
    info_file = version_dir / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["version"] = version_dir.name
    info_file.write_text(json.dumps(info))


class TinyVtab(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real TFDS dataset, prepared as ArrayRecord files: image i of a split is one colour,
    its pixel value equal to its label (start + i) and of height 5 + i % 3. Not registered:
    TFDS finds it by its files, as it finds any prepared dataset without its code."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS = {"train": (0, 30), "validation": (100, 10), "test": (200, 7)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=256)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(*args) for name, args in self.SPLITS.items()}

    def _generate_examples(self, start, n):
        for i in range(n):
            yield i, {"image": np.full((5 + i % 3, 6, 3), start + i, np.uint8), "label": start + i}


def prepare_tiny_vtab(data_dir: str, monkeypatch=None) -> str:
    """Prepares `TinyVtab` (needs TensorFlow) in data_dir; returns the task that reads it: dtd,
    pointed at it (train800 = train[:4], val200 = validation[:3]) when `monkeypatch` is given."""
    TinyVtab(data_dir=data_dir, file_format="array_record").download_and_prepare()
    if monkeypatch is not None:
        monkeypatch.setitem(data.TASKS, "dtd", tiny_task())
    return "dtd"


def tiny_task():
    """dtd's row, pointed at `TinyVtab`."""
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(data.TASKS["dtd"], tfds_name="tiny_vtab:1.*.*",
                               train800="train[:4]", val200="validation[:3]", test="test")


def test_array_record_dataset_is_read_in_split_order(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    task = prepare_tiny_vtab(data_dir, monkeypatch)
    # The order in which the TF pipeline read the same dataset, prepared as TFRecord files.
    TinyVtab(data_dir=str(tmp_path / "tfrecord")).download_and_prepare()
    reference = tfds.builder("tiny_vtab", data_dir=str(tmp_path / "tfrecord")).as_dataset(
        split="train[:4]+validation[:3]", shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1))
    order = [int(ex["label"]) for ex in reference.as_numpy_iterator()]
    data.validate(task, data_dir, "test")
    images, labels = data.load_train_examples(task, data_dir, "test", image_size=4)
    assert labels.tolist() == order  # train[:4], then validation[:3]
    assert max(order[:4]) < 30 and min(order[4:]) >= 100
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    hosts = [list(data.make_eval_iterator(task, data_dir, "val", global_batch_size=4,
                                          image_size=4, process_index=h, process_count=2))
             for h in range(2)]
    real = [[int(y) for b in batches for y, m in zip(b["label"], b["mask"], strict=True) if m]
            for batches in hosts]
    assert real[0] + real[1] != order[4:] and sorted(real[0] + real[1]) == sorted(order[4:])
    assert real[0] == order[4::2] and real[1] == order[5::2]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data dir where all 16 VTAB-1k source datasets look prepared."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for tfds_name in sorted({v[0] for v in VTAB.values()}):
        _fake_prepare(data_dir, tfds_name)
    return data_dir


def _first(iterator, n=1):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Task table.
# ---------------------------------------------------------------------------------------------


def test_table_matches_reference():
    assert data.task_names() == list(VTAB)
    for name, (tfds_name, num_classes, group, train800, val200, test) in VTAB.items():
        task = data.get_task(name)
        assert (task.name, task.tfds_name, task.num_classes, task.group) == (
            name,
            tfds_name,
            num_classes,
            group,
        ), name
        assert task.tfds_split("train800") == train800
        assert task.tfds_split("val200") == val200
        assert task.tfds_split("test") == test
        assert task.tfds_split("train800val200") == f"{train800}+{val200}"


def test_groups():
    groups = [t.group for t in data.TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized")) == (7, 4)
    assert groups.count("structured") == 8


def test_unknown_task_and_split_names():
    with pytest.raises(ValueError, match=r"'nope'.*caltech101.*smallnorb_elevation"):
        data.get_task("nope")
    with pytest.raises(ValueError, match="'nope'"):
        data.validate("nope", "/nonexistent", "val")
    with pytest.raises(ValueError, match="'nope'"):
        data.make_train_iterator("nope", "/nonexistent", "val", global_batch_size=2)
    with pytest.raises(ValueError, match="'train1000'"):
        data.get_task("dtd").tfds_split("train1000")
    with pytest.raises(ValueError, match="'trainval'"):
        data.validate("dtd", "/nonexistent", "trainval")


# ---------------------------------------------------------------------------------------------
# What the pipeline asks TFDS for.
# ---------------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(out, "PNG")
    return out.getvalue()


def _fake_source(self, split, decoders=None, num=3, **kwargs):
    """mock_data's random examples as a data source (images encoded, as SkipDecoding leaves
    them), but with every variable length set to 10.

    By default the mock draws each variable length on its own, so e.g. kitti's objects/type
    and objects/location would disagree in length, which real data never does.
    """
    del split, kwargs
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    fake = mocking.RandomFakeGenerator(self.info.features, num, constant_dynamic_shape=True)
    return [{**fake[i], "image": _png(fake[i]["image"])} for i in range(num)]


@pytest.fixture
def tfds_requests(tfds_dir):
    """Mocks TFDS over `tfds_dir` and records (name given to tfds.builder, split) pairs."""
    requests = []
    real_builder = tfds.builder

    def builder(name, **kwargs):
        requests.append(("builder", name, kwargs.get("data_dir"), kwargs.get("try_gcs")))
        return real_builder(name, **kwargs)

    def as_data_source(self, split=None, **kwargs):
        requests.append(("as_data_source", self.name, str(self.version), split))
        return _fake_source(self, split, **kwargs)

    with tfds.testing.mock_data(data_dir=tfds_dir, as_data_source_fn=as_data_source):
        with mock.patch.object(tfds, "builder", builder):
            yield requests


@pytest.mark.parametrize("split", ["val", "test"])
def test_pipeline_requests_vtab_splits(tfds_requests, tfds_dir, split):
    for name, (tfds_name, _, _, train800, val200, test) in VTAB.items():
        train_split = train800 if split == "val" else f"{train800}+{val200}"
        eval_split = val200 if split == "val" else test
        tfds_requests.clear()
        train = data.make_train_iterator(
            name,
            tfds_dir,
            split,
            global_batch_size=2,
            image_size=8,
            process_count=1,
            process_index=0,
        )
        batch = next(train)
        assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        evals = list(
            data.make_eval_iterator(
                name,
                tfds_dir,
                split,
                global_batch_size=2,
                image_size=8,
                process_count=1,
                process_index=0,
            )
        )
        assert sum(b["mask"].sum() for b in evals) == 3

        builders = [r for r in tfds_requests if r[0] == "builder"]
        reads = [r for r in tfds_requests if r[0] == "as_data_source"]
        assert builders == [("builder", tfds_name, tfds_dir, False)] * 2, name
        assert [r[3] for r in reads] == [train_split, eval_split], name
        base, _, version = tfds_name.partition(":")
        assert all(fnmatch.fnmatch(r[2], version) for r in reads), (name, reads)
        assert all(r[1] == base.split("/")[0] for r in reads), (name, reads)


def test_validate_prepared_and_split_sizes(tfds_dir, tmp_path):
    with tfds.testing.mock_data(num_examples=3, data_dir=tfds_dir):
        for name in VTAB:
            for split in ("val", "test"):
                data.validate(name, tfds_dir, split)
    # A prepared copy too small for the VTAB slices (e.g. a different version) is caught.
    small_dir = str(tmp_path / "small")
    _fake_prepare(small_dir, "cifar100:3.*.*", {"train": 1000, "test": 100})
    with pytest.raises(ValueError, match=r"train\[45000:45200\]"):
        data.validate("cifar100", small_dir, "val")


def test_num_examples_and_classes(tfds_dir):
    with tfds.testing.mock_data(num_examples=5, data_dir=tfds_dir):
        assert data.get_num_examples("dtd", tfds_dir, "val", "train") == 5
        assert data.get_num_examples("dtd", tfds_dir, "test", "eval") == 5
    assert data.get_num_classes("sun397") == 397
    assert data.get_num_classes("clevr_distance") == 6


# ---------------------------------------------------------------------------------------------
# Not prepared: fails at once and says what to run.
# ---------------------------------------------------------------------------------------------


def test_unprepared_dataset_fails_fast_in_fresh_process(tmp_path):
    # A fresh process, under a hard timeout, so a network wait fails the test instead of
    # hanging it.
    code = textwrap.dedent(f"""
        import time
        from vqt_jax import data
        start = time.monotonic()
        try:
            data.make_train_iterator('dtd', {str(tmp_path)!r}, 'val', global_batch_size=2)
        except data.DatasetNotPreparedError as e:
            print(e)
            print('SECONDS', time.monotonic() - start)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=root
    )
    assert f"tfds build 'dtd:3.*.*' --data_dir={tmp_path}" in result.stdout, result.stderr
    seconds = float(result.stdout.split("SECONDS")[1])
    assert seconds < 10
    assert os.listdir(tmp_path) == []  # Nothing downloaded or created.


@pytest.mark.parametrize(
    "task, expected",
    [
        ("dtd", r"tfds build 'dtd:3\.\*\.\*' --data_dir="),
        ("sun397", r"tfds build 'sun397/tfds:4\.\*\.\*'(.|\n)*large download"),
        ("resisc45", r"manual dir"),
        ("diabetic_retinopathy", r"large download(.|\n)*manual dir"),
        ("dmlab", r"tfds build 'dmlab:2\.0\.1'(.|\n)*large download"),
        ("kitti_distance", r"tfds build 'kitti:3\.1\.0'(.|\n)*large download"),
        ("oxford_iiit_pet", r"cannot build it either(.|\n)*3\.\*\.\*"),
    ],
)
def test_unprepared_dataset_message(tmp_path, task, expected):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError, match=expected) as info:
        data.validate(task, str(tmp_path), "test")
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------
# Label and image conversions.
# ---------------------------------------------------------------------------------------------


def _convert(task_name, example):
    out = data.get_task(task_name).convert(example)
    assert out["label"].dtype == np.int32 and out["image"].dtype == np.uint8
    return out["image"], int(out["label"])


def _image(h=4, w=5, c=3):
    return np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c)


@pytest.mark.parametrize("num_objects, label", [(3, 0), (4, 1), (10, 7)])
def test_clevr_count(num_objects, label):
    objects = {
        "size": np.zeros(num_objects, np.int64),
        "pixel_coords": np.ones((num_objects, 3), np.float32),
    }
    image, got = _convert("clevr_count", {"image": _image(), "objects": objects})
    assert got == label
    np.testing.assert_array_equal(image, _image())


@pytest.mark.parametrize(
    "depths, label",
    [([12.0, 7.9], 0), ([8.0], 0), ([8.01, 30.0], 1), ([8.7], 2), ([9.2], 3), ([9.7], 4),
     ([10.0], 4), ([10.5, 50.0], 5), ([99.0], 5)],
)  # fmt: skip
def test_clevr_distance(depths, label):
    # The closest object's depth is the third pixel coordinate; x, y must not matter.
    coords = np.array([[1.0, 2.0, d] for d in depths], np.float32)
    objects = {"size": np.zeros(len(depths), np.int64), "pixel_coords": coords}
    assert _convert("clevr_distance", {"image": _image(), "objects": objects})[1] == label


CAR, VAN, TRUCK, PEDESTRIAN, TRAM, MISC = 0, 1, 2, 3, 6, 7


@pytest.mark.parametrize(
    "objects, label",
    [
        ([(CAR, 5.0)], 0),
        ([(VAN, 8.0)], 0),
        ([(PEDESTRIAN, 2.0), (CAR, 15.0)], 1),
        ([(TRUCK, 25.0), (CAR, 40.0)], 2),
        ([(PEDESTRIAN, 2.0), (TRAM, 3.0), (MISC, 4.0)], 3),  # No vehicle.
        ([], 3),
    ],
)
def test_kitti_closest_vehicle_distance(objects, label):
    types = np.array([t for t, _ in objects], np.int64)
    # location is (x, y, z); only z, the distance ahead, counts.
    location = np.array([[-3.0, 1.0, z] for _, z in objects], np.float32).reshape(-1, 3)
    example = {"image": _image(), "objects": {"type": types, "location": location}}
    assert _convert("kitti_distance", example)[1] == label


def _dsprites_example(x_position=0, orientation=0):
    mask = np.zeros((64, 64, 1), np.uint8)
    mask[10:20, 30:40] = 1
    return {
        "image": mask,
        "label_x_position": np.int64(x_position),
        "label_orientation": np.int64(orientation),
        "label_shape": np.int64(1),
    }


@pytest.mark.parametrize("x_position, label", [(0, 0), (1, 0), (2, 1), (17, 8), (31, 15)])
def test_dsprites_location(x_position, label):
    image, got = _convert("dsprites_location", _dsprites_example(x_position=x_position))
    assert got == label
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) == {0, 255}
    assert (image[15, 35] == 255).all() and (image[0, 0] == 0).all()


@pytest.mark.parametrize(
    "orientation, label", [(0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (24, 9), (39, 15)]
)
def test_dsprites_orientation(orientation, label):
    assert _convert("dsprites_orientation", _dsprites_example(orientation=orientation))[1] == label


@pytest.mark.parametrize(
    "task, field, value",
    [("smallnorb_azimuth", "label_azimuth", 17), ("smallnorb_elevation", "label_elevation", 8)],
)
def test_smallnorb(task, field, value):
    gray = _image(96, 96, 1)
    example = {
        "image": gray,
        "image2": gray,
        "label_azimuth": np.int64(3),
        "label_elevation": np.int64(2),
        "label_category": np.int64(1),
    }
    example[field] = np.int64(value)
    image, label = _convert(task, example)
    assert label == value
    np.testing.assert_array_equal(image, np.repeat(gray, 3, axis=2))


def test_plain_label_tasks_pass_label_through():
    image, label = _convert("dtd", {"image": _image(), "label": np.int64(46), "file_name": "x"})
    assert label == 46
    np.testing.assert_array_equal(image, _image())


# ---------------------------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------------------------


def test_normalization_ranges():
    pixels = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    inception = data.normalize(pixels, "inception")
    np.testing.assert_allclose(inception, [[-1, -1, -1], [1, 1, 1]], atol=1e-6)
    imagenet = data.normalize(pixels, "imagenet")
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(imagenet, [-mean / std, (1 - mean) / std], rtol=1e-5)
    custom = data.normalize(pixels, ((0.5, 0.25, 0.0), (0.25, 0.25, 0.5)))
    np.testing.assert_allclose(custom, [[-2, -1, 0], [2, 3, 2]], rtol=1e-5)
    assert inception.dtype == np.float32
    for bad in ["imagenet21k", ((0.5, 0.5), (0.5, 0.5)), ((0.5,) * 3, (0.0, 1.0, 1.0))]:
        with pytest.raises(ValueError):
            data.normalize(pixels, bad)


def test_resize_is_bilinear_without_crop():
    # A horizontal ramp, 10 * x: bilinear sampling of the full width (half-pixel centres) gives
    # 10 * ((i + 0.5) * 20 / 6 - 0.5) in output column i; nearest or a crop would not.
    ramp = np.broadcast_to((10 * np.arange(20, dtype=np.uint8))[None, :, None], (10, 20, 3))
    out = data.resize(ramp, 6)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    expected = np.round(10 * ((np.arange(6) + 0.5) * 20 / 6 - 0.5))
    np.testing.assert_array_equal(out, np.broadcast_to(expected[None, :, None], (6, 6, 3)))
    flat = np.full((7, 3, 3), 77, np.uint8)
    assert (data.resize(flat, 5) == 77).all()


# ---------------------------------------------------------------------------------------------
# Training stream.
# ---------------------------------------------------------------------------------------------


def _id_arrays(n, size=2):
    """Examples whose label is their index and whose pixels all equal the index."""
    images = np.broadcast_to(
        np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)
    ).copy()
    return images, np.arange(n, dtype=np.int32)


def _train_labels(n, steps, **kwargs):
    images, labels = _id_arrays(n)
    ds = data.train_dataset(images, labels, normalization=((0, 0, 0), (1 / 255,) * 3), **kwargs)
    batches = list(itertools.islice(ds, steps))
    for b in batches:  # Images travel with their labels.
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
    return np.stack([b["label"] for b in batches])


def test_train_same_seed_same_stream_other_seed_other_stream():
    a = _train_labels(10, 6, global_batch_size=4, seed=3)
    b = _train_labels(10, 6, global_batch_size=4, seed=3)
    c = _train_labels(10, 6, global_batch_size=4, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_epochs_are_reshuffled_permutations():
    n = 12
    labels = _train_labels(n, 4, global_batch_size=n, seed=0)  # One batch per epoch.
    for epoch in labels:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(epoch) for epoch in labels}) == 4
    # Batches that straddle epochs: 3 epochs of 10 in batches of 4 still use each id 3 times.
    stream = _train_labels(10, 30 // 4, global_batch_size=4, seed=1).ravel()
    assert sorted(stream[:20]) == sorted(list(range(10)) * 2)


def test_train_start_step_resumes_exactly():
    full = _train_labels(10, 9, global_batch_size=4, seed=5)
    resumed = _train_labels(10, 4, global_batch_size=4, seed=5, start_step=5)
    np.testing.assert_array_equal(resumed, full[5:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_host_slices_make_up_the_global_batch(process_count):
    single = _train_labels(10, 5, global_batch_size=8, seed=2, start_step=3)
    slices = [
        _train_labels(
            10,
            5,
            global_batch_size=8,
            seed=2,
            start_step=3,
            process_index=h,
            process_count=process_count,
        )
        for h in range(process_count)
    ]
    assert slices[0].shape == (5, 8 // process_count)
    np.testing.assert_array_equal(np.concatenate(slices, axis=1), single)


def test_train_bad_arguments():
    images, labels = _id_arrays(4)
    with pytest.raises(ValueError, match="process_count"):
        data.train_dataset(images, labels, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="start_step"):
        data.train_dataset(images, labels, global_batch_size=2, start_step=-1)
    with pytest.raises(ValueError, match="empty"):
        data.train_dataset(images[:0], labels[:0], global_batch_size=2)
    with pytest.raises(ValueError, match="process_index=2"):
        data.train_dataset(images, labels, global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_index=3"):
        data.eval_dataset(_id_examples(4), 4, global_batch_size=3, process_index=3, process_count=3)


def test_make_train_iterator_deterministic_and_resumable(tfds_dir):
    with tfds.testing.mock_data(num_examples=6, data_dir=tfds_dir):
        kwargs = dict(global_batch_size=4, image_size=8, seed=7, process_index=0, process_count=1)
        a = _first(data.make_train_iterator("dtd", tfds_dir, "val", **kwargs), 4)
        b = _first(data.make_train_iterator("dtd", tfds_dir, "val", start_step=2, **kwargs), 2)
        c = _first(data.make_train_iterator("dtd", tfds_dir, "val", **{**kwargs, "seed": 8}), 4)
    for x, y in zip(a[2:], b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    assert a[0]["image"].min() >= -1 and a[0]["image"].max() <= 1


# ---------------------------------------------------------------------------------------------
# Evaluation stream.
# ---------------------------------------------------------------------------------------------


def _id_examples(n):
    images, labels = _id_arrays(n, size=3)
    return [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]


def _eval_hosts(n, local_batch, process_count, **kwargs):
    """Batches of every host; checks that they agree on the number of steps and shapes."""
    hosts = []
    for h in range(process_count):
        ds = data.eval_dataset(
            _id_examples(n),
            n,
            global_batch_size=local_batch * process_count,
            image_size=3,
            process_index=h,
            process_count=process_count,
            normalization=((0, 0, 0), (1 / 255,) * 3),
            **kwargs,
        )
        hosts.append(list(ds))
    assert len({len(batches) for batches in hosts}) == 1
    for batches in hosts:
        for b in batches:
            assert b["image"].shape == (local_batch, 3, 3, 3)
            assert b["label"].shape == b["mask"].shape == (local_batch,)
    return hosts


@pytest.mark.parametrize("process_count", [1, 2, 3])
@pytest.mark.parametrize("n, local_batch", [(1, 4), (7, 4), (10, 3), (23, 4), (24, 4)])
def test_eval_counts_every_example_once(n, local_batch, process_count):
    hosts = _eval_hosts(n, local_batch, process_count)
    real = [
        (int(label), float(image[0, 0, 0]))
        for batches in hosts
        for b in batches
        for label, image, m in zip(b["label"], b["image"], b["mask"], strict=True)
        if m == 1
    ]
    assert sorted(label for label, _ in real) == list(range(n))
    assert all(label == pixel for label, pixel in real)
    num_steps = len(hosts[0])
    # No step is pure padding on every host: the fewest steps that hold every example.
    assert num_steps == math.ceil(math.ceil(n / process_count) / local_batch)
    masks = np.concatenate([b["mask"] for batches in hosts for b in batches])
    assert set(np.unique(masks)) <= {0.0, 1.0} and masks.sum() == n
    assert len(masks) == num_steps * local_batch * process_count


def test_eval_padding_is_zero():
    (batches,) = _eval_hosts(5, 4, 1)
    pad = batches[-1]["mask"] == 0
    assert pad.sum() == 3
    assert (batches[-1]["image"][pad] == 0).all() and (batches[-1]["label"][pad] == 0).all()


def test_eval_local_batch_must_split_over_local_devices():
    with pytest.raises(ValueError, match="local_device_count=4"):
        _eval_hosts(10, 6, 2, local_device_count=4)
    _eval_hosts(10, 8, 2, local_device_count=4)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_make_eval_iterator_shards_tfds_examples(tfds_dir, process_count):
    n = 23

    def as_data_source(self, split, decoders=None, **kwargs):
        del self, split, decoders, kwargs
        images, labels = _id_arrays(n, size=5)
        return [{"image": _png(x), "label": np.int64(y), "id": str(y),
                 "coarse_label": np.int64(y % 20)} for x, y in zip(images, labels, strict=True)]

    seen = []
    with tfds.testing.mock_data(data_dir=tfds_dir, as_data_source_fn=as_data_source):
        for h in range(process_count):
            batches = list(
                data.make_eval_iterator(
                    "cifar100",
                    tfds_dir,
                    "test",
                    global_batch_size=4 * process_count,
                    image_size=4,
                    process_index=h,
                    process_count=process_count,
                )
            )
            assert len(batches) == math.ceil(math.ceil(n / process_count) / 4)
            for b in batches:
                seen.extend(b["label"][b["mask"] == 1].tolist())
    assert sorted(seen) == list(range(n))


# ---------------------------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------------------------


def _write_image(path, value, size=(6, 9), channels=3, fmt="png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.full([*size, channels], value, np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    image.save(path, format="PNG" if fmt == "png" else "JPEG", quality=100)


def _make_tree(root, layout):
    """layout: {'train/cat': [pixel values], ...}: one image per value."""
    for folder, values in layout.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i, v in enumerate(values):
            _write_image(os.path.join(root, folder, f"img{i}.png"), v)
    return str(root)


LAYOUT = {
    "train/dog": [10, 11, 12], "train/cat": [20, 21], "train/emu": [30],
    "val/cat": [40], "val/emu": [50, 51],
    "test/dog": [60], "test/emu": [70],
}  # fmt: skip


def _folder_values(batches):
    """(pixel value, label) of the real examples, with 'inception' normalization undone."""
    out = []
    for b in batches:
        mask = b.get("mask", np.ones_like(b["label"]))
        for image, label, m in zip(b["image"], b["label"], mask, strict=True):
            if m:
                out.append((round((image[0, 0, 0] + 1) * 127.5), int(label)))
    return sorted(out)


def test_folder_happy_path(tmp_path):
    root = _make_tree(tmp_path, LAYOUT)
    # Noise that must be ignored: a hidden folder, a non-image file, and a grayscale JPEG.
    _make_tree(tmp_path, {".ipynb_checkpoints/x": [1], "train/.cache": []})
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    _write_image(str(tmp_path / "train" / "cat" / "gray.JPG"), 22, channels=1, fmt="jpeg")
    cat, dog, emu = 0, 1, 2  # Sorted folder names.
    assert data.get_num_classes("folder", root) == 3
    data.validate("folder", root, "val")
    data.validate("folder", root, "test")
    assert data.get_num_examples("folder", root, "val", "train") == 7
    assert data.get_num_examples("folder", root, "test", "train") == 10

    common = dict(image_size=5, process_index=0, process_count=1)
    train = _first(data.make_train_iterator("folder", root, "val", global_batch_size=7, **common))
    assert train[0]["image"].shape == (7, 5, 5, 3)
    expected_train = [(10, dog), (11, dog), (12, dog), (20, cat), (21, cat), (22, cat), (30, emu)]
    assert _folder_values(train) == expected_train
    val = list(data.make_eval_iterator("folder", root, "val", global_batch_size=2, **common))
    assert _folder_values(val) == [(40, cat), (50, emu), (51, emu)]

    train_test = _first(
        data.make_train_iterator("folder", root, "test", global_batch_size=10, **common)
    )
    assert _folder_values(train_test) == sorted([*expected_train, (40, cat), (50, emu), (51, emu)])
    test = list(data.make_eval_iterator("folder", root, "test", global_batch_size=4, **common))
    assert _folder_values(test) == [(60, dog), (70, emu)]
    # Without host arguments: jax's process index and count (0 and 1 here).
    test = list(data.make_eval_iterator("folder", root, "test", global_batch_size=4, image_size=5))
    assert _folder_values(test) == [(60, dog), (70, emu)]


def test_folder_val_split_does_not_need_test(tmp_path):
    root = _make_tree(tmp_path, {k: v for k, v in LAYOUT.items() if not k.startswith("test")})
    data.validate("folder", root, "val")
    with pytest.raises(ValueError, match=f"{tmp_path}.*test/"):
        data.validate("folder", root, "test")


@pytest.mark.parametrize(
    "layout, split, side, message",
    [
        ({"val/cat": [1]}, "val", "train", "no train/ subfolder"),
        ({"train/cat": [1], "test/cat": [2]}, "val", "eval", "no val/ subfolder"),
        ({"train/cat": [1], "test/cat": [2]}, "test", "train", "no val/ subfolder"),
        ({"train/cat": [1], "val/cat": [2]}, "test", "eval", "no test/ subfolder"),
        ({"train/cat": [1], "val/cow": [2]}, "val", "eval", r"val/cow has no counterpart"),
        ({"train/cat": [1], "val/cow": [2], "test/cat": [3]}, "test", "train",
         r"val/cow has no counterpart"),
        ({"train/cat": [1], "val/cat": [2], "test/cat": [3], "test/cow": [4]}, "test", "eval",
         r"test/cow has no counterpart"),
        ({"train": [], "val/cat": [1]}, "val", "train", "no class subfolders"),
        ({"train/cat": [], "val/cat": [1]}, "val", "train", r"train/cat has no .*images"),
        ({"train/cat": [1], "val/cat": []}, "val", "eval", r"No .*images found in .*val"),
    ],
)  # fmt: skip
def test_folder_errors(tmp_path, layout, split, side, message):
    root = _make_tree(tmp_path, layout)
    with pytest.raises(ValueError, match=message) as info:
        data.validate("folder", root, split)
    assert str(tmp_path) in str(info.value)
    # The iterator that reads the broken side fails the same way.
    make = data.make_train_iterator if side == "train" else data.make_eval_iterator
    with pytest.raises(ValueError, match=message):
        make("folder", root, split, global_batch_size=1, process_index=0, process_count=1)


def test_folder_needs_a_root():
    with pytest.raises(ValueError, match="data_dir"):
        data.validate("folder", None, "val")
