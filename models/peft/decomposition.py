"""Adapters that train a few scales inside a fixed factorisation of the frozen kernel: SVFit and LoLDU.

Both factor ``W0 [in, out]`` once, in float32, when the layer is built, keep the factors of ``r``
directions as frozen :class:`~lolax.models.peft.AdapterBuffer` arrays (saved with the adapter),
and train only per-direction scales:

- ``svfit``: buffers ``svd_u [in, r]``, ``svd_vt [r, out]``, ``singular_values [r]``; trains
  ``sigma_delta [r]`` (starts at 0); ``dW = svd_u diag(sigma_delta) svd_vt``.
- ``loldu``: buffers ``ldu_l [in, r]``, ``ldu_u [r, out]``; trains ``ldu_diag [r]`` (starts at
  the pivots ``D_r``) and ``ldu_scale []`` (starts at 0); ``dW = ldu_scale * ldu_l diag(ldu_diag) ldu_u``.

``alpha`` is unused. ``r`` (``peft.rank``) must be at most ``min(in, out)``. Both merge exactly.

How this module departs from the two papers
-------------------------------------------
*SVFit* writes the adapted weight as ``W = U_r diag(sigma_r') V_r^T + W_res``, with the top-``r``
singular values ``sigma_r'`` trainable (starting at ``sigma_r``) and the frozen residual
``W_res = W0 - U_r diag(sigma_r) V_r^T`` replacing the kernel. Substituting ``sigma_r' = sigma_r +
delta`` gives ``W = W0 + U_r diag(delta) V_r^T``, and that is what is implemented: the kernel stays
``W0`` bit for bit and ``delta`` starts at 0, so the model is exactly unchanged at initialisation
(rather than up to the rounding of subtracting and re-adding the top-``r`` part), and gradients are
the same as the paper's (``d/d delta = d/d sigma_r'``). Two consequences differ: weight decay on
``sigma_delta`` pulls towards the pretrained weight instead of towards zero singular values, and
the paper motivates ``r`` by how much of the spectrum the top directions hold, while here ``r`` is
``peft.rank`` for every layer.

*LoLDU* factors the weight as ``P L D U`` (partial pivoting, unit-triangular ``L`` and ``U``), takes
the first ``r`` columns of ``P L``, pivots of ``D`` and rows of ``U``, and trains the ``r`` diagonal
entries plus one scalar gain ``sigma``. In that formulation the kernel is replaced by the residual
``W0 - sigma_0 P L_r D_r U_r`` and ``sigma`` starts at a nonzero value, so the model is unchanged at
initialisation only because the residual absorbs the starting term. Here the kernel is left
untouched and the gain ``ldu_scale`` starts at 0 (our choice, made so the model is exactly
unchanged at initialisation and the kernel keeps its values): ``dW = s * L_r diag(z) U_r`` with
``z`` starting at ``D_r``. At step 0 only the gain receives a gradient (``dW/dz`` is proportional
to ``s = 0``); the diagonal starts moving once ``s`` does. Also, the decomposition here is of the
``[in, out]`` kernel, so pivoting runs over input rows; factoring a weight stored ``[out, in]``
pivots over output rows instead, a different factorisation (the LU of a transpose is not the
transpose of the LU). The first ``r`` pivots are the ones partial
pivoting meets first, not the largest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import PeftConfig
from .core import AdaptedLinear, register


def _check_rank(layer: AdaptedLinear) -> None:
    limit = min(layer.in_features, layer.out_features)
    if layer.rank > limit:
        raise ValueError(f"peft.rank = {layer.rank} is larger than layer {layer.path} allows: its kernel is "
                         f"({layer.in_features}, {layer.out_features}), so the rank must be <= {limit}")


def top_svd(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top ``r`` singular triplets of ``w [in, out]`` in float32: ``U [in, r], S [r], Vt [r, out]``.

    >>> import jax.numpy as jnp
    >>> u, s, vt = top_svd(jnp.diag(jnp.array([1.0, 3.0, 2.0])), 2)
    >>> [round(v, 4) for v in s.tolist()]
    [3.0, 2.0]
    """
    u, s, vt = jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False)
    return u[:, :r], s[:r], vt[:r]


