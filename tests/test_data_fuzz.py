"""Property: whatever rows a data file holds — texts and labels of any JSON type, empty, null, nested,
mixed — and whatever max_seq_length, a short real run either trains (a finite loss, a saved model)
or stops before writing anything with one clean `hftune: error:` line. Never a traceback, never a
run that ends with nothing learnt (loss 0 or nan)."""

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hftune.run import main

pytestmark = pytest.mark.slow  # 20 + 40 short real runs (~45 s)

# Each file picks one kind of text and of label (a plausible file), its rows now and then odd ones.
TEXTS = {"text": st.text(min_size=1, max_size=20), "number": st.integers(-5, 5) | st.floats(allow_nan=True),
         "list": st.lists(st.text(max_size=5), max_size=3), "odd": st.just("") | st.none() | st.booleans()}
LABELS = {"names": st.sampled_from(["pos", "neg", "mid"]), "ints": st.integers(0, 2),
          "floats": st.floats(-1, 1) | st.just(float("nan")), "lists": st.lists(st.sampled_from("ab"), max_size=2),
          "odd": st.none() | st.text(max_size=3) | st.integers(0, 2)}


def with_one_odd_cell(rows, odd):
    """rows with, where `odd` is given, one cell replaced by a value of any kind."""
    if odd is not None:
        row, field, value = odd
        rows[row % len(rows)][field] = value
    return rows


def rows_of_kinds(kinds):
    clean = st.lists(st.fixed_dictionaries({"text": TEXTS[kinds[0]], "label": LABELS[kinds[1]]}), min_size=4,
                     max_size=8)
    odd = st.none() | st.none() | st.none() | st.tuples(st.integers(0, 7), st.sampled_from(["text", "label"]),
                                st.one_of(*TEXTS.values(), *LABELS.values()))
    return st.builds(with_one_odd_cell, clean, odd)


rows_of_a_file = st.tuples(st.sampled_from(["text", "text", "text", "number", "list"]),
                           st.sampled_from(["names", "names", "ints", "floats", "lists"])).flatmap(rows_of_kinds)


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=rows_of_a_file,
       max_seq_length=st.sampled_from([32, 32, 32, 8, 3, 2, 1]))
def test_any_rows_train_or_stop_with_one_line_before_writing(rows, max_seq_length, tiny_bert, tmp_path_factory,
                                                              capsys):
    folder = tmp_path_factory.mktemp("fuzz")
    train = folder / "train.jsonl"
    train.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = folder / "out"
    argv = [f"--model_name_or_path={tiny_bert}", f"--train_file={train}", f"--output_dir={out}", "--max_steps=2",
            f"--max_seq_length={max_seq_length}", "--label_column=label", "--validation_split_percentage=0",
            "--eval_strategy=no", "--do_eval=false", "--report_to=none", "--disable_tqdm=true", "--logging_steps=1",
            "--per_device_train_batch_size=4"]
    try:
        main(argv)
    except SystemExit as stop:
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hftune: error:")]
        assert stop.code == 2 and len(errors) == 1, (rows, errors)
        assert not out.exists(), (rows, errors, os.listdir(out))
        return
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(loss) and loss > 0 for loss in losses), (rows, losses)
    assert (out / "model.safetensors").is_file()


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "type_vocab_size", "hidden_act", "model_type", "layer_norm_eps",
               "pad_token_id", "architectures"]
config_values = st.one_of(st.integers(-2, 4), st.sampled_from([0, 1, 7, 10**9]), st.floats(allow_nan=True),
                          st.text(max_size=6), st.none(), st.booleans(), st.lists(st.text(max_size=4), max_size=2))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, min_size=1, max_size=2))
def test_any_config_json_trains_or_stops_with_one_line(changes, tiny_bert, tweets, tmp_path_factory, capsys):
    """A checkpoint whose config.json says anything: the run trains, or one line names the problem
    before anything is written (a traceback from deep in transformers or torch is the failure)."""
    import shutil

    from conftest import write_tweet_split

    folder = tmp_path_factory.mktemp("config-fuzz")
    model = folder / "model"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    train, validation = write_tweet_split(tweets, folder, rows=40, train_rows=32)
    out = folder / "out"
    argv = [f"--model_name_or_path={model}", f"--train_file={train}", f"--validation_file={validation}",
            "--label_column=sentiment", f"--output_dir={out}", "--max_steps=1", "--max_seq_length=32",
            "--report_to=none", "--disable_tqdm=true", "--eval_strategy=no", "--do_eval=false"]
    try:
        main(argv)
    except SystemExit as stop:
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hftune: error:")]
        assert stop.code == 2 and len(errors) == 1, (changes, errors)
        assert not out.exists(), (changes, errors)
        return
    assert (out / "model.safetensors").is_file(), changes
