"""Token-by-token linear attention (decoding)."""

from __future__ import annotations

from ..common import checks
from ..common.recurrent import fused_recurrent
from .normalize import normalized_inputs, normalized_outputs


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                normalize=False, cu_seqlens=None):
    """Token-by-token linear attention; the arguments of
    :func:`~lolax.ops.linear_attn.chunk_linear_attn` plus ``reverse``, and, as in
    flash-linear-attention, ``normalize`` defaults to False here.

    ``reverse=True`` runs every sequence from its last token to its first (the key sum too).  A
    one-token call carrying the state continues a sequence exactly: the decoding step.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    >>> o, S = fused_recurrent_linear_attn(x[:, :4], x[:, :4], x[:, :4], output_final_state=True)
    >>> o_5, _ = fused_recurrent_linear_attn(x[:, 4:], x[:, 4:], x[:, 4:], initial_state=S)
    >>> o_all, _ = fused_recurrent_linear_attn(x, x, x)
    >>> bool(jnp.allclose(o_5[:, 0], o_all[:, 4], atol=1e-5))
    True
    """
    reverse = checks.check_bool("reverse", reverse)
    x = normalized_inputs(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
    o, final = fused_recurrent(x, reverse=reverse)
    return normalized_outputs(x, o, final, normalize)
