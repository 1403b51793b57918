"""The examples in the library's docstrings run, and every public op has one."""

import doctest
import importlib
import pkgutil

import pytest

from lolax import ops
from lolax.ops import attention, feature_maps, lightning_attn, retention

SUBPACKAGES = ("ops", "models", "optim", "parallelism")


def library_modules() -> list[str]:
    names = ["lolax"]
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"lolax.{sub}")
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", library_modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(exclude_empty=True), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def public_ops():
    fns = [getattr(ops, n) for n in ops.__all__ if n.startswith(("chunk_", "fused_recurrent_"))]
    fns += [ops.get_op(f, "naive") for f in ops.FAMILIES] + [ops.get_op]
    fns += [getattr(attention, n) for n in attention.__all__]
    fns += [f for f in feature_maps.FEATURE_MAPS.values()]
    fns += [retention.chunk_retention, lightning_attn.chunk_lightning_attn]
    return fns


@pytest.mark.parametrize("fn", public_ops(), ids=lambda f: f.__name__)
def test_every_public_op_has_an_example(fn):
    assert ">>>" in (fn.__doc__ or ""), f"{fn.__module__}.{fn.__name__} has no example"
