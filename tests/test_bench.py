"""hnet.xla_stats: matmul FLOPs of a jaxpr, XLA memory analysis."""

import jax
import jax.numpy as jnp

from hnet.xla_stats import dot_general_flops, matmul_flops, memory_estimate


def test_dot_general_flops_counts_batch_contracting_and_free_dims():
    # "bij,bjk->bik": batch 2, contracting 4, free 3 and 5.
    assert dot_general_flops((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))) == 2 * 2 * 4 * 3 * 5
    jaxpr = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    assert matmul_flops(jaxpr).flops == 240


def test_matmul_flops_recurses_into_jit_scan_cond_while_and_custom_jvp():
    w = jnp.ones((8, 8))
    x = jnp.ones((4, 8))
    one = 2 * 4 * 8 * 8  # x @ w

    @jax.custom_jvp
    def custom(x):
        return x @ w

    custom.defjvp(lambda primals, tangents: (custom(*primals), tangents[0] @ w))

    def f(x):
        x = jax.jit(lambda x: x @ w)(x)                                            # 1
        x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)        # 5
        x = jax.lax.cond(x.sum() > 0, lambda x: (x @ w) @ w, lambda x: x, x)      # the larger branch: 2
        x = jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ w, x)          # once, noted
        return custom(x)                                                          # 1

    count = matmul_flops(jax.make_jaxpr(f)(x))
    assert count.flops == 10 * one and count.dot_generals == 10
    assert count.backward_flops == 0
    assert any("while" in note for note in count.notes)


def test_matmul_flops_of_a_gradient_counts_backward_and_recomputation():
    w = jnp.ones((8, 8))
    x = jnp.ones((4, 8))
    one = 2 * 4 * 8 * 8

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) @ w)

    grad = matmul_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(w, x))
    assert grad.flops == 6 * one and grad.backward_flops == 4 * one  # 2 forward, 2 x 2 backward
    # Rematerialised, the first matmul runs again inside the backward pass.
    remat = matmul_flops(jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(w, x))
    assert remat.flops == 7 * one and remat.backward_flops == 5 * one
    assert set(remat.by_source) == {"other"}  # written outside hnet


def test_memory_estimate_of_a_donating_function():
    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0, donate_argnums=0).lower(x).compile()
    memory = memory_estimate(compiled)
    assert memory.argument_bytes == memory.output_bytes == 256 * 256 * 4
    assert memory.alias_bytes in (0, memory.argument_bytes)  # XLA may or may not reuse the donated buffer
    assert memory.peak_bytes == memory.argument_bytes + memory.output_bytes + memory.temp_bytes - memory.alias_bytes
    assert memory.to_dict()["peak_bytes"] == memory.peak_bytes
