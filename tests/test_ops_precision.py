"""The precision policy (docs/precision.md): every matrix product inside an op, forward and
backward, is a float32 product at ``Precision.HIGHEST``, so the platform's default precision
cannot change the results.

A CPU computes every float32 product in float32 whatever the setting, so running under
``jax.default_matmul_precision("bfloat16")`` (what a TPU does by default) cannot fail here on its
own.  The structural check can: it walks the whole program of the forward and the backward pass
(scans, checkpoints, custom VJPs included) and fails on any product whose precision is not pinned.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

from lolax.ops import FAMILIES
from lolax.ops.attention import sliding_window_attention, softmax_attention
from lolax.ops.testing import assert_forms_match, family_inputs, family_op, value_and_grads

HIGHEST = jax.lax.Precision.HIGHEST


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def products(jaxpr):
    """Every ``dot_general`` equation in ``jaxpr``, recursively through nested programs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from products(sub)


def unpinned_products(jaxpr) -> list[str]:
    """The products whose precision is not HIGHEST on both operands."""
    bad = []
    for eqn in products(jaxpr):
        precision = eqn.params.get("precision")
        if not (isinstance(precision, tuple) and all(p == HIGHEST for p in precision)):
            bad.append(f"dot_general {[tuple(v.aval.shape) for v in eqn.invars]} precision={precision}")
    return bad


def _program(fn, args, do, dht):
    return jax.make_jaxpr(lambda a: value_and_grads(fn, a, do, dht))(args).jaxpr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_product_is_pinned_to_highest(family, form, dtype):
    args, do, dht = family_inputs(family, 0, 1, 40, 2, 16, 8, dtype=dtype)
    jaxpr = _program(family_op(family, form, chunk_size=16), args, do, dht)
    assert len(list(products(jaxpr))) >= 3
    assert unpinned_products(jaxpr) == []


def test_attention_products_are_pinned():
    q = k = v = jnp.ones((1, 40, 2, 8))
    for fn in (lambda q, k, v: softmax_attention(q, k, v, block_size=16),
               lambda q, k, v: sliding_window_attention(q, k, v, 9, block_size=16)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))(q, k, v)
        assert len(list(products(jaxpr.jaxpr))) >= 4
        assert unpinned_products(jaxpr.jaxpr) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_accuracy_holds_under_a_bfloat16_default(family):
    """Float32 inputs under ``default_matmul_precision("bfloat16")``: the float32 tolerances hold."""
    args, do, dht = family_inputs(family, 1, 2, 63, 2, 16, 16, strength=0.5)
    with jax.default_matmul_precision("bfloat16"):
        assert_forms_match(family_op(family, "naive"), {"chunk": family_op(family, "chunk", chunk_size=16)},
                           args, do, dht, {"o": 1e-5, "final_state": 1e-5, "grad": 1e-5})


def test_the_check_finds_an_unpinned_product():
    jaxpr = jax.make_jaxpr(lambda a: jnp.sum(jax.lax.scan(lambda c, x: (c @ x, None), a, a[None])[0]))(
        jnp.ones((4, 4))).jaxpr
    assert len(unpinned_products(jaxpr)) == 1
