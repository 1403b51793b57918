"""Training scripts, tasks, data pipelines and benchmarks built on ops, models and optim."""
