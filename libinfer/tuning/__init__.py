"""Fine-tuning a checkpoint on (prompt, completion) pairs (no Spark, no MLflow): examples
with the loss on completion tokens only (`data`), and the data-parallel LoRA / full
training loop that merges and saves an HF checkpoint (`train`). LoRA needs `peft`
(the `jobs` extra). jobs.finetune runs `train` on Spark executors with TorchDistributor."""
from .data import Example, collate, make_example, split, step_indices
from .train import LoraConf, TrainConfig, TuneConfigError, evaluate, token_nll, train

__all__ = ["Example", "LoraConf", "TrainConfig", "TuneConfigError", "collate", "evaluate", "make_example", "split",
           "step_indices", "token_nll", "train"]
