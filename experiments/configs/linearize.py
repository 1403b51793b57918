r"""Linearising a trained softmax Transformer (``python -m experiments.linearize``).

    python -m experiments.linearize --config=experiments/configs/linearize.py \
        --config.teacher=runs/teacher --config.method=lolcats --workdir=runs/lolcats

``teacher`` is a lolax run folder or a Hugging Face checkpoint folder (``lolax.models.hf``).
``method``: ``lolcats`` (sliding-window softmax + Hedgehog linear attention), ``liger`` (sliding-
window softmax + gated linear attention gated by the keys; no new parameters, so no transfer
stage) or ``transfer`` (every softmax layer becomes ``target``, any linear mixer).  Stage 1
(``transfer.*``) trains the new parameters to reproduce each attention layer's output; stage 2
(``recovery.*``) trains LoRA adapters on the attention projections with the language-model
loss.  See docs/linearize.md.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = ""                   # lolax run folder or Hugging Face checkpoint folder
    c.method = "lolcats"             # lolcats | liger | transfer
    c.target = "gated_deltanet"      # method = transfer: the mixer each softmax layer becomes
    c.window = 64                    # lolcats / liger: keys in the sliding window (including the query's own)
    c.hedgehog_dim = 0               # lolcats: features per half of each Hedgehog map; 0 = the head size
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = "shakespeare"
    c.data.val_fraction = 0.05
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.tokenizer = "byte"        # or a tokenizer.json (an imported teacher's own)

    c.transfer = ml_collections.ConfigDict()     # stage 1: attention transfer (new parameters only)
    c.transfer.steps = 200
    c.transfer.learning_rate = 1e-2
    c.transfer.warmup_steps = 20
    c.transfer.log_every = 25
    c.transfer.eval_every = 100
    c.transfer.eval_batches = 4
    c.transfer.checkpoint_every = 100

    c.recovery = ml_collections.ConfigDict()     # stage 2: LoRA with the language-model loss
    c.recovery.steps = 300
    c.recovery.learning_rate = 1e-3
    c.recovery.warmup_steps = 30
    c.recovery.rank = 8
    c.recovery.alpha = 16.0
    c.recovery.dropout = 0.0
    c.recovery.targets = "q_proj,k_proj,v_proj,o_proj"
    c.recovery.log_every = 25
    c.recovery.eval_every = 100
    c.recovery.eval_batches = 8
    c.recovery.checkpoint_every = 100
    c.recovery.sample_tokens = 240
    c.recovery.sample_prompt = "ROMEO:\n"

    c.model = ml_collections.ConfigDict()        # how the models run (not their parameters)
    c.model.dtype = "float32"
    c.model.implementation = config_dict.placeholder(str)
    c.model.remat = "none"

    c.mesh = ml_collections.ConfigDict()         # stage 2's device mesh (as in the training config)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.sequence = 1
    c.mesh.tensor = 1
    return c
