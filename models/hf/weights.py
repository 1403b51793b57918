"""Tensor names of a Hugging Face checkpoint, and reading / writing its safetensors files.

:func:`tensor_specs` lists, for a :class:`~lolax.models.ModelConfig`, every tensor a checkpoint
holds with its transformers name, its shape there and the parameter of
:class:`~lolax.models.LanguageModel` it becomes:

=============================================================== =====================================
transformers tensor (PyTorch layout)                             LanguageModel parameter
=============================================================== =====================================
``model.embed_tokens.weight [V, D]``                             ``embed.embedding [V, D]``
``model.layers.{i}.input_layernorm.weight [D]``                  ``layers[i].attn_norm.scale``
``model.layers.{i}.self_attn.q_proj.weight [H d, D]`` (``bias``) ``layers[i].attn.q_proj.kernel [D, H d]``
``model.layers.{i}.self_attn.{k,v}_proj.weight [Hkv d, D]``      ``layers[i].attn.{k,v}_proj.kernel``
``model.layers.{i}.self_attn.o_proj.weight [D, H d]`` (``bias``) ``layers[i].attn.o_proj.kernel [H d, D]``
``model.layers.{i}.self_attn.{q,k}_norm.weight [d]``             ``layers[i].attn.{q,k}_norm.scale``
``model.layers.{i}.post_attention_layernorm.weight [D]``         ``layers[i].mlp_norm.scale``
``model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]``            ``layers[i].mlp.{gate,up}_proj.kernel``
``model.layers.{i}.mlp.down_proj.weight [D, F]``                 ``layers[i].mlp.down_proj.kernel``
``model.norm.weight [D]``                                        ``norm.scale``
``lm_head.weight [V, D]`` (absent when tied)                     ``lm_head.kernel [D, V]``
=============================================================== =====================================

Every ``weight`` of a linear layer is stored ``[out, in]`` and becomes the transposed kernel
``[in, out]``; biases and norm weights keep their shape.  A scanned model
(``scan_layers = True``) holds layer ``i`` at ``stack.blocks[i % p]``, row ``i // p`` of the
stacked arrays (``p`` the pattern length).

:class:`SafetensorsFolder` reads single tensors or slices of them from ``model.safetensors``
or the shards that ``model.safetensors.index.json`` lists; :func:`write_folder` writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
"""safetensors dtype names :func:`~lolax.models.hf.load` converts from."""
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

Path = tuple[Any, ...]
"""A parameter's path in ``nnx.state(model)``, e.g. ``('layers', 0, 'attn', 'q_proj', 'kernel')``."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its ``name``, ``shape`` as stored, and where it goes in the model.

    ``path`` is the parameter of an unscanned model; ``layer`` the layer index (None outside the
    blocks); ``transpose`` whether the parameter is the stored tensor transposed.
    """

    name: str
    shape: tuple[int, ...]
    path: Path
    layer: int | None = None
    transpose: bool = False

    def model_shape(self) -> tuple[int, ...]:
        """The parameter's shape in an unscanned model."""
        return self.shape[::-1] if self.transpose else self.shape


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a checkpoint of ``cfg``, in the order transformers lists them."""
    v, d, f = cfg.vocab_size, cfg.d_model, cfg.hidden_size
    q, kv, hd = cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.head_size
    out = [TensorSpec("model.embed_tokens.weight", (v, d), ("embed", "embedding"))]
    for i in range(cfg.num_layers):
        pre, at = f"model.layers.{i}.", ("layers", i)

        def add(name: str, shape: tuple[int, ...], *path: str, transpose: bool = False, pre=pre, at=at, i=i):
            out.append(TensorSpec(pre + name, shape, at + path, i, transpose))

        add("input_layernorm.weight", (d,), "attn_norm", "scale")
        for proj, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            add(f"self_attn.{proj}.weight", (width, d), "attn", proj, "kernel", transpose=True)
            if cfg.qkv_bias:
                add(f"self_attn.{proj}.bias", (width,), "attn", proj, "bias")
        add("self_attn.o_proj.weight", (d, q), "attn", "o_proj", "kernel", transpose=True)
        if cfg.o_bias:
            add("self_attn.o_proj.bias", (d,), "attn", "o_proj", "bias")
        if cfg.qk_norm:
            add("self_attn.q_norm.weight", (hd,), "attn", "q_norm", "scale")
            add("self_attn.k_norm.weight", (hd,), "attn", "k_norm", "scale")
        add("post_attention_layernorm.weight", (d,), "mlp_norm", "scale")
        add("mlp.gate_proj.weight", (f, d), "mlp", "gate_proj", "kernel", transpose=True)
        add("mlp.up_proj.weight", (f, d), "mlp", "up_proj", "kernel", transpose=True)
        add("mlp.down_proj.weight", (d, f), "mlp", "down_proj", "kernel", transpose=True)
    out.append(TensorSpec("model.norm.weight", (d,), ("norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(TensorSpec("lm_head.weight", (v, d), ("lm_head", "kernel"), transpose=True))
    return out


def scanned_path(spec: TensorSpec, pattern_length: int) -> tuple[Path, int | None]:
    """``(path in a scanned model, row of the stacked array)`` of ``spec`` (row None outside blocks)."""
    if spec.layer is None:
        return spec.path, None
    return ("stack", "blocks", spec.layer % pattern_length) + spec.path[2:], spec.layer // pattern_length


def ignored_on_load(name: str, cfg: ModelConfig) -> bool:
    """Stored tensors transformers skips too: rotary caches, and ``lm_head.weight`` of a tied model."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


