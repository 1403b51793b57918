"""The sweeps behind the task scripts, importable without their command-line flags."""

from __future__ import annotations

import numpy as np

from experiments.tasks import IGNORE, generate_mqar, generate_state_tracking
from experiments.tasks.listops import LISTOPS_VOCAB
from experiments.tasks.runner import decode_state_size, task_model_config, train_on_task
from experiments.tasks.state_tracking import task_vocab

# MQAR mixer name -> (preset, model settings): the settings a layer's paper used in its own recall
# experiments where the name alone would leave them implicit, and variants that differ in one
# setting.  A name without an entry is a preset (experiments/configs/presets.py) as it stands.
MQAR_MIXER_SPECS = {
    "gdn": ("gdn", {"gdn_use_gate": True, "gdn_gate_activation": "swish"}),     # the GDN paper's layer
    "gdn_no_gate": ("gdn", {"gdn_use_gate": False}),
    "gdn_sigmoid_gate": ("gdn", {"gdn_gate_activation": "sigmoid"}),          # Kimi's KDA gate
    "deltanet_no_conv": ("deltanet", {"conv_size": 0}),                       # the recurrence alone
    "gdn_no_conv": ("gdn", {"conv_size": 0}),
    "gdn_no_gate_no_conv": ("gdn", {"gdn_use_gate": False, "conv_size": 0}),
}

LR_SELECTIONS = ("all_seeds", "first_seed")


def mqar_mixer(name: str) -> tuple[str, dict]:
    """``(preset, model settings)`` of an MQAR mixer name (see ``MQAR_MIXER_SPECS``)."""
    return MQAR_MIXER_SPECS.get(name, (name, {}))


