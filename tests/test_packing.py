"""causal-lm padding-free batches (concatenate_texts: false, padding_free unset or true): every text
in a flattened batch gets the logits it gets alone, the loss is the token-weighted mean of the texts'
losses, a run matches padded batches step for step, and what cannot be exact is refused. Packed
blocks (concatenate_texts: true, isolate_texts unset or true) keep their texts apart the same way."""

from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq, default_data_collator

from conftest import fail, logged_losses
from hftune.config import DataArguments, ModelArguments
from hftune.errors import HftuneError
from hftune.run import main
from hftune.tasks import causal_lm
from test_causal_lm import tweet_jsonl, tweet_texts  # noqa: F401 (fixtures)


def build_bundle(model, texts, **data):
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts})})
    data_args = DataArguments(task="causal-lm", concatenate_texts=False, max_seq_length=48, **data)
    return causal_lm.build(ModelArguments(model_name_or_path=model), data_args, raw)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_each_packed_text_gets_its_own_logits_and_loss(model, request, tweet_texts):  # noqa: F811
    bundle = build_bundle(request.getfixturevalue(model), tweet_texts[:6])
    assert isinstance(bundle.data_collator, causal_lm.FlatteningCollator)
    examples = [bundle.train_dataset[i] for i in range(6)]
    batch = bundle.data_collator(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths)) and len(set(lengths)) > 1  # one row, no padding

    model = bundle.model.train()  # as in training: a causal LM would build a KV cache and let texts mix
    packed = model(**batch)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    losses = []
    for example, start, length in zip(examples, starts, lengths):
        ids = torch.tensor([example["input_ids"]])
        alone = model(input_ids=ids, labels=ids)
        torch.testing.assert_close(packed.logits[0, start:start + length], alone.logits[0], atol=1e-5, rtol=1e-5)
        losses.append(alone.loss.item())
    predicted = [length - 1 for length in lengths]  # the first token of each text is predicted by none
    weighted = sum(loss * n for loss, n in zip(losses, predicted)) / sum(predicted)
    assert packed.loss.item() == pytest.approx(weighted, abs=1e-5)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_each_text_in_a_packed_block_gets_its_own_logits(model, request, tweet_texts):  # noqa: F811
    path = request.getfixturevalue(model)
    raw = DatasetDict({"train": Dataset.from_dict({"text": tweet_texts[:12]})})
    bundle = causal_lm.build(ModelArguments(model_name_or_path=path), DataArguments(task="causal-lm", block_size=64), raw)
    batch = bundle.data_collator([bundle.train_dataset[i] for i in range(2)])
    model = bundle.model.train()
    packed = model(**batch)
    segments = 0
    for row in range(2):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [64]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][row:row + 1, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed.logits[row, start:end], alone, atol=1e-5, rtol=1e-5)
            segments += 1
    assert segments > 4  # several texts per block (tweets are short)
    # the loss is next-token cross-entropy over the labels, none predicting a text's first token
    logits, labels = packed.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    assert (labels == -100).sum() >= segments - 2  # every text start inside a block (a block's first label is unused)
    assert packed.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-5)
    # negative control: run_clm.py's blocks let the second text of a block see the first
    plain = model(input_ids=batch["input_ids"], use_cache=False).logits
    start, end = starts[1], starts[2]
    alone = model(input_ids=batch["input_ids"][1:2, start:end], use_cache=False).logits[0]
    assert (plain[1, start:end] - alone).abs().max() > 1e-3


def run(tmp_path, model, train, validation, name, **overrides):
    recipe = dict(
        task="causal-lm", model_name_or_path=model, train_file=str(train), validation_file=str(validation),
        output_dir=str(tmp_path / name), concatenate_texts=False, max_seq_length=32, max_steps=8,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=0,
        logging_steps=1, eval_strategy="no", do_eval=False, save_strategy="no", report_to="none", seed=0,
        **overrides,
    )
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    main(["--config", str(tmp_path / f"{name}.yaml")])
    return logged_losses(recipe["output_dir"])


@pytest.mark.slow
def test_training_matches_padded_batches_step_for_step(tmp_path, tiny_llama, tweet_jsonl):  # noqa: F811
    """Trainer weighs tokens across micro-batches by its label count: the same count either way."""
    flat = run(tmp_path, tiny_llama, *tweet_jsonl, "flat")
    padded = run(tmp_path, tiny_llama, *tweet_jsonl, "padded", padding_free=False)
    assert len(flat) == 8
    assert flat[0] == pytest.approx(padded[0], abs=1e-5)
    assert flat == pytest.approx(padded, abs=1e-4)
    assert flat[-1] < flat[0] - 0.5, flat  # from ln(30522) = 10.3 at random init


