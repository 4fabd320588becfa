"""Every shipped data-parallel strategy, launched for real with 2 processes on this GPU-less machine.

Each run goes through tests/rank_probe.py, which records what every process saw. A strategy passes
when both processes report world size 2, they collate disjoint rows that together are the rows a
single process reads for the same global batch, and the per-step training loss and final weights
equal that single-process run. ZeRO-3 must also hold only half of every parameter per process.
"""

import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import launch, probed, read_json

# These runs exercise the CPU path (gloo); on a GPU machine ddp.yaml would put 2 processes on NCCL.
# Every test here launches processes: all of them stay out of the fast tier (-m "not slow").
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches; GPU runs are separate"),
              pytest.mark.slow]
STEPS, GLOBAL_BATCH = 4, 16


def step_logs(output_dir, key):
    history = read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
    return [entry[key] for entry in history if key in entry and "train_runtime" not in entry]


def weights(output_dir):
    """The saved model's weights as from_pretrained loads them (key names differ between savers)."""
    return AutoModelForSequenceClassification.from_pretrained(output_dir).state_dict()


def max_weight_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def run_args(tiny_bert, tmp_path_factory, tweets):
    folder = tmp_path_factory.mktemp("tweets")
    sample = tweets.sample(n=400, random_state=0)[["text", "sentiment"]]
    sample.iloc[:320].to_csv(folder / "train.csv", index=False)
    sample.iloc[320:].to_csv(folder / "validation.csv", index=False)
    return ["--model_name_or_path", tiny_bert, "--train_file", str(folder / "train.csv"),
            "--validation_file", str(folder / "validation.csv"), "--label_column", "sentiment",
            "--report_to", "none", "--max_seq_length", "32", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--disable_tqdm", "true", "--seed", "7",
            "--train_sampling_strategy", "sequential", "--do_eval", "false", "--eval_strategy", "no",
            "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def single_process(run_args, tmp_path_factory):
    """The reference: one process, the same global batch."""
    tmp_path = tmp_path_factory.mktemp("single")
    probes = launch("single_device.yaml", 1, run_args + ["--per_device_train_batch_size", str(GLOBAL_BATCH)],
                    **probed(tmp_path, "one")).probes
    return tmp_path / "one", probes[0]


# name: (accelerate config, extra args, tolerance on losses, why it is looser than 1e-4)
STRATEGIES = {
    "ddp": ("ddp.yaml", [], 1e-4, None),
    "zero1": ("deepspeed_zero1.yaml", [], 1e-4, None),
    "zero2": ("deepspeed_zero2.yaml", [], 1e-4, None),
    "zero3": ("deepspeed_zero3.yaml", [], 1e-4, None),
    "zero3_offload": ("deepspeed_zero3_offload.yaml", [], 1e-4, None),
    "zero2_offload": ("ddp.yaml", ["--deepspeed", "deepspeed_configs/zero2_offload.json"], 1e-4, None),
    "ddp_fp16_hook": ("ddp.yaml", ["--ddp_comm_hook", "fp16"], 1e-3, "gradients travel rounded to fp16"),
    "ddp_powersgd_hook": ("ddp.yaml", ["--ddp_comm_hook", "powersgd", "--powersgd_start_iter", "2"], 1e-2,
                          "gradients travel as a rank-1 approximation from step 2"),
    "deepspeed_fp16_comm": ("ddp.yaml", ["--deepspeed", "deepspeed_configs/zero2_comm_fp16.json"], 1e-3,
                            "ZeRO-2 reduces gradients in fp16"),
}
RESUMED = ("ddp", "zero2", "zero3")  # also resumed from checkpoint-2 (ddp: after a kill -9) to the same model
# (ZeRO-1 writes the checkpoint ZeRO-2 does: its resume is ZeRO-2's)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_shards_data_and_matches_one_process(name, run_args, single_process, tmp_path):
    config, extra, tolerance, lossy = STRATEGIES[name]
    reference, reference_probe = single_process
    args = run_args + ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2), *extra]
    probes = launch(config, 2, args, **probed(tmp_path, name)).probes
    assert [probes[r]["world_size"] for r in (0, 1)] == [2, 2]
    rows = [set(probes[r]["rows"]) for r in (0, 1)]
    assert not rows[0] & rows[1], "both processes read the same rows"
    assert rows[0] | rows[1] == set(reference_probe["rows"])
    if name.startswith("zero3"):  # each process holds half of the parameters (plus padding)
        for rank in (0, 1):
            assert probes[rank]["ds_tensor"] == pytest.approx(probes[rank]["ds_numel"] / 2, rel=1e-3)
        # ... and the saved model is consolidated: a plain checkpoint from_pretrained loads whole.
        assert AutoModelForSequenceClassification.from_pretrained(tmp_path / name).num_parameters() == \
            probes[0]["ds_numel"]
    losses, expected = step_logs(tmp_path / name, "loss"), step_logs(reference, "loss")
    assert len(losses) == len(expected) == STEPS
    assert losses == pytest.approx(expected, abs=tolerance)
    # The saved model is the single-process model. Adam moves a weight whose gradient is near zero by up to
    # the learning rate per step whichever way rounding tips it, so lossy compression gets STEPS x lr.
    weight_tolerance = STEPS * 1e-3 if lossy else tolerance
    assert max_weight_difference(weights(tmp_path / name), weights(reference)) < weight_tolerance
    if lossy:  # the compression is really on: gradient norms are not the exact ones
        norms, exact = step_logs(tmp_path / name, "grad_norm"), step_logs(reference, "grad_norm")
        assert max(abs(a - b) for a, b in zip(norms, exact)) > 1e-6
    # the checkpoint records the launch that wrote it, which a resume with another layout is checked against
    record = read_json(tmp_path / name / "checkpoint-4" / "hftune_checkpoint.json")["run"]
    deepspeed = config != "ddp.yaml" or "--deepspeed" in extra
    assert record["world_size"] == 2 and (record["zero_stage"] is not None) == deepspeed
    if name == "ddp":  # kill -9 both processes mid-step 3, then rerun the same command: it resumes from checkpoint-2
        command = args + ["--resume_from_checkpoint", "auto"]
        killed = launch(config, 2, command, **probed(tmp_path, "resumed"), check=False,
                        env={"HFTUNE_KILL_AT": "step:3"})
        assert killed.returncode != 0 and not (tmp_path / "resumed" / "checkpoint-4").exists()
        resumed = launch(config, 2, command, **probed(tmp_path, "resumed"))
        assert f"resuming from {tmp_path / 'resumed' / 'checkpoint-2'}" in resumed.stdout + resumed.stderr
    elif name in RESUMED:
        launch(config, 2, args + ["--resume_from_checkpoint", str(tmp_path / name / "checkpoint-2")],
               **probed(tmp_path, "resumed"))
    if name in RESUMED:
        # trainer_state.json carries the checkpoint's history on: steps 3-4 are the resumed run's own.
        assert step_logs(tmp_path / "resumed", "loss") == pytest.approx(losses, abs=1e-6)
        assert max_weight_difference(weights(tmp_path / "resumed"), weights(tmp_path / name)) < 1e-6


