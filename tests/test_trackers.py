"""report_to reaches the trackers: a real TensorBoard run (offline) logs the same train/eval
values that trainer_state.json records, under both engines; a bad tracker name fails first."""

import pytest
from conftest import fail, read_json, strategy_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hftune.run import main


def scalars(output_dir):
    """{tag: {step: value}} from every TensorBoard event file under output_dir."""
    found = {}
    for run in sorted(output_dir.glob("runs/*")):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return found


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_tensorboard_logs_what_trainer_state_records(engine, tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    main(strategy_args(tiny_bert, out, *tweets_csv, engine=engine, report_to="tensorboard", max_steps=6,
                       logging_steps=2, eval_strategy="steps", eval_steps=3, do_eval="true", max_eval_samples=24))
    logged = scalars(out)
    history = read_json(out / "trainer_state.json")["log_history"]
    train = {e["step"]: e["loss"] for e in history if "loss" in e}
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [3, 6]
    assert logged["train/loss"] == pytest.approx(train, rel=1e-6)  # TensorBoard stores float32
    assert {s: v for s, v in logged["eval/loss"].items() if s in evals} == pytest.approx(evals, rel=1e-6)
    accuracy = {e["step"]: e["eval_accuracy"] for e in history if "eval_accuracy" in e}
    assert {s: logged["eval/accuracy"][s] for s in accuracy} == pytest.approx(accuracy, rel=1e-6)


def test_unknown_tracker_is_refused_before_training(capsys, tiny_bert, tweets_csv, tmp_path):
    line = fail(capsys, strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, report_to="tensorbord"))
    assert "unknown report_to 'tensorbord'. Did you mean 'tensorboard'?" in line
    assert not (tmp_path / "out").exists()
