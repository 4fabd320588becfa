"""`hftune launch [accelerate launch options] [hftune options]`: exactly `accelerate launch <its options>
hftune/run.py <hftune options>`, after the checks accelerate's own launcher makes with a traceback.

accelerate's launcher starts DeepSpeed before any hftune code runs, so a DeepSpeed launch config
without DeepSpeed installed ends there in `ImportError: DeepSpeed is not installed`; this command says
so in one line with hftune's install line (exit status 2). Options are told apart by accelerate's own
parser: what it knows goes to `accelerate launch`, the rest to hftune.

On several machines (num_machines > 1) it checks first what would otherwise hang: node 0 must own
main_process_ip, and every other node waits at most HFTUNE_PREFLIGHT_TIMEOUT seconds (120) for node 0's
port to answer, then stops with one line.

Example:
    $ hftune launch --config_file accelerate_configs/deepspeed_zero3.yaml --config recipe.yaml
"""

import importlib.util
import os
import sys

import yaml

from hftune.errors import HftuneError
from hftune.launch.network import check_main_process

RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")
DEEPSPEED_INSTALL = "bash scripts/install.sh deepspeed (or pip install 'hftune[deepspeed]')"


def split_options(argv):
    """(accelerate launch's options, hftune's), by accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    actions = launch_command_parser()._option_string_actions
    ours, theirs, k = [], [], 0
    while k < len(argv):
        name = argv[k].split("=", 1)[0]
        action = actions.get(name) if argv[k].startswith("--") or len(name) == 2 else None
        if action is None or name in ("-h", "--help"):
            ours.append(argv[k])
            k += 1
            continue
        takes_value = action.nargs != 0 and "=" not in argv[k]
        theirs += argv[k:k + 1 + takes_value]
        k += 1 + takes_value
    return theirs, ours


def launch_config(accelerate_options):
    """The accelerate config file this launch reads (its --config_file, else accelerate's default), as a dict."""
    path = option_value(accelerate_options, "--config_file")
    if path is not None and not os.path.isfile(path):
        raise HftuneError(f"--config_file '{path}' does not exist; pick one of accelerate_configs/.")
    if path is None:
        from accelerate.commands.config.config_args import default_config_file

        path = default_config_file if os.path.isfile(default_config_file) else None
    if path is None:
        return {}
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def option_value(options, name):
    for k, option in enumerate(options):
        if option == name and k + 1 < len(options):
            return options[k + 1]
        if option.startswith(name + "="):
            return option.split("=", 1)[1]
    return None


def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_launch(accelerate_options):
    config = launch_config(accelerate_options)
    wants_deepspeed = config.get("distributed_type") == "DEEPSPEED" or "--use_deepspeed" in accelerate_options
    if wants_deepspeed and not installed("deepspeed"):
        raise HftuneError(f"this launch config uses DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}.")
    setting = {key: option_value(accelerate_options, f"--{key}") or config.get(key)
               for key in ("num_machines", "machine_rank", "main_process_ip", "main_process_port")}
    if int(setting["num_machines"] or 1) > 1:
        check_main_process(setting["main_process_ip"], int(setting["main_process_port"] or 29500),
                           int(setting["machine_rank"] or 0), float(os.environ.get("HFTUNE_PREFLIGHT_TIMEOUT", 120)))


def main(argv):
    accelerate_options, hftune_options = split_options(argv)
    try:
        check_launch(accelerate_options)
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)
    command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_options, RUN_PY, *hftune_options]
    os.execv(sys.executable, command)
