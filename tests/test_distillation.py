"""Knowledge distillation: the loss against a hand computation; students distilled from a trained
teacher end closer to it (KL on the validation set) than the same students trained without it, for
the text classifier, the causal LM and the image classifier; the teacher stays frozen; a 2-process
DDP launch and a ZeRO-3 launch with a teacher match one process; bad input is one line."""

import json
import re

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
    AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, ResNetConfig,
    ResNetForImageClassification,
)

from conftest import (
    cli_flags, fail, launch, read_json, run_engine, step_logs, strategy_args, tiny_model, write_tweet_split,
)
from hftune.compression.distillation import distillation_loss
from hftune.errors import HftuneError

STUDENT = dict(max_steps=12, per_device_train_batch_size=16, train_sampling_strategy="sequential", seed=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as launchers set (OMP_NUM_THREADS=1): these tiny models train several
    times faster on 2 shared cores than with threads competing for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the formula ----

def hand_kl(teacher_logits, student_logits, temperature):
    """KL(p || q) = sum p (log p - log q) of the temperature-softened softmaxes, written out."""
    p = torch.exp(teacher_logits / temperature) / torch.exp(teacher_logits / temperature).sum(-1, keepdim=True)
    q = torch.exp(student_logits / temperature) / torch.exp(student_logits / temperature).sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1)


def test_classification_loss_is_t_squared_kl_averaged_over_examples():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3) * 3
    for temperature in (1.0, 2.0, 4.0):
        expected = temperature**2 * hand_kl(teacher, student, temperature).mean()
        assert distillation_loss(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_causal_lm_loss_is_shifted_and_skips_ignored_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    # position i predicts label i + 1: kept are (0,0) (0,1) and all four of row 1
    kept = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    kl = torch.stack([hand_kl(teacher[b, t], student[b, t], 2.0) for b, t in kept])
    loss = distillation_loss(student, teacher, 2.0, labels=labels)
    assert loss.item() == pytest.approx(4 * kl.mean().item(), rel=1e-5)
    # normalized like a task loss over a larger accumulated batch: summed, divided by its token count
    assert distillation_loss(student, teacher, 2.0, labels=labels, num_items=12).item() == \
        pytest.approx(4 * kl.sum().item() / 12, rel=1e-5)
    # every label ignored: no KL, no NaN
    assert distillation_loss(student, teacher, 2.0, labels=torch.full_like(labels, -100)).item() == 0.0


def test_alpha_weighs_task_loss_against_distillation():
    from hftune.compression.distillation import Distiller

    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    inputs = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}

    class Logits(torch.nn.Module):  # a model's output: .logits
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return type("Out", (), {"logits": self.linear(x)})()

    student_logits = torch.randn(5, 3, requires_grad=True)
    task = torch.tensor(1.25)
    distiller = Distiller(Logits(teacher), alpha=0.3, temperature=2.0, causal=False)
    mixed = distiller.mix(task, student_logits, inputs, inputs["labels"])
    distill = 4 * hand_kl(teacher(inputs["x"]), student_logits, 2.0).mean()
    assert mixed.item() == pytest.approx(0.3 * 1.25 + 0.7 * distill.item(), rel=1e-5)
    mixed.backward()
    assert teacher.weight.grad is None  # the teacher ran under no_grad
    assert distiller.pop_means() == pytest.approx({"task_loss": 1.25, "distill_loss": distill.item()})


# ---- KL(teacher || student) on the validation set ----

def mean_kl(teacher, student, batch, causal=False):
    """Mean KL(teacher || student) at T = 1: per example, or per predicted (non-padding) token."""
    with torch.no_grad():
        t, s = teacher(**batch).logits, student(**batch).logits
    if causal:
        keep = batch["attention_mask"][:, 1:].bool()
        t, s = t[:, :-1][keep], s[:, :-1][keep]
    return (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean().item()


def kl_of(auto_class, teacher_dir, student_dir, batch, causal=False):
    teacher, student = auto_class.from_pretrained(teacher_dir).eval(), auto_class.from_pretrained(student_dir).eval()
    return mean_kl(teacher, student, batch, causal)


# ---- text classification ----

@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tweets):
    train, validation = write_tweet_split(tweets, tmp_path_factory.mktemp("tweets"))
    return train, validation, pd.read_csv(validation, dtype=str, keep_default_na=False)["text"].tolist()


