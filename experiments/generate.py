r"""Generate text from a trained model: a lolax run folder or a Hugging Face checkpoint.

    python -m experiments.generate --model=runs/NAME --prompt="ROMEO:" \
        [--max_new_tokens=200 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 \
         --tokenizer=PATH --dtype=float32]

``--model`` is either

- a lolax run folder (``config.json`` with a ``model`` section, checkpoints under
  ``checkpoints/``): the newest checkpoint's parameters; an adapter run's adapters are folded into
  its base first. The tokenizer defaults to the run's ``data.tokenizer`` (bytes for runs that
  predate the setting);
- a Hugging Face checkpoint folder (``config.json`` with a ``model_type``), read by
  ``lolax.models.hf``; the tokenizer defaults to the folder's ``tokenizer.json``, and the prompt
  gets the tokenizer's special tokens (such as a BOS token) the way the model was trained.

It prints the prompt with its continuation, then one line with the decode speed: new tokens per
second of the compiled generation (prefill of the prompt included, compilation not).
``--temperature=0`` decodes greedily.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from experiments import finetune
from experiments.checkpoint import CONFIG_FILE
from experiments.data import JsonTokenizer, Tokenizer, load_tokenizer
from experiments.data.tokenizer import TOKENIZER_FILE
from lolax.models import ModelConfig, generate, peft
from lolax.models.config import DTYPES


@dataclasses.dataclass
class LoadedModel:
    """A model ready to generate, and what its folder says about tokenizing for it."""

    model: nnx.Module
    config: ModelConfig
    kind: str                      # "lolax" (a run folder) or "hf" (a Hugging Face checkpoint)
    tokenizer: str | None          # the default tokenizer spec; None: the folder names none
    context: int | None            # tokens the model was trained on at once, where known
    add_special_tokens: bool       # whether prompts get the tokenizer's special tokens


@dataclasses.dataclass
class Generation:
    """A prompt, its continuation and how long decoding took."""

    prompt: str
    continuation: str
    prompt_tokens: np.ndarray      # [P] int32
    new_tokens: np.ndarray         # [max_new_tokens] int32
    compile_s: float
    decode_s: float                # the compiled call: prefill and every decoding step

    @property
    def text(self) -> str:
        return self.prompt + self.continuation

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens.size / self.decode_s if self.decode_s > 0 else float("inf")


def _read_config(path: str) -> dict | None:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model = {path!r}: {file} is not readable JSON ({e})") from e
    return saved if isinstance(saved, dict) else None


def _has_checkpoint(path: str) -> bool:
    folder = os.path.join(path, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def load_model(path: str, dtype: str = "float32") -> LoadedModel:
    """The model in ``path`` (a lolax run folder or a Hugging Face checkpoint folder) with compute
    dtype ``dtype``.

    Raises:
      ValueError: ``path`` is neither kind, holds no checkpoint, or ``dtype`` is unknown.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype = {dtype!r} is not one of {sorted(DTYPES)}")
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        raise ValueError(f"--model = {path!r} is not a folder (expected a lolax run folder or a "
                         "Hugging Face checkpoint folder)")
    saved = _read_config(folder)
    if saved is not None and isinstance(saved.get("model"), dict):
        return _load_run(folder, saved, dtype)
    if saved is not None and "model_type" in saved:
        from lolax.models import hf  # imported here: only this branch needs it

        if hf.is_checkpoint(folder):
            model, model_cfg = hf.load(folder, dtype=dtype)
            tokenizer = os.path.join(folder, TOKENIZER_FILE)
            context = saved.get("max_position_embeddings")
            return LoadedModel(model=model, config=model_cfg, kind="hf",
                               tokenizer=tokenizer if os.path.isfile(tokenizer) else None,
                               context=context if isinstance(context, int) else None,
                               add_special_tokens=True)
    raise ValueError(
        f"--model = {path!r} is neither a lolax run folder ({CONFIG_FILE} with a \"model\" section and "
        f"checkpoints/) nor a Hugging Face checkpoint folder ({CONFIG_FILE} with a \"model_type\" and "
        "its weights)" + ("" if saved is not None else f"; it has no {CONFIG_FILE}"))


def _load_run(folder: str, saved: dict, dtype: str) -> LoadedModel:
    """A lolax run's newest parameters (adapters folded in) in a model computing in ``dtype``."""
    if not _has_checkpoint(folder):
        raise ValueError(f"--model = {folder!r} is a lolax run folder without checkpoints "
                         f"(nothing under {os.path.join(folder, 'checkpoints')})")
    seed = int(saved.get("seed", 0))
    if saved.get("peft", {}).get("method"):
        adapted, _, step, _ = finetune.restore_adapted(folder)
        merged = peft.merge(adapted)
        cfg = dataclasses.replace(merged.config, dtype=dtype)
        if cfg == merged.config:
            model = merged
        else:   # rebuild with the requested compute dtype around the merged parameters
            base = finetune.Base(folder, cfg, nnx.state(merged, nnx.Param), step)
            model = finetune.build_model(cfg, seed, base, None)[0]
    else:
        current = dataclasses.replace(finetune.saved_model_config(saved), dtype=dtype)
        base = finetune.load_base(folder, current)
        cfg = base.model
        model = finetune.build_model(cfg, seed, base, None)[0]
    data = saved.get("data", {})
    seq_len = data.get("seq_len")
    return LoadedModel(model=model, config=cfg, kind="lolax", tokenizer=data.get("tokenizer") or "byte",
                       context=seq_len if isinstance(seq_len, int) else None, add_special_tokens=False)


