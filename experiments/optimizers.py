"""Builds the optax transformation of a training config: schedule, clipping and the optimizer."""

from __future__ import annotations

import inspect

import ml_collections
import optax

from lolax import optim
from lolax.optim.lisa import compact_weight_decay_mask


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.name``, from ``lolax.optim.OPTIMIZERS`` (``adamw`` is ``optax.adamw``).

    ``b1``, ``b2`` and ``weight_decay`` go to every constructor that takes them; the shared
    ``rank``, ``update_proj_gap`` and ``scale`` go to the low-rank methods that take them, and
    ``num_active``, ``interval`` and ``tau`` to the layer-sampling ones (LISA, OwLore), each only
    when >= 0 (a negative value keeps the method's default); ``moments_8bit`` goes to every
    method that takes it.  Keys missing from an older run's config keep the defaults.

    Weight decay follows one rule for every optimizer, :func:`optim.default_weight_decay_mask`:
    weight matrices decay, norms, biases and the mixers' decay/gate parameters (``A_log``,
    ``dt_bias``, ...) do not, and the embeddings do unless ``optim.decay_embeddings = False``.
    """
    if cfg.name not in optim.OPTIMIZERS:
        raise ValueError(f"optim.name = {cfg.name!r} is unknown; expected one of {sorted(optim.OPTIMIZERS)}")
    factory = optim.OPTIMIZERS[cfg.name]
    accepted = inspect.signature(factory).parameters
    kwargs = {k: cfg[k] for k in ("b1", "b2", "weight_decay") if k in accepted}
    # APOLLO-Mini is rank 1 by definition: the shared rank only applies to the other methods.
    for key in ("rank", "update_proj_gap", "scale", "num_active", "interval", "tau"):
        value = cfg.get(key, -1)
        if key in accepted and value >= 0 and not (key == "rank" and cfg.name == "apollo_mini"):
            kwargs[key] = value
    if "moments_8bit" in accepted and cfg.get("moments_8bit", False):
        kwargs["moments_8bit"] = True
    elif cfg.get("moments_8bit", False) and cfg.name != "adamw_8bit":
        raise ValueError(f"optim.moments_8bit = True, but optim.name = {cfg.name!r} has no 8-bit moments; use "
                         "adamw_8bit, or one of the low-rank methods (galore, fira, frugal, natural_galore, apollo, "
                         "apollo_mini)")
    embeddings = cfg.get("decay_embeddings", True)
    mask_key = next((k for k in ("mask", "weight_decay_mask") if k in accepted), None)
    if mask_key is not None:
        kwargs[mask_key] = (compact_weight_decay_mask(embeddings) if cfg.name == "lisa_adamw"
                            else optim.default_weight_decay_mask(embeddings=embeddings))
    return factory(schedule, **kwargs)


def check_layer_layout(optim_cfg: ml_collections.ConfigDict, scan_layers: bool) -> None:
    """The low-rank methods project every matrix leaf as one matrix, and LISA and OwLore find
    layers by path; a scanned model stacks its layers' matrices into ``[repeats, in, out]``
    leaves, which neither can take."""
    if not scan_layers or optim_cfg.name in ("adamw", "adamw_8bit"):
        return
    if optim_cfg.name in ("lisa_adamw", "owlore"):
        raise ValueError(f"optim.name = {optim_cfg.name!r} samples layers by their paths (layers/<i>), but "
                         "model.scan_layers = True stacks every layer into one leaf; use model.scan_layers = False")
    raise ValueError(f"optim.name = {optim_cfg.name!r} projects each parameter leaf as one matrix, but "
                     "model.scan_layers = True stacks every layer's matrices into one [repeats, in, out] "
                     "leaf; use optim.name = 'adamw' or model.scan_layers = False")


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    tx = _optimizer(cfg, schedule)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
