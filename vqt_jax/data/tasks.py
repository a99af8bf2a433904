"""The 19 VTAB-1k tasks: TFDS sources, splits and label conversions.

Every task is one row of `TASKS`, looked up by name with `get_task`. The splits and conversions
follow the standard VTAB-1k definitions of google-research/task_adaptation (also used by VPT
and VQT): train800 is the first 800 training examples, val200 a fixed 200-example slice, and
train800val200 the two together, train800 first.

A conversion maps one raw TFDS example (numpy, image decoded) to ``{'image': uint8 [H, W, 3],
'label': int32 []}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

Example = Mapping[str, np.ndarray]
Converter = Callable[[Example], dict[str, np.ndarray]]
Group = Literal["natural", "specialized", "structured"]

# The four VTAB-1k split names every task defines.
SPLIT_NAMES = ("train800", "val200", "train800val200", "test")


def _out(image: np.ndarray, label: float) -> dict[str, np.ndarray]:
    return {"image": np.asarray(image), "label": np.int32(label)}


def image_and_label(example: Example) -> dict[str, np.ndarray]:
    """Conversion for the tasks whose TFDS `label` is already the class."""
    return _out(example["image"], example["label"])


def _bin_index(value: float, edges: Sequence[float]) -> int:
    """Index of the bin ``(edges[i], edges[i + 1]]`` that holds `value`.

    Same as task_adaptation's ``max(where(edges - value < 0))``: the last edge strictly below the
    value. Values at or below the first edge give -1 (task_adaptation's edges are chosen so that
    real data never does).
    """
    return int(np.sum(np.asarray(edges, np.float32) < np.float32(value))) - 1


def _clevr_count(example: Example) -> dict[str, np.ndarray]:
    # CLEVR scenes hold 3 to 10 objects: 8 classes.
    return _out(example["image"], np.size(example["objects"]["size"]) - 3)


def _clevr_distance(example: Example) -> dict[str, np.ndarray]:
    # Depth (pixel_coords[:, 2]) of the closest object; the edges give roughly balanced classes.
    depth = np.min(np.asarray(example["objects"]["pixel_coords"])[:, 2])
    return _out(example["image"], _bin_index(depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)))


def _kitti_distance(example: Example) -> dict[str, np.ndarray]:
    objects = example["objects"]
    # Object types 0, 1, 2 are Car, Van, Truck: the "vehicles" of closest_vehicle_distance.
    is_vehicle = np.asarray(objects["type"]) < 3
    # location is (x, y, z) in camera coordinates, meters; z is the distance ahead.
    vehicle_z = np.asarray(objects["location"], np.float32).reshape(-1, 3)[is_vehicle, 2]
    # A frame without vehicles counts as a vehicle at 1000 m, which lands in the last class.
    distance = np.min(np.append(vehicle_z, np.float32(1000.0)))
    return _out(example["image"], _bin_index(distance, (-100.0, 8.0, 20.0, 999.0)))


def _dsprites(attribute: str, num_values: int, num_classes: int) -> Converter:
    """dSprites: group `num_values` neighbouring attribute values into `num_classes` classes."""
    factor = np.float32(num_values / num_classes)

    def convert(example: Example) -> dict[str, np.ndarray]:
        # The images are single-channel 0/1 masks; make them RGB in [0, 255] like every other task.
        image = np.tile(np.asarray(example["image"], np.uint8), (1, 1, 3)) * np.uint8(255)
        return _out(image, np.floor_divide(np.float32(example[attribute]), factor))

    return convert


def _smallnorb(attribute: str) -> Converter:
    def convert(example: Example) -> dict[str, np.ndarray]:
        # Grayscale 96x96; tile to RGB so the model input has 3 channels.
        return _out(np.tile(example["image"], (1, 1, 3)), example[attribute])

    return convert


@dataclasses.dataclass(frozen=True)
class Task:
    """One VTAB-1k task.

    Attributes:
        name: Task name, e.g. ``'clevr_count'``.
        tfds_name: TFDS name with config and version pattern, e.g. ``'sun397/tfds:4.*.*'``.
        num_classes: Number of classes after the label conversion.
        group: VTAB group used for reporting: natural, specialized or structured.
        val200: TFDS split string of the 200 validation examples.
        test: TFDS split string of the test set.
        convert: Maps a raw TFDS example to ``{'image': uint8 [H, W, 3], 'label': int32}``.
        prepare_note: Extra advice shown when the dataset is not prepared (size, manual download).
        train800: TFDS split string of the 800 training examples.
    """

    name: str
    tfds_name: str
    num_classes: int
    group: Group
    val200: str
    test: str
    convert: Converter = image_and_label
    prepare_note: str = ""
    # Every VTAB-1k task trains on the first 800 examples of the TFDS train split.
    train800: str = "train[:800]"

    @property
    def train800val200(self) -> str:
        """train800 followed by val200 (TFDS reads a ``'+'`` concatenation in order)."""
        return f"{self.train800}+{self.val200}"

    def tfds_split(self, split_name: str) -> str:
        """Returns the TFDS split string of one of `SPLIT_NAMES`.

        Raises:
            ValueError: If `split_name` is not one of `SPLIT_NAMES`.
        """
        if split_name not in SPLIT_NAMES:
            raise ValueError(f"Unknown VTAB split {split_name!r}; expected one of {SPLIT_NAMES}.")
        return getattr(self, split_name)


_LARGE = "It is a large download (several GB or more); allow time and disk space."


def _manual(what: str) -> str:
    return (f"TFDS cannot fetch it by itself: {what} into the manual dir first "
            "(<data_dir>/downloads/manual by default; or pass "
            "download_config=tfds.download.DownloadConfig(manual_dir=DIR) to download_and_prepare, "
            "or --manual_dir to tfds build).")


TASKS: Mapping[str, Task] = {task.name: task for task in [
    # name, TFDS name, classes, group, val200, test.
    Task("caltech101", "caltech101:3.*.*", 102, "natural", "train[2754:2954]", "test"),
    Task("cifar100", "cifar100:3.*.*", 100, "natural", "train[45000:45200]", "test"),
    Task("dtd", "dtd:3.*.*", 47, "natural", "validation[:200]", "test"),
    Task("oxford_flowers102", "oxford_flowers102:2.*.*", 102, "natural",
         "validation[:200]", "test"),
    Task("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", 37, "natural", "train[2944:3144]", "test"),
    Task("svhn", "svhn_cropped:3.*.*", 10, "natural", "train[65931:66131]", "test"),
    Task("sun397", "sun397/tfds:4.*.*", 397, "natural", "validation[:200]", "test",
         prepare_note=_LARGE),
    Task("patch_camelyon", "patch_camelyon:2.*.*", 2, "specialized", "validation[:200]", "test"),
    Task("eurosat", "eurosat/rgb:2.*.*", 10, "specialized", "train[16200:16400]", "train[21600:]"),
    Task("resisc45", "resisc45:3.*.*", 45, "specialized", "train[18900:19100]", "train[25200:]",
         prepare_note=_manual("download NWPU-RESISC45.rar")),
    Task("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
         "specialized", "validation[:200]", "test",
         prepare_note=f"{_LARGE} {_manual('download the Kaggle competition files')}"),
    Task("clevr_count", "clevr:3.*.*", 8, "structured", "train[63000:63200]", "validation",
         convert=_clevr_count),
    Task("clevr_distance", "clevr:3.*.*", 6, "structured", "train[63000:63200]", "validation",
         convert=_clevr_distance),
    Task("dmlab", "dmlab:2.0.1", 6, "structured", "validation[:200]", "test", prepare_note=_LARGE),
    Task("kitti_distance", "kitti:3.1.0", 4, "structured", "validation[:200]", "test",
         convert=_kitti_distance, prepare_note=_LARGE),
    Task("dsprites_location", "dsprites:2.*.*", 16, "structured", "train[589824:590024]",
         "train[663552:]", convert=_dsprites("label_x_position", 32, 16)),
    Task("dsprites_orientation", "dsprites:2.*.*", 16, "structured", "train[589824:590024]",
         "train[663552:]", convert=_dsprites("label_orientation", 40, 16)),
    Task("smallnorb_azimuth", "smallnorb:2.*.*", 18, "structured", "test[:200]", "test[50%:]",
         convert=_smallnorb("label_azimuth")),
    Task("smallnorb_elevation", "smallnorb:2.*.*", 9, "structured", "test[:200]", "test[50%:]",
         convert=_smallnorb("label_elevation")),
]}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ReleaseSetting:
    """The VQT release's per-task settings (github andytu28/VQT, `run_demo_exp.sh`).

    Attributes:
        num_queries: T, query tokens per layer.
        compression: whether the feature-compression stage (keep 0.7) follows; the release
            runs it on the T = 1 tasks only.
    """

    num_queries: int
    compression: bool


_T1 = ReleaseSetting(num_queries=1, compression=True)
_T10 = ReleaseSetting(num_queries=10, compression=False)
_T20 = ReleaseSetting(num_queries=20, compression=False)

# One row per task, in TASKS' order: what `run_demo_exp.sh` runs for it.
RELEASE_SETTINGS: Mapping[str, ReleaseSetting] = {
    "caltech101": _T1, "cifar100": _T1, "dtd": _T1, "oxford_flowers102": _T1,
    "oxford_iiit_pet": _T1, "svhn": _T20, "sun397": _T1,
    "patch_camelyon": _T1, "eurosat": _T1, "resisc45": _T1, "diabetic_retinopathy": _T1,
    "clevr_count": _T1, "clevr_distance": _T10, "dmlab": _T20, "kitti_distance": _T20,
    "dsprites_location": _T20, "dsprites_orientation": _T1, "smallnorb_azimuth": _T20,
    "smallnorb_elevation": _T10,
}  # fmt: skip


# One row per task, in TASKS' order: the size of its test split (the `test` column), as the
# VTAB benchmark lists them; time estimates scale evaluation by it (experiments/sweep_speed.py).
TEST_SIZES: Mapping[str, int] = {
    "caltech101": 6084, "cifar100": 10000, "dtd": 1880, "oxford_flowers102": 6149,
    "oxford_iiit_pet": 3669, "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768,
    "eurosat": 5400, "resisc45": 6300, "diabetic_retinopathy": 42670, "clevr_count": 15000,
    "clevr_distance": 15000, "dmlab": 22735, "kitti_distance": 711, "dsprites_location": 73728,
    "dsprites_orientation": 73728, "smallnorb_azimuth": 12150, "smallnorb_elevation": 12150,
}  # fmt: skip


def task_names() -> list[str]:
    """Returns the names of the 19 VTAB-1k tasks in table order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """Returns the VTAB-1k task called `name`.

    Raises:
        ValueError: If `name` is not a VTAB-1k task; the message lists the valid names.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown VTAB-1k task {name!r}. Valid tasks: {', '.join(TASKS)} "
                         "(or 'folder' for an image-folder dataset).") from None
