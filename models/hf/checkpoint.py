"""Loading a Hugging Face checkpoint folder into a :class:`~lolax.models.LanguageModel`, and saving one.

The model is first built abstractly (``nnx.eval_shape``: no memory, no random init); each of its
parameters is then made from the checkpoint tensor :mod:`.weights` maps it to.  With a mesh every
parameter is created sharded by the logical-axis rules (:mod:`lolax.parallelism.rules`) with
``jax.make_array_from_callback``: each device's callback reads only its slice of the stored tensor,
so no device (and no host buffer) ever holds a whole parameter it does not need.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...parallelism import rules
from ..config import DTYPES, ModelConfig
from ..lm import LanguageModel
from ..peft.core import AdaptedLinear
from ..sltrain import SLTrainLinear
from .config import config_from_hf, config_to_hf, read_config
from .weights import (
    FLOAT_DTYPES,
    SafetensorsFolder,
    TensorSpec,
    ignored_on_load,
    parse_size,
    remove_old_weights,
    scanned_path,
    tensor_specs,
    write_folder,
)

RUNTIME_FIELDS = ("param_dtype", "implementation", "remat", "scan_layers", "sequence_attention", "chunk_size")
"""ModelConfig fields :func:`load` accepts as overrides: how the model runs, not what it computes."""


def _shape_error(spec: TensorSpec, stored: tuple[int, ...], file: pathlib.Path, config: pathlib.Path) -> ValueError:
    return ValueError(f"tensor {spec.name} in {file} has shape {list(stored)}, but {config} implies "
                      f"{list(spec.shape)} (hidden_size, intermediate_size, num_attention_heads, "
                      f"num_key_value_heads, head_dim, vocab_size)")


def _sources(cfg: ModelConfig) -> dict[tuple, list[tuple[int | None, TensorSpec]]]:
    """Model parameter path -> the tensors it is made of, as ``(row, spec)`` (row: scanned stacks)."""
    out: dict[tuple, list[tuple[int | None, TensorSpec]]] = {}
    for spec in tensor_specs(cfg):
        path, row = scanned_path(spec, cfg.pattern_length) if cfg.scan_layers else (spec.path, None)
        out.setdefault(path, []).append((row, spec))
    return {path: sorted(parts, key=lambda part: part[0] or 0) for path, parts in out.items()}


def _reader(folder: SafetensorsFolder, parts: list[tuple[int | None, TensorSpec]],
            dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``index -> parameter[index]`` (numpy, ``dtype``) reading only that slice of the stored tensors."""

    def one(spec: TensorSpec, index: tuple[slice, ...]) -> np.ndarray:
        if spec.transpose:
            return folder.read(spec.name, index[::-1]).T
        return folder.read(spec.name, index)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if parts[0][0] is None:                                  # one tensor, no stacking
            value = one(parts[0][1], tuple(index))
        else:                                                    # rows of a scanned stack
            rows = range(len(parts))[index[0]]
            value = np.stack([one(parts[r][1], tuple(index[1:])) for r in rows])
        return np.ascontiguousarray(value.astype(dtype))

    return read


def load(path: str | pathlib.Path, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
         **overrides: Any) -> tuple[LanguageModel, ModelConfig]:
    """Loads the checkpoint folder ``path`` (what ``save_pretrained`` writes) -> ``(model, config)``.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors``, or shards listed by
        ``model.safetensors.index.json``.
      dtype: compute and parameter dtype, ``float32`` | ``bfloat16`` | ``float16``; stored
        tensors of any floating dtype (float32, bfloat16, float16) are converted to it.
      mesh: create each parameter sharded over this mesh by the logical-axis rules (every device
        reads only its slice); None: unsharded arrays on the default device.
      overrides: runtime ModelConfig fields (:data:`RUNTIME_FIELDS`), e.g. ``implementation``,
        ``remat``, ``param_dtype`` (to keep parameters in another dtype than the compute) or
        ``scan_layers=True`` (the layers are stacked while loading).

    Raises FileNotFoundError naming a missing ``config.json`` or shard, and ValueError naming the
    file and key of an unsupported config, a tensor missing from the files, unexpected extra
    tensors, or a tensor whose shape does not match the config.
    """
    path = pathlib.Path(path)
    hf, config_file = read_config(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"load() overrides {unknown} are not runtime fields; the checkpoint's config.json "
                         f"decides the rest. Allowed: {list(RUNTIME_FIELDS)} (and the dtype argument)")
    cfg = config_from_hf(hf, source=str(config_file))
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=overrides.pop("param_dtype", dtype), **overrides)
    sources = _sources(cfg)
    with SafetensorsFolder(path) as folder:
        stored = set(folder.names())
        for parts in sources.values():
            for _, spec in parts:
                if spec.name not in stored:
                    raise ValueError(f"tensor {spec.name} is missing from the checkpoint files in {path} "
                                     f"(its {config_file.name} needs it)")
                stored_dtype = folder.dtype(spec.name)
                if stored_dtype not in FLOAT_DTYPES:
                    raise ValueError(f"tensor {spec.name} in {folder.file_of(spec.name)} is stored as {stored_dtype}; "
                                     f"floating tensors ({', '.join(FLOAT_DTYPES)}) are read")
                shape = folder.shape(spec.name)
                if shape != spec.shape:
                    raise _shape_error(spec, shape, folder.file_of(spec.name), config_file)
        wanted = {spec.name for parts in sources.values() for _, spec in parts}
        extra = sorted(n for n in stored - wanted if not ignored_on_load(n, cfg))
        if extra:
            shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            raise ValueError(f"unexpected tensors in {path} that {config_file.name} does not describe: {shown}")

        abstract = nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shardings = {} if mesh is None else {
            p: v.get_value() for p, v in nnx.to_flat_state(rules.state_shardings(state, mesh))}
        for var_path, var in nnx.to_flat_state(state):
            if var_path not in sources:
                raise ValueError(f"the model of {config_file} has a parameter {'.'.join(map(str, var_path))} "
                                 f"that no checkpoint tensor maps to")
            shape, want = var.get_value().shape, np.dtype(var.get_value().dtype)
            read = _reader(folder, sources[var_path], want)
            if mesh is None:
                value = jnp.asarray(read(tuple(slice(None) for _ in shape)))
            else:
                value = jax.make_array_from_callback(shape, shardings[var_path], read)
            var.set_value(value)
        model = nnx.merge(graphdef, state)
    return model, cfg


