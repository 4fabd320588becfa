"""Launch checks: a DeepSpeed JSON or a compression setting that the run could not honour is refused
with one line, before any data or model is loaded."""

import json
import os

import pytest
import torch

from conftest import fail
from hftune.errors import HftuneError
from test_bad_input import base  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto"}
PIPELINE = {"zero_optimization": {"stage": 1}, "pipeline": {"stages": "auto"}}

# case: (DeepSpeed JSON or None, extra flags, environment, expected fragment of the error line)
LAUNCH_ERRORS = {
    "pipeline block under Trainer": (PIPELINE, [], {}, "'pipeline' block, which engine: trainer would ignore"),
    "ZeRO-2 with pipeline": ({**ZERO2, "pipeline": {}}, ["--engine", "pipeline"], {}, "needs ZeRO-1, the config asks for ZeRO-2"),
    "pipeline without ZeRO": ({"zero_optimization": {"stage": 0}, "pipeline": {}}, ["--engine", "pipeline"], {},
                              "needs ZeRO-1, the config asks for ZeRO-0"),
    "removed DeepSpeed block": ({**ZERO2, "compression_training": {}}, [], {}, "removed option"),
    "null blocks are valid JSON": ({**ZERO2, "optimizer": None, "zero_optimization": {"stage": 3, "offload_param": None},
                                    "train_batch_size": 3}, [], {}, "train_batch_size is 3"),
    "pipeline without DeepSpeed": (None, ["--engine", "pipeline"], {}, "engine: pipeline runs on DeepSpeed"),
    "1-bit Adam": ({**ZERO2, "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, [], {},
                   "OneBitAdam was removed in DeepSpeed 0.19"),
    "second optimizer owner": ({**ZERO2, "optimizer": {"type": "AdamW"}}, [], {}, "from the recipe's optim"),
    "second scheduler owner": ({**ZERO2, "scheduler": {"type": "WarmupLR"}}, [], {},
                               "from the recipe's lr_scheduler_type"),
    "global batch": ({**ZERO2, "train_batch_size": 64}, ["--per_device_train_batch_size", "8"], {"WORLD_SIZE": "2"},
                     "train_batch_size is 64 but the recipe gives 16"),
    "micro batch": ({**ZERO2, "train_micro_batch_size_per_gpu": 4}, ["--per_device_train_batch_size", "8"], {},
                    "train_micro_batch_size_per_gpu is 4 but the recipe gives 8"),
    "accumulation": ({**ZERO2, "gradient_accumulation_steps": 4}, [], {}, "gradient_accumulation_steps is 4"),
    "NVMe offload without GPU": ("deepspeed_configs/zero3_nvme_offload.json", [], {}, "NVMe offload (ZeRO-Infinity)"),
    "missing DeepSpeed file": ("no/such.json", [], {}, "DeepSpeed config 'no/such.json' does not exist"),
    "unknown hook": (None, ["--ddp_comm_hook", "int8"], {}, "unknown ddp_comm_hook 'int8'"),
    "bf16 hook on gloo": (None, ["--ddp_comm_hook", "bf16"], {}, "bf16 needs NCCL"),  # (on a machine without GPU)
    "powersgd too early": (None, ["--ddp_comm_hook", "powersgd", "--powersgd_start_iter", "1"], {},
                           "powersgd_start_iter >= 2"),
    "powersgd with unused-parameter search": (None, ["--ddp_comm_hook", "powersgd", "--ddp_find_unused_parameters",
                                                     "true"], {}, "deadlocks with ddp_find_unused_parameters"),
    "hook under DeepSpeed": (ZERO2, ["--ddp_comm_hook", "fp16"], {}, "ddp_comm_hook applies to DDP only"),
    "hook without DDP": (None, ["--ddp_comm_hook", "fp16"], {}, "a 1-process run does not have"),
}


@pytest.mark.parametrize("case", LAUNCH_ERRORS)
def test_launch_that_cannot_be_honoured_is_refused(case, capsys, base, tmp_path, monkeypatch):  # noqa: F811
    config, flags, env, fragment = LAUNCH_ERRORS[case]
    if case in ("bf16 hook on gloo", "NVMe offload without GPU") and torch.cuda.is_available():
        pytest.skip("refused only on machines without GPUs")
    monkeypatch.chdir(REPO)  # shipped JSONs are named relative to the repository root, as in the README
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if isinstance(config, dict):
        (tmp_path / "ds.json").write_text(json.dumps(config))
        config = str(tmp_path / "ds.json")
    deepspeed = ["--deepspeed", config] if config else []
    assert fragment in fail(capsys, base + deepspeed + flags)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "deepspeed_configs"))))