def mqar_sweep(mixers, d_models, vocab, settings, steps, batch, lrs, train_examples, test_examples, seed, log=print,
               seeds=None, lr_selection="all_seeds", fixed_lrs=None, on_row=None, **model_overrides):
    """Trains every (mixer, width) on every (L, D) setting; returns a list of result rows.

    Each mixer name is a preset or a key of ``MQAR_MIXER_SPECS`` (a preset with its paper's
    settings, or a variant); ``model_overrides`` (for example ``window=16``) then replace those
    values in every model. A seed draws the data, its order and the initialisation; ``seeds``
    defaults to ``[seed]``. The learning rate is chosen per (setting, mixer, width):

    - ``lr_selection="all_seeds"``: every rate of ``lrs`` runs once per seed and the rate with
      the best mean test accuracy is kept;
    - ``"first_seed"``: every rate runs on the first seed, the best one is kept and only it runs
      on the other seeds (``len(lrs) + len(seeds) - 1`` runs instead of ``len(lrs) * len(seeds)``;
      the reported mean then includes the seed the rate was picked on);
    - ``fixed_lrs`` (``{(mixer, d_model): lr}``) skips the sweep for the pairs it names and runs
      that rate on every seed (to reuse rates chosen at another length).

    A row reports the kept rate, the mean and standard deviation of its test accuracy over the
    seeds, each seed's accuracy (``accuracies``) and every swept rate's mean (``by_lr``).
    Rows are complete one at a time; ``on_row(rows)`` is called after each, so a caller can save
    partial results of a long sweep.
    """
    if lr_selection not in LR_SELECTIONS:
        raise ValueError(f"lr_selection must be one of {LR_SELECTIONS}, got {lr_selection!r}")
    seeds = [seed] if seeds is None else list(seeds)
    fixed_lrs = dict(fixed_lrs or {})
    data = {}

    def task_data(s, seq_len, pairs):
        if (s, seq_len, pairs) not in data:
            train = generate_mqar(train_examples, vocab, seq_len, pairs, seed=s)
            test = generate_mqar(test_examples, vocab, seq_len, pairs, seed=s + 10_000)
            order = np.random.default_rng(s).permutation(train_examples)

            def sample(i, train=train, order=order):
                idx = order[(np.arange(batch) + i * batch) % train_examples]
                return {k: v[idx] for k, v in train.items()}

            data[(s, seq_len, pairs)] = sample, test
        return data[(s, seq_len, pairs)]

    rows = []
    for seq_len, pairs in settings:
        for mixer in mixers:
            for d in d_models:
                preset, settings_of_mixer = mqar_mixer(mixer)
                cfg = task_model_config(preset, vocab, d, num_layers=2, num_heads=2,
                                        **{**settings_of_mixer, **model_overrides})
                results = {}          # lr -> per-seed results

                def run(lr, s, cfg=cfg, seq_len=seq_len, pairs=pairs, mixer=mixer, d=d, results=results):
                    sample, test = task_data(s, seq_len, pairs)
                    result = train_on_task(cfg, sample, {"test": test}, steps=steps, learning_rate=lr, seed=s,
                                           stop_accuracy=0.99, eval_every=max(steps // 5, 1))
                    results.setdefault(lr, []).append(result)
                    log(f"seed {s} L={seq_len} D={pairs} {mixer:12s} d={d:4d} lr {lr:g} "
                        f"acc={result.accuracy['test']:.3f} ({result.seconds:.0f}s)")

                if (mixer, d) in fixed_lrs:
                    swept, sweep_seeds = [fixed_lrs[(mixer, d)]], seeds
                else:
                    swept = list(lrs)
                    sweep_seeds = seeds if lr_selection == "all_seeds" else seeds[:1]
                for s in sweep_seeds:
                    for lr in swept:
                        run(lr, s)
                by_lr = {lr: [r.accuracy["test"] for r in results[lr]] for lr in swept}
                lr = max(swept, key=lambda x: np.mean(by_lr[x]))
                for s in seeds[len(sweep_seeds):]:
                    run(lr, s)
                runs = results[lr]
                accs = [r.accuracy["test"] for r in runs]
                rows.append({"mixer": mixer, "d_model": d, "seq_len": seq_len, "num_pairs": pairs,
                             "learning_rate": lr, "state_size": decode_state_size(cfg, seq_len),
                             "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                             "accuracies": [float(a) for a in accs], "seeds": seeds,
                             "lr_selection": "fixed" if (mixer, d) in fixed_lrs else lr_selection,
                             "by_lr": {str(x): float(np.mean(v)) for x, v in by_lr.items()},
                             "train_loss": float(np.mean([r.train_loss for r in runs])),
                             "steps": int(np.mean([r.steps for r in runs])),
                             "seconds": float(sum(r.seconds for v in results.values() for r in v)),
                             "num_params": runs[0].num_params})
                log(f"L={seq_len} D={pairs} {mixer:12s} d={d:4d} state={rows[-1]['state_size']:7d} "
                    f"acc={rows[-1]['accuracy']:.3f} ± {rows[-1]['accuracy_std']:.3f} (lr {lr:g}, "
                    f"{len(seeds)} seed(s))")
                if on_row is not None:
                    on_row(rows)
    return rows


def mqar_markdown(rows) -> str:
    """The table of :func:`mqar_sweep`'s rows: mean ± standard deviation over the seeds."""
    lines = ["| L | mixer | d_model | state (floats) | best lr | accuracy (mean ± std) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["mixer"], r["d_model"])):
        per_seed = ", ".join(f"{a:.3f}" for a in r.get("accuracies", [r["accuracy"]]))
        lines.append(f"| {r['seq_len']} | {r['mixer']} | {r['d_model']} | {r['state_size']:,} | {r['learning_rate']:g} "
                     f"| {r['accuracy']:.3f} ± {r.get('accuracy_std', 0.0):.3f} | {per_seed} |")
    return "\n".join(lines) + "\n"


# mixer name -> (preset, extra model overrides)
MIXER_SPECS = {
    "deltanet": ("deltanet", {}),
    "deltanet_neg": ("deltanet", {"allow_neg_eigval": True}),
    "gdn": ("gdn", {}),
    "gdn_neg": ("gdn", {"allow_neg_eigval": True}),
    "transformer": ("transformer", {}),
}


def final_token_set(task: str, length: int, n: int, seed: int) -> dict[str, np.ndarray]:
    data = generate_state_tracking(task, n, length, seed=seed)
    labels = np.full_like(data["labels"], IGNORE)
    labels[:, -1] = data["labels"][:, -1]
    return {"inputs": data["inputs"], "labels": labels}


def state_tracking_sweep(tasks, mixers, train_length, test_lengths, d_model, num_layers, steps, batch, lr, seeds,
                         test_examples,
        log=print):
    rows = []
    for task in tasks:
        vocab, states = task_vocab(task)
        for mixer in mixers:
            preset, extra = MIXER_SPECS[mixer]
            for seed in seeds:
                cfg = task_model_config(preset, max(vocab, states), d_model, num_layers=num_layers, **extra)
                sample = lambda i, task=task, seed=seed: generate_state_tracking(
                    task, batch, train_length, seed=seed * 1_000_003 + i)
                evals = {f"L{n}": final_token_set(task, n, test_examples, seed=10_000 + seed + n) for n in test_lengths}
                result = train_on_task(cfg, sample, evals, steps=steps, learning_rate=lr, seed=seed)
                for n in test_lengths:
                    acc = result.accuracy[f"L{n}"]
                    rows.append({"task": task, "mixer": mixer, "seed": seed, "length": n, "accuracy": acc,
                                 "normalized": (acc - 1 / states) / (1 - 1 / states),
                                 "train_loss": result.train_loss, "seconds": result.seconds})
                log(f"{task:6s} {mixer:13s} seed {seed}: " + ", ".join(
                    f"L{n} {result.accuracy[f'L{n}']:.2f}" for n in test_lengths) + f" ({result.seconds:.0f}s)")
    return rows



def listops_sweep(mixers, train, test, batch, d_model, num_layers, steps, lr, seed, log=print):
    """Trains each mixer preset on ListOps trees; returns one row per mixer."""
    rng = np.random.default_rng(seed)
    n_train = len(train["inputs"])

    def sample(i):
        idx = rng.integers(0, n_train, batch)
        return {k: train[k][idx] for k in ("inputs", "labels")}

    rows = []
    for mixer in mixers:
        cfg = task_model_config(mixer, len(LISTOPS_VOCAB), d_model, num_layers=num_layers)
        result = train_on_task(cfg, sample, {"test": test}, steps=steps, learning_rate=lr, seed=seed)
        rows.append({"mixer": mixer, "accuracy": result.accuracy["test"], "train_loss": result.train_loss,
                     "seconds": result.seconds, "num_params": result.num_params})
        log(f"{mixer:12s} accuracy {result.accuracy['test']:.3f} ({result.seconds:.0f}s)")
    return rows
