"""`hftune plan`: the resolved launch for each shipped accelerate config, the memory estimate checked
against memory measured on CPU (and against DeepSpeed's own estimators), the ZeRO ordering, the
recommendation, and one-line errors. Nothing here trains or launches processes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hftune.launch.memory import HEADROOM
from hftune.launch.plan import build_plan, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Accelerate configs name their DeepSpeed JSON relative to the launch directory: the repo root."""
    monkeypatch.chdir(REPO)


# the default recipe samples by length, which the pipeline engine cannot do
PIPELINE = ["--engine", "pipeline", "--train_sampling_strategy", "random"]


def config_file(name):
    return f"accelerate_configs/{name}.yaml"


def printed_plan(capsys, argv):
    main(argv)
    return capsys.readouterr().out


def value(text, name):
    """The value printed after `name` in the Launch section."""
    match = re.search(rf"^  {re.escape(name)}\s+(.+)$", text, re.MULTILINE)
    assert match, f"no '{name}' line in:\n{text}"
    return match.group(1)


@pytest.fixture(scope="session")
def bert_38m(tmp_path_factory):
    """Config of a 12-layer BERT (~38M parameters) with a small vocabulary, so that no single layer
    dominates (in MiniLM the word embedding is half the model, which ZeRO-3 must gather whole)."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-38m")
    BertConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
               intermediate_size=2048).save_pretrained(path)
    return str(path)


# ---- the resolved launch ----


def test_zero3_launch_shows_world_size_stage_and_global_batch(capsys):
    text = printed_plan(capsys, ["--config_file", config_file("deepspeed_zero3"), "--num_processes", "2",
                                 "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "3"])
    assert value(text, "distributed type") == "DEEPSPEED"
    assert value(text, "world size").startswith("2 ")
    assert value(text, "ZeRO stage").startswith("3 (DeepSpeed config: deepspeed_configs/zero3.json)")
    assert value(text, "offload") == "optimizer: none, parameters: none"
    assert value(text, "per-device batch") == "8" and value(text, "gradient accumulation") == "3"
    assert value(text, "global batch").startswith(f"{8 * 3 * 2} ")
    assert "this launch: ZeRO-3:" in text


def test_batch_numbers_in_the_json_are_checked_against_the_planned_world_size(capsys, tmp_path):
    """train_batch_size 16 = 8 per device x 2 processes: right for the 2-process launch, wrong for 4."""
    config = json.loads(open(os.path.join(REPO, "deepspeed_configs", "zero2.json")).read())
    (tmp_path / "ds.json").write_text(json.dumps({**config, "train_batch_size": 16}))
    accelerate = open(os.path.join(REPO, config_file("deepspeed_zero2"))).read()
    (tmp_path / "launch.yaml").write_text(accelerate.replace("deepspeed_configs/zero2.json", str(tmp_path / "ds.json")))
    argv = ["--config_file", str(tmp_path / "launch.yaml"), "--per_device_train_batch_size", "8"]
    assert value(printed_plan(capsys, argv + ["--num_processes", "2"]), "global batch").startswith("16 ")
    with pytest.raises(SystemExit):
        main(argv + ["--num_processes", "4"])
    assert "train_batch_size is 16 but the recipe gives 32" in capsys.readouterr().err


def test_num_processes_overrides_the_config_like_accelerate_launch(capsys):
    text = printed_plan(capsys, ["--config_file", config_file("deepspeed_zero3"), "--num_processes", "8"])
    assert value(text, "world size").startswith("8 ") and value(text, "data-parallel size") == "8"
    recipe_batch = int(value(text, "per-device batch"))  # the default recipe's
    assert value(text, "global batch").startswith(f"{recipe_batch * 8} ")


def test_zero3_offload_launch_shows_offload(capsys):
    text = printed_plan(capsys, ["--config_file", config_file("deepspeed_zero3_offload")])
    assert value(text, "ZeRO stage").startswith("3 ")
    assert value(text, "offload") == "optimizer: cpu, parameters: cpu"
    launch_line = next(line for line in text.splitlines() if "this launch:" in line)
    assert "offload optimizer -> cpu, parameters -> cpu" in launch_line and "GiB host per process" in launch_line


def test_ddp_launch_has_no_zero(capsys):
    text = printed_plan(capsys, ["--config_file", config_file("ddp"), "--num_processes", "4"])
    assert value(text, "distributed type") == "MULTI_GPU"
    assert value(text, "ZeRO stage").startswith("none")
    assert value(text, "world size").startswith("4 ")
    assert "this launch: DDP:" in text


def test_pipeline_launch_shows_stages_and_data_parallel_size(capsys):
    text = printed_plan(capsys, ["--config_file", config_file("deepspeed_pipeline"), *PIPELINE,
                                 "--num_processes", "4", "--pipeline_stages", "2",
                                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"])
    assert value(text, "pipeline stages").startswith("2 (engine: pipeline)")
    assert value(text, "data-parallel size") == "2"
    assert value(text, "ZeRO stage").startswith("1 ")  # the shipped pipeline JSON's
    assert value(text, "global batch").startswith(f"{4 * 2 * 2} ")


def test_pipeline_stages_default_to_every_process(capsys):
    """pipeline.json says stages: auto, so every process is a stage and nothing is left for data parallelism."""
    text = printed_plan(capsys, ["--config_file", config_file("deepspeed_pipeline"), *PIPELINE])
    world = int(value(text, "world size").split()[0])
    assert value(text, "pipeline stages").startswith(f"{world} ") and value(text, "data-parallel size") == "1"


def test_plan_refuses_what_the_launch_would_refuse(capsys):
    """parse_config sees the launch's environment (here FSDP), so hftune's launch checks apply; the
    variables are gone afterwards."""
    line = fail(capsys, ["--config_file", config_file("fsdp"), "--optim", "lbfgs", "--weight_decay", "0"])
    assert "lbfgs" in line and "FSDP" in line
    line = fail(capsys, ["--config_file", config_file("deepspeed_zero2"), *PIPELINE])
    assert "pipeline" in line and "ZeRO-2" in line
    assert "ACCELERATE_USE_FSDP" not in os.environ and "ACCELERATE_DEEPSPEED_CONFIG_FILE" not in os.environ


def test_python_m_hftune_plan_runs_without_launching():
    result = subprocess.run([sys.executable, "-m", "hftune", "plan", "--config_file", config_file("fsdp")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert value(result.stdout, "FSDP") == "FSDP2, full shard"
    assert value(result.stdout, "world size").startswith("2 ")


# ---- the estimate against memory measured on this CPU ----

MEASURE = r"""
import json, os, sys
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification


