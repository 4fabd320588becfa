"""`hftune evaluate` and `do_predict` on a saved model: metrics and predictions equal an independent
forward pass of the saved checkpoint; output_dir's model files are left as they were."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fail, read_json, write_tweet_split
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hftune.run import main

COMMON = ["--report_to=none", "--disable_tqdm=true", "--max_seq_length=48", "--per_device_train_batch_size=16",
          "--per_device_eval_batch_size=8", "--save_strategy=no", "--eval_strategy=no", "--learning_rate=3e-3"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def classifier(tiny_bert, tweets, tmp_path_factory):
    """A tiny BERT fine-tuned for 6 steps, plus a labelled and an unlabelled test file."""
    data = tmp_path_factory.mktemp("predict-data")
    train, validation = write_tweet_split(tweets, data, rows=200, train_rows=160)
    test = tweets.sample(n=30, random_state=1)[["text", "sentiment"]]
    test.to_csv(data / "test.csv", index=False)
    test[["text"]].iloc[:12].to_csv(data / "unlabelled.csv", index=False)
    out = tmp_path_factory.mktemp("predict-run") / "model"
    main([f"--model_name_or_path={tiny_bert}", f"--output_dir={out}", f"--train_file={train}",
          f"--validation_file={validation}", "--label_column=sentiment", "--max_steps=6", *COMMON])
    return out, data


def forward(model_dir, texts):
    """Logits of the saved classifier, one text at a time (no padding), as an independent reference."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, truncation=True, max_length=48, return_tensors="pt")).logits
                          for t in texts]).double()


def test_evaluate_on_test_and_predict_validation_match_a_forward_pass(classifier):
    out, data = classifier
    saved = {name: digest(out / name) for name in ("model.safetensors", "config.json", "hftune_config.yaml")}
    # Into the model's own folder, from the run's own resolved config: nothing of the run may change.
    main(["evaluate", "--config", str(out / "hftune_config.yaml"), "--model_name_or_path", str(out),
          "--test_file", str(data / "test.csv"), "--eval_split", "test", "--do_predict=true",
          "--predict_split=validation"])
    assert {name: digest(out / name) for name in saved} == saved

    test = pd.read_csv(data / "test.csv")
    names = AutoModelForSequenceClassification.from_pretrained(out).config.id2label
    logits = forward(out, test["text"])
    targets = torch.tensor([[v for v in names.values()].index(s) for s in test["sentiment"]])
    results = read_json(out / "test_results.json")
    assert results["test_samples"] == 30
    assert results["test_accuracy"] == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    assert results["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), abs=1e-5)

    validation = pd.read_csv(data / "validation.csv")
    predicted = rows(out / "predictions_validation.jsonl")
    assert len(predicted) == len(validation) == 40
    probabilities = torch.softmax(forward(out, validation["text"]), -1).numpy()
    for row, probs, text, truth in zip(predicted, probabilities, validation["text"], validation["sentiment"]):
        assert row["text"] == text and row["true_label"] == truth
        assert list(row["probabilities"]) == list(names.values())
        assert np.allclose(list(row["probabilities"].values()), probs, atol=1e-5)
        assert row["label"] == names[int(probs.argmax())] and row["score"] == pytest.approx(probs.max(), abs=1e-5)
    eval_results = read_json(out / "eval_results.json")  # the validation metrics came with the predictions
    assert eval_results["eval_accuracy"] == pytest.approx(np.mean([r["label"] == r["true_label"] for r in predicted]))


def test_predict_an_unlabelled_test_file(classifier, tmp_path):
    out, data = classifier
    main(["--config", str(out / "hftune_config.yaml"), "--model_name_or_path", str(out), "--output_dir",
          str(tmp_path), "--do_train=false", "--do_eval=false", "--do_predict=true",
          "--test_file", str(data / "unlabelled.csv")])
    predicted = rows(tmp_path / "predictions_test.jsonl")
    texts = pd.read_csv(data / "unlabelled.csv")["text"]
    assert [r["text"] for r in predicted] == list(texts) and all("true_label" not in r for r in predicted)
    expected = torch.softmax(forward(out, texts), -1).numpy()
    assert np.allclose([list(r["probabilities"].values()) for r in predicted], expected, atol=1e-5)
    assert not (tmp_path / "test_results.json").exists()  # nothing to score without labels


def test_evaluate_bad_input_is_one_line(classifier, tiny_bert, capsys, tmp_path):
    out, data = classifier
    base = ["evaluate", "--config", str(out / "hftune_config.yaml"), "--output_dir", str(tmp_path)]
    line = fail(capsys, base + ["--model_name_or_path", str(out), "--eval_split", "test"])
    assert "eval_split 'test' is not in the data (splits: train, validation)" in line
    line = fail(capsys, base + ["--model_name_or_path", str(out), "--eval_split", "dev"])
    assert "eval_split 'dev'" in line and "['train', 'validation', 'test']" in line
    line = fail(capsys, base + ["--model_name_or_path", str(tmp_path / "missing")])
    assert "is not a folder" in line and "missing" in line
    line = fail(capsys, base + ["--model_name_or_path", tiny_bert])  # not fine-tuned: its head would be random
    assert "predicts the labels ['LABEL_0', 'LABEL_1']" in line
    line = fail(capsys, base + ["--model_name_or_path", str(out), "--eval_split", "test",
                                "--test_file", str(data / "unlabelled.csv")])
    assert "eval_split 'test' has no labels" in line


@pytest.mark.slow
def test_causal_lm_predictions_are_greedy_continuations(tiny_gpt, tweets, tmp_path):
    train, validation = write_tweet_split(tweets, tmp_path, rows=120, train_rows=100)
    prompts = tweets.sample(n=4, random_state=2)[["text"]]
    prompts.to_csv(tmp_path / "prompts.csv", index=False)
    out = tmp_path / "lm"
    lm = [f"--train_file={train}", f"--validation_file={validation}", "--task=causal-lm", "--block_size=32",
          *COMMON, "--max_seq_length=128"]
    main([f"--model_name_or_path={tiny_gpt}", f"--output_dir={out}", "--max_steps=5", *lm])
    main(["evaluate", f"--model_name_or_path={out}", f"--output_dir={tmp_path / 'eval'}", *lm,
          "--do_eval=false", "--do_predict=true", f"--test_file={tmp_path / 'prompts.csv'}", "--max_new_tokens=6"])
    predicted = rows(tmp_path / "eval" / "predictions_test.jsonl")
    assert [r["prompt"] for r in predicted] == list(prompts["text"])
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    for row in predicted:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        assert row["generated"] == tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert read_json(tmp_path / "eval" / "test_results.json")["test_perplexity"] > 1
