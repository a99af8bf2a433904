r"""Trains and evaluates a vqt_jax config.

  python main.py --config=configs/vtab.py:dtd --workdir=/tmp/vqt/dtd [--config.lr=0.25]

Multi-host (TPU pod slices, GPU clusters): add --distributed (or set VQT_DISTRIBUTED=1) on every
host to call jax.distributed.initialize() first; the coordinator is found automatically on
Cloud TPU, or from --coordinator/--num_processes/--process_id elsewhere.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vtab.py:dtd.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.DEFINE_bool("distributed", os.environ.get("VQT_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host off Cloud TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host off Cloud TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host off Cloud TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    if FLAGS.distributed:
        # CPU devices of different processes talk through gloo (no effect on TPU/GPU); it must
        # be set before any backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    from vqt_jax.training import train

    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError) as e:
        # Bad config, data or checkpoint: the message says what to fix; no traceback needed.
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2, sort_keys=True))
        print(summary(results))


def summary(results: dict) -> str:
    """One line: the method's top-1, then its compressed head's and the baselines' if any."""
    heads = {results["method"]: results["top1"]}
    if "compression" in results:
        heads[f"{results['method']} (compressed)"] = results["compression"]["top1"]
    for name, r in results.get("baselines", {}).items():
        heads[name] = r["top1"]
    split = "val" if results["split"] == "val" else "test"
    return f"{split} top-1: " + " | ".join(f"{k} {100 * v:.1f}%" for k, v in heads.items())


if __name__ == "__main__":
    app.run(main)
