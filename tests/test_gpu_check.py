"""benchmarks/gpu_check.py: which checks a machine runs for its GPU count, that every GPU check's command is
a launch hftune accepts (resolved by `hftune plan` here, without a GPU), and that the script's CPU part runs
its checks, lists every GPU check as skipped, and compares each loss with its reference run."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check import CHECKS, Machine, skip_reason  # noqa: E402

CPU_CHECKS = {"cpu-full", "cpu-lora", "cpu-ddp"}
ONE_GPU = {"smollm2-bf16", "minilm-bf16", "smollm2-lora", "smollm2-qlora", "smollm2-zero2-offload",
           "smollm2-zero3-offload", "smollm2-bf16-compile"}
TWO_GPUS = {"smollm2-ddp", "smollm2-zero3", "smollm2-fsdp", "minilm-fsdp", "smollm2-pipeline"}


def runnable(machine):
    return {c.name for c in CHECKS if skip_reason(c, machine) is None}


def reasons(machine):
    return {c.name: skip_reason(c, machine) for c in CHECKS}


def test_checks_are_selected_by_gpu_count():
    full = dict(bitsandbytes=True, deepspeed=True)
    assert runnable(Machine(0, **full)) == CPU_CHECKS
    assert runnable(Machine(1, "H100", **full)) == ONE_GPU
    assert runnable(Machine(2, "H100", **full)) == ONE_GPU | TWO_GPUS
    assert runnable(Machine(4, "H100", **full)) == ONE_GPU | TWO_GPUS | {"smollm2-hybrid"}
    assert runnable(Machine(8, "H100", **full)) == runnable(Machine(4, "H100", **full))
    on_cpu = reasons(Machine(0, **full))
    assert {name for name, why in on_cpu.items() if why == "no CUDA device"} == {c.name for c in CHECKS} - CPU_CHECKS
    one = reasons(Machine(1, "H100", **full))
    assert one["smollm2-ddp"] == "needs 2 GPUs, 1 visible" and one["smollm2-hybrid"] == "needs 4 GPUs, 1 visible"
    assert one["cpu-ddp"].startswith("CPU-only check")


def test_missing_packages_skip_only_the_checks_that_need_them():
    bare = reasons(Machine(2, "H100"))
    assert bare["smollm2-qlora"].startswith("bitsandbytes not installed")
    deepspeed = {"smollm2-zero3", "smollm2-pipeline", "smollm2-zero2-offload", "smollm2-zero3-offload"}
    assert all(bare[name].startswith("deepspeed not installed") for name in deepspeed)
    assert runnable(Machine(2, "H100")) == (ONE_GPU | TWO_GPUS) - deepspeed - {"smollm2-qlora"}


def test_every_run_splits_the_reference_global_batch():
    """Losses compare only at the reference's global batch: per-device batch x micro-batches x replicas."""
    by_name = {c.name: c for c in CHECKS}
    cases = {("smollm2-ddp", 2): 8, ("smollm2-ddp", 8): 2, ("smollm2-pipeline", 2): 4, ("smollm2-hybrid", 4): 2,
             ("minilm-fsdp", 2): 32, ("cpu-ddp", 2): 4, ("smollm2-bf16", 1): 16, ("smollm2-ddp", 3): None}
    for (name, processes), batch in cases.items():
        assert gpu_check.per_device_batch(by_name[name], processes) == batch, name
    out = gpu_check.run_check(by_name["smollm2-ddp"], Machine(3, "H100", deepspeed=True), Path("/nonexistent"), 1)
    assert out["status"] == "skipped: global batch 16 does not split over 3 processes"


def test_commands_launch_as_a_user_would():
    by_name = {c.name: c for c in CHECKS}
    single = gpu_check.command(by_name["smollm2-bf16"], 1, "/out")
    assert single[1:5] == ["-m", "hftune", "--config", "causal_lm"] and "--per_device_train_batch_size=16" in single
    ddp = gpu_check.command(by_name["smollm2-ddp"], 2, "/out")
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--config_file") + 1] == str(REPO / "accelerate_configs" / "ddp.yaml")
    assert ddp[ddp.index("--num_processes") + 1] == "2"
    assert ddp.index(str(REPO / "hftune" / "run.py")) < ddp.index("--config")
    offload = gpu_check.command(by_name["smollm2-zero2-offload"], 1, "/out")
    assert offload[offload.index("--deepspeed_config_file") + 1] == "deepspeed_configs/zero2_offload.json"


# what `hftune plan` must resolve each check's launch to: (distributed type, world size, engine, ZeRO stage,
# optimizer offload, parameter offload, pipeline stages)
EXPECTED_LAUNCH = {
    "smollm2-bf16": ("NO", 1, "trainer", None, "none", "none", None),
    "smollm2-bf16-compile": ("NO", 1, "trainer", None, "none", "none", None),
    "minilm-bf16": ("NO", 1, "trainer", None, "none", "none", None),
    "smollm2-lora": ("NO", 1, "trainer", None, "none", "none", None),
    "smollm2-qlora": ("NO", 1, "trainer", None, "none", "none", None),
    "smollm2-ddp": ("MULTI_GPU", 4, "trainer", None, "none", "none", None),
    "smollm2-zero3": ("DEEPSPEED", 4, "trainer", 3, "none", "none", None),
    "smollm2-fsdp": ("FSDP", 4, None, None, "none", "none", None),  # the engine depends on GPUs being there
    "minilm-fsdp": ("FSDP", 4, None, None, "none", "none", None),
    "smollm2-pipeline": ("DEEPSPEED", 2, "pipeline", 1, "none", "none", 2),
    "smollm2-hybrid": ("DEEPSPEED", 4, "pipeline", 1, "none", "none", 2),
    "smollm2-zero2-offload": ("DEEPSPEED", 1, "trainer", 2, "cpu", "none", None),
    "smollm2-zero3-offload": ("DEEPSPEED", 1, "trainer", 3, "cpu", "cpu", None),
    "cpu-full": ("NO", 1, "trainer", None, "none", "none", None),
    "cpu-lora": ("NO", 1, "trainer", None, "none", "none", None),
    "cpu-ddp": ("MULTI_GPU", 2, "trainer", None, "none", "none", None),
}


