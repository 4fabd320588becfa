"""Regression and multi-label classification (hftune.tasks.labels), as run_classification.py does them:
float labels regress (one output, MSE), list labels are multi-label (a sigmoid per label, BCE), for text
(tiny BERT, real tweets with a score and tags derived from their words) and images (tiny ResNet on
generated pictures of coloured squares). Each run must learn, write its predictions, and save a model
that transformers.pipeline scores with the right activation; every bad label column is one line."""

import contextlib
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, List, Value
from PIL import Image
from sklearn.metrics import f1_score
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import cli_flags, fail, launch, logged_losses, read_json, tiny_model
from hftune.config import DataArguments, ModelArguments
from hftune.errors import HftuneError
from hftune.metrics import load_metric
from hftune.run import main
from hftune.tasks import image_classification, text_classification
from hftune.tasks.labels import MULTI, REGRESSION, SINGLE, detect_labels

# tag -> the string whose presence in a tweet sets it; the score weighs the same strings
TAGS = {"question": "?", "exclamation": "!", "link": "http", "hashtag": "#"}
WEIGHTS = {"question": 1.5, "exclamation": 1.0, "link": 0.5, "hashtag": 0.25}
STEPS = 30  # text regression; multi-label and images take 60 (tiny models, seconds a run)
COLORS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A seeded tiny BERT (the shared tiny_bert's weights depend on test order), so every number here repeats."""
    return tiny_model(tmp_path_factory.mktemp("bert"), "bert", seed=0)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("resnet"), "resnet", seed=0)


@pytest.fixture(scope="module")
def tagged(tweets):
    """400 real tweets with a learnable float `score` and a list of `tags` (often empty), both from their words."""
    sample = tweets.sample(n=400, random_state=0).reset_index(drop=True)
    has = {tag: sample.text.str.contains(mark, regex=False) for tag, mark in TAGS.items()}
    sample["score"] = sum(WEIGHTS[tag] * has[tag].astype(float) for tag in TAGS)
    sample["tags"] = [[tag for tag in TAGS if has[tag][i]] for i in range(len(sample))]
    return sample


def write_splits(frame, folder, columns, suffix, train_rows=320):
    """folder/train.<suffix>, folder/validation.<suffix> with `columns` (csv, or jsonl, which holds lists)."""
    paths = folder / f"train.{suffix}", folder / f"validation.{suffix}"
    for part, path in zip((frame.iloc[:train_rows], frame.iloc[train_rows:]), paths):
        if suffix == "csv":
            part[columns].to_csv(path, index=False)
        else:
            part[columns].to_json(path, orient="records", lines=True)
    return paths


