r"""Tokenise text once into token shards that training reads with ``data.path=DIR``.

    python -m experiments.prepare_data --input='texts/**/*.txt' --tokenizer=bpe:8192 --out=data/mine \
        [--val_fraction=0.05 --shard_tokens=134217728 --documents=file --eos='<|endoftext|>' --overwrite]

``--tokenizer`` is ``byte``, a ``tokenizer.json`` (or a folder holding one), or ``bpe:N`` (trained on
the training parts of the input and saved as ``DIR/tokenizer.json``). ``--documents`` is ``file``
(one document per file), ``blank_line``, ``line`` or ``re:REGEX``. Then train with
``--config.data.path=DIR --config.data.tokenizer=DIR`` (the folder holds the tokenizer; ``byte`` for
byte shards). See docs/training.md, "Data".
"""

from absl import app, flags

from experiments.cli import parse_flags
from experiments.data.prepare import DEFAULT_SHARD_TOKENS, prepare


def define_flags() -> None:
    flags.DEFINE_string("input", None, "Text to tokenise: a file, a folder or a glob.")
    flags.DEFINE_string("tokenizer", "byte", "'byte', a tokenizer.json (or a folder holding one), or bpe:N.")
    flags.DEFINE_string("out", None, "Folder to write the shards, index.json and tokenizer.json into.")
    flags.DEFINE_float("val_fraction", 0.05, "Tail of every file kept for validation, in [0, 1).")
    flags.DEFINE_integer("shard_tokens", DEFAULT_SHARD_TOKENS, "Tokens per shard file at most.")
    flags.DEFINE_string("documents", "file", "How text splits into documents: file, blank_line, line or re:REGEX.")
    flags.DEFINE_string("eos", "", "A special token appended to every document (e.g. <|endoftext|>); empty: none.")
    flags.DEFINE_bool("overwrite", False, "Replace prepared data already in --out.")
    flags.mark_flags_as_required(["input", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        index = prepare(f.input, f.tokenizer, f.out, val_fraction=f.val_fraction, shard_tokens=f.shard_tokens,
                        documents=f.documents, eos=f.eos, overwrite=f.overwrite)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    train, val = index["splits"]["train"], index["splits"]["val"]
    tok = index["tokenizer"]
    print(f"{f.out}: {train['tokens']:,} train tokens in {train['documents']:,} documents and "
          f"{len(train['shards'])} shard(s), {val['tokens']:,} validation tokens; {index['dtype']}, tokenizer "
          f"{tok['spec']!r} ({tok['vocab_size']:,} tokens)")
    print(f"train with --config.data.path={f.out} --config.data.tokenizer={f.out if tok['file'] else 'byte'}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
