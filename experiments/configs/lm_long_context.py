r"""Long context: a hybrid (Gated DeltaNet x3 + softmax) byte-level LM at T = 32K, sequence-parallel.

The 32,768-token sequence is split over 8 devices (4,096 tokens each): the Gated DeltaNet layers
run LASP-2 (one all-gather of K x (K + V) states per layer), the softmax layer ring attention
(K/V blocks rotate over the 8 devices).  On a CPU-only machine simulate the devices:

    JAX_NUM_CPU_DEVICES=8 python -m experiments.train \
        --config=experiments/configs/lm_long_context.py --workdir=runs/long_context

(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` works too.)  With 16 or 32 devices set
``--config.mesh.data=2`` (or ``4``) and raise ``--config.data.batch_size`` to match; on one device
use ``--config.mesh.sequence=1``.  Simulated devices share the host's cores: expect minutes per step
on a laptop; the point is that it runs, sharded exactly as on a pod.
"""

from experiments.configs.lm_shakespeare import get_config as base_config


def get_config():
    c = base_config()
    c.data.seq_len = 32768
    c.data.batch_size = 1

    c.model.d_model = 64
    c.model.num_layers = 4
    c.model.pattern = "EEES"          # E: gated_deltanet (LASP-2), S: softmax (ring attention)
    c.model.num_heads = 4
    c.model.chunk_size = 64
    c.model.sequence_attention = "ring"   # or "ulysses" (4 heads: needs sequence <= 4) / "allgather"

    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 5

    c.train.steps = 20
    c.train.log_every = 1
    c.train.eval_every = 10
    c.train.eval_batches = 1
    c.train.checkpoint_every = 10
    c.train.sample_tokens = 0         # sampling re-runs a 32K window per token: skip

    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.sequence = 8               # T / 8 = 4096 tokens per device
    c.mesh.tensor = 1
    return c