def run(model, out, train, validation, **extra):
    """A logged run evaluated before and after training, predicting the validation split; its stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(cli_flags(dict(
            model_name_or_path=model, output_dir=out, train_file=train, validation_file=validation,
            do_predict="true", predict_split="validation", report_to="none", max_steps=STEPS, logging_steps=1,
            per_device_train_batch_size=16, disable_tqdm="true", warmup_steps=0, eval_strategy="steps",
            eval_steps=extra.get("max_steps", STEPS), eval_on_start="true", save_strategy="no"), extra))
    return stdout.getvalue()


def text_run(model, out, train, validation, label, **extra):
    return run(model, out, train, validation, label_column=label, max_seq_length=32, learning_rate=1e-2, **extra)


def evaluations(out):
    """(eval metrics of the untrained model, of the trained one)."""
    evals = [e for e in read_json(out / "trainer_state.json")["log_history"] if "eval_loss" in e]
    return evals[0], evals[-1]


def predictions(out, split="validation"):
    return [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines()]


def loss_fell(out, by):
    losses = logged_losses(out)
    return np.mean(losses[-5:]) < np.mean(losses[:5]) - by, losses


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def best_constant_f1(label_sets, names):
    """The micro-F1 of the best answer that ignores the input (the same label set for every row): what a
    model that learned only how often each label occurs gets."""
    truth = [[int(n in labels) for n in names] for labels in label_sets]
    answers = [[(i >> k) & 1 for k in range(len(names))] for i in range(1, 2 ** len(names))]
    return max(f1_score(truth, [answer] * len(truth), average="micro") for answer in answers)


# ---- text ----


@pytest.fixture(scope="module")
def text_regression(bert, tagged, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-regression")
    train, validation = write_splits(tagged, folder, ["text", "score"], "csv")
    out = folder / "out"
    # the validation file again as test_file: a labelled test split is predicted and scored too
    stdout = text_run(bert, out, train, validation, "score", test_file=validation, predict_split="test")
    return out, stdout, tagged.iloc[320:]


def test_text_regression_learns_the_score(text_regression):
    out, stdout, validation = text_regression
    config = AutoConfig.from_pretrained(out)
    assert (config.problem_type, config.num_labels) == ("regression", 1)
    fell, losses = loss_fell(out, 0.15)
    assert fell, losses
    before, after = evaluations(out)
    assert after["eval_pearson"] > max(before["eval_pearson"], 0) + 0.5, (before, after)
    assert after["eval_spearman"] > before["eval_spearman"] + 0.5
    # better than the best constant answer (the mean score), whose MSE is the scores' variance
    assert after["eval_mse"] < 0.6 * np.var(validation.score), (after, np.var(validation.score))
    results = read_json(out / "all_results.json")
    assert results["eval_rmse"] == pytest.approx(np.sqrt(results["eval_mse"]))
    assert results["eval_mse"] == pytest.approx(results["eval_loss"], rel=1e-4)  # the loss is the MSE
    assert "accuracy" not in json.dumps(results)
    assert f"eval_pearson = {results['eval_pearson']:.4f} on 80 validation examples" in stdout


def test_text_regression_predictions_and_pipeline_give_the_raw_score(text_regression):
    out, _, validation = text_regression
    rows = predictions(out, "test")
    assert list(rows[0]) == ["index", "text", "score", "true_score"]
    assert [r["true_score"] for r in rows] == validation.score.tolist()
    results = read_json(out / "all_results.json")
    scores = np.array([r["score"] for r in rows])
    assert np.mean((scores - validation.score.values) ** 2) == pytest.approx(results["test_mse"], rel=1e-4)
    pipe = pipeline("text-classification", model=str(out), device="cpu")
    piped = pipe(validation.text.tolist()[:16], truncation=True, max_length=32)
    assert {p["label"] for p in piped} == {"LABEL_0"}
    # no sigmoid: the pipeline's score is the regression output itself, as the predictions file has it
    assert [p["score"] for p in piped] == pytest.approx(scores[:16].tolist(), abs=1e-4)
    assert results["test_pearson"] == pytest.approx(results["eval_pearson"])  # the same rows


def test_text_regression_card_names_the_problem_and_its_metrics(text_regression):
    out, _, _ = text_regression
    card = (out / "README.md").read_text()
    assert "Problem type: **regression** of `score`" in card
    for metric in ("mse", "rmse", "pearson", "spearman"):
        assert f"| validation | {metric} |" in card
    assert "accuracy" not in card and "multi-label" not in card


def test_evaluating_the_regression_model_on_classes_is_refused(text_regression, tweets_csv, capsys):
    out, _, _ = text_regression
    train, validation = tweets_csv
    error = fail(capsys, ["evaluate", "--model_name_or_path", str(out), "--train_file", str(train),
                          "--validation_file", str(validation), "--label_column", "sentiment",
                          "--output_dir", str(out.parent / "eval"), "--report_to", "none"])
    assert "has a head for regression, the data asks for single-label classes" in error


@pytest.mark.slow
def test_text_multi_label_learns_the_tags(bert, tagged, tmp_path):
    train, validation = write_splits(tagged, tmp_path, ["text", "tags"], "jsonl")
    out = tmp_path / "out"
    stdout = text_run(bert, out, train, validation, "tags", max_steps=60)
    config = AutoConfig.from_pretrained(out)
    assert config.problem_type == "multi_label_classification"
    assert list(config.id2label.values()) == sorted(TAGS)
    fell, losses = loss_fell(out, 0.05)
    assert fell, losses
    before, after = evaluations(out)
    assert after["eval_f1_micro"] > before["eval_f1_micro"] + 0.3, (before, after)
    assert after["eval_f1_macro"] > before["eval_f1_macro"] + 0.2, (before, after)
    # it read the texts: no answer blind to them (e.g. always "hashtag") scores as well
    assert after["eval_f1_micro"] > best_constant_f1(tagged.tags.iloc[320:], sorted(TAGS)) + 0.05, after
    assert "eval_f1_micro =" in stdout

    rows, expected = predictions(out), tagged.tags.iloc[320:].tolist()
    assert list(rows[0]) == ["index", "text", "labels", "probabilities", "true_labels"]
    assert [sorted(r["true_labels"]) for r in rows] == [sorted(t) for t in expected]
    assert any(not t for t in expected)  # rows without any tag: an empty list is a row with no label
    for row in rows:
        assert row["labels"] == [name for name, p in row["probabilities"].items() if p > 0.5]
    # the reported metric is the micro-F1 of exactly these predictions
    indicator = lambda names: [int(n in names) for n in sorted(TAGS)]  # noqa: E731
    f1 = f1_score([indicator(r["true_labels"]) for r in rows], [indicator(r["labels"]) for r in rows], average="micro")
    results = read_json(out / "all_results.json")
    assert results["eval_f1_micro"] == pytest.approx(f1)
    assert {"eval_f1_macro", "eval_subset_accuracy"} <= set(results) and "eval_accuracy" not in results

    pipe = pipeline("text-classification", model=str(out), device="cpu", top_k=None)
    piped = pipe(tagged.text.iloc[320:336].tolist(), truncation=True, max_length=32)
    for row, scores in zip(rows, piped):  # sigmoid per label: each the row's probability, not summing to 1
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(row["probabilities"], abs=1e-4)
    assert any(abs(sum(s["score"] for s in scores) - 1) > 0.05 for scores in piped)
    card = (out / "README.md").read_text()
    assert "Problem type: **multi-label classification** of `tags` over 4 labels" in card
    assert "| validation | f1_micro |" in card and "| validation | accuracy |" not in card


# ---- images ----


def square_images(folder, count, kind, seed):
    """Noisy 32-px pictures with coloured squares. multi-label: 2-3 of COLORS, labelled with their names;
    regression: one red square, scored by its area."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        if kind == "multi-label":
            label = sorted(rng.choice(list(COLORS), int(rng.integers(2, 4)), replace=False).tolist())
            sizes = {name: int(rng.integers(7, 12)) for name in label}
        else:
            sizes = {"red": int(rng.integers(4, 17))}
            label = sizes["red"] ** 2 / 100
        for name, size in sizes.items():
            x, y = rng.integers(0, 32 - size, 2)
            pixels[y:y + size, x:x + size] = COLORS[name]
        path = folder / f"{seed}-{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"image": str(path), "label": label})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["multi-label", "regression"])
