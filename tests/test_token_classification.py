"""token-classification: labels aligned to sub-tokens, seqeval's entity-level metrics, a run that
learns, the saved model in pipeline("token-classification"), task inference and bad input."""

import json
import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import AutoTokenizer, pipeline

from conftest import fail, read_json
from hftune.metrics import load_metric
from hftune.tasks.token_classification import IGNORE, align_labels, continuation_ids

NAMES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
PEOPLE = [["Ada", "Lovelace"], ["Alan", "Turing"], ["Grace", "Hopper"], ["Tim", "Berners-Lee"]]
PLACES = [["Paris"], ["New", "York"], ["Kathmandu"], ["Rio", "de", "Janeiro"]]


def sentences(n, seed=0):
    """Learnable rows: '<person> flew to <place> yesterday' with BIO tags (strings)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        words = person + ["flew", "to"] + place + ["yesterday"]
        tags = (["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O"] + ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
                + ["O"])
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_word_s_first_sub_token_carries_its_tag(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words, tags = ["Tim", "Berners-Lee", "visited", "Kathmandu"], [1, 2, 0, 3]
    encoded = tokenizer(words, is_split_into_words=True)
    word_ids = encoded.word_ids()
    assert len(word_ids) > len(words) + 2  # some words are several sub-tokens
    first = align_labels(word_ids, tags, False, continuation_ids(NAMES))
    every = align_labels(word_ids, tags, True, continuation_ids(NAMES))
    previous = None
    for position, word in enumerate(word_ids):
        if word is None:
            assert first[position] == every[position] == IGNORE
        elif word != previous:
            assert first[position] == every[position] == tags[word]
        else:
            assert first[position] == IGNORE
            assert every[position] == (4 if tags[word] == 3 else tags[word])  # B-LOC's continuation is I-LOC
        previous = word


def test_entity_scores_are_seqeval_s():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O", "B-PER"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "O", "B-PER"]]  # 2 of 4 entities exactly right
    scores = load_metric("seqeval").compute(predictions=predictions, references=references)
    assert scores["overall_precision"] == pytest.approx(2 / 3) == precision_score(references, predictions)
    assert scores["overall_recall"] == pytest.approx(0.5) == recall_score(references, predictions)
    assert scores["overall_f1"] == pytest.approx(f1_score(references, predictions))
    assert scores["overall_accuracy"] == pytest.approx(6 / 8)
    assert scores["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 2}


def test_a_run_learns_the_tags_and_the_model_loads_in_a_pipeline(tiny_bert, tmp_path):
    from hftune.run import main

    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_bert, "--train_file", write_jsonl(tmp_path / "train.jsonl", sentences(192)),
          "--validation_file", write_jsonl(tmp_path / "validation.jsonl", sentences(48, seed=1)),
          "--output_dir", str(out), "--num_train_epochs", "6", "--learning_rate", "5e-3", "--eval_strategy", "epoch",
          "--eval_on_start", "true", "--per_device_train_batch_size", "16", "--logging_steps", "4",
          "--return_entity_level_metrics", "true", "--report_to", "none", "--seed", "0", "--do_predict", "true",
          "--test_file", write_jsonl(tmp_path / "test.jsonl", sentences(16, seed=2))])
    assert "task: token-classification" in (out / "hftune_config.yaml").read_text()  # inferred from the columns
    history = read_json(out / "trainer_state.json")["log_history"]
    f1 = [e["eval_f1"] for e in history if "eval_f1" in e]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < 0.5 * losses[0] and f1[-1] > f1[0] + 0.5, (losses, f1)
    results = read_json(out / "all_results.json")
    assert {"eval_precision", "eval_recall", "eval_accuracy", "eval_PER_f1", "eval_LOC_f1"} <= set(results)
    predicted = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in predicted] == [r["tokens"] for r in sentences(16, seed=2)]  # in row order
    card = (out / "README.md").read_text()  # the model card: its Hub task, scores and usage
    assert "pipeline_tag: token-classification" in card and "| validation | f1 |" in card
    assert all(p["true_tags"] == r["ner_tags"] for p, r in zip(predicted, sentences(16, seed=2)))
    assert all(len(p["tags"]) == len(p["tokens"]) for p in predicted)
    assert sum(p["tags"] == p["true_tags"] for p in predicted) >= 12  # a tag per word, mostly right
    tagger = pipeline("token-classification", model=str(out), aggregation_strategy="simple")
    entities = tagger("Grace Hopper flew to Paris yesterday")
    assert [(e["entity_group"], e["word"]) for e in entities] == [("PER", "grace hopper"), ("LOC", "paris")]


def test_bad_input_is_one_line(tiny_bert, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    args = ["--model_name_or_path", tiny_bert, "--task", "token-classification", "--train_file", str(train),
            "--output_dir", str(tmp_path / "out"), "--validation_split_percentage", "0", "--do_eval", "false"]
    write_jsonl(train, [{"tokens": "Ada flew", "ner_tags": ["B-PER", "O"]}] * 4)
    assert "text_column 'tokens' holds str, not a list of words" in fail(capsys, args)
    write_jsonl(train, [{"words": ["Ada"], "ner_tags": ["B-PER"]}, {"words": ["to"], "ner_tags": [0]}] * 2)
    assert "label_column 'ner_tags' mixes ['int', 'str'] tags" in fail(capsys, args)
    write_jsonl(train, [{"sentence": "Ada flew", "tag": "x"}] * 4)
    assert "no text column (tokens or words)" in fail(capsys, args)


def test_run_ner_command_runs_as_written(tiny_bert, tmp_path):
    """run_ner.py's test command shape (its column names, label_all_tokens), hftune/run.py in its place."""
    from hftune.run import main

    rows = [{"words": r["tokens"], "tags": r["ner_tags"]} for r in sentences(32)]
    out = tmp_path / "ner-run"
    main(["--model_name_or_path", tiny_bert, "--train_file", write_jsonl(tmp_path / "train.json", rows),
          "--validation_file", write_jsonl(tmp_path / "dev.json", rows[:8]), "--text_column_name", "words",
          "--label_column_name", "tags", "--task", "token-classification", "--label_all_tokens", "true",
          "--do_train", "--do_eval", "--max_steps", "4", "--per_device_train_batch_size", "8",
          "--output_dir", str(out)])
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 8 and 0 <= results["eval_f1"] <= 1
    config = read_json(out / "config.json")
    assert sorted(config["id2label"].values()) == sorted(NAMES)


