"""Error metrics shared by the op tests and benchmarks."""

import numpy as np


def rel_rms_error(ref, out) -> float:
    """``rms(ref - out) / (rms(ref) + 1e-8)``, computed in float64; 0 when max |diff| <= 1e-6."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs output {out.shape}")
    diff = ref - out
    if diff.size == 0 or np.max(np.abs(diff)) <= 1e-6:
        return 0.0
    return float(np.sqrt(np.mean(diff ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-8))


def assert_close(name: str, ref, out, tol: float) -> None:
    err = rel_rms_error(ref, out)
    assert np.all(np.isfinite(np.asarray(out, np.float64))), f"{name}: non-finite values"
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}"


# ----------------------------------------------------------------------------------------------
# Helpers for the op-family tests (diagonal-decay and delta families alike)
# ----------------------------------------------------------------------------------------------

def random_qkv(seed: int, B: int, T: int, H: int, K: int, V: int, *, gate=None,
               strength: float = 1.0, dtype=None, num_states: int | None = None):
    """Random op inputs with FLA's conventions (REFERENCE §2.2).

    Returns a dict with q, k, v (``dtype``, default float32), ``g`` when ``gate`` is
    ``"scalar"`` (``[B, T, H]``) or ``"vector"`` (``[B, T, H, K]``), drawn as
    ``logsigmoid(u) / strength`` (strength 0.1 = 10x stronger decay), a float32
    ``initial_state`` ``[N, H, K, V]`` and cotangents ``do`` ``[B, T, H, V]``, ``dht``
    ``[N, H, K, V]`` (all float32).
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    n = B if num_states is None else num_states
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    out = {
        "q": jnp.asarray(normal(B, T, H, K), dtype),
        "k": jnp.asarray(normal(B, T, H, K), dtype),
        "v": jnp.asarray(normal(B, T, H, V), dtype),
        "initial_state": jnp.asarray(normal(n, H, K, V)),
        "do": jnp.asarray(normal(B, T, H, V)),
        "dht": jnp.asarray(normal(n, H, K, V)),
    }
    if gate is not None:
        shape = {"scalar": (B, T, H), "vector": (B, T, H, K)}[gate]
        out["g"] = jax.nn.log_sigmoid(jnp.asarray(normal(*shape))) / strength
    return out


def value_and_grads(fn, args: dict, do, dht):
    """Runs ``fn(**args) -> (o, final_state)`` and the gradients of FLA's test loss
    ``L = Σ(o ⊙ do) + Σ(h_T ⊙ dh_T)`` with respect to every entry of ``args``.

    Returns ``(o, final_state, grads)`` (grads a dict keyed like ``args``).
    """
    import jax
    import jax.numpy as jnp

    def loss(a):
        o, ht = fn(**a)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)

    grads, (o, ht) = jax.grad(loss, has_aux=True)(args)
    return o, ht, grads


def assert_forms_match(ref_fn, fns: dict, args: dict, do, dht, tol: dict, *, jit: bool = True) -> dict:
    """Compares each ``fns[name]`` with ``ref_fn`` on o, the final state and every gradient.

    ``tol`` maps ``"o"``, ``"final_state"`` and ``"d<arg>"`` (e.g. ``"dq"``, ``"dg"``,
    ``"dinitial_state"``) to a relative-RMS tolerance; a missing ``"d<arg>"`` falls back to
    ``tol["grad"]``.  Returns ``{name: {quantity: error}}`` for reporting.
    """
    import jax

    run = (lambda f: jax.jit(lambda a: value_and_grads(f, a, do, dht))) if jit else \
        (lambda f: (lambda a: value_and_grads(f, a, do, dht)))
    ro, rh, rg = run(ref_fn)(args)
    errors = {}
    for name, fn in fns.items():
        o, h, g = run(fn)(args)
        assert o.dtype == args["v"].dtype, f"{name}: o dtype {o.dtype} != v dtype {args['v'].dtype}"
        quantities = [("o", ro, o), ("final_state", rh, h)] + [("d" + a, rg[a], g[a]) for a in rg]
        errors[name] = {}
        for q, ref, out in quantities:
            t = tol.get(q, tol.get("grad"))
            assert_close(f"{name} {q}", ref, out, t)
            errors[name][q] = rel_rms_error(ref, out)
    return errors
