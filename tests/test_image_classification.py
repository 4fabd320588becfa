"""image-classification end to end on a tiny ResNet saved locally and real 8x8 digit scans
(scikit-learn's load_digits), written as an image folder, parquet bytes and jsonl paths."""

import io
import json
import pickle

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from conftest import CLASSES, SIZE, cli_flags, logged_losses, read_json
from hftune import assets
from hftune.config import DataArguments, ModelArguments
from hftune.errors import HftuneError
from hftune.run import main
from hftune.tasks import image_classification



@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HFTUNE_ASSETS_CACHE", str(tmp_path / "assets"))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_args(model, out, **extra):
    return cli_flags(dict(config="image_classification", model_name_or_path=model, output_dir=out,
                          report_to="none", logging_steps=1, per_device_train_batch_size=16, learning_rate=5e-3,
                          warmup_steps=0, disable_tqdm="true"), extra)


def test_image_folder_train_save_and_reload(tiny_resnet, digit_folders, tmp_path):
    train, validation = digit_folders
    out = tmp_path / "out"
    main(run_args(tiny_resnet, out, train_file=train, validation_file=validation, num_train_epochs=3))

    losses = logged_losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses  # it learned something
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 60 and results["eval_accuracy"] > 0.5  # chance: 1/3

    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "one", 1: "two", 2: "zero"}  # the folder names, sorted
    assert model.config.label2id == {"one": 0, "two": 1, "zero": 2}
    gray = Image.open(next((validation / "zero").iterdir()))
    assert gray.mode == "L"
    logits = model(**processor(gray.convert("RGB"), return_tensors="pt")).logits
    assert logits.shape == (1, 3)


@pytest.mark.parametrize("layout", ["parquet-bytes", pytest.param("jsonl-paths", marks=pytest.mark.slow)])
def test_table_of_bytes_or_paths(layout, tiny_resnet, digits, tmp_path):
    """Custom column names, integer or string labels; two DataLoader workers run the transform."""
    rows = digits[:80]
    if layout == "parquet-bytes":
        frame = pd.DataFrame({"picture": [png_bytes(im) for im, _ in rows],
                              "digit": [list(CLASSES.values()).index(n) for _, n in rows]})
        train, validation = tmp_path / "train.parquet", tmp_path / "validation.parquet"
        frame.iloc[:60].to_parquet(train)
        frame.iloc[60:].to_parquet(validation)
    else:
        for i, (image, _) in enumerate(rows):
            image.save(tmp_path / f"{i}.png")
        frame = pd.DataFrame({"picture": [str(tmp_path / f"{i}.png") for i in range(80)],
                              "digit": [n for _, n in rows]})
        train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
        frame.iloc[:60].to_json(train, orient="records", lines=True)
        frame.iloc[60:].to_json(validation, orient="records", lines=True)
    out = tmp_path / "out"
    main(run_args(tiny_resnet, out, train_file=train, validation_file=validation, image_column="picture",
                  label_column="digit", max_steps=4, dataloader_num_workers=2))

    assert 0 <= read_json(out / "all_results.json")["eval_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    expected = ["0", "1", "2"] if layout == "parquet-bytes" else ["one", "two", "zero"]
    assert list(config["id2label"].values()) == expected


def build_bundle(model, **columns):
    """The task's build() over in-memory splits, as run.py calls it."""
    raw = DatasetDict({split: Dataset.from_dict(data) for split, data in columns.items()})
    return image_classification.build(ModelArguments(model), DataArguments(task="image-classification"), raw)


@pytest.mark.parametrize("kind", ["pil", "path", "bytes", "bytes-dict"])
def test_each_image_column_type_is_preprocessed(kind, tiny_resnet, digits, tmp_path):
    rows = digits[:6]
    images = [im if i % 2 else im.convert("RGBA") for i, (im, _) in enumerate(rows)]  # grayscale and RGBA
    if kind == "path":
        for i, image in enumerate(images):
            image.save(tmp_path / f"{i}.png")
        column = [str(tmp_path / f"{i}.png") for i in range(len(images))]
    elif kind == "bytes":
        column = [png_bytes(im) for im in images]
    elif kind == "bytes-dict":
        column = [{"bytes": png_bytes(im)} for im in images]
    else:
        column = images
    bundle = build_bundle(tiny_resnet, train={"image": column, "label": [n for _, n in rows]})

    example = bundle.train_dataset[0]
    assert example["pixel_values"].shape == (3, SIZE, SIZE)  # 1 or 4 channels -> RGB
    assert example["labels"] == ["one", "two", "zero"].index(rows[0][1])
    # DataLoader workers started with spawn get a pickled copy of the data set and its transform.
    assert pickle.loads(pickle.dumps(bundle.train_dataset))[0]["pixel_values"].equal(example["pixel_values"])
    batch = bundle.data_collator([bundle.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["labels"].tolist() == [
        ["one", "two", "zero"].index(n) for _, n in rows[:4]
    ]


def test_validation_class_ids_follow_the_train_names(tiny_resnet, digit_folders, tmp_path):
    """An image folder's ClassLabel numbers only the classes it holds: map them by name."""
    from hftune.data import load_raw_datasets

    train, _ = digit_folders
    for name in ("two", "zero"):  # no "one": here "two" is id 0 and "zero" id 1
        (tmp_path / "validation" / name).mkdir(parents=True)
        Image.open(next((train / name).iterdir())).save(tmp_path / "validation" / name / "a.png")
    data_args = DataArguments(task="image-classification", train_file=str(train),
                              validation_file=str(tmp_path / "validation"))
    bundle = image_classification.build(ModelArguments(tiny_resnet), data_args, load_raw_datasets(data_args))
    names = bundle.model.config.id2label
    assert sorted(names[bundle.eval_dataset[i]["labels"]] for i in range(2)) == ["two", "zero"]


def test_missing_image_column_is_one_clean_line(tiny_resnet, digit_folders, tmp_path, capsys):
    train, validation = digit_folders
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tiny_resnet, tmp_path / "out", train_file=train, validation_file=validation,
                      image_column="picture"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_column 'picture'" in err, err


def test_unreadable_images_fail_before_training(tiny_resnet):
    with pytest.raises(HftuneError, match="image_column 'image' of the train split could not be read"):
        build_bundle(tiny_resnet, train={"image": ["/no/such.png", "/no/such2.png"], "label": [0, 1]})
    with pytest.raises(HftuneError, match="not images"):
        build_bundle(tiny_resnet, train={"image": [1, 2], "label": [0, 1]})


def test_asset_build_is_atomic(tmp_path):
    def killed(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.cached_build("demo", killed)
    assert list((tmp_path / "assets").iterdir()) == []  # nothing half-built is left to be mistaken for done
    folder = assets.cached_build("demo", lambda d: (d / "ok.txt").write_text("done"))
    assert (tmp_path / "assets" / "demo" / "ok.txt").read_text() == "done"
    assert assets.cached_build("demo", killed) == folder  # built once, never again


def test_fashion_mnist_names_its_package_when_missing(monkeypatch):
    monkeypatch.setattr(assets, "FASHION_MNIST_DIR", "/nonexistent")
    with pytest.raises(HftuneError, match="apt-get install dataset-fashion-mnist"):
        assets.get_asset("asset:fashion-mnist", "dataset").locate()


def test_untrained_resnet_asset_loads_through_auto_classes():
    path = assets.resolve_model("asset:resnet-18-untrained")
    model = AutoModelForImageClassification.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    assert model.config.num_labels == 1000 and model.config.hidden_sizes == [64, 128, 256, 512]
    assert processor.size == {"shortest_edge": 64}
