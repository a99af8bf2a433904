"""The CPU inference forward of vqt_jax's ViT-B/16 next to timm's, measured in one run.

    python experiments/cpu_forward_vs_timm.py --timm_python /path/to/venv/bin/python \\
        --json experiments/results/cpu_forward_vs_timm.json

timm runs in its own process (`--timm_python`: an interpreter with torch and timm; importing
TensorFlow and torch in one process can crash, and the test environment keeps torch out). The
two alternate, `--rounds` times, each round timing `--steps` forwards of a batch of `--batch`
224x224 images (float32, random weights and inputs: the time does not depend on them), after
one warm-up per side, so both see the same machine state. vqt_jax's forward is the one its
cache builds and evaluations run (`inference.forward_fn` on a one-device mesh: on CPU, a loop of
`--rows_per_step` rows at a time inside the one program). It reports each side's images/s
(median over the rounds' medians) and the ratio vqt_jax / timm. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqt_jax import inference, timing  # noqa: E402
from vqt_jax.models import create_model  # noqa: E402

# The timm side: reads "STEPS\n" lines, answers each with the seconds of every forward.
TIMM_WORKER = r"""
import json, sys, time
import timm, torch
batch, size = int(sys.argv[1]), int(sys.argv[2])
model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000).eval()
x = torch.randn(batch, 3, size, size)
with torch.inference_mode():
    model(x)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "timm": timm.__version__}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)
"""


def parser() -> argparse.ArgumentParser:
    """The command line (README's commands are checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timm_python", required=True, help="a python with torch and timm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows_per_step", type=int, default=None,
                   help="inference.forward_fn's rows_per_step (default: its own; 0: all at once)")
    p.add_argument("--json")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    timm = subprocess.Popen([args.timm_python, "-c", TIMM_WORKER, str(args.batch),
                             str(args.image_size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    timm_info = json.loads(timm.stdout.readline())

    model = create_model("B/16", num_classes=1000)
    x = jnp.asarray(np.random.default_rng(0).normal(
        size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    forward = inference.forward_fn(model.apply, mesh, args.rows_per_step)
    forward = forward.lower(variables, x).compile()
    forward(variables, x).block_until_ready()

    def ours() -> list[float]:
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            forward(variables, x).block_until_ready()
            times.append(time.perf_counter() - t)
        return times

    def theirs() -> list[float]:
        timm.stdin.write(f"{args.steps}\n")
        timm.stdin.flush()
        return json.loads(timm.stdout.readline())

    rounds = {"vqt_jax": [], "timm": []}
    for _ in range(args.rounds):
        rounds["timm"].append(statistics.median(theirs()))
        rounds["vqt_jax"].append(statistics.median(ours()))
    timm.stdin.close()
    timm.wait()
    img_s = {k: args.batch / statistics.median(v) for k, v in rounds.items()}
    result = {"device": "cpu", "cpu_count": os.cpu_count(), "batch": args.batch,
              "image_size": args.image_size, "dtype": "float32",
              "rows_per_step": args.rows_per_step if args.rows_per_step is not None
              else inference.CPU_ROWS_PER_STEP, "model": "ViT-B/16",
              "rounds": args.rounds, "steps_per_round": args.steps, "img_s": img_s,
              "ratio_vqt_jax_over_timm": img_s["vqt_jax"] / img_s["timm"],
              "round_seconds": rounds, "machine": timing.machine(), **timm_info}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