def rss():  # resident set size, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill_grads(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


# Warm-up on a tiny model: lazy imports, thread pools and allocator set-up are paid before the baseline.
small = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64))
fill_grads(small)
torch.optim.AdamW(small.parameters(), lr=1e-3).step()
del small
config = AutoConfig.from_pretrained(sys.argv[1])
base = rss()
model = AutoModelForSequenceClassification.from_config(config)  # fp32 weights, written by the init
built = rss()
fill_grads(model)
with_grads = rss()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
optimizer.step()  # allocates exp_avg and exp_avg_sq
stepped = rss()
print(json.dumps({"parameters": built - base, "gradients": with_grads - built, "optimizer": stepped - with_grads}))
"""


@pytest.mark.slow
def test_parameters_and_adamw_states_match_memory_measured_on_cpu():
    """Measured: in a fresh process (one thread), the growth of the resident set size while the
    all-MiniLM-L6-v2 classifier (22.7M parameters, fp32) is built, while a zero gradient is given to
    every parameter, and while one AdamW step allocates its two states. The plan (single process,
    fp32, optim adamw) must predict each within 25%."""
    from hftune.assets import resolve_model

    path = resolve_model("asset:all-MiniLM-L6-v2")
    result = subprocess.run([sys.executable, "-c", MEASURE, path], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    plan = build_plan(["--config_file", config_file("single_device"), "--optim", "adamw"])
    assert plan.launch.world_size == 1 and plan.launch.mixed_precision == "no"
    ddp = plan.table["DDP"]
    predicted = ddp.parameters + ddp.optimizer
    actual = measured["parameters"] + measured["optimizer"]
    assert actual > 200 * MiB  # far above allocator noise
    assert abs(predicted - actual) / actual < 0.25, (predicted / MiB, actual / MiB)
    for row in ("parameters", "gradients", "optimizer"):
        assert abs(getattr(ddp, row) - measured[row]) / measured[row] < 0.25, (row, getattr(ddp, row), measured[row])


def saved_activation_bytes(model, **inputs):
    """Bytes autograd keeps for the backward pass (tensors saved by forward, parameters excluded)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def test_transformer_activation_formula_matches_saved_tensors(tmp_path):
    """Korthikanti's per-layer formula against what autograd really saves for a BERT in fp32, at a
    sequence short enough that attention scores (stored by CPU attention, not by fused GPU kernels)
    are a small part."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024)
    config.save_pretrained(tmp_path)
    batch, seq = 8, 32
    measured = saved_activation_bytes(BertForSequenceClassification(config).train(),
                                      input_ids=torch.randint(0, 1000, (batch, seq)))
    plan = build_plan(["--config_file", config_file("single_device"), "--model_name_or_path", str(tmp_path),
                       "--max_seq_length", str(seq), "--per_device_train_batch_size", str(batch)])
    assert abs(plan.table["DDP"].activations - measured) / measured < 0.3, (plan.table["DDP"].activations, measured)


def test_cnn_activations_follow_feature_maps(tiny_resnet):
    """The traced feature-map sum against what autograd saves: approximate (a BatchNorm output that only
    feeds a ReLU is counted though not kept; max-pool indices are kept though not counted), so within
    a factor 0.75-1.6, and linear in the batch."""
    from transformers import AutoModelForImageClassification

    def planned(batch):
        plan = build_plan(["--config", "image_classification", "--config_file", config_file("single_device"),
                           "--model_name_or_path", tiny_resnet, "--per_device_train_batch_size", str(batch)])
        return plan.table["DDP"].activations

    model = AutoModelForImageClassification.from_pretrained(tiny_resnet).train()
    measured = saved_activation_bytes(model, pixel_values=torch.randn(4, 3, 32, 32))  # the fixture's 32 px
    assert 0.75 * measured <= planned(4) <= 1.6 * measured, (planned(4), measured)
    assert planned(8) == pytest.approx(2 * planned(4))


# ---- the strategies against each other and against DeepSpeed's estimators ----


def model_states(estimate):
    return estimate.parameters + estimate.gradients + estimate.optimizer


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zero_stages_strictly_reduce_memory(bert_38m, world):
    plan = build_plan(["--model_name_or_path", bert_38m, "--config_file", config_file("ddp"),
                       "--num_processes", str(world)])
    totals = [plan.table[s].total for s in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
    # ZeRO-3 shards every model state: about DDP's share of one process (plus the gathered largest layer).
    ratio = model_states(plan.table["ZeRO-3"]) * world / model_states(plan.table["DDP"])
    assert 1 <= ratio < 1.15, ratio


@pytest.mark.parametrize("world", [2, 4])
def test_zero_figures_agree_with_deepspeed_estimators(bert_38m, world):
    """DeepSpeed's estimators assume 16-bit mixed precision and Adam: compare under bf16 + AdamW."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = build_plan(["--model_name_or_path", bert_38m, "--config_file", config_file("deepspeed_zero2"),
                       "--num_processes", str(world), "--bf16", "true", "--optim", "adamw"])
    params, largest = plan.facts.params, plan.facts.largest_layer
    expected = {
        "ZeRO-2": estimate_zero2_model_states_mem_needs(params, world, cpu_offload=False)[1],
        "ZeRO-2 off": estimate_zero2_model_states_mem_needs(params, world, cpu_offload=True)[1],
        "ZeRO-3": estimate_zero3_model_states_mem_needs(params, largest, world, cpu_offload=False)[1],
        "ZeRO-3 off": estimate_zero3_model_states_mem_needs(params, largest, world, cpu_offload=True)[1],
    }
    for strategy, deepspeed_bytes in expected.items():
        ours = model_states(plan.table[strategy])
        assert abs(ours - deepspeed_bytes) / deepspeed_bytes < 0.15, (strategy, ours, deepspeed_bytes)


