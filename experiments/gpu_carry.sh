#!/usr/bin/env bash
# Writes what a GPU machine with only jax, flax, optax, orbax, numpy and pillow (and no network)
# needs to run `experiments/sweep_speed.py --setups gpu` from a clean checkout
# (docs/performance.md has the command that uses it):
#   DIR/fashion_mnist_1000_200_1000  a 1000/200/1000 folder of Fashion-MNIST's 28 px PNGs, from
#                                    Debian's dataset-fashion-mnist (the run resizes them to 224)
#   DIR/wheels                       the pure-Python wheels that machine lacks, at
#                                    requirements.txt's pins
#
# Usage: experiments/gpu_carry.sh [DIR]      (DIR: default .gpu_carry, which git ignores)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_carry}
# What the run imports beyond those packages and their own requirements: found by running it
# in a virtual environment of only them (docs/performance.md). TensorBoard is optional there
# (metrics.jsonl only).
names=(ml-collections)

pins=()
for name in "${names[@]}"; do
  pin=$(grep -E "^${name}==" requirements.txt) || { echo "no pin for $name" >&2; exit 1; }
  pins+=("$pin")
done
python3 -c 'import sys; from vqt_jax.data import fashion_mnist
fashion_mnist.write_vtab_style_subset(sys.argv[1], num_train=1000, num_val=200, num_test=1000)' \
  "$dir/fashion_mnist_1000_200_1000"
rm -rf "$dir/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --implementation py --abi none \
  --platform any --python-version 3.12 -d "$dir/wheels" "${pins[@]}"
ls -l "$dir/wheels"
du -sh "$dir"