@pytest.fixture(scope="module")
def text_teacher(tiny_bert, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "teacher"
    # with dropout, so a teacher left in train mode would give noisy targets
    run_engine(strategy_args(tiny_bert, out, *text_data[:2], max_steps=30, hidden_dropout=0.1))
    return out


@pytest.fixture(scope="module")
def text_runs(tiny_bert, text_data, text_teacher, tmp_path_factory):
    """The same student trained without and with the teacher: {name: (output dir, engine, log history)}."""
    root = tmp_path_factory.mktemp("text-students")
    runs = {}
    for name, extra in (("plain", {}), ("distilled", {"teacher_model_name_or_path": text_teacher})):
        engine, history = run_engine(strategy_args(tiny_bert, root / name, *text_data[:2], **STUDENT, **extra))
        runs[name] = root / name, engine, history
    return runs


def test_distilled_text_student_is_closer_to_its_teacher(text_runs, text_teacher, text_data, tiny_bert):
    batch = dict(AutoTokenizer.from_pretrained(tiny_bert)(text_data[2], padding=True, truncation=True,
                                                          max_length=48, return_tensors="pt"))
    plain, distilled = (kl_of(AutoModelForSequenceClassification, text_teacher, text_runs[n][0], batch)
                        for n in ("plain", "distilled"))
    print(f"text KL(teacher || student): plain {plain:.4f}, distilled {distilled:.4f}")
    assert distilled < 0.5 * plain


def test_both_parts_are_logged_and_mixed_by_alpha(text_runs):
    history = text_runs["distilled"][2]
    loss, task, distill = (step_logs(history, key) for key in ("loss", "task_loss", "distill_loss"))
    assert len(loss) == len(task) == len(distill) == STUDENT["max_steps"]
    assert loss == pytest.approx([0.5 * t + 0.5 * d for t, d in zip(task, distill)], rel=1e-5)
    assert distill[-1] < distill[0]
    assert not step_logs(text_runs["plain"][2], "distill_loss")


def test_teacher_stays_frozen_in_eval_mode(text_runs, text_teacher):
    teacher = text_runs["distilled"][1].distiller.teacher
    assert any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in teacher.modules())
    assert not any(module.training for module in teacher.modules())  # dropout off while the student trained
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    saved = AutoModelForSequenceClassification.from_pretrained(text_teacher).state_dict()
    assert all(torch.equal(t, saved[n]) for n, t in teacher.state_dict().items())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_accelerate_engine_distills_like_trainer(tiny_bert, text_data, text_teacher, text_runs, tmp_path):
    _, history = run_engine(strategy_args(tiny_bert, tmp_path / "acc", *text_data[:2], **STUDENT, engine="accelerate",
                                          teacher_model_name_or_path=text_teacher))
    for key in ("loss", "task_loss", "distill_loss"):
        assert step_logs(history, key) == pytest.approx(step_logs(text_runs["distilled"][2], key), abs=1e-5)


def test_lora_student_distills_through_its_adapter(tiny_bert, text_data, text_teacher, tmp_path):
    _, history = run_engine(strategy_args(tiny_bert, tmp_path / "lora", *text_data[:2], **STUDENT, peft="lora",
                                          teacher_model_name_or_path=text_teacher))
    loss, task, distill = (step_logs(history, key) for key in ("loss", "task_loss", "distill_loss"))
    assert loss == pytest.approx([0.5 * t + 0.5 * d for t, d in zip(task, distill)], rel=1e-5)
    assert distill[-1] < distill[0]
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


# ---- causal LM ----

@pytest.fixture(scope="module")
def lm_data(tmp_path_factory, tweets):
    folder = tmp_path_factory.mktemp("lm")
    texts = tweets["text"].sample(n=400, random_state=1).tolist()
    for name, part in (("train", texts[:340]), ("validation", texts[340:])):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    return folder / "train.jsonl", folder / "validation.jsonl", texts[340:]


def lm_args(model, out, data, **extra):
    return cli_flags(dict(config="causal_lm", model_name_or_path=model, output_dir=out, train_file=data[0],
                          validation_file=data[1], text_column="text", block_size=32, report_to="none",
                          disable_tqdm="true", per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0,
                          logging_steps=1, eval_strategy="no", save_strategy="no", do_eval="false", seed=0), extra)


