"""The bad-input battery: hftune fed bad recipes, command lines, data, models, output folders and
checkpoints, each case run once in this process (the import cost paid once), each outcome sorted as

    clear      exit 2 with exactly one `hftune: error:` line, no traceback, output_dir untouched
    traceback  any other exception escaped
    accepted   the run went on as if nothing were wrong (exit 0)
    lost       it stopped, but output_dir changed: a file written, changed or removed first

Cases whose output_dir should be kept safe start from a copy of an earlier real run (its model,
results, resolved config and a sealed checkpoint), resumed or overwritten as the case says.

    python benchmarks/reliability.py --trials 0      # runs the battery, prints the table
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@dataclass
class Case:
    kind: str  # recipe, cli, data, model, output, checkpoint
    name: str
    argv: list
    output_dir: str = None  # watched for changes; None: the case's argv names none
    cwd: str = None  # the folder the case runs in (default: where the battery runs)


@dataclass
class Outcome:
    case: Case
    verdict: str  # clear, traceback, accepted, lost
    message: str


# --------------------------------------------------------------------------------------------
# What the cases start from


def tweet_split(folder, rows=400, train_rows=320):
    import pandas as pd
    from bench import tweet_corpus

    frame = pd.concat(pd.read_csv(path) for path in tweet_corpus(folder, rows=rows))  # already shuffled
    frame = frame.rename(columns={"sentiment": "label"})
    frame.iloc[:train_rows].to_csv(folder / "train.csv", index=False)
    frame.iloc[train_rows:].to_csv(folder / "validation.csv", index=False)
    return str(folder / "train.csv"), str(folder / "validation.csv")


class Materials:
    """Tiny real-format models, the real tweets, and one earlier real run, built once in `folder`."""

    def __init__(self, folder):
        from bench import llama, tiny_bert, tiny_resnet

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.train, self.validation = tweet_split(self.folder, rows=120, train_rows=96)
        self.bert = tiny_bert(self.folder / "tiny-bert")
        self.gpt = llama(self.folder / "tiny-llama", tiny=True)
        self.resnet = tiny_resnet(self.folder / "tiny-resnet")
        self.count = 0
        self.earlier_run = self._earlier_run()

    def path(self, name):
        self.count += 1
        return self.folder / f"{self.count:03d}-{name}"

    def text_argv(self, output_dir, **overrides):
        settings = dict(model_name_or_path=self.bert, train_file=self.train, validation_file=self.validation,
                        output_dir=output_dir, label_column="label", report_to="none", disable_tqdm="true",
                        max_seq_length=32, per_device_train_batch_size=16, max_steps=2, logging_steps=1,
                        save_strategy="steps", save_steps=2, eval_strategy="no", seed=0)
        settings.update(overrides)
        return [f"--{k}={v}" for k, v in settings.items() if v is not None]

    def _earlier_run(self):
        from hftune.run import main

        out = str(self.folder / "earlier-run")
        with contextlib.redirect_stdout(io.StringIO()):
            main(self.text_argv(out, save_total_limit=1))
        return out

    def copy_of_earlier_run(self, name):
        out = self.path(name)
        shutil.copytree(self.earlier_run, out)
        return str(out)

    def file(self, name, content):
        path = self.path(name)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def model_copy(self, name, source=None, drop=(), edit_config=None):
        """A copy of a tiny model folder without the files in `drop`, its config.json edited."""
        out = self.path(name)
        shutil.copytree(source or self.bert, out)
        for file in drop:
            os.remove(out / file)
        if edit_config:
            config = json.loads((out / "config.json").read_text())
            edit_config(config)
            (out / "config.json").write_text(json.dumps(config))
        return str(out)


# --------------------------------------------------------------------------------------------
# Running one case


def snapshot(folder):
    """{relative path: digest} of everything under folder; None when it does not exist."""
    if folder is None or not os.path.lexists(folder):
        return None
    if not os.path.isdir(folder):
        return {"": hashlib.sha256(Path(folder).read_bytes()).hexdigest() if os.path.isfile(folder) else "link"}
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (os.readlink(path) if os.path.islink(path) else
                                                    hashlib.sha256(Path(path).read_bytes()).hexdigest())
    return found


def run_case(case):
    from hftune.run import main

    cwd = os.getcwd()
    os.chdir(case.cwd or cwd)
    before = snapshot(case.output_dir)
    errors, code, escaped = io.StringIO(), 0, None
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            main(case.argv)
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - the battery records whatever escapes
        escaped = traceback.format_exc().strip().splitlines()[-1]
    finally:
        os.chdir(cwd)
    lines = [line for line in errors.getvalue().splitlines() if line.startswith("hftune: error:")]
    if escaped is not None:
        return Outcome(case, "traceback", escaped)
    if code == 0:
        return Outcome(case, "accepted", "")
    os.chdir(case.cwd or cwd)
    changed = snapshot(case.output_dir) != before
    os.chdir(cwd)
    if changed:
        return Outcome(case, "lost", lines[0] if lines else f"exit {code}")
    clear = code == 2 and len(lines) == 1 and "Traceback" not in errors.getvalue()
    return Outcome(case, "clear" if clear else "traceback", lines[0] if clear else f"exit {code}: {lines}")


def run_battery(cases):
    return [run_case(case) for case in cases]


VERDICTS = ("clear", "traceback", "accepted", "lost")


def table(outcomes):
    kinds = list(dict.fromkeys(o.case.kind for o in outcomes))
    lines = ["| kind | cases | " + " | ".join(VERDICTS) + " |", "|---" * (len(VERDICTS) + 2) + "|"]
    for kind in kinds + ["all"]:
        mine = [o for o in outcomes if kind in ("all", o.case.kind)]
        lines.append(f"| {kind} | {len(mine)} | " + " | ".join(str(sum(o.verdict == v for o in mine))
                                                             for v in VERDICTS) + " |")
    lines.append("")
    lines += [f"- [{o.case.kind}] {o.case.name}: " + (o.message if o.verdict == "clear" else
                                                       f"{o.verdict.upper()} {o.message}") for o in outcomes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The cases


def recipe_cases(m):
    def recipe(name, content, *extra):
        path = m.file(f"{name}.yaml", content)
        out = str(m.path(name))
        body = "\n".join(f"{k}: {v}" for k, v in (("model_name_or_path", m.bert), ("train_file", m.train),
                                                   ("output_dir", out), ("max_steps", 1), ("report_to", "none")))
        if isinstance(content, str):
            Path(path).write_text(body + "\n" + content)
        return Case("recipe", name, ["--config", path, *extra], out)

    return [
        Case("recipe", "recipe not UTF-8", ["--config", m.file("latin1.yaml", "learning_rate: 1e-3\nnotes: caf\xe9\n"
                                                                           .encode("latin-1"))]),
        Case("recipe", "recipe in UTF-16", ["--config", m.file("utf16.yaml", "learning_rate: 1e-3\n".encode("utf-16"))]),
        recipe("duplicate key", "learning_rate: 1e-3\nlearning_rate: 5e-3\n"),
        recipe("YAML syntax error", "learning_rate: [1e-3\n"),
        Case("recipe", "recipe is a list", ["--config", m.file("list.yaml", "- learning_rate: 1e-3\n")]),
        Case("recipe", "recipe is empty", ["--config", m.file("empty.yaml", "")]),
        recipe("unknown key in recipe", "learnig_rate: 1e-3\n"),
        recipe("nested mapping as value", "learning_rate:\n  value: 1e-3\n"),
        Case("recipe", "recipe file missing", ["--config", str(m.folder / "nowhere.yaml")]),
        Case("recipe", "recipe given without --config", [m.file("plain.yaml", "learning_rate: 1e-3\n")]),
        Case("recipe", "recipe is a folder", ["--config", str(m.folder)]),
        Case("recipe", "unknown shipped recipe name", ["--config", "text_clasification"]),
    ]


def cli_cases(m):
    def cli(name, **overrides):
        out = str(m.path(name))
        return Case("cli", name, m.text_argv(out, **overrides), out)

    return [
        cli("negative learning_rate", learning_rate=-1),
        cli("batch size 0", per_device_train_batch_size=0),
        cli("learning_rate not a number", learning_rate="fast"),
        cli("unknown flag", learnig_rate=1e-3),
        cli("warmup_ratio 1.5", warmup_ratio=1.5),
        cli("unknown task", task="text-clasification"),
        cli("unknown optim", optim="adamw_fast"),
        cli("unknown lr_scheduler_type", lr_scheduler_type="cosine_fast"),
        cli("gradient_accumulation_steps 0", gradient_accumulation_steps=0),
        cli("boolean 'maybe'", do_train="maybe"),
        cli("label_smoothing_factor 1.5", label_smoothing_factor=1.5),
        cli("num_train_epochs 0", max_steps=-1, num_train_epochs=0),
        cli("eval_strategy steps without a validation split", validation_file=None, eval_strategy="steps",
            eval_steps=1, validation_split_percentage=0),
        cli("max_seq_length 1", max_seq_length=1),
        cli("max_seq_length 2 (special tokens only)", max_seq_length=2),
        cli("hidden_dropout 1.5", hidden_dropout=1.5),
        cli("weight_decay negative", weight_decay=-0.1),
        cli("max_grad_norm negative", max_grad_norm=-1),
        cli("regularize without a penalty", regularize="nothing_matches_this"),
        cli("freeze_bn_stats without BatchNorm", freeze_bn_stats="true"),
        cli("peft unknown", peft="lorra"),
        cli("lora_target_modules matching nothing", peft="lora", lora_target_modules="nonexistent_proj"),
        cli("a flag without a value", **{"learning_rate": ""}),
        cli("save_steps 0 with save_strategy steps", save_steps=0),
        cli("logging_steps 0 with logging steps", logging_steps=0),
    ]


def data_cases(m):
    def data(name, train, validation=None, **overrides):
        out = str(m.path(name))
        return Case("data", name, m.text_argv(out, train_file=train, validation_file=validation, **overrides), out)

    def csv(name, text):
        return m.file(f"{name}.csv", text)

    def jsonl(name, rows):
        return m.file(f"{name}.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")

    good = [{"text": f"text number {i}", "label": i % 2} for i in range(8)]
    return [
        data("missing label column", m.train, m.validation, label_column="sentiment"),
        data("missing train file", str(m.folder / "nowhere.csv"), m.validation),
        data("empty train split", csv("empty", "text,label\n"), m.validation),
        data("label out of range in validation", m.train, csv("label7", "text,label\nhello,0\nworld,7\n")),
        data("non-UTF-8 bytes", csv("latin1", b"text,label\ncaf\xe9,0\nna\xefve,1\n"), m.validation),
        data("UTF-16 file", m.file("utf16.csv", "text,label\nhello,0\nworld,1\n".encode("utf-16")), m.validation),
        data("text column of integers", jsonl("ints", [{"text": i, "label": i % 2} for i in range(8)]), None,
             validation_split_percentage=25),
        data("texts as lists of words", jsonl("words", [{"text": ["a", "b"], "label": i % 2} for i in range(8)]),
             None, validation_split_percentage=25),
        data("labels mixing ints and strings", jsonl("mixed", [{"text": f"t {i}", "label": i % 2 or "pos"}
                                                              for i in range(8)]), None, validation_split_percentage=25),
        data("one row with a carved validation split", csv("onerow", "text,label\nhello,0\n"), None,
             validation_split_percentage=10),
        data("unknown file extension", m.file("train.xlsx", b"PK\x03\x04"), m.validation),
        data("train_file is a folder", str(m.folder), m.validation),
        data("ragged CSV rows", csv("ragged", "text,label\nhello,0,extra,more\nworld\n"), m.validation),
        data("malformed JSON lines", m.file("bad.jsonl", '{"text": "a", "label": 0}\n{"text": \n'), None),
        data("corrupted parquet", m.file("bad.parquet", b"PAR1 this is not parquet"), m.validation),
        data("every text empty", csv("blank", "text,label\n,0\n,1\n,0\n"), None, validation_split_percentage=34),
        data("validation file with other columns", m.train, csv("othercols", "sentence,y\nhello,0\n")),
        data("max_train_samples 0", m.train, m.validation, max_train_samples=0),
        data("text_column missing", m.train, m.validation, text_column="body"),
        data("a single class in train", jsonl("oneclass", [{"text": f"t {i}", "label": 0} for i in range(8)]),
             None, validation_split_percentage=25),
        data("validation_split_percentage 100", jsonl("good", good), None, validation_split_percentage=100),
    ] + task_data_cases(m)


def task_data_cases(m):
    def task(name, task_name, rows, **overrides):
        out = str(m.path(name))
        train = m.file(f"{name.replace(' ', '-')}.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
        return Case("data", name, m.text_argv(out, task=task_name, train_file=train, validation_file=None,
                                              label_column=None, validation_split_percentage=25, **overrides), out)

    qa = {"question": "Who?", "context": "Alice went home.", "answers": {"text": ["Alice"], "answer_start": [0]}}
    shifted = {**qa, "answers": {"text": ["Alice"], "answer_start": [3]}}
    return [
        task("tags and tokens of different lengths", "token-classification",
             [{"tokens": ["a", "b"], "ner_tags": ["O"]}] + [{"tokens": ["a"], "ner_tags": ["O"]}] * 7),
        task("answer not at its start offset", "question-answering", [qa] * 7 + [shifted], doc_stride=8),
        task("doc_stride >= max_seq_length", "question-answering", [qa] * 8, doc_stride=64, max_seq_length=64),
        task("a row with a different number of endings", "multiple-choice",
             [{"sent1": "x", "sent2": "y", "ending0": "a", "ending1": "b", "label": 0}] * 7 +
             [{"sent1": "x", "sent2": "y", "ending0": "a", "ending1": None, "label": 0}]),
        task("block_size 1", "causal-lm", [{"text": "hello world again " * 5}] * 8, model_name_or_path=m.gpt,
             block_size=1),
        task("mlm_probability 0", "masked-lm", [{"text": "hello world again " * 5}] * 8, mlm_probability=0),
        task("masked-lm on an image model", "masked-lm", [{"text": "hello"}] * 8, model_name_or_path=m.resnet),
        task("sft rows without messages", "sft", [{"text": "hello"}] * 8, model_name_or_path=m.gpt),
    ]


def model_cases(m):
    def model(name, path, **overrides):
        out = str(m.path(name))
        return Case("model", name, m.text_argv(out, model_name_or_path=path, **overrides), out)

    truncated = m.model_copy("truncated")
    weights = Path(truncated) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbled = m.model_copy("garbled")
    (Path(garbled) / "config.json").write_text("{ not json")

    def wider(config):
        config["intermediate_size"] = 96

    return [
        model("model that does not exist", str(m.folder / "no-model")),
        model("folder without config.json", m.model_copy("noconfig", drop=["config.json"])),
        model("unknown model_type", m.model_copy("unknowntype", edit_config=lambda c: c.update(model_type="bertish"))),
        model("config.json not JSON", garbled),
        model("ResNet checkpoint for text classification", m.resnet, task="text-classification"),
        model("encoder for causal-lm", m.bert, task="causal-lm", label_column=None),
        model("truncated model.safetensors", truncated),
        model("config sizes disagree with the weights", m.model_copy("wider", edit_config=wider)),
        model("folder without tokenizer files", m.model_copy(
            "notokenizer", drop=[f for f in os.listdir(m.bert) if f.startswith(("tokenizer", "vocab", "special"))])),
        model("tokenizer_name that does not exist", m.bert, tokenizer_name=str(m.folder / "no-tokenizer")),
        model("config_name that does not exist", m.bert, config_name=str(m.folder / "no-config")),
        model("model_name_or_path is a file", m.train),
        model("teacher path that does not exist", m.bert, teacher_model_name_or_path=str(m.folder / "no-teacher")),
        model("teacher without config.json", m.bert,
              teacher_model_name_or_path=m.model_copy("teachernoconfig", drop=["config.json"])),
        model("teacher with another vocabulary", m.bert, teacher_model_name_or_path=m.model_copy(
            "teachervocab", edit_config=lambda c: c.update(vocab_size=c["vocab_size"] + 7))),
        model("unknown model_type from scratch", None, model_type="bertish", tokenizer_name=m.bert),
        model("model_revision on an asset", "asset:all-MiniLM-L6-v2", model_revision="v2"),
        model("empty model folder", str(Path(m.model_copy("emptymodel", drop=os.listdir(m.bert))))),
    ]


def output_cases(m):
    def output(name, out, **overrides):
        return Case("output", name, m.text_argv(str(out), **overrides), str(out))

    existing_file = m.file("a-file", "not a folder\n")
    dangling = m.path("dangling")
    os.symlink(m.folder / "nowhere-at-all", dangling)
    return [
        output("output_dir is an existing file", existing_file),
        output("output_dir is a dangling symlink", dangling),
        output("output_dir under a file", Path(existing_file) / "out"),
        output("output_dir not creatable", "/proc/hftune-out"),
        Case("output", "output_dir empty string", m.text_argv(""), ".", cwd=m.copy_of_earlier_run("empty-string")),
        output("output_dir holds a run (no overwrite)", m.copy_of_earlier_run("holds-a-run")),
        Case("output", "output_dir '.' holding a run", m.text_argv("."), ".", cwd=m.copy_of_earlier_run("dot")),
    ] + written_before_checked(m)


def written_before_checked(m):
    """An earlier run's output_dir, resumed or overwritten by a run that must stop before writing."""
    def over(name, resume=True, **overrides):
        out = m.copy_of_earlier_run(name)
        flags = dict(resume_from_checkpoint="auto", max_steps=4) if resume else dict(overwrite_output_dir="true")
        return Case("output", name, m.text_argv(out, **{**flags, **overrides}), out)

    two = m.file("two.jsonl", "\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(9)) + "\n")
    return [
        over("overwrite: freeze_bn_stats without BatchNorm", resume=False, freeze_bn_stats="true"),
        over("overwrite: eval_strategy steps without validation", resume=False, validation_file=None,
             eval_strategy="steps", eval_steps=1, validation_split_percentage=0),
        over("overwrite: regularize matching nothing", resume=False, regularize="nothing_matches_this", l2_lambda=1e-4),
        over("overwrite: engine accelerate with early stopping", resume=False, engine="accelerate",
             early_stopping_patience=2),
        over("resume: 3-class checkpoint with 2-class data", train_file=two, validation_file=None,
             validation_split_percentage=34),
        over("resume: freeze_bn_stats without BatchNorm", freeze_bn_stats="true"),
        over("resume: unknown metric_for_best_model", metric_for_best_model="eval_bleu", eval_strategy="steps",
             eval_steps=1, load_best_model_at_end="true"),
        over("overwrite: model that does not exist", resume=False, model_name_or_path=str(m.folder / "gone")),
        over("overwrite: missing label column", resume=False, label_column="sentiment"),
    ]


def checkpoint_cases(m):
    def resume(name, checkpoint, out=None, **overrides):
        out = out or m.copy_of_earlier_run(name)
        return Case("checkpoint", name, m.text_argv(out, resume_from_checkpoint=checkpoint, max_steps=4,
                                                    **overrides), out)

    def earlier_checkpoint(out):
        return next(str(p) for p in Path(out).glob("checkpoint-*"))

    corrupted = m.copy_of_earlier_run("corrupted")
    weights = Path(earlier_checkpoint(corrupted)) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, other bytes
    weights.write_bytes(bytes(data))
    unsealed = m.copy_of_earlier_run("unsealed")
    os.remove(Path(earlier_checkpoint(unsealed)) / "hftune_checkpoint.json")
    missing_state = m.copy_of_earlier_run("nostate")
    os.remove(Path(earlier_checkpoint(missing_state)) / "trainer_state.json")
    return [
        resume("resume from a missing checkpoint", str(m.folder / "checkpoint-9")),
        resume("resume from a file", m.train),
        resume("resume from a folder that is no checkpoint", m.bert),
        resume("explicit checkpoint corrupted after its seal", earlier_checkpoint(corrupted), out=corrupted),
        resume("explicit checkpoint without its seal, state missing", earlier_checkpoint(missing_state),
               out=missing_state),
        resume("explicit checkpoint with another model", earlier_checkpoint(m.copy_of_earlier_run("othermodel")),
               model_name_or_path=m.model_copy("othermodel-weights")),
        resume("explicit checkpoint of another task", earlier_checkpoint(m.copy_of_earlier_run("othertask")),
               task="masked-lm", label_column=None),
        resume("resume_from_checkpoint 'maybe'", "maybe"),
        resume("explicit unsealed checkpoint", earlier_checkpoint(unsealed), out=unsealed),
    ]


def all_cases(m):
    return (recipe_cases(m) + cli_cases(m) + data_cases(m) + model_cases(m) + output_cases(m) +
            checkpoint_cases(m))

