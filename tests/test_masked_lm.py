"""masked-lm: masks as DataCollatorForLanguageModeling draws them (rate, special tokens, labels, whole
words), reproducible per batch and epoch, new each epoch, and fixed per evaluation row; blocks vs
line_by_line; a tiny BERT that learns real tweets; the adapted encoder as a classifier's start; bad input;
distillation; DDP and resume."""

import logging

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from conftest import cli_flags, fail, launch, logged_losses, read_json, run_engine
from hftune.compression.distillation import distillation_loss
from hftune.config import DataArguments, ModelArguments
from hftune.run import main
from hftune.tasks import masked_lm

IGNORE = -100


@pytest.fixture(scope="module")
def texts(tweets):
    return tweets["text"].sample(n=400, random_state=0).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    """train.txt (340 tweets) and validation.txt (60), one tweet a line."""
    folder = tmp_path_factory.mktemp("mlm")
    for name, rows in (("train", texts[:340]), ("validation", texts[340:])):
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return str(folder / "train.txt"), str(folder / "validation.txt")


def build(model, texts, validation=None, **data):
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts})})
    if validation is not None:
        raw["validation"] = Dataset.from_dict({"text": validation})
    return masked_lm.build(ModelArguments(model_name_or_path=model),
                           DataArguments(task="masked-lm", text_column="text", **data), raw)


def batches(bundle, size=16):
    rows = [bundle.train_dataset[i] for i in range(len(bundle.train_dataset))]
    return [bundle.data_collator(rows[i:i + size]) for i in range(0, len(rows), size)]


def mlm_args(model, train, validation, out, **overrides):
    settings = dict(task="masked-lm", model_name_or_path=model, train_file=train, validation_file=validation,
                    output_dir=out, max_seq_length=32, max_steps=12, per_device_train_batch_size=8,
                    per_device_eval_batch_size=16, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
                    eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm="true", seed=0)
    return cli_flags(settings, overrides)


# ---- masks ----

@pytest.mark.parametrize("probability", [0.15, 0.3])
def test_masks_follow_mlm_probability_and_spare_special_tokens(tiny_bert, texts, probability):
    bundle = build(tiny_bert, texts, max_seq_length=64, mlm_probability=probability)
    tokenizer = bundle.processor
    special = torch.tensor(tokenizer.all_special_ids)
    masked = kept_as_mask = kept_same = plain = 0
    for rows, batch in zip(
            (bundle.train_dataset[i:i + 16]["input_ids"] for i in range(0, len(bundle.train_dataset), 16)),
            batches(bundle)):
        original = torch.tensor(rows)
        chosen = batch["labels"] != IGNORE
        is_special = torch.isin(original, special)
        assert not (chosen & is_special).any()  # [CLS], [SEP] (and [PAD], [UNK]) never masked
        assert torch.equal(batch["labels"][chosen], original[chosen])  # labels: the original token where masked ...
        assert torch.equal(batch["input_ids"][~chosen], original[~chosen])  # ... and inputs unchanged elsewhere
        masked, plain = masked + chosen.sum().item(), plain + (~is_special).sum().item()
        kept_as_mask += (batch["input_ids"][chosen] == tokenizer.mask_token_id).sum().item()
        kept_same += (batch["input_ids"][chosen] == original[chosen]).sum().item()
    assert plain > 10_000
    assert masked / plain == pytest.approx(probability, abs=0.015)  # 4 standard deviations
    assert kept_as_mask / masked == pytest.approx(0.8, abs=0.03)
    assert kept_same / masked == pytest.approx(0.1, abs=0.03)  # (random replacements may hit the same token too)


def test_padding_is_never_masked_and_masks_are_reproducible(tiny_bert, texts):
    bundle = build(tiny_bert, texts[:64], line_by_line=True, max_seq_length=48)
    rows = [bundle.train_dataset[i] for i in range(16)]
    batch = bundle.data_collator(rows)
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == bundle.processor.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE).all()
    again = bundle.data_collator([dict(r) for r in rows])  # the same batch: the same masks
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["labels"], again["labels"])
    other = bundle.data_collator(rows[::-1])  # another batch: other masks
    assert not torch.equal(other["labels"].flip(0), batch["labels"])