@pytest.fixture(scope="module")
def lm_runs(tiny_llama, lm_data, tmp_path_factory):
    """The teacher, a wider Llama from another initialization briefly trained (a student trained like it
    from its own init would follow the teacher's path, distilled or not); the student without and with it."""
    root = tmp_path_factory.mktemp("lm-runs")
    tiny_model(root / "wide", "llama", tokenizer=tiny_llama, hidden_size=48, intermediate_size=96, seed=1)
    run_engine(lm_args(root / "wide", root / "teacher", lm_data, max_steps=10, seed=1))
    runs = {"teacher": root / "teacher"}
    for name, extra in (("plain", {}), ("distilled", {"teacher_model_name_or_path": root / "teacher"})):
        runs[name] = run_engine(lm_args(tiny_llama, root / name, lm_data, max_steps=5, **extra))[1]
    return root, runs


@pytest.mark.slow
def test_distilled_causal_lm_is_closer_to_its_teacher(lm_runs, tiny_llama, lm_data):
    root, _ = lm_runs
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batch = dict(tokenizer(lm_data[2], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    plain, distilled = (kl_of(AutoModelForCausalLM, root / "teacher", root / n, batch, causal=True)
                        for n in ("plain", "distilled"))
    print(f"causal LM token KL(teacher || student): plain {plain:.4f}, distilled {distilled:.4f}")
    assert distilled < 0.75 * plain


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
@pytest.mark.slow
def test_causal_lm_distillation_is_normalized_like_the_lm_loss(engine, lm_runs, tiny_llama, lm_data, tmp_path):
    """Both engines normalize a causal LM's loss by the tokens of the whole accumulated batch: 2 x 4
    blocks with gradient accumulation give Trainer's 8-block run's loss, task and distillation parts."""
    root, runs = lm_runs
    _, history = run_engine(lm_args(tiny_llama, tmp_path / "ga", lm_data, max_steps=5, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=2, teacher_model_name_or_path=root / "teacher",
                                    engine=engine))
    for key in ("loss", "task_loss", "distill_loss"):
        assert step_logs(history, key) == pytest.approx(step_logs(runs["distilled"], key), rel=1e-4), key


# ---- image classification ----

def image_args(model, folders, out, **extra):
    return cli_flags(dict(config="image_classification", model_name_or_path=model, output_dir=out,
                          train_file=folders[0], validation_file=folders[1], report_to="none", disable_tqdm="true",
                          per_device_train_batch_size=16, learning_rate=5e-3, warmup_steps=0, logging_steps=1,
                          do_eval="false", seed=0), extra)


def test_distilled_image_student_is_closer_to_its_teacher(tiny_resnet, digit_folders, tmp_path):
    # The teacher: a wider ResNet from another initialization, briefly trained, so its outputs are
    # soft and its own (these digits are easy: a well-trained teacher says little beyond the labels).
    torch.manual_seed(1)
    wide = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
    ResNetForImageClassification(wide).save_pretrained(tmp_path / "wide")
    AutoImageProcessor.from_pretrained(tiny_resnet).save_pretrained(tmp_path / "wide")
    run_engine(image_args(tmp_path / "wide", digit_folders, tmp_path / "teacher", max_steps=8, seed=1))
    # 20 steps: enough for the students' BatchNorm running statistics, used in eval mode, to settle
    for name, extra in (("plain", {}), ("distilled", {"teacher_model_name_or_path": tmp_path / "teacher"})):
        run_engine(image_args(tiny_resnet, digit_folders, tmp_path / name, max_steps=20, **extra))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "teacher")
    images = [Image.open(p).convert("RGB") for p in sorted(digit_folders[1].rglob("*.png"))]
    batch = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"]}
    plain, distilled = (kl_of(AutoModelForImageClassification, tmp_path / "teacher", tmp_path / n, batch)
                        for n in ("plain", "distilled"))
    print(f"image KL(teacher || student): plain {plain:.4f}, distilled {distilled:.4f}")
    assert distilled < 0.9 * plain


# ---- multi-process ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches")
@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml"])
@pytest.mark.slow
def test_two_processes_with_a_teacher_match_one(config, tiny_bert, text_data, text_teacher, text_runs, tmp_path):
    """Each process holds a whole teacher under DDP, half of it under ZeRO-3; losses equal one process's."""
    out = tmp_path / "out"
    settings = {**STUDENT, "per_device_train_batch_size": 8, "teacher_model_name_or_path": text_teacher}
    result = launch(config, 2, strategy_args(tiny_bert, out, *text_data[:2], **settings))
    history, output = read_json(out / "trainer_state.json")["log_history"], result.stdout + result.stderr
    if config == "ddp.yaml":
        assert re.search(r"teacher: a whole frozen copy on cpu(:0)? in every process", output)
    else:
        held, whole = (int(n.replace(",", "")) for n in
                       re.search(r"teacher: partitioned by ZeRO-3, ([\d,]+) of ([\d,]+) parameter", output).groups())
        assert whole == sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
            text_teacher).parameters())
        assert held == pytest.approx(whole / 2, rel=1e-3)
    reference = text_runs["distilled"][2]
    for key in ("loss", "task_loss", "distill_loss"):
        assert step_logs(history, key) == pytest.approx(step_logs(reference, key), abs=1e-4), key


