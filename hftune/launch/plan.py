"""`hftune plan`: the resolved launch and a per-device memory estimate, without training.

    hftune plan --config text_classification --config_file accelerate_configs/deepspeed_zero3.yaml \\
        --num_processes 4 --device_memory 24GB --per_device_train_batch_size 64

prints what `accelerate launch --config_file ... hftune/run.py --config ...` would run (distributed
type, world size, machines and processes per node, batch sizes, ZeRO/FSDP/pipeline settings, precision), the
estimated memory per device and per node of this model under each strategy, the bytes each process sends per
optimizer step (and, given --network_bandwidth such as 10Gbit or 25GB/s, the seconds that takes), and, given
--device_memory, the simplest strategy that fits.
Nothing is trained, no process is launched, no weights are loaded (the model is built on the meta device).

The launch is resolved by hftune.launch.resolve, the memory model (and its formula) is hftune.launch.memory,
the communication model (and its formula) hftune.launch.traffic; this module assembles the plan, prints it
and holds the command line.
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
from hftune.launch.resolve import (
    Launch, deepspeed_settings, launch_environment, load_accelerate_config, resolve_launch, world_size,
)
from hftune.launch.traffic import Compression, launch_traffic, parse_bandwidth, traffic_table

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
    traffic: dict  # {strategy: Traffic}
    this_traffic: tuple  # (description, Traffic)
    bandwidth: tuple = None  # (as written, bytes per second)
    cpu: bool = False  # the processes run on CPUs: a node's devices are its RAM


def build_plan(argv):
    """Parse plan's own flags, then the recipe plus hftune overrides, and work out the plan."""
    from hftune.config import parse_config

    options, hftune_argv = plan_parser().parse_known_args(argv)
    device = parse_memory(options.device_memory) if options.device_memory is not None else None
    bandwidth = options.network_bandwidth
    bandwidth = (bandwidth, parse_bandwidth(bandwidth)) if bandwidth is not None else None
    config, shown = load_accelerate_config(options.config_file)
    notes = []
    world = world_size(config, options.num_processes or (config.num_processes if config is not None else 1), [])
    with launch_environment(config, notes, world):
        model_args, data_args, args = parse_config(hftune_argv)
    launch = resolve_launch(args, options, config, shown, notes)
    processes_per_node(launch)  # refuse an uneven split before the model is built
    facts = model_facts(model_args, data_args, args, launch)
    state_bytes, optimizer = optimizer_state_bytes(args)
    sizing = Sizing(facts, state_bytes, launch.mixed_precision != "no", launch.gradient_accumulation)
    table = estimates(sizing, launch)
    recommendation = recommend(table, device, launch.world_size) if device is not None else None
    compression = launch_compression(args, config, shown)
    traffic = traffic_table(facts, launch, compression)
    return Plan(launch, facts, optimizer, table, launch_estimate(sizing, launch), recommendation, hftune_argv,
                traffic, launch_traffic(traffic, facts, launch, compression), bandwidth, runs_on_cpu(config))


def processes_per_node(launch):
    """accelerate starts num_processes / num_machines processes on each machine: it must divide."""
    if launch.num_processes % launch.num_machines:
        raise HftuneError(f"num_processes {launch.num_processes} is not a multiple of num_machines "
                          f"{launch.num_machines}: every machine starts the same number of processes.")
    return launch.num_processes // launch.num_machines


def runs_on_cpu(config):
    return config is not None and (bool(getattr(config, "use_cpu", False)) or
                                   str(config.distributed_type.value) == "MULTI_CPU")


def launch_compression(args, config, shown):
    """The gradient compression the run asks for: its DDP comm hook, or the DeepSpeed JSON's data type."""
    _, ds_json, _ = deepspeed_settings(args, config, shown)
    return Compression(args.ddp_comm_hook, args.powersgd_rank, args.powersgd_start_iter,
                       (ds_json or {}).get("communication_data_type"))


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
        ("num_machines", str(launch.num_machines)),
        ("processes per node", str(processes_per_node(launch))),
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
    title, per_node = node_row(plan)
    lines.append(f"  {title:<18}" + "".join(f"{gib(per_node(plan.table[l])):>{width}}" for l in labels))
    return lines


def node_row(plan):
    """(title, Estimate -> bytes per node): a node holds num_processes / num_machines devices; on CPUs the
    devices are the node's RAM, which also holds what they offload."""
    k = processes_per_node(plan.launch)
    if plan.cpu:
        return f"node RAM (x{k})", lambda e: k * (e.total + e.host)
    return f"per node (x{k})", lambda e: k * e.total


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


def size(value):
    """Bytes in the largest binary unit under 1024 of it: 173.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def traffic_lines(plan):
    launch, f, bandwidth = plan.launch, plan.facts, plan.bandwidth
    crosses, steps = launch.num_machines > 1, launch.gradient_accumulation
    width = max(len(label) for label in plan.traffic) + 2
    lines = [f"Communication per optimizer step, ring collectives over {launch.world_size} processes "
             f"(T = {f.trainable / 1e6:.2f}M trainable, P = {f.params / 1e6:.2f}M parameters; formulas in "
             "hftune/launch/traffic.py)",
             f"  {'':<{width}}{'sent per process':>18}{'over each node link':>21}"
             + (f"{'s at ' + bandwidth[0]:>16}" if bandwidth else "")]
    for label, traffic in plan.traffic.items():
        seconds = f"{traffic.total / bandwidth[1]:>16.3g}" if bandwidth else ""
        lines.append(f"  {label:<{width}}{size(traffic.total):>18}{size(traffic.total * crosses):>21}{seconds}")
    description, traffic = plan.this_traffic
    seconds = f", {traffic.total / bandwidth[1]:.3g} s at {bandwidth[0]}" if bandwidth else ""
    lines += [f"  this launch: {description}: {size(traffic.total)} per process per optimizer step{seconds}",
              f"  an optimizer step of {steps} micro-batch{'es' if steps > 1 else ''}: DDP (no_sync) and ZeRO-1 send "
              "once, ZeRO-2 gradients and ZeRO-3 everything at each micro-batch",
              "  assumed: the ring visits the nodes in turn, so each node's link carries every chunk once, what one "
              "process sends, and paces the step" + ("" if crosses else " (one machine: nothing crosses)")]
    return lines + ([] if bandwidth else ["  Pass --network_bandwidth (e.g. 10Gbit, 25GB/s) for seconds per step."])


def format_plan(plan):
    description, estimate = plan.this_launch
    host = f" (+{gib(estimate.host)} GiB host per process)" if estimate.host else ""
    per_node = node_row(plan)[1]
    node = f", {gib(per_node(estimate))} GiB {'of RAM ' if plan.cpu else ''}per node"
    lines = [
        "hftune plan: nothing is trained or launched; memory and traffic figures are estimates.", "",
        *launch_lines(plan.launch), "", *model_lines(plan), "",
        f"Estimated memory per device, world size {plan.launch.world_size} (activations approximate)",
        *table_lines(plan),
        f"  this launch: {description}: {gib(estimate.total)} GiB per device{node}{host}", "",
        *traffic_lines(plan), "",
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
    parser.add_argument("--network_bandwidth", default=None,
                        help="Each node's network link, e.g. 10Gbit, 100Gbps or 25GB/s: prints seconds per step.")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        print(format_plan(build_plan(argv)))
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)
