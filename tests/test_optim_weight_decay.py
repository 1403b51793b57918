"""One weight-decay rule for every optimizer of the training script: what is and is not decayed
for each mixer family, and that the rule reaches every optimizer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.optimizers import make_optimizer
from lolax import optim
from lolax.models import LanguageModel, ModelConfig
from lolax.models.config import MIXER_LETTERS

EVERY_MODEL = {"attn_norm/scale", "mlp_norm/scale", "norm/scale"}
# per mixer letter: the parameters inside a layer that are not decayed besides the block norms
NOT_DECAYED = {
    "L": {"attn/o_norm/scale"}, "H": {"attn/o_norm/scale"}, "B": set(), "R": set(),
    "N": set(), "G": {"attn/o_norm/scale", "attn/gk_up_proj/bias"},
    "D": {"attn/o_norm/scale"}, "E": {"attn/o_norm/scale", "attn/A_log", "attn/dt_bias"},
    "M": {"attn/o_norm/scale", "attn/A_log", "attn/dt_bias"},
    "S": {"attn/q_proj/bias", "attn/k_proj/bias", "attn/v_proj/bias"},
    "W": {"attn/q_proj/bias", "attn/k_proj/bias", "attn/v_proj/bias"}, "C": set(),
    "O": {"attn/q_proj/bias", "attn/k_proj/bias", "attn/v_proj/bias", "attn/window_factor"},
    "I": {"attn/q_proj/bias", "attn/k_proj/bias", "attn/v_proj/bias"},
}


def _params(pattern, **kw):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=len(pattern), num_heads=2, pattern=pattern,
                      qkv_bias=any(c in "SWOI" for c in pattern), **kw)
    return nnx.state(LanguageModel(cfg, nnx.Rngs(0)), nnx.Param)


def _paths(mask, value):
    out = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if leaf == value:
            names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
            names = [n for n in names if n not in ("layers", "0", "1", "2", "stack", "blocks", "value")]
            out.add("/".join(names))
    return out


@pytest.mark.parametrize("letter", sorted(MIXER_LETTERS))
def test_what_each_mixer_family_decays(letter):
    mask = optim.default_weight_decay_mask(_params(letter))
    assert _paths(mask, False) == EVERY_MODEL | NOT_DECAYED[letter]
    decayed = _paths(mask, True)
    assert {"embed/embedding", "lm_head/kernel", "mlp/up_proj/kernel", "attn/o_proj/kernel"} <= decayed
    no_embed = optim.default_weight_decay_mask(_params(letter), embeddings=False)
    assert _paths(no_embed, False) == EVERY_MODEL | NOT_DECAYED[letter] | {"embed/embedding"}


def test_scanned_layers_follow_the_same_rule():
    plain = _paths(optim.default_weight_decay_mask(_params("EE")), False)
    scanned = _paths(optim.default_weight_decay_mask(_params("EE", scan_layers=True)), False)
    assert scanned == plain == EVERY_MODEL | NOT_DECAYED["E"]


def _config(name, **extra):
    return ml_collections.ConfigDict({"name": name, "learning_rate": 0.1, "warmup_steps": 0, "min_lr_ratio": 1.0,
                                      "weight_decay": 0.5, "b1": 0.9, "b2": 0.95, "grad_clip": 0.0, "rank": 4,
                                      "update_proj_gap": 10, "scale": -1.0, "num_active": 2, **extra})


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "galore", "apollo", "lisa_adamw"])
def test_every_optimizer_of_the_training_script_uses_the_rule(name):
    params = jax.tree.map(lambda x: x + 1.0, _params("EE"))          # no zeros: decay moves every decayed leaf
    tx = make_optimizer(_config(name, decay_embeddings=False), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)            # zero gradients: only decay moves
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    expected = optim.default_weight_decay_mask(params, embeddings=False)
    assert _paths(moved, False) == _paths(expected, False) == EVERY_MODEL | NOT_DECAYED["E"] | {"embed/embedding"}


def test_lisa_compact_mask_ignores_the_slot_axis():
    from lolax.optim.lisa import compact_weight_decay_mask
    params = _params("EEE")
    tx = optim.lisa(optax.adamw(0.1, weight_decay=0.5, mask=compact_weight_decay_mask()), num_active=2)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, jax.tree.map(lambda x: x + 1.0, params))
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    # the layer that is not sampled does not move at all; the sampled ones move where the rule says
    frozen = [i for i in range(3) if not any(jax.tree.leaves(moved["layers"][i]))]
    assert len(frozen) == 1
    for i in set(range(3)) - set(frozen):
        layer = optim.default_weight_decay_mask(params["layers"][i])
        assert jax.tree.map(lambda a, b: a == b, moved["layers"][i], layer) == jax.tree.map(lambda _: True, layer)
