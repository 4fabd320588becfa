"""engine: pipeline: DeepSpeed pipeline stages over gloo, launched for real with
accelerate_configs/deepspeed_pipeline.yaml. Each run is compared with a single-process run of
another engine on the same rows (sequential sampling, dropout off), so a wrong cut, a lost gradient
between stages, an untied embedding or a wrong data share shows up as a different loss."""

import json
import os
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
    LlamaForCausalLM,
)

from conftest import RANK_PROBE, cli_flags, fail, launch, logged_losses, read_json
from hftune.run import main
from test_causal_lm import tweet_jsonl, tweet_texts  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# launched from the repository root, where this accelerate config finds deepspeed_configs/pipeline.json (a run's
# own JSON comes as a launch flag), running RANK_PROBE: hftune's run.py recording each rank's rows
PIPELINE = "deepspeed_pipeline.yaml"
ENGINE = ["--engine", "pipeline"]


def llama_args(model, data, out, **overrides):
    train, validation = data
    settings = dict(
        task="causal-lm", model_name_or_path=model, train_file=train, validation_file=validation, text_column="text",
        output_dir=out, block_size=32, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        per_device_eval_batch_size=5, learning_rate=1e-2, warmup_steps=0, logging_steps=1, seed=0,
        train_sampling_strategy="sequential", eval_strategy="no", save_strategy="no", do_eval="false",
        report_to="none", disable_tqdm="true",
    )
    return cli_flags(settings, overrides)


def history(out):
    return read_json(os.path.join(out, "trainer_state.json"))["log_history"]


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tiny_llama_tied, tweet_jsonl):  # noqa: F811
    """2 stages on 2 processes: 6 steps, checkpoints at 3 and 6, evaluation at the end. The shipped
    JSON, partitioned by layer type so that the last stage holds the tied head alone (a stage with
    no norm weight: its no-decay parameter group would be empty)."""
    root = tmp_path_factory.mktemp("pipeline-tied")
    config = read_json(os.path.join(REPO, "deepspeed_configs", "pipeline.json"))
    config["pipeline"]["partition"] = "type:Embedding"  # both ends are Embedding layers: [0, 4) and [4, 5)
    (root / "pipeline.json").write_text(json.dumps(config))
    args = llama_args(tiny_llama_tied, tweet_jsonl, str(root / "out"), do_eval="true", save_strategy="steps",
                      save_steps=3)
    result = launch(PIPELINE, 2, [*args, *ENGINE], script=RANK_PROBE, probe_dir=root / "probe",
                    launch_flags=["--deepspeed_config_file", root / "pipeline.json"])
    return dict(args=args, out=str(root / "out"), ranks=[result.probes[r] for r in range(2)], log=result.stdout,
                model=tiny_llama_tied, json=root / "pipeline.json")


