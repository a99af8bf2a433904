"""experiments/accelerator_bench.py's own arithmetic (its run is tests/test_tf_free.py's)."""

import importlib.util
import os

import jax
import jax.numpy as jnp

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "experiments", "accelerator_bench.py")


def _bench():
    spec = importlib.util.spec_from_file_location("accelerator_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_are_counted_on_the_cpu_exactly():
    """The count the benchmark divides its times by: 2 m k n for a matmul, whatever device
    its arrays live on (a GPU's own cost analysis leaves the cuBLAS calls out)."""
    a, b = jnp.ones((64, 32)), jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert _bench().cpu_flops(lambda x, y: x @ y, a, b) == 2 * 64 * 32 * 16
