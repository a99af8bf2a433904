r"""Trains and evaluates a vqt_jax config.

  python main.py --config=configs/vtab.py:dtd --workdir=/tmp/vqt/dtd [--config.lr=0.25]
  python main.py --config=configs/vtab.py:dtd --workdir=/tmp/vqt/dtd --dry_run  # checks only

The config a run trains and records (workdir/config.json) is
`vqt_jax.resolve.resolve(get_config(ARG), {FIELD: VALUE, ...})` of the `--config.FIELD=VALUE`
flags. absl's config_flags applies those flags to get_config(ARG) itself, and train.plan_run
resolves the result; that is the same config, because resolve applies its overrides first and
config_flags sets them alike: existing fields only (an unknown one is a usage error), each
parsed to its field's type (a placeholder's too, e.g. --config.batch_size=64), on the live
config (so FieldReferences follow, as they do in resolve before it resolves them).

Bad input (config, data, checkpoint, workdir, disk, a diverged run) ends with one `error:` line
and exit status 2 (see vqt_jax/cli.py). Multi-host (TPU pod slices, GPU clusters): add
--distributed (or set VQT_DISTRIBUTED=1) on every host to call jax.distributed.initialize()
first; the coordinator is found automatically on Cloud TPU, or from
--coordinator/--num_processes/--process_id elsewhere.
"""

import sys

from absl import app, flags

from vqt_jax import cli

FLAGS = cli.define_flags(flags.FLAGS)


def _parse(argv: list[str]) -> cli.Options:
    try:
        return cli.parse(argv, FLAGS)
    except cli.UsageError as e:
        print(f"error: {cli.one_line(str(e))}", file=sys.stderr)
        sys.exit(2)


def main(options: cli.Options) -> None:
    sys.exit(cli.run_options(options))


if __name__ == "__main__":
    cli.quiet_native_logs(sys.argv)  # before the config file (or anything) imports jax
    app.run(main, flags_parser=_parse)