def test_each_epoch_draws_its_own_masks_reproducibly(tiny_bert, texts):
    first, second = (build(tiny_bert, texts[:64], texts[64:80], max_seq_length=32) for _ in range(2))
    rows = [first.train_dataset[i] for i in range(8)]

    def masks(bundle, epoch):
        bundle.data_collator.epoch = epoch
        return bundle.data_collator([dict(r) for r in rows])

    zero, one = masks(first, 0), masks(first, 1)
    assert not torch.equal(zero["labels"], one["labels"])  # the same batch, another epoch: other masks
    for epoch, batch in ((0, zero), (1, one)):  # the same tokens and epoch: the same masks, in any copy
        for again in (masks(first, epoch), masks(second, epoch)):
            assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["labels"], again["labels"])
    evaluation = [first.eval_dataset[i] for i in range(4)]
    assert first.data_collator(evaluation)["labels"].tolist() == first.eval_dataset[:4]["labels"]  # masked once


class SeenMasks(TrainerCallback):
    """(tokens before masking, labels) of every training micro-batch the model is given, in order."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, positional, inputs):
            if module.training:
                ids, labels = inputs["input_ids"], inputs["labels"]
                self.seen.append((torch.where(labels == IGNORE, ids, labels), labels))

        model.register_forward_pre_hook(record, with_kwargs=True)


def test_sequential_epochs_draw_new_masks_on_both_engines_and_with_workers(tiny_bert, corpus, tmp_path):
    """2 epochs of the same 2 batches (sequential order): the second epoch masks them anew, and the
    masks are the same on either engine and with dataloader workers (which start with each epoch)."""
    runs = {}
    for name, flags in (("trainer", {}), ("workers", dict(dataloader_num_workers=2)),
                        ("accelerate", dict(engine="accelerate", dataloader_num_workers=2))):
        recorder = SeenMasks()
        run_engine(mlm_args(tiny_bert, corpus[0], None, tmp_path / name, max_steps=4, max_train_samples=16,
                            train_sampling_strategy="sequential", do_eval="false", validation_split_percentage=0,
                            **flags), callbacks=[recorder])
        runs[name] = recorder.seen
    seen = runs["trainer"]
    assert len(seen) == 4  # 16 blocks in batches of 8: 2 steps an epoch
    for step in range(2):
        (tokens, labels), (again, relabelled) = seen[step], seen[step + 2]
        assert torch.equal(tokens, again) and not torch.equal(labels, relabelled)
    for name in ("workers", "accelerate"):
        assert len(runs[name]) == 4 and all(torch.equal(a[1], b[1]) for a, b in zip(seen, runs[name])), name


def test_whole_word_masking_masks_every_sub_token_of_a_word(tiny_bert, texts):
    bundle = build(tiny_bert, texts, line_by_line=True, max_seq_length=64, whole_word_masking=True,
                   mlm_probability=0.3)
    tokenizer = bundle.processor
    split_words = 0
    for start in range(0, 400, 16):
        encoded = tokenizer(texts[start:start + 16], truncation=True, max_length=64)
        batch = bundle.data_collator([bundle.train_dataset[i] for i in range(start, min(start + 16, 400))])
        for row in range(len(encoded["input_ids"])):
            words = {}
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None:
                    words.setdefault(word, []).append(bool(batch["labels"][row, position] != IGNORE))
            for flags in words.values():
                assert all(flags) or not any(flags)
                split_words += len(flags) > 1 and all(flags)
    assert split_words > 20  # words of several sub-tokens were masked, whole


def test_evaluation_masks_are_fixed_per_row(tiny_bert, texts):
    first, second = (build(tiny_bert, texts[:40], texts[40:160], max_seq_length=32) for _ in range(2))
    rows = first.eval_dataset[:]
    assert rows == second.eval_dataset[:] and set(first.eval_dataset.column_names) == {"input_ids", "labels"}
    assert any(label != IGNORE for row in rows["labels"] for label in row)
    together = first.data_collator([first.eval_dataset[i] for i in range(8)])  # collated: padded only
    assert together["labels"].tolist() == rows["labels"][:8]


# ---- blocks ----

def test_blocks_and_lines(tiny_bert, texts):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ids = [tokenizer(t)["input_ids"] for t in texts[:100]]
    stream = [token for row in ids for token in row]
    grouped = build(tiny_bert, texts[:100] + ["", None], max_seq_length=40).train_dataset
    assert len(grouped) == len(stream) // 40 and grouped.column_names == ["input_ids"]
    assert [token for row in grouped["input_ids"] for token in row] == stream[:len(grouped) * 40]
    assert grouped[0]["input_ids"][0] == tokenizer.cls_token_id  # run_mlm.py's blocks: texts with [CLS] ... [SEP]

    lines = build(tiny_bert, texts[:100] + ["   "], line_by_line=True, max_seq_length=40).train_dataset
    assert len(lines) == 100  # one row per non-empty text
    assert lines["input_ids"] == [row[:39] + [tokenizer.sep_token_id] if len(row) > 40 else row for row in ids]
    padded = build(tiny_bert, texts[:20], line_by_line=True, max_seq_length=40, pad_to_max_length=True).train_dataset
    assert {len(row) for row in padded["input_ids"]} == {40}
    assert padded[0]["attention_mask"] == [1] * len(ids[0]) + [0] * (40 - len(ids[0]))


# ---- runs ----

def test_a_tiny_bert_learns_the_tweets(tiny_bert, corpus, tmp_path):
    out = tmp_path / "mlm"
    main(mlm_args(tiny_bert, *corpus, out, eval_strategy="steps", eval_steps=12,
                  eval_on_start="true"))
    losses = logged_losses(out)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses  # from ~ln(30522) = 10.3
    state = read_json(out / "trainer_state.json")
    before, after = [e["eval_perplexity"] for e in state["log_history"] if "eval_perplexity" in e][:2]
    assert after < before / 2, (before, after)
    results = read_json(out / "all_results.json")
    assert results["eval_perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-6)
    assert results["perplexity"] == results["eval_perplexity"]
    assert AutoModelForMaskedLM.from_pretrained(out).config.architectures == ["BertForMaskedLM"]
    card = (out / "README.md").read_text()  # the model card: its Hub task, scores and usage
    assert "pipeline_tag: fill-mask" in card and "| validation | perplexity |" in card


class FirstWeights(TrainerCallback):
    """The classifier's encoder weights when training begins."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()


