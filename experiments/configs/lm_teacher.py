r"""The teacher for the linearisation experiment: a softmax Transformer on the embedded corpus.

    python -m experiments.train --config=experiments/configs/lm_teacher.py --workdir=runs/teacher

Four softmax layers with grouped-query heads (4 query heads sharing 2 key/value heads), rotary,
SwiGLU, byte vocabulary: a Llama-shaped model, so the linearisation pipeline meets the same
layout it meets in an imported checkpoint.  About 10 minutes on 2 idle CPU cores.
"""

from experiments.configs.lm_shakespeare import get_config as base_config


def get_config():
    c = base_config()
    c.model.pattern = "S"
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.train.steps = 2000
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    return c