# ---- the recommendation ----


def recommendation(capsys, model, device_memory):
    text = printed_plan(capsys, ["--model_name_or_path", model, "--config_file", config_file("ddp"),
                                 "--device_memory", device_memory])
    return text.split("Recommendation for", 1)[1]


def test_recommendation_from_none_fits_to_ddp(capsys, bert_38m):
    plan = build_plan(["--model_name_or_path", bert_38m, "--config_file", config_file("ddp")])
    zero2, zero3 = plan.table["ZeRO-2"].total, plan.table["ZeRO-3"].total
    assert zero3 < zero2

    tiny = recommendation(capsys, bert_38m, "1MiB")
    assert "none fits: the smallest need is" in tiny and "accelerate launch" not in tiny

    huge = recommendation(capsys, bert_38m, "1TB")
    assert "DDP (" in huge and "--config_file accelerate_configs/ddp.yaml --num_processes 2" in huge

    between = (zero2 + zero3) / 2 / HEADROOM  # ZeRO-3 fits with the margin, ZeRO-2 does not
    chosen = recommendation(capsys, bert_38m, f"{between / MiB:.0f}MiB")
    assert "ZeRO-3 (" in chosen and "accelerate_configs/deepspeed_zero3.yaml" in chosen


# ---- several machines: per-node memory and communication (hftune.launch.traffic) ----

