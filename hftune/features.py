"""The features that add fields and checks to the config, in the order their fields appear in
`hftune --help` and in the resolved config. A feature module may declare any of:
- `ModelFields`, `TrainingFields`: dataclasses of its fields, composed onto the model and training
  arguments (hftune.config), so `model_args.lora_r` reads as before wherever the value is used;
- `check_training(training_args)`: runs while TrainingArguments parses, before its own checks;
- `check_config(model_args, data_args, training_args)`: runs once all three are parsed.
Tasks declare their `DataFields` and `check_config` the same way (hftune.tasks).
"""

import importlib

FEATURES = (
    "hftune.results.predict",  # eval_split, predict_split, max_new_tokens
    "hftune.engines.checks",  # engine, pipeline_stages, ddp_comm_hook
    "hftune.training.regularization",  # dropout overrides, clipping, L1/L2, early stopping, BatchNorm
    "hftune.training.guards",  # the NaN/inf guard
    "hftune.compression.adapters",  # PEFT
    "hftune.compression.distillation",
    "hftune.compression.pruning",
    "hftune.results.hub",
    "hftune.compression.quantization",
)


def feature_modules():
    return [importlib.import_module(name) for name in FEATURES]