@pytest.mark.slow
def test_two_stages_match_one_process(tied_run, tmp_path):
    """Same losses, learning rates and eval loss as Trainer on one process: the tied embedding's
    gradients from the first stage (input) and the last (output) are summed."""
    ranks = tied_run["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert "2 stages x 1 data-parallel replicas, layers per stage [4, 1]" in tied_run["log"]
    assert ranks[0]["rows"] == ranks[1]["rows"]  # first stage reads the inputs, last stage the same rows' labels
    main([*tied_run["args"], f"--output_dir={tmp_path / 'one'}", "--engine=trainer"])
    pipe, one = history(tied_run["out"]), history(tmp_path / "one")
    steps = lambda h, key: [e[key] for e in h if "loss" in e]  # noqa: E731
    assert len(steps(pipe, "loss")) == 6
    assert steps(pipe, "loss") == pytest.approx(steps(one, "loss"), abs=1e-4)
    assert steps(pipe, "learning_rate") == pytest.approx(steps(one, "learning_rate"), rel=1e-9)
    results = read_json(os.path.join(tied_run["out"], "all_results.json"))
    assert results["eval_loss"] == pytest.approx(read_json(tmp_path / "one/all_results.json")["eval_loss"], abs=1e-4)


@pytest.mark.slow
def test_saved_model_is_the_trained_tied_checkpoint(tied_run, tweet_jsonl, tmp_path):  # noqa: F811
    out = tied_run["out"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    saved, initial = load_file(f"{out}/model.safetensors"), load_file(f"{tied_run['model']}/model.safetensors")
    assert "lm_head.weight" not in saved  # one tensor for both ends, as save_pretrained writes tied models
    assert not torch.equal(saved["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    # Every stage's weights as DeepSpeed itself checkpointed them at the last step (layer files 0..3:
    # embedding, 2 blocks, final norm; the tied head has no file of its own).
    state = f"{out}/checkpoint-6/pipeline_state"
    layers = [torch.load(f"{state}/layer_{i:02d}-model_states.pt", weights_only=True) for i in range(4)]
    expected = {"model.embed_tokens.weight": layers[0]["embedding.weight"],
                "model.norm.weight": layers[3]["norm.weight"]}
    for block in (0, 1):
        expected.update({f"model.layers.{block}.{k[len('layer.'):]}": v for k, v in layers[block + 1].items()})
    assert set(expected) == set(saved)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    # The reloaded checkpoint scores the validation set as the pipeline did at the end of training.
    main(llama_args(out, tweet_jsonl, str(tmp_path / "eval"), do_train="false", do_eval="true"))
    reloaded = read_json(tmp_path / "eval/all_results.json")["eval_loss"]
    assert reloaded == pytest.approx(read_json(f"{out}/all_results.json")["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_resume_continues_exactly(tied_run, tmp_path):
    """Resuming at step 3 ends with the uninterrupted run's losses and weights."""
    args = [*tied_run["args"], f"--output_dir={tmp_path / 'resumed'}",
            f"--resume_from_checkpoint={tied_run['out']}/checkpoint-3"]
    launch(PIPELINE, 2, [*args, *ENGINE], script=RANK_PROBE, probe_dir=tmp_path / "probe",
           launch_flags=["--deepspeed_config_file", tied_run["json"]])
    assert logged_losses(tmp_path / "resumed") == pytest.approx(logged_losses(tied_run["out"]), abs=1e-6)
    resumed = load_file(tmp_path / "resumed/model.safetensors")
    straight = load_file(f"{tied_run['out']}/model.safetensors")
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


@pytest.mark.slow
def test_two_stages_by_two_replicas(tiny_gpt2, tweet_jsonl, tmp_path):  # noqa: F811
    """4 processes = 2 stages x 2 data-parallel replicas of GPT-2: each replica reads its own rows (both
    of its stages the same ones), and 2 micro-batches of 2 on each replica equal one process's 2 of 4.
    Reference: one process on engine accelerate."""
    args = llama_args(tiny_gpt2, tweet_jsonl, str(tmp_path / "pipe"), max_steps=4, pipeline_stages=2,
                      per_device_train_batch_size=2)
    probes = launch(PIPELINE, 4, [*args, *ENGINE], script=RANK_PROBE, probe_dir=tmp_path / "probe").probes
    ranks = [probes[r] for r in range(4)]
    assert [r["world_size"] for r in ranks] == [4] * 4
    readers = defaultdict(list)
    for rank, seen in enumerate(ranks):
        readers[tuple(seen["rows"])].append(rank)
    assert sorted(len(r) for r in readers.values()) == [2, 2], readers.values()  # two replicas, two readers each
    first, second = (set(rows) for rows in readers)
    assert not first & second and len(first | second) == 4 * 8  # 4 steps of 8 distinct rows
    main(llama_args(tiny_gpt2, tweet_jsonl, str(tmp_path / "one"), max_steps=4, engine="accelerate"))
    assert logged_losses(tmp_path / "pipe") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)


@pytest.mark.slow
def test_bert_classifier_two_stages(tiny_bert, tweets_csv, tmp_path):
    """A BERT encoder + classification head (padded batches of varying length) in 2 stages; accuracy
    and F1 come from the last stage's logits."""
    train, validation = tweets_csv
    flags = cli_flags(dict(
        model_name_or_path=tiny_bert, train_file=train, validation_file=validation, label_column="sentiment",
        max_seq_length=32, max_steps=6, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-3, warmup_steps=0, logging_steps=1, seed=7, train_sampling_strategy="sequential",
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm="true"), {})
    probes = launch(PIPELINE, 2, [*flags, f"--output_dir={tmp_path / 'pipe'}", *ENGINE], script=RANK_PROBE,
                    probe_dir=tmp_path / "probe").probes
    ranks = [probes[r] for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    main([*flags, f"--output_dir={tmp_path / 'one'}"])
    assert logged_losses(tmp_path / "pipe") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    pipe, one = read_json(tmp_path / "pipe/all_results.json"), read_json(tmp_path / "one/all_results.json")
    for key in ("eval_loss", "eval_accuracy", "eval_f1_macro"):
        assert pipe[key] == pytest.approx(one[key], abs=1e-4), key


def run_layers(model, inputs, packed=False):
    """The pipeline layers of `model` applied in order on one process, as the stages apply them."""
    from deepspeed.pipe import TiedLayerSpec

    from hftune.engines.pipeline_layers import FAMILIES

    tied, x = {}, inputs
    for layer in FAMILIES[type(model).__name__].layers(model, packed):
        if isinstance(layer, TiedLayerSpec):
            module = tied.setdefault(layer.key, layer.build())
            x = module(x) if layer.forward_fn is None else layer.forward_fn(module, x)
        else:
            x = layer(x)
    return x


TINY = dict(vocab_size=300, max_position_embeddings=64)
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "bert": lambda: BertForSequenceClassification(BertConfig(
        **TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)),
}


@pytest.mark.parametrize("name", MODELS)
def test_layers_reproduce_the_model(name):
    """Embedding, blocks, norm and head in sequence give the HF model's own logits, padding included."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    if name == "bert":
        mask[1, 8:] = 0
    else:  # left padding: a decoder's causal mask alone would already hide right padding
        mask[1, :4] = 0
    positions = torch.arange(12).expand_as(ids)
    inputs = (ids, mask, torch.zeros_like(ids)) if name == "bert" else (ids, mask, positions)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = run_layers(model, inputs)
    if name != "bert":  # padded positions' logits are never scored
        expected, got = expected[mask.bool()], got[mask.bool()]
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layers_keep_packed_texts_apart_as_the_model_does(name):
    """Blocks whose position ids restart with every text (isolate_texts): the stages pass the positions
    on, and each text gets the logits the model gives it alone, as Trainer's one-process run does."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(3, 300, (2, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # (a cache: no packing)
        got = run_layers(model, (ids, torch.ones_like(ids), positions), packed=True)
        alone = model(input_ids=ids[:1, 5:]).logits  # the first row's second text on its own
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[0, 5:], alone[0], atol=1e-5)


@pytest.fixture
def deepspeed_launch(monkeypatch):
    """What accelerate launch with deepspeed_pipeline.yaml sets, for a single in-process run."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(REPO, "deepspeed_configs", "pipeline.json"))


@pytest.mark.parametrize("flags, message", [
    (dict(pipeline_stages=2), "1 processes cannot be split into pipelines of 2 stages"),
    (dict(pipeline_stages=8), "the model has 5 pipeline layers (embedding, blocks, norm, head), fewer than "
                              "pipeline_stages=8"),
    (dict(label_smoothing_factor=0.1), "engine: pipeline does not support label smoothing"),
])
def test_bad_pipeline_settings(capsys, deepspeed_launch, tiny_llama, tweet_jsonl,  # noqa: F811
                               tmp_path, flags, message):
    line = fail(capsys, llama_args(tiny_llama, tweet_jsonl, str(tmp_path / "out"), engine="pipeline", **flags))
    assert message in line


def test_unsupported_model_names_the_supported_ones(capsys, deepspeed_launch, tiny_resnet, digit_folders, tmp_path):
    train, validation = digit_folders
    line = fail(capsys, ["--config", "image_classification", "--model_name_or_path", tiny_resnet, "--train_file",
                         str(train), "--validation_file", str(validation), "--output_dir", str(tmp_path / "out"),
                         "--engine", "pipeline"])
    assert "cannot split ResNetForImageClassification" in line
    assert "['BertForSequenceClassification', 'GPT2LMHeadModel', 'LlamaForCausalLM']" in line