# ---- bad input ----

@pytest.fixture(scope="module")
def two_label_teacher(tiny_bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("two-labels")
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, num_labels=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reordered_teacher(tiny_bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("reordered")
    names = ["positive", "neutral", "negative"]
    config = BertConfig.from_pretrained(tiny_bert, id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra, expected", [
    ({"distill_alpha": 1.5, "teacher_model_name_or_path": "x"}, "distill_alpha must be in [0, 1]"),
    ({"distill_temperature": 0, "teacher_model_name_or_path": "x"}, "distill_temperature must be > 0"),
    ({"distill_alpha": 0.5}, "distill_alpha needs teacher_model_name_or_path"),
    ({"distill_temperature": 3}, "distill_temperature needs teacher_model_name_or_path"),
    ({"teacher_model_name_or_path": "/nowhere/teacher"}, "teacher_model_name_or_path '/nowhere/teacher' is not a folder"),
])
def test_bad_distillation_settings(capsys, extra, expected, tiny_bert, text_data, tmp_path):
    line = fail(capsys, strategy_args(tiny_bert, tmp_path / "out", *text_data[:2], **extra))
    assert expected in line, line


@pytest.mark.parametrize("engine_settings, expected", [
    ({"engine": "pipeline"}, "engine: pipeline cannot distill"),
    ({"fsdp": "full_shard"}, "distillation under FSDP is not supported"),
    ({"do_train": False}, "only changes training, and do_train is false"),
])
def test_distillation_is_refused_where_no_engine_honours_it(engine_settings, expected):
    from types import SimpleNamespace

    from hftune.compression.distillation import check_distillation

    args = SimpleNamespace(**{"distill_alpha": None, "distill_temperature": None, "do_train": True,
                              "engine": "trainer", "fsdp": "", **engine_settings})
    with pytest.raises(HftuneError, match=expected):
        check_distillation(SimpleNamespace(teacher_model_name_or_path="teacher"), args)


def test_teacher_with_other_labels_is_refused(capsys, tiny_bert, text_data, two_label_teacher, reordered_teacher,
                                              tmp_path):
    line = fail(capsys, strategy_args(tiny_bert, tmp_path / "a", *text_data[:2],
                                      teacher_model_name_or_path=two_label_teacher))
    assert "has 2 labels ['LABEL_0', 'LABEL_1'], the data has 3 ['negative', 'neutral', 'positive']" in line
    line = fail(capsys, strategy_args(tiny_bert, tmp_path / "b", *text_data[:2],
                                      teacher_model_name_or_path=reordered_teacher))
    assert "labels ['positive', 'neutral', 'negative'], the data's classes are ['negative', 'neutral', " \
           "'positive'] (in this order)" in line


def test_teacher_lm_with_another_vocabulary_is_refused(capsys, tiny_llama, lm_data, tmp_path):
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.vocab_size += 8
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wider")
    line = fail(capsys, lm_args(tiny_llama, tmp_path / "out", lm_data, max_steps=1,
                                teacher_model_name_or_path=tmp_path / "wider"))
    assert f"predicts over {config.vocab_size} tokens, the student over {config.vocab_size - 8}" in line
    # the same logit width, but a tokenizer that maps text to other ids
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens(["<extra>"])
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path / "retokenized")
    tokenizer.save_pretrained(tmp_path / "retokenized")
    line = fail(capsys, lm_args(tiny_llama, tmp_path / "out2", lm_data, max_steps=1,
                                teacher_model_name_or_path=tmp_path / "retokenized"))
    assert f"has a tokenizer of {len(tokenizer)} tokens that maps text to other ids than the student's " \
           f"({len(tokenizer) - 1} tokens)" in line