class SafetensorsFolder(contextlib.AbstractContextManager):
    """The tensors of a checkpoint folder, opened lazily (memory-mapped), by name.

    ``names()`` are the stored tensors, ``shape(name)`` their shapes, and ``read(name, index)``
    returns ``tensor[index]`` as a numpy array, reading only that slice from the file.
    Stored ``bfloat16`` comes back as ``ml_dtypes.bfloat16``, ``float16`` as ``np.float16``.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._stack = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, Any] = {}
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} must be JSON with a 'weight_map' object: {e!r}") from None
            self.files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"shard {file.name} named by {index} is missing from {self.path}")
            self._listed_in = index
        elif single.is_file():
            self.files = {name: single for name in self._open(single).keys()}
            self._listed_in = single
        else:
            raise FileNotFoundError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _open(self, file: pathlib.Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="np"))
        return self._handles[file]

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def close(self) -> None:
        """Closes the open files."""
        self.__exit__(None, None, None)

    def names(self) -> list[str]:
        return list(self.files)

    def _slice(self, name: str):
        if name not in self.files:
            raise KeyError(name)
        file = self.files[name]
        handle = self._open(file)
        if name not in handle.keys():
            raise ValueError(f"tensor {name} is listed in {self._listed_in.name} as stored in {file.name}, "
                             f"but {file} does not hold it")
        return handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name (``F32``, ``BF16``, ``F16``, ...)."""
        return str(self._slice(name).get_dtype())

    def file_of(self, name: str) -> pathlib.Path:
        return self.files[name]

    def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """``tensor[index]`` (the whole tensor when ``index`` is None) as a numpy array."""
        part = self._slice(name)
        if index is None:
            index = tuple(slice(None) for _ in part.get_shape())
        return np.asarray(part[tuple(index)])


def parse_size(size: int | str) -> int:
    """``5_000_000``, ``"5GB"`` (10^9), ``"2GiB"`` (2^30), ``"100KB"`` ... -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        units = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
                 "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else ""
        if not match or (unit or "B") not in units:
            raise ValueError(f"max_shard_size = {size!r} must be a number of bytes or a string like '5GB' / '500MiB'")
        value = int(float(match.group(1)) * units[unit or "B"])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Groups ``(name, bytes)`` in order into shards of at most ``max_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def remove_old_weights(path: pathlib.Path) -> None:
    """Deletes the weights a previous save left in ``path`` (single file, shards, index)."""
    for file in path.iterdir():
        if file.name in (SINGLE_FILE, INDEX_FILE) or SHARD_NAME.match(file.name):
            file.unlink()


def write_folder(path: pathlib.Path, specs: Iterable[tuple[str, int]], fetch: Callable[[str], np.ndarray],
                 max_bytes: int) -> list[str]:
    """Writes the tensors ``specs`` (``(name, bytes)`` in order) as ``model.safetensors``, or as
    shards of at most ``max_bytes`` plus ``model.safetensors.index.json``.

    ``fetch(name)`` returns a tensor when its shard is written, so at most one shard is held in
    host memory.  Returns the file names written.
    """
    specs = list(specs)
    shards = plan_shards(specs, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({name: fetch(name) for name in shards[0]}, path / SINGLE_FILE, metadata=meta)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: fetch(name) for name in names}, path / file, metadata=meta)
        weight_map.update({name: file for name in names})
        files.append(file)
    index = {"metadata": {"total_size": sum(size for _, size in specs)}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_FILE]