def test_shipped_deepspeed_configs_leave_training_arguments_values_to_the_recipe(name):
    """One owner per value: batch sizes, accumulation, clipping and precision are "auto"; no optimizer/scheduler."""
    config = json.loads(open(os.path.join(REPO, "deepspeed_configs", name)).read())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["fp16"]["enabled"] == config["bf16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config
    assert "stage" in config["zero_optimization"]


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "deepspeed_configs"))))
def test_shipped_deepspeed_configs_are_valid_for_the_installed_deepspeed(name):
    """DeepSpeed's own config model parses each file, once TrainingArguments has filled its "auto" values."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads(open(os.path.join(REPO, "deepspeed_configs", name)).read())
    filled = {**config, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "fp16": {**config["fp16"], "enabled": False}, "bf16": {"enabled": False}}
    zero = filled["zero_optimization"]
    filled["zero_optimization"] = {k: (1000 if v == "auto" else v) for k, v in zero.items()}
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_optimization_stage == zero["stage"]


# ---- several machines: the socket interface (hftune.launch.network) ----

def test_runs_across_machines_pin_the_interface_that_reaches_node_0():
    import socket

    import psutil

    from hftune.launch.network import pin_socket_interface

    interfaces = {name: a.address for name, addresses in psutil.net_if_addrs().items() for a in addresses
                  if a.family == socket.AF_INET and not a.address.startswith("127.")}
    if not interfaces:
        pytest.skip("no non-loopback IPv4 interface")
    name, address = next(iter(interfaces.items()))
    across = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": address}
    environ = dict(across)
    assert pin_socket_interface(environ) == name
    assert environ["GLOO_SOCKET_IFNAME"] == environ["NCCL_SOCKET_IFNAME"] == name
    chosen = {**across, "GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}
    assert pin_socket_interface(chosen) is None and chosen["GLOO_SOCKET_IFNAME"] == "ib0"  # the user's choice
    one_machine = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert pin_socket_interface(one_machine) is None and "GLOO_SOCKET_IFNAME" not in one_machine


def test_a_main_process_ip_other_machines_cannot_reach_is_refused():
    from hftune.launch.network import pin_socket_interface

    with pytest.raises(HftuneError, match="main_process_ip '127.0.0.1' is this machine's loopback"):
        pin_socket_interface({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    with pytest.raises(HftuneError, match="main_process_ip 'no-such-host.invalid' does not resolve"):
        pin_socket_interface({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "no-such-host.invalid"})


def test_processes_started_with_different_configs_are_refused(monkeypatch):
    """Every process's resolved config is gathered once the group is up: one that differs (a node whose
    command set another learning rate) stops the run on every process, naming the setting; the output_dir
    may differ (one per node)."""
    import torch.distributed as dist

    from hftune.launch.checks import check_same_config

    configs = [{"learning_rate": 5e-3, "output_dir": "/a"}, {"learning_rate": 1e-3, "output_dir": "/b"}]
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), configs))
    with pytest.raises(HftuneError, match=r"^process 1 runs with learning_rate=0.001, process 0 with 0.005: every "
                                          r"node's command must give the same config"):
        check_same_config(configs[0], 2)
    configs[1]["learning_rate"] = 5e-3
    check_same_config(configs[0], 2)  # only output_dir differs: allowed
