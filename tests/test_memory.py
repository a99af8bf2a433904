"""experiments/memory.py on a tiny model: its settings, ratios, targets, table and JSON.

The real measurement (ViT-B/16 at 224, batch 64) is far too heavy for a test; these runs
use a one-layer Ti/16 at 16 pixels and only check the script's logic.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from vqt_jax import methods
from vqt_jax import trainable as trainable_lib

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_memory_module():
    # experiments/ is not a package: load the script by path, as `python experiments/...` does.
    spec = importlib.util.spec_from_file_location("memory_benchmark",
                                                  REPO_ROOT / "experiments" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


memory = _load_memory_module()
TINY_ARGS = ["--variant=Ti/16", "--image_size=16", "--batch=2", "--model", "depth=1"]


def test_every_method_is_a_setting_built_from_the_config():
    assert set(memory.SETTINGS) == {"forward", "vqt_bf16_kv", *methods.METHODS}
    fields = memory.model_fields({})
    assert (fields["num_prompts"], fields["adapter_dim"], fields["lora_rank"]) == (10, 64, 8)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    tiny = memory.model_fields({"depth": 1})
    for name, setting in memory.SETTINGS.items():
        model = memory.build_model(setting, "Ti/16", tiny)
        assert model.width == 192 and model.num_classes == memory.NUM_CLASSES
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        trainable, _ = trainable_lib.partition(v, trainable_lib.rule_for(setting.method))
        assert trainable, name
    vpt = memory.build_model(memory.SETTINGS["vpt_deep"], "B/16", fields)
    assert (vpt.num_prompts, vpt.deep_prompts, vpt.num_queries) == (10, True, 0)
    bf16 = memory.build_model(memory.SETTINGS["vqt_bf16_kv"], "B/16", fields)
    assert bf16.kv_dtype == jnp.bfloat16 and bf16.num_queries == 1
    assert not memory.SETTINGS["forward"].train


def _fake_results(mib: dict[str, float], secs: dict[str, float | None], stash: float) -> dict:
    settings = {
        name: dict(method=memory.SETTINGS[name].method, train=name != "forward",
                   optimizer=None if name == "forward" else "adam", num_trainable=1,
                   memory_mib=dict(total=m, temp=m / 2), step_seconds=secs.get(name))
        for name, m in mib.items()
    }
    return dict(settings=settings, stash_mib=stash, stash_bf16_mib=stash / 2)


def test_ratios_and_targets():
    res = _fake_results({"forward": 100.0, "vqt": 200.0, "vpt_deep": 1000.0, "full": 800.0},
                        {"forward": 1.0, "vqt": 1.2, "vpt_deep": 3.0, "full": None}, stash=90.0)
    memory._add_ratios(res)
    s = res["settings"]
    assert s["vpt_deep"]["memory_vs_vqt"] == pytest.approx(5.0)
    assert s["vpt_deep"]["memory_vs_forward"] == pytest.approx(10.0)
    assert s["vqt"]["memory_vs_vqt"] == pytest.approx(1.0)
    assert s["vpt_deep"]["time_vs_vqt"] == pytest.approx(2.5)
    assert s["full"]["time_vs_vqt"] is None  # not timed
    t = res["targets"]
    assert t["memory vqt/vpt_deep"] == dict(value=pytest.approx(0.2), at_most=0.2, met=True)
    assert t["memory vqt/full"]["value"] == pytest.approx(0.25)
    assert not t["memory vqt/full"]["met"]
    assert t["memory vqt/(forward+stash)"]["value"] == pytest.approx(200 / 190)
    assert t["memory vqt/(forward+stash)"]["met"]
    assert t["time vqt/forward"]["met"]
    lines = memory.summary_lines(res)
    assert "target memory vqt/full: 0.250 (at most 0.2) NOT MET" in lines
    assert "target memory vqt/vpt_deep: 0.200 (at most 0.2) met" in lines
    md = memory.to_markdown(res).splitlines()
    assert md[0].startswith("| setting |") and len(md) == 2 + 4
    assert "| vpt_deep | adam | 1 | 1000.0 | 500.0 | 5.000x | 10.000x | 3 | 2.500x | 3.000x |" \
        in md
    assert md[-1].endswith("| - | - | - |")  # full: no time


def test_tiny_run_measures_and_writes_json(tmp_path, capsys):
    path = tmp_path / "memory.json"
    res = memory.main([*TINY_ARGS, "--reps=1", "--settings=forward,vqt", f"--json={path}"])
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    s = res["settings"]
    assert list(s) == ["forward", "vqt"]
    assert res["model_overrides"] == {"depth": 1} and res["model"]["num_prompts"] == 10
    for r in s.values():
        assert r["memory_mib"]["total"] > 0 and r["step_seconds"] > 0
    assert s["vqt"]["time_vs_forward"] == pytest.approx(
        s["vqt"]["step_seconds"] / s["forward"]["step_seconds"])
    assert set(res["targets"]) == {"memory vqt/(forward+stash)", "time vqt/forward"}
    out = capsys.readouterr().out
    assert "| vqt | adam | 4,042 |" in out and "target time vqt/forward:" in out


def test_tiny_memory_of_vqt_vpt_deep_and_full():
    names = ["vqt", "vpt_deep", "full"]
    res = memory.run("Ti/16", 2, 16, 0, names, log=lambda _: None,
                     model_overrides={"depth": 1})
    s = res["settings"]
    assert [s[n]["optimizer"] for n in names] == ["adam", "sgd", "adamw"]
    assert all(s[n]["step_seconds"] is None for n in names)  # reps=0: memory only
    # Trainable counts: T*D query numbers per layer, P*D prompt numbers per layer, + head.
    d, c = 192, memory.NUM_CLASSES
    assert s["vqt"]["num_trainable"] == d + (2 * d + 1) * c
    assert s["vpt_deep"]["num_trainable"] == 10 * d + (d + 1) * c
    assert s["full"]["num_trainable"] > 100 * s["vqt"]["num_trainable"]
    # VQT's backward stays out of the backbone: less scratch memory than VPT-deep's, whose
    # gradient goes through every layer, even at this size.
    assert s["vqt"]["memory_mib"]["temp"] < s["vpt_deep"]["memory_mib"]["temp"]
    assert s["vqt"]["memory_mib"]["total"] < s["full"]["memory_mib"]["total"]
    assert set(res["targets"]) == {"memory vqt/vpt_deep", "memory vqt/full"}


@pytest.mark.parametrize("argv, message", [
    (["--settings=vqt,nope"], "unknown settings"),
    (["--model", "nope=1"], "unknown model fields"),
    (["--model", "depth"], "KEY=VALUE"),
])
def test_bad_arguments_fail_before_compiling(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory.main(argv)
    assert message in capsys.readouterr().err
