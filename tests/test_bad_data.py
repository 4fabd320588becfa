"""Bad rows and files: each stops the run before training with one line naming the file, column or
row and the fix, or is skipped and counted (`<split>_skipped_rows` in all_results.json); an error
never touches what output_dir already holds."""

import os

import pandas as pd
import pytest

from conftest import fail, read_json
from hftune.config import DataArguments, ModelArguments
from hftune.tasks import get_task

TEXTS = ["what a good day", "bad service", "it was ok", "great", "awful", "fine I guess"] * 4


def write_csv(path, **columns):
    pd.DataFrame(columns).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def run(tiny_bert, tmp_path):
    """`hftune` on the tiny BERT with a given train file; output_dir already holds an earlier run's file
    and overwrite_output_dir is on, so an error must leave it alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    validation = write_csv(tmp_path / "validation.csv", text=TEXTS[:6], label=[0, 1, 2] * 2)

    def command(train, *flags):
        return ["--model_name_or_path", tiny_bert, "--train_file", str(train), "--validation_file", validation,
                "--output_dir", str(out), "--overwrite_output_dir", "true", "--report_to", "none",
                "--max_steps", "1", "--per_device_train_batch_size", "4", "--disable_tqdm", "true", *flags]

    return command, out


def failed_cleanly(capsys, run, train, *flags):
    command, out = run
    line = fail(capsys, command(train, *flags))
    assert os.listdir(out) == ["earlier.txt"] and (out / "earlier.txt").read_text() == "keep me"
    return line


def test_empty_and_missing_texts_are_skipped_and_counted(run, tmp_path):
    from hftune.run import main

    texts = TEXTS[:-3] + [None, "", "   "]
    command, out = run
    main(command(write_csv(tmp_path / "t.csv", text=texts, label=[0, 1, 2] * 8)))
    results = read_json(out / "all_results.json")
    assert results["train_skipped_rows"] == 3 and results["train_samples"] == 21
    assert "validation_skipped_rows" not in results  # nothing skipped there
    assert (out / "earlier.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad, why", [(7, "ids [0, 1, 2, 7] are not consecutive"), (-1, "-1 marks unlabelled rows")])
def test_integer_label_out_of_range_names_the_row(bad, why, capsys, run, tmp_path):
    labels = [0, 1, 2] * 8
    labels[13] = bad
    line = failed_cleanly(capsys, run, write_csv(tmp_path / "t.csv", text=TEXTS, label=labels))
    assert f"label_column 'label' of the train split has label {bad} at row 13 ({why})" in line


def test_missing_label_names_the_row(capsys, run, tmp_path):
    labels = [0, 1, 2] * 8
    labels[5] = None
    line = failed_cleanly(capsys, run, write_csv(tmp_path / "t.csv", text=TEXTS, label=labels))
    assert "empty labels in the train split (first at row 5)" in line


def test_non_utf8_file_names_file_and_line(capsys, run, tmp_path):
    train = tmp_path / "latin1.csv"
    rows = [f"{t},{i % 3}" for i, t in enumerate(TEXTS)]
    rows[4] = "caf\xe9 au lait,1"
    train.write_bytes(("text,label\n" + "\n".join(rows) + "\n").encode("latin-1"))
    line = failed_cleanly(capsys, run, train)
    assert f"train_file '{train}' is not valid UTF-8: line 6 has byte 0xe9; re-encode" in line


def test_a_file_missing_the_label_column_names_key_and_split(capsys, run, tmp_path):
    """train.csv lacks the column validation.csv has: datasets' cast error becomes the column's key."""
    line = failed_cleanly(capsys, run, write_csv(tmp_path / "t.csv", text=TEXTS))
    assert "no label column (label or labels) among the train split's columns ['text']; set label_column" in line


def test_header_only_split(capsys, run, tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n")
    line = failed_cleanly(capsys, run, tmp_path / "t.csv")
    assert "train_file" in line and "has no rows" in line


def test_split_with_only_empty_texts(capsys, run, tmp_path):
    line = failed_cleanly(capsys, run, write_csv(tmp_path / "t.csv", text=[None, " "] * 3, label=[0, 1] * 3))
    assert "the train split has no usable row (every text is empty)" in line


def test_causal_lm_skips_and_counts_empty_texts(tiny_gpt, tmp_path):
    from datasets import Dataset, DatasetDict

    raw = DatasetDict(train=Dataset.from_dict({"text": TEXTS[:10] + ["", None, "  "]}),
                      validation=Dataset.from_dict({"text": TEXTS[:4]}))
    bundle = get_task("causal-lm").build(ModelArguments(tiny_gpt),
                                         DataArguments(task="causal-lm", concatenate_texts=False), raw)
    assert bundle.skipped_rows == {"train": 3, "validation": 0}
    assert len(bundle.train_dataset) == 10


def test_corrupt_image_is_skipped_and_non_rgb_images_converted(tiny_resnet, digits, tmp_path):
    """Grayscale, palette, RGBA and 16-bit images all reach the model as 3-channel pixels; a
    corrupt file and an empty one are skipped and counted."""
    from datasets import load_dataset

    modes = ["L", "P", "RGBA", "I;16", "RGB", "LA"]
    for split, count in (("train", 18), ("validation", 6)):
        for i, (image, name) in enumerate(digits[:count]):
            folder = tmp_path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.convert(modes[i % len(modes)]).save(folder / f"{i}.png")
    (tmp_path / "train" / "one" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    png = next((tmp_path / "train" / "two").glob("*.png"))
    (tmp_path / "train" / "two" / "truncated.png").write_bytes(png.read_bytes()[:60])
    raw = {split: load_dataset("imagefolder", data_dir=str(tmp_path / split), split="train")
           for split in ("train", "validation")}
    bundle = get_task("image-classification").build(ModelArguments(tiny_resnet),
                                                     DataArguments(task="image-classification"), raw)
    assert bundle.skipped_rows == {"train": 2, "validation": 0}
    assert len(bundle.train_dataset) == 18
    shapes = {tuple(bundle.train_dataset[i]["pixel_values"].shape) for i in range(18)}
    assert shapes == {(3, 32, 32)}
