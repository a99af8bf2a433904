"""FLOP counts (vqt_jax/costs.py), against arithmetic done by hand."""

import jax
import jax.numpy as jnp

from vqt_jax import cache as cache_lib
from vqt_jax import costs
from vqt_jax.models import create_model

TINY = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=5)


def test_a_matmul_counts_2mkn_whatever_device_its_arrays_live_on():
    a, b = jnp.ones((64, 32)), jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert costs.cpu_flops(lambda x, y: x @ y, a, b) == 2 * 64 * 32 * 16


def _variables(model, size=32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_the_forward_count_is_the_vits_matmuls_plus_its_elementwise_ops():
    model = create_model(**TINY)
    n, d, mlp = 17, 32, 64  # 16 patches of 8x8 at 32 px, and the class token
    matmuls = (2 * 16 * (8 * 8 * 3) * d  # patch embedding
               + 2 * (2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp)
               + 2 * d * 5)  # head
    flops = costs.forward_flops(model, _variables(model), 32)
    assert matmuls <= flops <= 1.3 * matmuls, (flops, matmuls)


def test_a_vqt_step_from_the_cache_costs_its_query_path_not_the_backbone():
    """T=1 query per layer against 17 cached tokens: far less than the backbone's forward, and
    (the optimiser aside) proportional to the batch."""
    model = create_model(**TINY, num_queries=1)
    variables = _variables(model)
    spec = cache_lib.spec_for(model, "kv", 8, 32)

    def step(batch):
        return costs.cached_step_flops(model, variables, spec, batch, method="vqt",
                                       optimizer="adam")

    forward = costs.forward_flops(model, variables, 32)
    assert 0 < step(8) < 8 * forward / 4
    per_image = (step(16) - step(8)) / 8
    assert abs(step(8) - 8 * per_image) < 0.2 * step(8)
