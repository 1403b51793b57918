"""Every public op takes flash-linear-attention's positional arguments, in its order, with its
names and defaults, so code ported from ``fla.ops`` keeps its meaning when arguments are passed by
position.  Arguments FLA lacks are keyword-only.

The table is FLA's signatures (the ``fla.ops`` of the 0.6 line), written out here, up to and
including ``cu_seqlens``; FLA's torch-specific trailing arguments (``cu_seqlens_cpu``,
``chunk_indices``, ``cp_context``) have no JAX counterpart.
"""

import inspect

import pytest

from lolax import ops

NONE = None
FLA = {
    "chunk_linear_attn": [("q",), ("k",), ("v",), ("scale", NONE), ("initial_state", NONE),
                          ("output_final_state", False), ("normalize", True), ("cu_seqlens", NONE)],
    "fused_recurrent_linear_attn": [("q",), ("k",), ("v",), ("scale", NONE), ("initial_state", NONE),
                                    ("output_final_state", False), ("reverse", False), ("normalize", False),
                                    ("cu_seqlens", NONE)],
    "chunk_simple_gla": [("q",), ("k",), ("v",), ("g", NONE), ("g_gamma", NONE), ("scale", NONE),
                         ("initial_state", NONE), ("output_final_state", False), ("state_v_first", False),
                         ("cu_seqlens", NONE)],
    "fused_recurrent_simple_gla": [("q",), ("k",), ("v",), ("g", NONE), ("g_gamma", NONE), ("scale", NONE),
                                   ("initial_state", NONE), ("output_final_state", False), ("reverse", False),
                                   ("state_v_first", False), ("cu_seqlens", NONE)],
    "chunk_retention": [("q",), ("k",), ("v",), ("scale", NONE), ("initial_state", NONE),
                        ("output_final_state", False), ("cu_seqlens", NONE)],
    "fused_recurrent_retention": [("q",), ("k",), ("v",), ("scale", NONE), ("initial_state", NONE),
                                  ("output_final_state", False), ("reverse", False), ("state_v_first", False),
                                  ("cu_seqlens", NONE)],
    "chunk_lightning_attn": [("q",), ("k",), ("v",), ("layer_idx",), ("num_layers",), ("scale", NONE),
                             ("initial_state", NONE), ("output_final_state", False), ("cu_seqlens", NONE)],
    "fused_recurrent_lightning_attn": [("q",), ("k",), ("v",), ("layer_idx",), ("num_layers",), ("scale", NONE),
                                       ("initial_state", NONE), ("output_final_state", False), ("reverse", False),
                                       ("cu_seqlens", NONE)],
    "chunk_gla": [("q",), ("k",), ("v",), ("g",), ("scale", NONE), ("initial_state", NONE),
                  ("output_final_state", False), ("state_v_first", False), ("cu_seqlens", NONE)],
    "fused_recurrent_gla": [("q",), ("k",), ("v",), ("gk", NONE), ("gv", NONE), ("scale", NONE),
                            ("initial_state", NONE), ("output_final_state", False), ("reverse", False),
                            ("state_v_first", False), ("cu_seqlens", NONE)],
    "chunk_delta_rule": [("q",), ("k",), ("v",), ("beta",), ("scale", NONE), ("initial_state", NONE),
                         ("output_final_state", False), ("use_qk_l2norm_in_kernel", False), ("cu_seqlens", NONE)],
    "fused_recurrent_delta_rule": [("q",), ("k",), ("v",), ("beta", NONE), ("scale", NONE), ("initial_state", NONE),
                                   ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                                   ("cu_seqlens", NONE)],
    "chunk_gated_delta_rule": [("q",), ("k",), ("v",), ("g",), ("beta",), ("scale", NONE), ("initial_state", NONE),
                               ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                               ("use_beta_sigmoid_in_kernel", False), ("allow_neg_eigval", False),
                               ("state_v_first", False), ("cu_seqlens", NONE)],
    "fused_recurrent_gated_delta_rule": [("q",), ("k",), ("v",), ("g", NONE), ("gk", NONE), ("gv", NONE),
                                         ("beta", NONE), ("scale", NONE), ("initial_state", NONE),
                                         ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                                         ("use_gate_in_kernel", False), ("A_log", NONE), ("dt_bias", NONE),
                                         ("use_beta_sigmoid_in_kernel", False), ("allow_neg_eigval", False),
                                         ("state_v_first", False), ("cu_seqlens", NONE)],
}

# Keyword arguments FLA accepts through **kwargs, which lolax takes as keyword-only.
FLA_KEYWORDS = {"chunk_gated_delta_rule": {"use_gate_in_kernel": False, "A_log": NONE, "dt_bias": NONE,
                                           "chunk_size": 64}}


def _positional(fn):
    params = inspect.signature(fn).parameters.values()
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("name", sorted(FLA))
def test_positional_arguments_are_flas(name):
    fn = getattr(ops, name)
    got = [(p.name,) if p.default is p.empty else (p.name, p.default) for p in _positional(fn)]
    assert got == FLA[name], f"{name}{inspect.signature(fn)}"
    for p in inspect.signature(fn).parameters.values():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{name}: {p.name} is {p.kind}"
    for key, default in FLA_KEYWORDS.get(name, {}).items():
        assert inspect.signature(fn).parameters[key].default == default


@pytest.mark.parametrize("family", ops.FAMILIES)
def test_naive_oracles_take_the_chunk_positional_signature(family):
    chunk, naive = ops.get_op(family, "chunk"), ops.get_op(family, "naive")
    assert [p.name for p in _positional(naive)] == [p.name for p in _positional(chunk)]
    assert [p.default for p in _positional(naive)] == [p.default for p in _positional(chunk)]


def test_every_public_op_is_pinned():
    public = {n for n in ops.__all__ if n.startswith(("chunk_", "fused_recurrent_"))}
    assert public == set(FLA)
