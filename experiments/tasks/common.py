"""Conventions shared by the task generators."""

IGNORE = -100  # label of positions that carry no target (as in PyTorch's cross-entropy)
