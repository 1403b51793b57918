"""One whole training step of a small bf16 hybrid (Gated DeltaNet + softmax, scanned layers, remat)
exported with ``jax.export`` from this CPU machine for TPU and for CUDA: the programs carry the
kernels they would run there."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax import export

from experiments.train_state import init_state, make_train_step
from lolax.models import ModelConfig

# T and the head size are what splash takes (T a multiple of 128, head size a multiple of 64).
CFG = ModelConfig(vocab_size=256, d_model=128, num_heads=2, num_layers=4, pattern="ES", chunk_size=64,
                  dtype="bfloat16", scan_layers=True, remat="dots")
B, T = 2, 256


def exported_step(platform: str) -> str:
    tx = optax.adamw(1e-3)
    graphdef, state = nnx.eval_shape(lambda: init_state(CFG, tx, 0))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    step = make_train_step(graphdef, tx, donate=False)
    exp = export.export(step, platforms=[platform], disabled_checks=disabled)(
        state, {"inputs": tokens, "targets": tokens})
    return exp.mlir_module()


def kernel_names(text: str, prefix: str) -> set[str]:
    return set(re.findall(rf"{prefix}[a-z_0-9]*", text))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_training_step_exports_with_the_kernels(platform):
    text = exported_step(platform)
    delta = kernel_names(text, "lolax_delta_")
    # the Gated DeltaNet layer's forward and backward kernels, inside the scan over layers
    assert any("forward" in k or "fwd" in k for k in delta) and len(delta) >= 2, sorted(delta)
    if platform == "tpu":
        names = set(re.findall(r'kernel_name = "([^"]*)"', text))       # the Mosaic custom calls
        assert {"lolax_delta_head_fwd", "lolax_delta_head_bwd"} <= names, sorted(names)
        for part in ("fwd", "dq", "dkv"):                                 # the softmax layer's splash kernels
            assert any(n.startswith(f"splash_mha_{part}") for n in names), sorted(names)
    else:
        # cuDNN attention cannot be traced on a machine without it: the CUDA program exported from
        # here runs the softmax layer in XLA (the GPU selection has its own tests).
        assert "__gpu$xla.gpu.triton" in text and "cudnn" not in text