@pytest.mark.slow
def test_image_regression_and_multi_label_learn(kind, resnet, tmp_path):
    frames = square_images(tmp_path, 160, kind, seed=0), square_images(tmp_path, 64, kind, seed=1)
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    for frame, path in zip(frames, (train, validation)):
        frame.to_json(path, orient="records", lines=True)
    out = tmp_path / "out"
    run(resnet, out, train, validation, config="image_classification", learning_rate=5e-3, max_steps=60)

    model = AutoModelForImageClassification.from_pretrained(out)
    fell, losses = loss_fell(out, 0.1)
    assert fell, losses
    before, after = evaluations(out)
    rows = predictions(out)
    images = [Image.open(path) for path in frames[1].image[:8]]
    with torch.no_grad():
        logits = model(**AutoImageProcessor.from_pretrained(out)(images, return_tensors="pt")).logits.numpy()
    pipe = pipeline("image-classification", model=str(out), device="cpu", top_k=None)
    piped = pipe(images)
    if kind == "multi-label":
        assert model.config.problem_type == "multi_label_classification"
        assert list(model.config.id2label.values()) == sorted(COLORS)
        assert after["eval_f1_micro"] > before["eval_f1_micro"] + 0.3, (before, after)
        assert after["eval_f1_micro"] > best_constant_f1(frames[1].label, sorted(COLORS)) + 0.05, after
        assert [r["true_labels"] for r in rows] == frames[1].label.tolist()
        for row, scores, row_logits in zip(rows, piped, logits):
            assert {s["label"]: s["score"] for s in scores} == pytest.approx(row["probabilities"], abs=1e-4)
            expected = dict(zip(sorted(COLORS), sigmoid(row_logits)))
            assert {s["label"]: s["score"] for s in scores} == pytest.approx(expected, abs=1e-5)
    else:
        assert (model.config.problem_type, model.config.num_labels) == ("regression", 1)
        assert after["eval_pearson"] > max(before["eval_pearson"], 0) + 0.5, (before, after)
        assert after["eval_mse"] < 0.5 * np.var(frames[1].label), after
        assert list(rows[0]) == ["index", "score", "true_score"]
        assert [r["true_score"] for r in rows] == pytest.approx(frames[1].label.tolist())
        assert [p[0]["score"] for p in piped] == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
        assert [p[0]["score"] for p in piped] == pytest.approx([r["score"] for r in rows[:8]], abs=1e-4)