def plan_argv(check, processes, model):
    """`hftune plan` arguments for the check's launch, its model swapped for a tiny local one (SmolLM2's asset
    is built on first use). accelerate's --deepspeed_config_file becomes hftune's --deepspeed: the same JSON."""
    extra = {} if check.workload == "minilm" else {"model_name_or_path": model}
    argv = ["--config_file", str(REPO / "accelerate_configs" / check.config), "--num_processes", str(processes),
            *gpu_check.hftune_args(check, processes, "/nonexistent/out", extra)]
    flags = dict(zip(check.launch_flags[::2], check.launch_flags[1::2]))
    return argv + (["--deepspeed", flags["--deepspeed_config_file"]] if "--deepspeed_config_file" in flags else [])


@pytest.mark.skipif(gpu_check.importlib.util.find_spec("deepspeed") is None, reason="the DeepSpeed checks need it")
def test_every_check_is_a_launch_hftune_accepts(tiny_llama, monkeypatch):
    """Typos or refused combinations in a GPU check's flags would otherwise show only on a lent GPU machine."""
    import hftune.compression.adapters as adapters
    from hftune.launch.plan import build_plan

    monkeypatch.setattr(adapters, "check_qlora", lambda *args: None)  # it refuses load_in_4bit without CUDA
    machine = Machine(4, "H100", bitsandbytes=True, deepspeed=True)
    assert set(EXPECTED_LAUNCH) == {c.name for c in CHECKS}
    for check in CHECKS:
        processes = gpu_check.process_count(check, machine)
        plan = build_plan(plan_argv(check, processes, tiny_llama))
        launch = plan.launch
        kind, world, engine, stage, offload, offload_param, stages = EXPECTED_LAUNCH[check.name]
        assert (launch.distributed_type, launch.world_size, launch.zero_stage, launch.offload_optimizer,
                launch.offload_param, launch.pipeline_stages) == (kind, world, stage, offload, offload_param, stages)
        assert engine is None or launch.engine == engine, check.name
        assert launch.global_batch == gpu_check.WORKLOADS[check.workload].global_batch, check.name
        assert launch.mixed_precision == ("bf16" if check.cuda else "no"), check.name


def test_loss_is_compared_with_the_reference_that_ran():
    by_name = {c.name: c for c in CHECKS}
    outcomes = {"smollm2-bf16": dict(status="yes", results=dict(train_loss=2.5)),
                "smollm2-ddp": dict(status="yes", results=dict(train_loss=2.51, train_real_tokens_per_second=1e5)),
                "smollm2-qlora": dict(status="yes", results=dict(train_loss=2.7)),
                "smollm2-lora": dict(status="failed: exit 1", failed=True)}
    assert gpu_check.loss_delta(by_name["smollm2-ddp"], outcomes) == "+1.00e-02 (vs smollm2-bf16)"
    assert gpu_check.loss_delta(by_name["smollm2-bf16"], outcomes) == "reference"
    assert gpu_check.loss_delta(by_name["smollm2-qlora"], outcomes) == "- (vs smollm2-lora: not run)"
    rows = gpu_check.table([by_name[n] for n in outcomes], outcomes, Machine(2, "H100")).splitlines()
    assert rows[3].startswith("| smollm2-ddp | ddp.yaml x2 | yes | 100,000 |")


def test_list_and_unknown_names(capsys):
    assert gpu_check.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{c.name} " in listed for c in CHECKS)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "smollm2-dpp"])
    assert "unknown check(s) ['smollm2-dpp']" in capsys.readouterr().err


def table_rows(text):
    """{check: {column: cell}} from the report's Markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def number(cell):
    return float(cell.replace(",", "").rstrip("%"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU part; on a GPU machine the CPU checks are skipped")
def test_cpu_part_runs_the_cpu_checks_and_lists_the_gpu_checks_as_skipped(tmp_path):
    """The whole script as on a machine without GPUs (~45 s on 2 cores): three tiny runs, one of them DDP."""
    output = tmp_path / "gpu_check.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--output", str(output)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CPU only (no CUDA device)" in result.stdout
    assert output.read_text().strip() == result.stdout.strip()  # the same report in the file
    rows = table_rows(result.stdout)
    assert list(rows) == [c.name for c in CHECKS]
    for check in CHECKS:
        row = rows[check.name]
        if check.cuda:
            assert row["ran"] == "skipped: no CUDA device", row
            continue
        assert row["ran"] == "yes", row
        assert math.isfinite(number(row["train loss"])) and number(row["tokens/s"]) > 0, row
        assert number(row["MFU"]) > 0 and number(row["peak memory MiB"]) > 100, row
    assert rows["cpu-full"]["loss - reference"] == "reference"
    # 2 processes with the reference's global batch: the same losses (an unsynchronised pair would differ)
    ddp_delta, reference = rows["cpu-ddp"]["loss - reference"].split(" (vs ")
    assert abs(float(ddp_delta)) < 1e-4 and reference == "cpu-full)"
    assert rows["cpu-ddp"]["launch"] == "ddp.yaml x2"
    assert rows["cpu-lora"]["loss - reference"].endswith("(vs cpu-full)")