def test_processes_that_do_not_form_one_job_are_refused(run_args, tmp_path):
    """Negative control: without gloo (use_cpu false here) each process would train alone; hftune stops it."""
    result = launch("ddp.yaml", 2, run_args + ["--per_device_train_batch_size", "8", "--use_cpu", "false"],
                    **probed(tmp_path, "alone"), check=False)
    probes = result.probes
    assert result.returncode != 0
    assert "2 processes were launched but this run sees world size 1" in result.stderr + result.stdout
    assert len(probes) == 2 and all(not probe["rows"] for probe in probes.values())  # refused before any data
    assert not (tmp_path / "alone" / "model.safetensors").exists()


def test_the_sharding_assertions_catch_independent_jobs(run_args, tmp_path):
    """Negative control for the assertions above: with hftune's check skipped, the same broken launch
    trains two independent jobs. torch.distributed still reports 2 processes (so hftune checks the
    world size TrainingArguments trains with), but each reads every row: the distinct-rows check fails."""
    probes = launch("ddp.yaml", 2, run_args + ["--per_device_train_batch_size", "8", "--use_cpu", "false"],
                    **probed(tmp_path, "alone"), env={"HFTUNE_PROBE_UNCHECKED": "1"}).probes
    assert set(probes[0]["rows"]) == set(probes[1]["rows"])
    assert len(probes[0]["rows"]) > GLOBAL_BATCH * STEPS // 2