def test_a_classifier_starts_from_the_adapted_encoder(tiny_bert, corpus, tweets_csv, tmp_path):
    adapted = tmp_path / "adapted"
    main(mlm_args(tiny_bert, *corpus, adapted, max_steps=4))
    mlm = AutoModelForMaskedLM.from_pretrained(adapted).bert.encoder.layer[0].attention.self.query.weight
    original = AutoModelForMaskedLM.from_pretrained(tiny_bert).bert.encoder.layer[0].attention.self.query.weight
    assert (mlm - original).abs().max() > 1e-4  # pretraining moved it

    first = FirstWeights()
    train, validation = tweets_csv
    engine, history = run_engine(cli_flags(dict(
        task="text-classification", model_name_or_path=adapted, train_file=train, validation_file=validation,
        label_column="sentiment", output_dir=tmp_path / "classifier", max_steps=4, per_device_train_batch_size=8,
        max_seq_length=32, save_strategy="no", report_to="none", disable_tqdm="true", logging_steps=1), {}),
        callbacks=[first])
    assert torch.equal(first.start, mlm)  # the adapted encoder, not a fresh one
    trained = engine.model.bert.encoder.layer[0].attention.self.query.weight
    assert (trained - mlm).abs().max() > 1e-6 and all(e["loss"] == e["loss"] for e in history if "loss" in e)


def test_an_encoder_without_a_head_gets_one(texts, caplog):
    with caplog.at_level(logging.WARNING, logger="hftune"):
        bundle = build("asset:all-MiniLM-L6-v2", texts[:50], max_seq_length=32)
    assert "has no masked-LM head weights: transformers added a new one" in caplog.text
    model = bundle.model
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


