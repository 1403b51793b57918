r"""Train a byte-level language model.

    python -m experiments.train --config=experiments/configs/lm_shakespeare.py --workdir=runs/NAME \
        [--config.train.steps=3000 --config.model.pattern=LS --config.data.path=my_texts/ ...]

Rerunning with the same ``--workdir`` resumes from its newest checkpoint (an unreadable newest one
is moved aside with a warning). An out-of-range config value, or a run whose loss turns NaN or
infinite, ends with a one-line ``error: ...`` and exit status 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import parse_flags
from experiments.guards import TrainingDiverged, check_train_config
from experiments.trainer import final_line, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, loss.png.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's per-save logs out of the progress bar
    try:
        check_train_config(_CONFIG.value)             # train() checks too; here it is a one-line error
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except TrainingDiverged as e:
        sys.exit(f"error: {e}")
    print(final_line(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
