r"""A ~350M-parameter Gated DeltaNet / softmax hybrid for GPUs and TPUs: bf16 compute, scanned
layers, the Pallas and vendor attention kernels.

    python -m experiments.train --config=experiments/configs/lm_accelerator.py --workdir=runs/accel

What makes it the accelerator configuration (see ``docs/training.md``, "On accelerators"):

* ``model.dtype = "bfloat16"``: projections, MLPs and the residual stream in bf16; parameters,
  AdamW's moments, norms, gates, the sequence ops' internals, the logits and the loss in float32;
* ``model.scan_layers = True``: the six repeats of ``EEES`` are one ``lax.scan``, so the compile
  time is that of four layers, not 24; ``model.remat = "dots"`` keeps the weight matmuls' outputs
  for the backward pass and recomputes the rest of each repeat;
* ``model.implementation = None``: the Gated DeltaNet layers run lolax's Pallas kernels and the
  softmax layers cuDNN (GPU) or splash attention (TPU), each falling back to XLA (with one log
  line) for inputs it does not take.

Width 1024, 24 layers (18 Gated DeltaNet, 6 softmax), 8 heads of 128, MLP 3072: 350M parameters
with the byte vocabulary.  32K tokens per step (4 x 8192); with more devices the batch is split
over ``mesh.data`` (raise ``data.batch_size`` with it) or, for longer sequences,
``mesh.sequence``.  On a CPU it runs, slowly: shrink it with e.g. ``--config.model.num_layers=4
--config.model.d_model=128 --config.data.seq_len=512`` to try it.
"""

from experiments.configs.lm_shakespeare import get_config as base_config


def get_config():
    c = base_config()
    c.data.seq_len = 8192
    c.data.batch_size = 4

    c.model.d_model = 1024
    c.model.num_layers = 24
    c.model.pattern = "EEES"          # 3 Gated DeltaNet : 1 softmax, repeated 6 times
    c.model.num_heads = 8             # head size 128 (the kernels' and cuDNN's sweet spot)
    c.model.mlp_hidden = 3072
    c.model.chunk_size = 64
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat = "dots"
    c.model.implementation = None     # kernels where they apply, XLA elsewhere

    c.optim.name = "adamw"            # the low-rank optimizers project whole leaves: not for stacked layers
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.1

    c.train.steps = 20_000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_batches = 16
    c.train.checkpoint_every = 1000
    c.train.sample_tokens = 0
    return c