# A 1-layer BERT small enough to count by hand: embeddings 100*8 words + 16*8 positions + 2*8 types + 2*8 norm = 960;
# the layer: q, k, v, out 4*(8*8 + 8) + norm 16 + intermediate 8*16 + 16 + output 16*8 + 8 + norm 16 = 600;
# pooler 8*8 + 8 = 72; classifier (2 labels) 8*2 + 2 = 18.
TINY_PARAMS = 960 + 600 + 72 + 18
# PowerSGD rank 1 keeps k*(n+m) of a matrix where 2*(n+m) < n*m, the rest whole: words 108, positions 24, q/k/v/out
# 4*16, intermediate 24, output 24, pooler 16; whole: types 16, classifier 16 and the 114 bias/norm elements.
TINY_POWERSGD = 108 + 24 + 4 * 16 + 24 + 24 + 16 + (16 + 16) + 114


@pytest.fixture(scope="session")
def tiny_bert_1650(tmp_path_factory):
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-1650")
    BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=16).save_pretrained(path)
    return str(path)


def tiny_plan(model, *argv, world=4, accelerate="ddp"):
    return build_plan(["--model_name_or_path", model, "--max_seq_length", "16", "--config_file",
                       config_file(accelerate), "--num_processes", str(world), *argv])


def test_traffic_follows_the_ring_formulas_counted_by_hand(tiny_bert_1650):
    """fp32, 4 processes, r = 3/4: DDP 2r*4P, ZeRO-1/2 r*4P + r*4P, ZeRO-3 3r*4P, the fp16 hook half of DDP,
    PowerSGD 2r*4 times the elements it keeps."""
    plan = tiny_plan(tiny_bert_1650)
    assert plan.facts.params == plan.facts.trainable == TINY_PARAMS
    sent = {label: traffic.total for label, traffic in plan.traffic.items()}
    assert sent == {"DDP": 2 * 0.75 * TINY_PARAMS * 4, "DDP, fp16/bf16 hook": 0.75 * TINY_PARAMS * 4,
                    "DDP, PowerSGD r=1": 2 * 0.75 * TINY_POWERSGD * 4, "ZeRO-1": 2 * 0.75 * TINY_PARAMS * 4,
                    "ZeRO-2": 2 * 0.75 * TINY_PARAMS * 4, "ZeRO-3 / FSDP": 3 * 0.75 * TINY_PARAMS * 4}
    assert sent["ZeRO-3 / FSDP"] / sent["DDP"] == 1.5  # 3:2
    assert sent["DDP, fp16/bf16 hook"] == sent["DDP"] / 2
    assert plan.this_traffic == ("DDP", plan.traffic["DDP"])