def test_a_student_learns_the_tags_from_its_teacher_alone(tiny_bert, tmp_path):
    """Token-level distillation with distill_alpha 0: the student never sees a label's class, only the
    teacher's tag distribution at each labelled sub-token, and still learns to tag."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", sentences(128))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentences(32, seed=1))
    common = ["--task", "token-classification", "--train_file", train, "--validation_file", validation,
              "--num_train_epochs", "4", "--learning_rate", "5e-3", "--per_device_train_batch_size", "16",
              "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "4"]
    main(["--model_name_or_path", tiny_bert, "--output_dir", str(tmp_path / "teacher"), *common])
    main(["--model_name_or_path", tiny_bert, "--output_dir", str(tmp_path / "student"), *common,
          "--teacher_model_name_or_path", str(tmp_path / "teacher"), "--distill_alpha", "0"])
    teacher, student = (read_json(tmp_path / name / "all_results.json")["eval_f1"] for name in ("teacher", "student"))
    assert teacher > 0.8 and student > 0.6, (teacher, student)
    history = read_json(tmp_path / "student" / "trainer_state.json")["log_history"]
    distilled = [e["distill_loss"] for e in history if "distill_loss" in e]
    assert distilled and distilled[-1] < 0.5 * distilled[0], distilled


def test_token_distillation_counts_only_labelled_sub_tokens(tiny_bert):
    """The KL is taken where labels are not -100 (first sub-tokens; no [CLS], [SEP], padding): a student
    that differs from its teacher only elsewhere has no distillation loss."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForTokenClassification

    from hftune.compression.distillation import distiller_for

    teacher = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=len(NAMES))
    distiller = distiller_for(teacher, SimpleNamespace(distill_alpha=0.0, distill_temperature=1.0),
                              SimpleNamespace(state=SimpleNamespace(), device="cpu"))
    inputs = dict(AutoTokenizer.from_pretrained(tiny_bert)(["Ada flew to Kathmandu"], return_tensors="pt"))
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    labels[0, 1:3] = 1
    with torch.no_grad():
        student = teacher(**inputs).logits.clone()
    student[labels == IGNORE] += torch.randn_like(student[labels == IGNORE]) * 10  # differs only where unlabelled
    assert distiller.mix(torch.tensor(0.0), student, inputs, labels).item() == pytest.approx(0.0, abs=1e-6)
    student[0, 1, 0] += 5.0  # one labelled position, one tag
    assert distiller.mix(torch.tensor(0.0), student, inputs, labels).item() > 0.01


