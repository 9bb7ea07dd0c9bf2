"""The engine's parts that the models and the runner share (the scheduler, sampling and
metrics still sit at the package top; they move here with the KV-cache rework)."""