def test_zero2_and_zero3_communicate_at_every_micro_batch(tiny_bert_1650):
    """With 3 accumulation steps DDP (no_sync) and ZeRO-1 still send once per optimizer step; ZeRO-2
    reduce-scatters gradients, ZeRO-3 also gathers parameters, at each micro-batch."""
    sent = {k: t.total for k, t in tiny_plan(tiny_bert_1650, "--gradient_accumulation_steps", "3").traffic.items()}
    r4p = 0.75 * 4 * TINY_PARAMS
    assert (sent["DDP"], sent["ZeRO-1"], sent["ZeRO-2"], sent["ZeRO-3 / FSDP"]) == (2 * r4p, 2 * r4p, 4 * r4p, 9 * r4p)


def test_this_launch_uses_its_compression(tiny_bert_1650, tmp_path):
    hooked = tiny_plan(tiny_bert_1650, "--ddp_comm_hook", "fp16")
    assert hooked.this_traffic == ("DDP, fp16 comm hook", hooked.traffic["DDP, fp16/bf16 hook"])
    powersgd = tiny_plan(tiny_bert_1650, "--ddp_comm_hook", "powersgd", "--powersgd_rank", "2")
    assert powersgd.this_traffic[1].total == powersgd.traffic["DDP, PowerSGD r=2"].total < powersgd.traffic["DDP"].total
    # DeepSpeed's communication_data_type fp16 halves the gradients of an fp32 run, not the parameter all-gather.
    accelerate = open(os.path.join(REPO, config_file("deepspeed_zero2"))).read()
    (tmp_path / "launch.yaml").write_text(accelerate.replace("zero2.json", "zero2_comm_fp16.json"))
    plan = build_plan(["--model_name_or_path", tiny_bert_1650, "--config_file", str(tmp_path / "launch.yaml"),
                       "--num_processes", "4"])
    assert plan.this_traffic[1].total == plan.traffic["ZeRO-2"].total == 0.75 * TINY_PARAMS * (2 + 4)


def test_peft_sends_only_the_adapter_gradients(tiny_bert_1650):
    """LoRA r=2 on query/key/value: 3 x (2*8 + 8*2) = 96 trainable, plus the classifier's trained copy (18);
    ZeRO-3 still gathers every parameter, the frozen base included."""
    plan = tiny_plan(tiny_bert_1650, "--peft", "lora", "--lora_r", "2")
    trainable, params = 96 + 18, TINY_PARAMS + 96 + 18
    assert (plan.facts.trainable, plan.facts.params) == (trainable, params)
    assert plan.traffic["DDP"].total == 2 * 0.75 * trainable * 4
    assert plan.traffic["ZeRO-3 / FSDP"].total == 0.75 * 4 * (2 * params + trainable)


def test_several_machines_print_nodes_per_node_memory_and_seconds(capsys, tiny_bert_1650):
    # a micro-batch big enough that the memory totals print well above 0.001 GiB
    text = printed_plan(capsys, ["--model_name_or_path", tiny_bert_1650, "--max_seq_length", "16", "--config_file",
                                 config_file("multi_node"), "--num_machines", "2", "--num_processes", "4",
                                 "--network_bandwidth", "10Gbit", "--per_device_train_batch_size", "65536"])
    assert value(text, "num_machines") == "2" and value(text, "processes per node") == "2"
    totals = [float(v) for v in value(text, "total").split()]
    per_node = [float(v) for v in value(text, "per node (x2)").split()]
    assert min(totals) > 0.1 and per_node == pytest.approx([2 * t for t in totals], rel=0.01)
    ddp = value(text, "DDP").split()  # sent per process, over each node link, seconds at 10 Gbit/s
    sent = 2 * 0.75 * TINY_PARAMS * 4
    assert ddp == [f"{sent / 1024:.1f}", "KiB", f"{sent / 1024:.1f}", "KiB", f"{sent / 1.25e9:.3g}"]
    assert "this launch: DDP: " in text and "GiB per node" in text