def _refuse_modules(model: LanguageModel) -> None:
    for path, node in nnx.iter_graph(model):
        where = ".".join(map(str, path))
        if isinstance(node, AdaptedLinear):
            raise ValueError(f"{where} is a {type(node).__name__} adapter ({node.method}): fold the adapters into "
                             f"the kernels first with lolax.models.peft.merge(model)")
        if isinstance(node, SLTrainLinear):
            raise ValueError(f"{where} is an SLTrain layer (A B + S), not a dense kernel a Hugging Face "
                             f"checkpoint can hold")


def _flat_params(model: LanguageModel) -> dict[tuple, Any]:
    return {p: v for p, v in nnx.to_flat_state(nnx.state(model))}


def save(model: LanguageModel, path: str | pathlib.Path, max_shard_size: int | str = "5GB",
         extra_config: Mapping[str, Any] | None = None) -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint folder transformers can load.

    ``config.json`` comes from :func:`~lolax.models.hf.config_to_hf` (plus ``extra_config``,
    e.g. token ids, which overrides its keys); the weights are one ``model.safetensors``, or
    shards of at most ``max_shard_size`` (bytes, or a string such as ``"5GB"``) plus
    ``model.safetensors.index.json`` when larger.  Tensors keep the parameters' dtypes, so
    :func:`load` reproduces them exactly.  Weights an earlier save left in ``path`` are removed.
    A scanned model is written layer by layer.  Raises ValueError for a model a checkpoint cannot
    express (mixers other than softmax / sliding-window attention, SLTrain, adapters: merge them
    with ``lolax.models.peft.merge`` first).  Returns the file names written.
    """
    if not isinstance(model, LanguageModel):
        raise ValueError(f"save() writes a lolax LanguageModel, got {type(model).__name__}")
    cfg = model.config
    hf = config_to_hf(cfg)
    _refuse_modules(model)
    max_bytes = parse_size(max_shard_size)
    sources = _sources(cfg)
    params = _flat_params(model)
    extra = sorted(".".join(map(str, p)) for p in set(params) - set(sources))
    missing = sorted(".".join(map(str, p)) for p in set(sources) - set(params))
    if extra or missing:
        raise ValueError(f"the model's variables do not match its config's checkpoint layout: extra {extra}, "
                         f"missing {missing}")
    by_name: dict[str, tuple[Any, int | None, TensorSpec]] = {}
    for var_path, parts in sources.items():
        for row, spec in parts:
            by_name[spec.name] = (params[var_path], row, spec)

    def fetch(name: str) -> np.ndarray:
        var, row, spec = by_name[name]
        value = var.get_value() if row is None else var.get_value()[row]
        value = np.asarray(jax.device_get(value))
        if value.shape != spec.model_shape():
            raise ValueError(f"parameter {'.'.join(map(str, spec.path))} has shape {value.shape}, its config "
                             f"implies {spec.model_shape()}")
        return np.ascontiguousarray(value.T if spec.transpose else value)

    def nbytes(spec: TensorSpec) -> int:
        var = by_name[spec.name][0].get_value()
        return int(np.prod(spec.shape)) * np.dtype(var.dtype).itemsize

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_old_weights(path)
    specs = tensor_specs(cfg)
    files = write_folder(path, [(s.name, nbytes(s)) for s in specs], fetch, max_bytes)
    (path / "config.json").write_text(json.dumps({**hf, **dict(extra_config or {})}, indent=2, sort_keys=True) + "\n")
    return ["config.json"] + files