def test_a_model_that_mixes_packed_texts_gets_padded_batches_or_plain_blocks(tiny_opt, tweet_texts):  # noqa: F811
    assert isinstance(build_bundle(tiny_opt, tweet_texts[:4]).data_collator, DataCollatorForSeq2Seq)
    with pytest.raises(HftuneError, match=r"padding_free: true, but for opt .*see each other"):
        build_bundle(tiny_opt, tweet_texts[:4], padding_free=True)
    raw = DatasetDict({"train": Dataset.from_dict({"text": tweet_texts[:8]})})
    blocks = causal_lm.build(ModelArguments(model_name_or_path=tiny_opt), DataArguments(task="causal-lm", block_size=32),
                             raw)
    assert blocks.data_collator is default_data_collator and "position_ids" not in blocks.train_dataset.column_names
    with pytest.raises(HftuneError, match=r"isolate_texts: true, but for opt .*see each other"):
        causal_lm.build(ModelArguments(model_name_or_path=tiny_opt),
                        DataArguments(task="causal-lm", block_size=32, isolate_texts=True), raw)


@pytest.mark.parametrize("flags, message", [
    (["--task=causal-lm"], "padding_free applies to concatenate_texts: false"),  # blocks by default
    (["--task=causal-lm", "--concatenate_texts=false", "--isolate_texts=true"],
     "isolate_texts applies to concatenate_texts: true"),
    (["--task=causal-lm", "--concatenate_texts=false", "--peft=prompt_tuning"],
     "padding_free: true cannot be used with peft: prompt_tuning"),
    (["--task=text-classification"], "padding_free does not apply to task text-classification"),
])
def test_bad_combinations_are_refused(capsys, tmp_path, tiny_llama, tweet_jsonl, flags, message):  # noqa: F811
    train, validation = tweet_jsonl
    argv = [f"--model_name_or_path={tiny_llama}", f"--train_file={train}", f"--validation_file={validation}",
            "--padding_free=true", "--max_steps=1", f"--output_dir={tmp_path}/out", "--report_to=none", *flags]
    assert message in fail(capsys, argv)


@pytest.mark.parametrize("model, engine, keys", [
    (dict(teacher_model_name_or_path="teacher"), "trainer", ("padding_free", "isolate_texts")),
    (dict(), "pipeline", ("padding_free",))],  # the pipeline's stages pass packed blocks' position ids on
    ids=["teacher", "pipeline"])
def test_unset_padding_free_pads_where_it_is_not_checked(model, engine, keys):
    args = SimpleNamespace(engine=engine)  # a real pipeline config also needs a DeepSpeed launch
    for key, concatenate in (("padding_free", False), ("isolate_texts", True)):
        if key not in keys:
            data_args = DataArguments(task="causal-lm", concatenate_texts=concatenate)
            causal_lm.check_padding_free(ModelArguments(**model), data_args, args)
            assert getattr(data_args, key) is None  # left to the model check
            continue
        data_args = DataArguments(task="causal-lm", concatenate_texts=concatenate)
        causal_lm.check_padding_free(ModelArguments(**model), data_args, args)
        assert getattr(data_args, key) is False
        with pytest.raises(HftuneError, match=f"{key}: true cannot be used with"):
            causal_lm.check_padding_free(ModelArguments(**model), DataArguments(
                task="causal-lm", concatenate_texts=concatenate, **{key: True}), args)


@pytest.mark.slow
def test_zero3_trains_the_objective_of_one_process_on_packed_blocks(tiny_llama, tweet_jsonl, tmp_path):  # noqa: F811
    """The default blocks keep texts apart under ZeRO-3 too (the check runs on a 1-layer copy, not on
    the partitioned model): 2 processes give the 1-process losses step by step, and run_clm.py's
    blocks (isolate_texts: false) give other ones, so the comparison can tell the two apart."""
    from conftest import cli_flags, launch

    train, validation = tweet_jsonl

    def args(out, batch, **overrides):
        return cli_flags(dict(
            task="causal-lm", model_name_or_path=tiny_llama, train_file=train, validation_file=validation,
            text_column="text", output_dir=out, block_size=32, max_steps=4, per_device_train_batch_size=batch,
            learning_rate=1e-2, warmup_steps=0, logging_steps=1, seed=0, train_sampling_strategy="sequential",
            eval_strategy="no", save_strategy="no", do_eval="false", report_to="none", disable_tqdm="true"),
            overrides)

    result = launch("deepspeed_zero3.yaml", 2, args(tmp_path / "two", 4))
    assert "keeping texts apart would be inexact" not in result.stdout + result.stderr
    main(args(tmp_path / "one", 8))
    main(args(tmp_path / "blocks", 8, isolate_texts="false"))
    two, one, blocks = (logged_losses(tmp_path / name) for name in ("two", "one", "blocks"))
    assert len(two) == 4 and two == pytest.approx(one, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(one, blocks)) > 1e-3