def test_lora_trains_the_adapters_and_saves_the_tag_head(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    from hftune.run import main

    out = tmp_path / "lora"
    main(["--model_name_or_path", tiny_bert, "--task", "token-classification", "--peft", "lora",
          "--train_file", write_jsonl(tmp_path / "train.jsonl", sentences(32)), "--validation_split_percentage", "0",
          "--do_eval", "false", "--max_steps", "3", "--output_dir", str(out)])
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lora_" in name for name in saved) and any("classifier" in name for name in saved)
    assert read_json(out / "adapter_config.json")["task_type"] == "TOKEN_CLS"


def test_class_label_tags_keep_their_names_and_order(tiny_bert, tmp_path):
    """Tags stored as a ClassLabel sequence (as the Hub's conll2003 stores them): the head follows the
    ClassLabel's names and order, not the sorted strings."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    from hftune.run import main

    order = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # not sorted
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=order))})
    rows = [{"tokens": r["tokens"], "ner_tags": [order.index(t) for t in r["ner_tags"]]} for r in sentences(16)]
    Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_bert, "--train_file", str(tmp_path / "train.parquet"), "--max_steps", "1",
          "--validation_split_percentage", "0", "--do_eval", "false", "--output_dir", str(out), "--report_to", "none"])
    assert [read_json(out / "config.json")["id2label"][str(i)] for i in range(5)] == order


def test_resume_continues_exactly(tiny_bert, tmp_path):
    from conftest import run_engine
    from test_sft import trained_weights

    train = write_jsonl(tmp_path / "train.jsonl", sentences(48))
    flags = ["--model_name_or_path", tiny_bert, "--train_file", train, "--validation_split_percentage", "0",
             "--do_eval", "false", "--max_steps", "6", "--per_device_train_batch_size", "8", "--learning_rate",
             "5e-3", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none", "--seed", "0"]
    run_engine([*flags, "--output_dir", str(tmp_path / "whole")])
    run_engine([*flags, "--output_dir", str(tmp_path / "resumed"),
                "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-3")])
    whole, resumed = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "resumed")
    checkpoint = trained_weights(tmp_path / "whole" / "checkpoint-3")
    assert max((whole[k] - checkpoint[k]).abs().max().item() for k in whole) > 1e-3
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
@pytest.mark.slow
def test_two_processes_equal_one_process(config, tiny_bert, tmp_path):
    """2 processes x 4 rows = 1 process x 8 rows (SGD), under DDP, ZeRO-3 and FSDP. The loss is each micro-batch's mean over its labelled
    tokens, as run_ner.py's: equal only where every micro-batch labels as many tokens, so rows of 6 words."""
    from conftest import launch, logged_losses, run_engine
    from test_sft import trained_weights

    rows = [r for r in sentences(64) if len(r["tokens"]) == 6][:32]  # one length: equal token counts per row
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    flags = ["--model_name_or_path", tiny_bert, "--task", "token-classification", "--train_file", train,
             "--validation_split_percentage", "0", "--do_eval", "false", "--max_steps", "4", "--optim", "sgd",
             "--learning_rate", "0.5", "--train_sampling_strategy", "sequential", "--logging_steps", "1",
             "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"]
    launch(config, 2, [*flags, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two")])
    run_engine([*flags, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    two, one = trained_weights(tmp_path / "two"), trained_weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4