# ---- detection and refusals (no training) ----


def splits(train, validation=None, feature=None):
    data = {"train": Dataset.from_dict({"label": train})}
    if validation is not None:
        data["validation"] = Dataset.from_dict({"label": validation})
    if feature is not None:
        data = {split: ds.cast_column("label", feature) for split, ds in data.items()}
    return DatasetDict(data)


def test_label_kinds_are_detected_from_the_train_values():
    assert detect_labels(splits([0.5, 3.25, 1.0]), "label").kind == REGRESSION
    assert detect_labels(splits(["b", "a", "b"]), "label").names == ["a", "b"]
    assert detect_labels(splits([1, 0, 1]), "label").kind == SINGLE
    labels = detect_labels(splits([[], ["sports"], ["politics", "sports"]], [["sports"], []]), "label")
    assert (labels.kind, labels.names) == (MULTI, ["politics", "sports"])
    assert labels.head()["problem_type"] == MULTI and labels.head()["id2label"] == {0: "politics", 1: "sports"}
    # ids are accepted and sorted as numbers; a ClassLabel inside the lists keeps its own order
    assert detect_labels(splits([[10, 2], [1]]), "label").names == ["1", "2", "10"]
    named = splits([[1], [0, 1]], feature=List(ClassLabel(names=["zebra", "ant"])))
    labels = detect_labels(named, "label")
    assert labels.names == ["zebra", "ant"]
    assert labels.encoder("train", named["train"].features["label"])([[1], [0, 1], []]) == [
        [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    # do_regression: true regresses on integer scores; false keeps a few decimal values as classes
    assert detect_labels(splits([1, 5, 3]), "label", do_regression=True).kind == REGRESSION
    assert detect_labels(splits([0.5, 1.0, 1.5]), "label", do_regression=False).names == ["0.5", "1.0", "1.5"]
    assert detect_labels(splits([0.5, 1.5], [1.0]), "label").encoder("validation", Value("float64"))([1.0]) == [1.0]


def test_build_sets_the_head_before_any_forward(bert, resnet):
    """problem_type is in the config the task builds (transformers would only infer it at the first forward):
    what evaluating a saved model, the pipeline engine and the saved config rely on."""
    train = Dataset.from_dict({"text": ["a b", "c d", "e f"], "label": [["x"], ["y", "x"], []]})
    validation = Dataset.from_dict({"text": ["g h", "i j"], "label": [[0], [1, 0]]}).cast_column(
        "label", List(ClassLabel(names=["y", "x"])))  # its own ids: matched to train's labels by name
    data_args = DataArguments(task="text-classification", text_column="text", label_column="label")
    bundle = text_classification.build(ModelArguments(bert), data_args, DatasetDict(train=train, validation=validation))
    config = bundle.model.config
    assert (config.problem_type, config.id2label, bundle.main_metric) == (MULTI, {0: "x", 1: "y"}, "eval_f1_micro")
    assert [bundle.eval_dataset[i]["labels"] for i in range(2)] == [[0.0, 1.0], [1.0, 1.0]]
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    raw = DatasetDict(train=Dataset.from_dict({"image": images, "label": [1, 4, 2, 5]}))  # integer scores
    data_args = DataArguments(task="image-classification", image_column="image", label_column="label",
                              do_regression=True)
    bundle = image_classification.build(ModelArguments(resnet), data_args, raw)
    config = bundle.model.config
    assert (config.problem_type, config.num_labels, bundle.main_metric) == (REGRESSION, 1, "eval_pearson")
    batch = bundle.data_collator([bundle.train_dataset[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 4.0, 2.0, 5.0]
    assert bundle.model(**batch).loss.item() > 0  # MSE on the scores


def test_a_streamed_train_split_takes_the_labels_from_validation():
    raw = splits([["b"], ["a", "c"]], [["a"], ["c", "b"]])
    raw = {"train": raw["train"].to_iterable_dataset(), "validation": raw["validation"]}
    labels = detect_labels(raw, "label")
    assert (labels.kind, labels.names) == (MULTI, ["a", "b", "c"])
    with pytest.raises(HftuneError, match=r"train split has label 'd', not one of the classes"):
        labels.encoder("train", raw["train"].features["label"])([["d"]])
    with pytest.raises(HftuneError, match=r"no label \(None\) in a batch \(row 1 of it\)"):
        labels.encoder("train", raw["train"].features["label"])([["a"], None])


REFUSED = {
    "lists with do_regression": (dict(train=[["a"], ["b"]]), dict(do_regression=True),
                                 "do_regression: true, but label_column 'label' holds lists of labels"),
    "None among lists": (dict(train=[["a"], [], None, ["b"]]), {},
                         r"label_column 'label' of the train split has no label \(None\) at row 2"),
    "None inside a list": (dict(train=[["a"], ["b", None]]), {},
                           r"has an empty label \(None\) in \['b', None\] at row 1"),
    "unseen validation label": (dict(train=[["a"], ["b"]], validation=[["a", "c"]]), {},
                                r"the validation split has label\(s\) \['c'\] that never occur in train"),
    "only empty lists": (dict(train=[[], []]), {}, "holds only empty lists"),
    "None score": (dict(train=[0.5, None, 1.5]), {}, "has no label at row 1 .regression needs a score"),
    "unseen validation None score": (dict(train=[0.5, 1.5], validation=[None]), {},
                                     "label_column 'label' of the validation split has no label at row 0"),
    "text with do_regression": (dict(train=["low", "high"]), dict(do_regression=True),
                                "holds 'low' at row 0, not a number; drop do_regression"),
    "constant score": (dict(train=[2.5, 2.5]), {}, "the single score 2.5 on every row"),
    "a score with do_regression false": (dict(train=[i / 7 for i in range(30)]), dict(do_regression=False),
                                         "do_regression: false, but label_column 'label' holds 30 distinct decimal"),
    "lists written to csv": (dict(train=["['a', 'b']", "['a']"]), {}, "text that looks like lists"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_label_columns_are_refused(case):
    columns, options, message = REFUSED[case]
    with pytest.raises(HftuneError, match=message):
        detect_labels(splits(**columns), "label", **options)


def test_mixed_list_and_single_labels_are_one_line(bert, tmp_path, capsys):
    """JSON lines mixing lists and single labels load as a Json column; the error names the odd row."""
    rows = [{"text": "a b", "label": ["x"]}, {"text": "c d", "label": "x"}, {"text": "e f", "label": []}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    error = fail(capsys, ["--model_name_or_path", bert, "--train_file", str(tmp_path / "train.jsonl"),
                          "--validation_split_percentage", "0", "--output_dir", str(tmp_path / "out"),
                          "--report_to", "none", "--do_eval", "false", "--eval_strategy", "no"])
    assert "column 'label' of the train split mixes value types: row 0 holds a list, row 1 a string ('x')" in error


def test_do_regression_and_its_companions_are_refused_where_they_cannot_apply(bert, tweets_csv, tmp_path, capsys):
    train, validation = tweets_csv
    base = ["--model_name_or_path", bert, "--train_file", str(train), "--validation_file", str(validation),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--label_column", "sentiment"]
    assert "do_regression does not apply to task causal-lm" in fail(
        capsys, base + ["--task", "causal-lm", "--do_regression", "true"])
    assert "label_smoothing_factor smooths class targets, and do_regression: true has none" in fail(
        capsys, base + ["--do_regression", "true", "--label_smoothing_factor", "0.1"])
    assert re.search(r"label_column 'sentiment' of the train split holds '\w+' at row 0, not a number",
                     fail(capsys, base + ["--do_regression", "true"]))


def test_distillation_is_refused_for_scores_and_label_lists(bert):
    raw = DatasetDict(train=Dataset.from_dict({"text": ["a b", "c d"], "label": [0.5, 1.5]}))
    data_args = DataArguments(task="text-classification", text_column="text", label_column="label")
    with pytest.raises(HftuneError, match="distillation matches the teacher's softmax over classes, which regression"):
        text_classification.build(ModelArguments(bert, teacher_model_name_or_path=bert), data_args, raw)
    raw = DatasetDict(train=Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [["a"], []]}))
    data_args = DataArguments(task="image-classification", image_column="image", label_column="label")
    with pytest.raises(HftuneError, match="which multi-label classification .label_column 'label'. does not"):
        image_classification.build(ModelArguments(bert, teacher_model_name_or_path=bert), data_args, raw)


# ---- metric modules ----


def test_metric_modules_wrap_scipy_and_sklearn():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, mean_squared_error

    rng = np.random.default_rng(0)
    predictions, references = rng.normal(size=50), rng.normal(size=50)
    assert load_metric("mse").compute(predictions=predictions, references=references)["mse"] == pytest.approx(
        mean_squared_error(references, predictions), rel=1e-6)
    assert load_metric("mse").compute(predictions=predictions, references=references, squared=False)["mse"] == \
        pytest.approx(np.sqrt(mean_squared_error(references, predictions)), rel=1e-6)
    assert load_metric("pearsonr").compute(predictions=predictions, references=references)["pearsonr"] == \
        pytest.approx(pearsonr(references, predictions)[0], rel=1e-5)
    assert load_metric("spearmanr").compute(predictions=predictions, references=references)["spearmanr"] == \
        pytest.approx(spearmanr(references, predictions)[0], rel=1e-5)
    hot, truth = rng.integers(0, 2, (40, 5)), rng.integers(0, 2, (40, 5))
    for average in ("micro", "macro"):
        assert load_metric("f1", "multilabel").compute(predictions=hot, references=truth, average=average)["f1"] == \
            pytest.approx(f1_score(truth, hot, average=average))
    one_wrong = np.vstack([hot[:3], 1 - hot[3:4]])  # the 4th row's label set differs
    subset = load_metric("accuracy", "multilabel").compute(predictions=hot[:4], references=one_wrong)
    assert subset["accuracy"] == 0.75 == accuracy_score(one_wrong, hot[:4])


def test_a_missing_metric_library_stops_the_run_before_training(monkeypatch):
    """scipy / scikit-learn are not hftune dependencies of single-label runs: name them, up front."""
    from hftune.tasks import labels

    real = labels.importlib.util.find_spec
    monkeypatch.setattr(labels.importlib.util, "find_spec", lambda name: None if name == "scipy" else real(name))
    with pytest.raises(HftuneError, match="regression and multi-label metrics need scipy; pip install scipy"):
        labels.Labels(REGRESSION, [], "score").metrics()


# ---- distributed ----


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches; GPU runs are separate")
@pytest.mark.parametrize("kind", ["regression", "multi-label"])
def test_two_processes_match_one(kind, bert, tagged, tmp_path):
    """DDP over 2 processes x 8 examples = 1 process x 16: the same per-step losses (MSE / BCE are means)."""
    column, suffix = ("score", "csv") if kind == "regression" else ("tags", "jsonl")
    train, validation = write_splits(tagged, tmp_path, ["text", column], suffix)
    args = ["--model_name_or_path", bert, "--train_file", train, "--validation_file", validation, "--label_column",
            column, "--report_to", "none", "--max_seq_length", "32", "--max_steps", "4", "--logging_steps", "1",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--disable_tqdm", "true", "--seed", "7",
            "--train_sampling_strategy", "sequential", "--do_eval", "false", "--eval_strategy", "no",
            "--save_strategy", "no"]
    launch("single_device.yaml", 1, args + ["--per_device_train_batch_size", "16"], output_dir=tmp_path / "one")
    launch("ddp.yaml", 2, args + ["--per_device_train_batch_size", "8"], output_dir=tmp_path / "two")
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 4 and len(set(one)) > 1
    assert two == pytest.approx(one, abs=1e-5)
    assert AutoConfig.from_pretrained(tmp_path / "two").problem_type == (
        "regression" if kind == "regression" else "multi_label_classification")
