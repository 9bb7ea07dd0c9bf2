"""Spark/Hydra entry points. Inference logic lives in libinfer; these files are glue."""
