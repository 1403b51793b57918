"""Default job: a small LLLS hybrid byte-level language model on the embedded Shakespeare texts.

Sized to finish on 2 CPU cores in about five minutes. Override anything from the command line,
e.g. ``--config.train.steps=3000 --config.model.pattern=LS --config.data.path=~/my_texts``.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from lolax.models import ModelConfig
from lolax.models.peft import PeftConfig


def model_fields(**overrides) -> ml_collections.ConfigDict:
    """All ModelConfig fields with their defaults (typed placeholders for None), then overrides."""
    section = ml_collections.ConfigDict()
    hints = typing.get_type_hints(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        value = overrides.get(field.name, field.default)
        if value is None:      # an optional field, `T | None`: a placeholder that accepts a T
            kind, = (t for t in typing.get_args(hints[field.name]) if t is not type(None))
            value = config_dict.placeholder(kind)
        section[field.name] = value
    section.preset = overrides.get("preset", "")
    return section


def peft_fields() -> ml_collections.ConfigDict:
    """Every PeftConfig field with its default, ``method`` empty (no adapters), ``targets`` as
    comma-separated names (or ``re:<regex>``)."""
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(PeftConfig):
        value = field.default
        section[field.name] = ",".join(value) if isinstance(value, tuple) else value
    section.method = ""
    return section


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = "shakespeare"      # the embedded default, or a file, folder or glob of text
    c.data.tokenizer = "byte"        # UTF-8 bytes, or a tokenizer.json (or a folder holding one)
    c.data.val_fraction = 0.05       # tail of every document held out for validation
    c.data.seq_len = 256
    c.data.batch_size = 16
    # data.path may also be a folder from `python -m experiments.prepare_data` (token shards, read
    # window by window), and data.tokenizer "bpe:N": a byte-level BPE trained on the training split
    # into <workdir>/tokenizer.json (model.vocab_size = 0 then takes its size). See docs/training.md.
    c.data.packing = config_dict.placeholder(bool)   # reset at document starts; None: on for token shards only
    c.data.max_segments = 0          # packed rows: documents with their own segment per row; 0: max(2, seq_len // 256)
    c.data.prefetch = 2              # token shards: batches grain reads ahead in a background thread; 0: none

    # Every models.ModelConfig field is listed, so any of them can be set by flag; `preset`
    # (experiments/configs/presets.py) switches the mixer family, e.g. --config.model.preset=gdn.
    c.model = model_fields(
        preset="",
        vocab_size=256,
        d_model=128,
        num_layers=4,
        pattern="LLLS",          # L linear attention, S softmax; see models/config.py for all letters
        num_heads=4,
        feature_map="elu_plus_one",
        chunk_size=64,
        tie_embeddings=False,
    )

    # Fine-tuning: start from a run folder's newest parameters (its model config too), and with
    # peft.method set (lora, dora, ... see lolax.models.peft) train adapters only.
    c.init_from = ""
    c.peft = peft_fields()

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1       # cosine decay ends at this fraction of the peak
    c.optim.weight_decay = 0.1       # on weight matrices only (optim.default_weight_decay_mask)
    c.optim.decay_embeddings = True  # False keeps the token embeddings out of weight decay
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.grad_clip = 1.0
    c.optim.rank = 32                # low-rank optimizers; < 0 keeps the method default (apollo_mini: 1)
    c.optim.update_proj_gap = 200    # low-rank optimizers; < 0 keeps the method default
    c.optim.scale = -1.0             # low-rank optimizers; < 0 keeps the method default
    c.optim.moments_8bit = False     # low-rank optimizers: both moments block-wise in 8 bits
    c.optim.num_active = -1          # lisa_adamw / owlore: layers trained at once; < 0 keeps the default
    c.optim.interval = -1            # lisa_adamw / owlore: steps between layer samples; < 0 keeps the default
    c.optim.tau = -1.0               # owlore: outlier threshold (x mean |W|); < 0 keeps the default

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_batches = 8
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.train.sample_tokens = 240     # stays within seq_len: the model never saw longer contexts
    c.train.sample_prompt = "ROMEO:\n"
    c.train.sample_temperature = 0.8
    c.train.tensorboard = True       # event files beside metrics.jsonl: tensorboard --logdir=runs

    c.mesh = ml_collections.ConfigDict()   # parallelism.mesh axes; one of them may be -1 (fill)
    c.mesh.data = -1                 # devices on the data axis; -1 = all
    c.mesh.fsdp = 1                  # batch split + parameters/optimizer state sharded (ZeRO-3)
    c.mesh.sequence = 1              # tokens split: LASP-2 for linear layers, model.sequence_attention for softmax
    c.mesh.tensor = 1                # heads and MLP hidden units split
    return c
