"""hftune: fine-tune Hugging Face checkpoints from one config and one command.

Who owns what (each module one job; no module imports one that imports it back, tests/test_layout.py):
    run.py           the entry point: parse -> set up -> train -> finish
    config.py        the parser: composes the argument classes from their owners' dataclasses, YAML + CLI,
                     the resolved config; it names no task and no feature
    features.py      the registry of features that add fields and checks (order = order in --help)
    tasks/           one module per task: its DataFields, TRAITS, checks, preprocessing, collator, metrics,
                     pipeline task; tasks/__init__.py is the registry, tasks/common.py what they share;
                     sft's chat formats (chat.py), loss mask (chat_mask.py), `hftune inspect` (chat_audit.py)
    data.py          the data fields every task has; Hub, asset and local-file data sets
    engines/         the only code that touches Accelerator / DeepSpeed / FSDP: Trainer, Accelerate loop,
                     DeepSpeed pipeline; checks.py their fields and config checks, loop.py shared plumbing
    training/        TrainingArguments + hftune's switches (arguments.py), optimizers and schedules,
                     regularization, NaN guard, sampling, crash-safe checkpoints
    compression/     PEFT (adapters.py), pruning, distillation, quantization: each with its own fields
    launch/          launch checks, GPU defaults, `hftune plan` (resolve.py, memory.py, plan.py); several
                     machines: socket interface, pre-flight, lost peers (network.py), output_dir layout and
                     the checkpoint all nodes resume from (nodes.py)
    results/         predictions, generated answers' metrics (generation.py), model card + plots, Hub push,
                     throughput
    metrics/         offline `evaluate` metric modules
    outputs.py       names of the files a run writes into output_dir
    assets.py, errors.py, ranges.py: offline assets, the one-line error, numeric ranges

How data flows: config.parse_config -> (model_args, data_args, training_args), every feature's and the
task's checks done -> run.setup loads the data (data.py), the task builds a TaskBundle (model,
processor, datasets, collator, metrics), compression/ wraps the model (PEFT, teacher) -> engines.build_engine
-> train / evaluate / predict -> results/ writes metrics, card, plots and pushes to the Hub.
"""

__version__ = "0.1.0"