def resolve_tokenizer(loaded: LoadedModel, spec: str | None = None, model_path: str = "") -> Tokenizer:
    """``--tokenizer`` when given, else the model folder's default (see :class:`LoadedModel`)."""
    if spec:
        return load_tokenizer(spec, name="--tokenizer")
    if loaded.tokenizer is None:
        raise ValueError(f"--model = {model_path!r} has no {TOKENIZER_FILE}; pass --tokenizer=PATH "
                         f"(a {TOKENIZER_FILE} or a folder holding one)")
    try:
        # a bpe:N run keeps its tokenizer.json in its folder
        return load_tokenizer(loaded.tokenizer, name="the run's data.tokenizer", workdir=model_path or None)
    except ValueError as e:
        raise ValueError(f"{e}; pass --tokenizer=PATH to use another") from e


def encode_prompt(tokenizer: Tokenizer, prompt: str, add_special_tokens: bool = False) -> np.ndarray:
    """The prompt's ids (int32); a ``tokenizer.json`` adds its special tokens when asked."""
    if isinstance(tokenizer, JsonTokenizer):
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    return np.asarray(tokenizer.encode(prompt), np.int32)


def context_note(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> str | None:
    """A warning when prompt and continuation together exceed what the model was trained on."""
    total = prompt_tokens + max_new_tokens
    if loaded.context is None or total <= loaded.context:
        return None
    where = "data.seq_len of the run" if loaded.kind == "lolax" else "max_position_embeddings"
    return (f"note: the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) make {total} "
            f"tokens, more than the {loaded.context} the model was trained on ({where}); generation runs, "
            "but beyond that length the model extrapolates")


def generate_text(model: nnx.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0, add_special_tokens: bool = False) -> Generation:
    """Encodes ``prompt``, samples ``max_new_tokens`` with cached decoding
    (``lolax.models.generate``) and decodes them.

    The generation is compiled ahead of the timed call, so ``decode_s`` (and ``tokens_per_s``)
    exclude compilation. ``temperature = 0`` is greedy; ``top_k`` (0 or None: off) and ``top_p``
    (None or 1: off) filter the sampled distribution. New ids past the tokenizer's vocabulary
    (a model's spare embedding rows) are left out of the text.

    Raises:
      ValueError: an empty prompt, a prompt id outside the model's vocabulary, or bad settings.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    ids = encode_prompt(tokenizer, prompt, add_special_tokens)
    if ids.size == 0:
        raise ValueError("the prompt is empty after tokenization; give --prompt at least one character")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"the prompt has token id {int(ids.max())}, outside the model's vocabulary of {vocab}: "
                         f"the tokenizer {tokenizer.spec!r} does not belong to this model")

    graphdef, state = nnx.split(model)
    prompt_ids = jnp.asarray(ids[None])
    key = jax.random.key(seed)

    def run(state, prompt_ids, key):
        return generate(nnx.merge(graphdef, state), prompt_ids, max_new_tokens, temperature=temperature,
                        top_k=top_k or None, top_p=top_p, rng=key)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(state, prompt_ids, key).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    new = np.asarray(jax.block_until_ready(compiled(state, prompt_ids, key))[0])
    decode_s = time.perf_counter() - start

    known = new[new < tokenizer.vocab_size]
    prompt_text = tokenizer.decode(ids)
    full = tokenizer.decode(np.concatenate([ids, known]))
    # decoding the whole sequence keeps what joins prompt and continuation (a space, a character
    # split over tokens) intact
    continuation = full[len(prompt_text):] if full.startswith(prompt_text) else tokenizer.decode(known)
    return Generation(prompt=prompt, continuation=continuation, prompt_tokens=ids, new_tokens=new,
                      compile_s=compile_s, decode_s=decode_s)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads
    f = flags.FLAGS
    try:
        loaded = load_model(f.model, f.dtype)
        tokenizer = resolve_tokenizer(loaded, f.tokenizer, f.model)
        prompt_len = encode_prompt(tokenizer, f.prompt, loaded.add_special_tokens).size
        note = context_note(loaded, prompt_len, f.max_new_tokens)
        if note:
            print(note, file=sys.stderr)
        result = generate_text(loaded.model, tokenizer, f.prompt, f.max_new_tokens, f.temperature, f.top_k,
                               f.top_p, f.seed, loaded.add_special_tokens)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(result.text)
    print(f"[{result.new_tokens.size} new tokens in {result.decode_s:.2f} s: {result.tokens_per_s:,.1f} tokens/s "
          f"(prompt {result.prompt_tokens.size} tokens; compile {result.compile_s:.1f} s not counted; "
          f"{jax.devices()[0].platform})]")


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing this
    module next to other scripts' modules cannot clash over flag names)."""
    flags.DEFINE_string("model", None, "A lolax run folder or a Hugging Face checkpoint folder.")
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only (default: all).")
    flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of tokens with this much "
                       "probability (default: all).")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
    flags.DEFINE_string("tokenizer", None, "'byte', a tokenizer.json or a folder holding one "
                        "(default: the run's data.tokenizer, or the checkpoint's tokenizer.json).")
    flags.DEFINE_string("dtype", "float32", f"Compute dtype: {', '.join(DTYPES)}.")
    flags.mark_flags_as_required(["model"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