def test_one_machine_sends_nothing_across_nodes_and_cpu_nodes_count_ram(capsys, tmp_path):
    """On CPUs (use_cpu) a node's 'devices' are its RAM: per node = processes x (device + offloaded)."""
    (tmp_path / "cpu.yaml").write_text("distributed_type: MULTI_GPU\nuse_cpu: true\nnum_processes: 2\n")
    argv = ["--config_file", str(tmp_path / "cpu.yaml")]  # the default recipe's MiniLM: figures of 0.1 GiB
    text = printed_plan(capsys, argv)
    assert value(text, "DDP").split()[2:4] == ["0", "B"] and "(one machine: nothing crosses)" in text
    off = build_plan(argv).table["ZeRO-3 off"]
    assert off.host > 0.1 * off.total
    assert float(value(text, "node RAM (x2)").split()[5]) == pytest.approx(2 * (off.total + off.host) / 2**30, rel=0.01)


@pytest.mark.parametrize("text, expected", [("10Gbit", 1.25e9), ("100Gbps", 12.5e9), ("25GB/s", 25e9),
                                            ("1GiB/s", 2**30), ("800 Mbit/s", 1e8)])
def test_network_bandwidth_units(text, expected):
    from hftune.launch.traffic import parse_bandwidth

    assert parse_bandwidth(text) == expected


# ---- multiple-choice: one sequence per ending ----


@pytest.mark.parametrize("extra, endings", [([], 4), (["--ending_columns", "a,b,c"], 3)])
def test_multiple_choice_activations_count_every_ending(extra, endings):
    """SciQ (the recipe's data) has 4 answers a row, read from its first row; named ending columns are counted
    without reading. Activations = endings x a text-classification row of the same model and length; by hand
    (Korthikanti, SDPA, fp32): 6 layers x s*b*h*34*4/2 bytes with s=128, h=384, b = 2 rows x endings."""
    def planned(recipe, *more):
        plan = build_plan(["--config", recipe, "--config_file", config_file("single_device"), "--max_seq_length", "128",
                           "--per_device_train_batch_size", "2", *more])
        return plan.table["DDP"].activations, plan.facts.activation_formula

    choices, formula = planned("multiple_choice", *extra)
    row, _ = planned("text_classification")
    assert "5*a*s/h" not in formula and f"b = 2 rows x {endings} endings" in formula
    assert choices == endings * row == 6 * 128 * (2 * endings) * 384 * 34 * 4 / 2


# ---- bad input ----


def fail(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("hftune: error: "), errors
    return errors[0]


def test_missing_accelerate_config(capsys):
    line = fail(capsys, ["--config_file", "accelerate_configs/nope.yaml"])
    assert "accelerate config 'accelerate_configs/nope.yaml' does not exist" in line


def test_invalid_accelerate_config(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_procesess: 2\n")
    line = fail(capsys, ["--config_file", str(bad)])
    assert "is invalid" in line and "num_procesess" in line
    bad.write_text("distributed_type: TELEPATHY\n")
    assert "'TELEPATHY' is not a valid DistributedType" in fail(capsys, ["--config_file", str(bad)])


def test_missing_deepspeed_json(capsys, tmp_path):
    config = tmp_path / "ds.yaml"
    config.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n"
                      "deepspeed_config:\n  deepspeed_config_file: deepspeed_configs/zero9.json\n")
    line = fail(capsys, ["--config_file", str(config)])
    assert "DeepSpeed config 'deepspeed_configs/zero9.json'" in line and "does not exist" in line


@pytest.mark.parametrize("text", ["24", "24 parsecs", "lots", "0GB"])
def test_bad_device_memory(capsys, text):
    line = fail(capsys, ["--device_memory", text])
    assert f"--device_memory '{text}' is not a size" in line


def test_num_processes_must_split_evenly_over_machines(capsys):
    line = fail(capsys, ["--config_file", config_file("multi_node"), "--num_machines", "2", "--num_processes", "3"])
    assert "num_processes 3 is not a multiple of num_machines 2" in line


@pytest.mark.parametrize("text", ["fast", "10", "0Gbit", "10 gigs", "5GB/h"])
def test_bad_network_bandwidth(capsys, text):
    assert f"--network_bandwidth '{text}' is not a bandwidth" in fail(capsys, ["--network_bandwidth", text])


def test_pipeline_stages_must_divide_the_world(capsys):
    line = fail(capsys, ["--config_file", config_file("deepspeed_pipeline"), *PIPELINE,
                         "--num_processes", "3", "--pipeline_stages", "2"])
    assert "pipeline_stages 2 must divide the world size 3" in line
