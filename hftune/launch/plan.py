"""`hftune plan`: the resolved launch and a per-device memory estimate, without training.

    hftune plan --config text_classification --config_file accelerate_configs/deepspeed_zero3.yaml \\
        --num_processes 4 --device_memory 24GB --per_device_train_batch_size 64

prints what `accelerate launch --config_file ... hftune/run.py --config ...` would run (distributed
type, world size, batch sizes, ZeRO/FSDP/pipeline settings, precision), the estimated memory per
device of this model under each strategy, and, given --device_memory, the simplest strategy that fits.
Nothing is trained, no process is launched, no weights are loaded (the model is built on the meta device).

The launch is resolved by hftune.launch.resolve, the memory model (and its formula) is hftune.launch.memory;
this module assembles the plan, prints it and holds the command line.
"""

import argparse
import shlex
import sys
from dataclasses import dataclass

from hftune.errors import HftuneError
from hftune.launch.memory import (
    HEADROOM, ModelFacts, Recommendation, Sizing, estimates, launch_estimate, model_facts, optimizer_state_bytes,
    parse_memory, recommend,
)
from hftune.launch.resolve import Launch, launch_environment, load_accelerate_config, resolve_launch, world_size

GiB = 2**30


@dataclass
class Plan:
    launch: Launch
    facts: ModelFacts
    optimizer: str
    table: dict
    this_launch: tuple
    recommendation: Recommendation
    hftune_argv: list


def build_plan(argv):
    """Parse plan's own flags, then the recipe plus hftune overrides, and work out the plan."""
    from hftune.config import parse_config

    options, hftune_argv = plan_parser().parse_known_args(argv)
    device = parse_memory(options.device_memory) if options.device_memory is not None else None
    config, shown = load_accelerate_config(options.config_file)
    notes = []
    world = world_size(config, options.num_processes or (config.num_processes if config is not None else 1), [])
    with launch_environment(config, notes, world):
        model_args, data_args, args = parse_config(hftune_argv)
    launch = resolve_launch(args, options, config, shown, notes)
    facts = model_facts(model_args, data_args, args, launch)
    state_bytes, optimizer = optimizer_state_bytes(args)
    sizing = Sizing(facts, state_bytes, launch.mixed_precision != "no", launch.gradient_accumulation)
    table = estimates(sizing, launch)
    recommendation = recommend(table, device, launch.world_size) if device is not None else None
    return Plan(launch, facts, optimizer, table, launch_estimate(sizing, launch), recommendation, hftune_argv)


def gib(value):
    value /= GiB
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:.{digits}f}"


def launch_lines(launch):
    rows = [
        ("accelerate config", launch.config_file or "none (one process; pass --config_file to plan a launch)"),
        ("distributed type", launch.distributed_type),
        ("world size", f"{launch.world_size} ({launch.num_processes} processes on {launch.num_machines} "
                       f"machine{'s' if launch.num_machines > 1 else ''})"),
        ("ZeRO stage", f"{launch.zero_stage} (DeepSpeed config: {launch.deepspeed_source})"
         if launch.zero_stage is not None else "none (no DeepSpeed)"),
        ("offload", f"optimizer: {launch.offload_optimizer}, parameters: {launch.offload_param}"),
        ("FSDP", launch.fsdp or "none"),
        ("pipeline stages", f"{launch.pipeline_stages} (engine: pipeline)" if launch.pipeline_stages else
         f"none (engine: {launch.engine})"),
        ("data-parallel size", str(launch.data_parallel)),
        ("per-device batch", str(launch.per_device_batch)),
        ("gradient accumulation", str(launch.gradient_accumulation)),
        ("global batch", f"{launch.global_batch} (= {launch.per_device_batch} per device x "
                         f"{launch.gradient_accumulation} accumulation x {launch.data_parallel} data-parallel)"),
        ("mixed precision", launch.mixed_precision),
    ]
    return ["Launch"] + [f"  {name:<22} {value}" for name, value in rows] + [f"  note: {n}" for n in launch.notes]


def table_lines(plan):
    labels = list(plan.table)
    width = max(len(label) for label in labels) + 2
    rows = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer"),
            ("activations", "activations"), ("total", "total")]
    lines = [f"  {'GiB per device':<18}" + "".join(f"{label:>{width}}" for label in labels)]
    for title, attribute in rows:
        lines.append(f"  {title:<18}" + "".join(f"{gib(getattr(plan.table[l], attribute)):>{width}}" for l in labels))
    lines.append(f"  {'host (offloaded)':<18}" + "".join(f"{gib(plan.table[l].host):>{width}}" for l in labels))
    return lines


def model_lines(plan):
    f = plan.facts
    return [
        "Model",
        f"  {f.name}: {f.architecture}, {f.params / 1e6:.1f}M parameters ({f.trainable / 1e6:.1f}M trainable), "
        f"largest layer {f.largest_layer / 1e6:.1f}M",
        f"  optimizer: {plan.optimizer}",
        f"  activations (approximate): {f.activation_formula}",
    ]


def recommendation_lines(plan):
    r = plan.recommendation
    if r is None:
        return ["Pass --device_memory (e.g. 24GB, 80GiB) for a recommendation."]
    head = f"Recommendation for {gib(r.device)} GiB per device (an estimate must fit in {HEADROOM:.0%} of it):"
    if not r.fits:
        return [head, f"  none fits: the smallest need is {gib(r.need)} GiB ({r.strategy}). Lower "
                      "per_device_train_batch_size (raise gradient_accumulation_steps), set gradient_checkpointing: "
                      "true, use mixed precision, or add processes."]
    world, machines = plan.launch.world_size, plan.launch.num_machines
    processes = f" --num_processes {world}" if world > 1 else ""
    processes += f" --num_machines {machines}" if machines > 1 else ""
    command = (f"accelerate launch --config_file {r.config}{processes} hftune/run.py "
               f"{shlex.join(plan.hftune_argv)}").rstrip()
    return [head, f"  {r.strategy} ({gib(r.need)} GiB): {command}"]


def format_plan(plan):
    description, estimate = plan.this_launch
    host = f" (+{gib(estimate.host)} GiB host per process)" if estimate.host else ""
    lines = [
        "hftune plan: nothing is trained or launched; memory figures are estimates.", "",
        *launch_lines(plan.launch), "", *model_lines(plan), "",
        f"Estimated memory per device, world size {plan.launch.world_size} (activations approximate)",
        *table_lines(plan),
        f"  this launch: {description}: {gib(estimate.total)} GiB per device{host}", "",
        *recommendation_lines(plan),
    ]
    return "\n".join(lines)


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        raise HftuneError(f"hftune plan: {message}. Run `hftune plan --help`.")


def plan_parser():
    parser = _OneLineErrorParser(
        prog="hftune plan", allow_abbrev=False,
        description="Show the resolved launch and a per-device memory estimate without training. "
                    "Every other flag (--config recipe.yaml, --per_device_train_batch_size 8, ...) is hftune's.",
    )
    parser.add_argument("--config_file", default=None, help="accelerate config, as for `accelerate launch`.")
    parser.add_argument("--num_processes", type=int, default=None, help="Total processes (overrides the config).")
    parser.add_argument("--num_machines", type=int, default=None, help="Machines (overrides the config).")
    parser.add_argument("--device_memory", default=None, help="Memory per device, e.g. 24GB or 80GiB.")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        print(format_plan(build_plan(argv)))
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)