def ldu(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pivoted LDU factors of ``w [in, out]`` in float32: ``(P L) [in, k], D [k], U [k, out]`` with
    ``k = min(in, out)`` and ``w = (P L) diag(D) U``.

    ``L`` is unit lower-triangular and ``U`` unit upper-triangular, except where a pivot is exactly
    zero (a rank-deficient ``w``): there ``D`` is set to 1 and ``U``'s row is the LU factor's row
    as it is, so the product still reconstructs ``w``.

    >>> import jax.numpy as jnp
    >>> pl, d, u = ldu(jnp.array([[2.0, 4.0], [1.0, 5.0]]))
    >>> d.tolist(), u.tolist()
    ([2.0, 3.0], [[1.0, 2.0], [0.0, 1.0]])
    """
    p, lower, upper = jax.scipy.linalg.lu(jnp.asarray(w, jnp.float32))
    d = jnp.diagonal(upper)
    d = jnp.where(d == 0, jnp.ones_like(d), d)
    return p @ lower, d, upper / d[:, None]


@register
class SVFit(AdaptedLinear):
    """``y = x W0 + b + x U_r diag(sigma_delta) V_r^T``: train shifts of the top-``r`` singular values.

    Equivalent to the paper's ``U_r diag(sigma_r + sigma_delta) V_r^T + W_res`` with ``W_res = W0 -
    U_r diag(sigma_r) V_r^T``, written as ``W0 + U_r diag(sigma_delta) V_r^T`` so the kernel is not
    modified and the layer is exact at initialisation (``sigma_delta = 0``). No ``alpha`` scaling.
    ``singular_values`` (the frozen top-``r`` ``sigma_r``) is kept for analysis: the trained
    spectrum is ``singular_values + sigma_delta``.
    """

    method = "svfit"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        _check_rank(self)
        u, s, vt = top_svd(self.base_kernel(), self.rank)
        self.svd_u = self.buffer(u, self.in_name, "lora_rank")
        self.svd_vt = self.buffer(vt, "lora_rank", self.out_name)
        self.singular_values = self.buffer(s, "lora_rank")
        self.sigma_delta = self.adapter_param(jnp.zeros((self.rank,)), "lora_rank")

    def delta(self) -> jax.Array:
        return (self.svd_u[...] * self.sigma_delta[...]) @ self.svd_vt[...]

    def adapter(self, x: jax.Array) -> jax.Array:
        u, vt = self.svd_u[...].astype(x.dtype), self.svd_vt[...].astype(x.dtype)
        return ((x @ u) * self.sigma_delta[...].astype(x.dtype)) @ vt


@register
class LoLDU(AdaptedLinear):
    """``y = x W0 + b + ldu_scale * x L_r diag(ldu_diag) U_r`` from the pivoted LDU of ``W0``.

    ``ldu_l [in, r]`` is the first ``r`` columns of ``P L`` and ``ldu_u [r, out]`` the first ``r``
    rows of the unit upper factor (frozen buffers); ``ldu_diag [r]`` starts at the first ``r``
    pivots ``D_r`` and the scalar gain ``ldu_scale`` at 0. The zero start of the gain is our
    choice, made so the layer is exactly unchanged at initialisation without touching the kernel
    (the paper instead subtracts the starting term from the kernel); the gain still gets a
    gradient at step 0, the diagonal from the step after.
    """

    method = "loldu"

    def __init__(self, base: nnx.Linear, cfg: PeftConfig, rngs: nnx.Rngs, layer_id: int, path: str):
        super().__init__(base, cfg, rngs, layer_id, path)
        _check_rank(self)
        pl, d, u = ldu(self.base_kernel())
        r = self.rank
        self.ldu_l = self.buffer(pl[:, :r], self.in_name, "lora_rank")
        self.ldu_u = self.buffer(u[:r], "lora_rank", self.out_name)
        self.ldu_diag = self.adapter_param(d[:r], "lora_rank")
        self.ldu_scale = self.adapter_param(jnp.zeros(()))

    def delta(self) -> jax.Array:
        return self.ldu_scale[...] * ((self.ldu_l[...] * self.ldu_diag[...]) @ self.ldu_u[...])

    def adapter(self, x: jax.Array) -> jax.Array:
        l, u = self.ldu_l[...].astype(x.dtype), self.ldu_u[...].astype(x.dtype)
        z = (self.ldu_scale[...] * self.ldu_diag[...]).astype(x.dtype)
        return ((x @ l) * z) @ u