@pytest.fixture
def no_mask_tokenizer(tiny_bert, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.mask_token = None
    tokenizer.save_pretrained(tmp_path / "no-mask")
    assert AutoTokenizer.from_pretrained(tmp_path / "no-mask").mask_token is None
    return str(tmp_path / "no-mask")


@pytest.mark.parametrize("overrides, message", [
    (dict(mlm_probability=0), "mlm_probability must be in (0, 1), got 0.0"),
    (dict(mlm_probability=1.5), "mlm_probability must be in (0, 1), got 1.5"),
    (dict(do_predict="true"), "do_predict has nothing to write for masked-lm"),
    (dict(pad_to_max_length="true"), "pad_to_max_length applies to line_by_line: true"),
    (dict(block_size=32), "block_size does not apply to task masked-lm"),
    (dict(peft="prompt_tuning"), "peft prompt_tuning"),
    (dict(dataloader_num_workers=1, dataloader_persistent_workers="true"),
     "masked-lm draws new masks each epoch, which dataloader_persistent_workers would keep"),
])
def test_bad_settings_are_one_line(capsys, tiny_bert, corpus, tmp_path, overrides, message):
    assert message in fail(capsys, mlm_args(tiny_bert, *corpus, tmp_path / "out", **overrides))


def test_bad_checkpoints_are_one_line(capsys, tiny_gpt, tiny_llama, no_mask_tokenizer, tiny_bert, corpus, tmp_path):
    for decoder, kind in ((tiny_gpt, "gpt2"), (tiny_llama, "llama")):
        line = fail(capsys, mlm_args(decoder, *corpus, tmp_path / "out"))
        assert f"is a {kind} model, which has no masked-LM head (AutoModelForMaskedLM)" in line
        assert "task: causal-lm for a decoder" in line
    line = fail(capsys, mlm_args(tiny_bert, *corpus, tmp_path / "out", tokenizer_name=no_mask_tokenizer))
    assert "has no mask_token, which masked-lm needs" in line


# ---- distillation ----

def test_distillation_compares_the_masked_positions_only():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1], labels[1, 4] = 3, 6
    expected = distillation_loss(student[labels != IGNORE], teacher[labels != IGNORE], 2.0)
    assert distillation_loss(student, teacher, 2.0, labels=labels, shift=0).item() == pytest.approx(expected.item())


@pytest.mark.slow
def test_a_masked_lm_distills_from_a_teacher(tiny_bert, corpus, tmp_path):
    teacher = tmp_path / "teacher"
    main(mlm_args(tiny_bert, *corpus, teacher, max_steps=6))
    out = tmp_path / "student"
    engine, history = run_engine(mlm_args(tiny_bert, *corpus, out, max_steps=4, teacher_model_name_or_path=teacher,
                                          distill_alpha=0.5))
    assert engine.distiller.per_token and not engine.distiller.causal
    logged = [e for e in history if "distill_loss" in e]
    assert len(logged) == 4 and all(0 < e["distill_loss"] < 50 for e in logged)


# ---- processes and resume ----

def weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_resume_continues_exactly(tiny_bert, corpus, tmp_path):
    """Whole words, through Trainer (which keeps the word offsets for the collator), resumed exactly."""
    flags = dict(max_steps=4, save_strategy="steps", save_steps=2, train_sampling_strategy="random",
                 whole_word_masking="true")
    main(mlm_args(tiny_bert, *corpus, tmp_path / "whole", **flags))
    main(mlm_args(tiny_bert, *corpus, tmp_path / "resumed", **flags,
                  resume_from_checkpoint=tmp_path / "whole" / "checkpoint-2"))
    whole, resumed, checkpoint = (weights(tmp_path / n) for n in ("whole", "resumed", "whole/checkpoint-2"))
    assert max((whole[k] - checkpoint[k]).abs().max().item() for k in whole) > 1e-3  # steps 3-4 changed weights
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_resume_in_a_later_epoch_continues_exactly(tiny_bert, corpus, tmp_path, engine):
    """3 epochs of 2 steps, resumed half-way through the second (after step 3): the resumed run masks as
    that epoch does."""
    flags = dict(max_steps=6, max_train_samples=16, save_strategy="steps", save_steps=3, engine=engine,
                 train_sampling_strategy="sequential", do_eval="false", validation_file=None,
                 validation_split_percentage=0)
    main(mlm_args(tiny_bert, corpus[0], None, tmp_path / "whole", **flags))
    main(mlm_args(tiny_bert, corpus[0], None, tmp_path / "resumed", **flags,
                  resume_from_checkpoint=tmp_path / "whole" / "checkpoint-3"))
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
@pytest.mark.slow
def test_two_processes_equal_one(config, tiny_bert, corpus, tmp_path):
    """2 processes x 4 rows = 1 process x 4 rows x 2 accumulated micro-batches: the same micro-batches,
    so the same masks (seeded by their tokens), and the same mean of per-micro-batch losses; under DDP,
    ZeRO-3 and FSDP."""
    flags = dict(max_steps=2, train_sampling_strategy="sequential", optim="sgd", learning_rate=1.0,
                 max_grad_norm=0, per_device_train_batch_size=4, do_eval="false", validation_file=None,
                 validation_split_percentage=0)
    main(mlm_args(tiny_bert, corpus[0], None, tmp_path / "one", gradient_accumulation_steps=2, **flags))
    launch(config, 2, mlm_args(tiny_bert, corpus[0], None, tmp_path / "two", **flags))
    one, two, start = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_bert)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # the updates are not nothing
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
