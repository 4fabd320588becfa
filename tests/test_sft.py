"""sft: formats, the offset-based loss mask on three templates, truncation, bad input, and whole runs."""

import importlib.metadata
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from conftest import fail, read_json, tiny_model
from hftune.errors import HftuneError
from hftune.results.generation import generate, prompts_and_references
from hftune.tasks.causal_lm import FlatteningCollator
from hftune.tasks.chat_batches import LogitsWhereTrained, PackedRowsCollator, pack_rows
from hftune.tasks.chat import COLUMNS, Columns, Conversation, detect_format, to_conversation
from hftune.tasks.chat_mask import IGNORE, NO_LABELS, TOO_LONG, TRUNCATED, Labeller

TRL_TEMPLATES = os.path.join(os.path.dirname(importlib.util.find_spec("trl").origin), "chat_templates")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A Zephyr-style template without generation tags whose end-of-turn marker is not the tokenizer's EOS.
ZEPHYR = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And grass?"},
    {"role": "tool", "content": "lookup: grass=green"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture
def smol(smol_tokenizer_path):
    return AutoTokenizer.from_pretrained(smol_tokenizer_path)


def llama3_tokenizer(smol, template_file="llama3.jinja"):
    smol.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    smol.bos_token = "<|begin_of_text|>"
    with open(os.path.join(TRL_TEMPLATES, template_file)) as handle:
        return smol, handle.read()


def labelled_runs(tokenizer, ids, labels):
    """The decoded text of each run of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def label(tokenizer, template, messages, train_on="assistant", max_length=4096, truncation="keep_start", start=0):
    return Labeller(tokenizer, template, train_on, max_length, truncation).example(
        Conversation(messages, start), 0, "train")


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr"])
def test_only_assistant_turns_and_their_end_are_trained(smol, name):
    tokenizer, template = (smol, smol.chat_template) if name == "chatml" else \
        llama3_tokenizer(smol) if name == "llama3" else (smol, ZEPHYR)
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "<|endoftext|>"}[name]
    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system message SmolLM2's template injects one
        example = label(tokenizer, template, messages)
        assert labelled_runs(tokenizer, example["input_ids"], example["labels"]) == \
            ["Blue, on a clear day." + end, "Green." + end]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]  # one tokenization
    if name == "chatml":
        assert "You are a helpful AI assistant named SmolLM" in text  # the injected prompt is there, untrained


def test_generation_tags_and_offsets_agree(smol):
    tokenizer, template = llama3_tokenizer(smol, "llama3_training.jinja")
    example = label(tokenizer, template, CONVERSATION)  # Labeller compares both masks itself
    tagged = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert tagged["assistant_masks"] == [int(x != IGNORE) for x in example["labels"]]
    assert sum(tagged["assistant_masks"]) > 0
    wrong = ("{% for m in messages %}{% if m.role == 'user' %}{% generation %}<|im_start|>user\n{{ m.content }}"
             "<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # tags on the user turns
    with pytest.raises(HftuneError, match=r"row 0 of the train split: the template's \{% generation %\} tags"):
        label(tokenizer, wrong, CONVERSATION)


def test_prompt_completion_boundary_inside_a_token(smol):
    example = Labeller(smol, None, "assistant", 64, "keep_start").example(
        Conversation(["The sky is ", "blue"], 1, plain=True), 0, "train")
    ids, labels = example["input_ids"], example["labels"]
    assert ids[:-1] == smol("The sky is blue", add_special_tokens=False)["input_ids"]  # one tokenization
    assert ids[-1] == labels[-1] == smol.eos_token_id  # the model learns to stop
    trained = smol.decode([t for t, x in zip(ids[:-1], labels[:-1]) if x != IGNORE])
    assert "blue" in trained and "sky" not in trained


def test_pad_equal_to_eos_keeps_every_end_of_turn_trained(smol):
    assert smol.pad_token_id == smol.eos_token_id == smol.convert_tokens_to_ids("<|im_end|>")
    long, short = label(smol, smol.chat_template, CONVERSATION), label(smol, smol.chat_template, CONVERSATION[:3])
    batch = DataCollatorForSeq2Seq(smol, label_pad_token_id=IGNORE)(
        [{k: v for k, v in e.items() if k != "status"} for e in (long, short)])
    eos_labelled = (batch["labels"] == smol.eos_token_id).sum(dim=1).tolist()
    assert eos_labelled == [2, 1]  # one per trained turn, though the short row is padded with that id
    assert (batch["input_ids"][1] == smol.eos_token_id).sum() > (batch["labels"][1] == smol.eos_token_id).sum()


def test_last_assistant_and_everything(smol):
    last = label(smol, smol.chat_template, CONVERSATION, train_on="last_assistant")
    assert labelled_runs(smol, last["input_ids"], last["labels"]) == ["Green.<|im_end|>"]
    everything = label(smol, smol.chat_template, CONVERSATION, train_on="all")
    assert all(x != IGNORE for x in everything["labels"][:-1])  # all but the newline after the last <|im_end|>
    assert everything["labels"][-2] == smol.eos_token_id and smol.decode(everything["input_ids"][-1]) == "\n"


def test_formats_become_conversations():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    share = [{"from": "system", "value": "Be kind"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    assert to_conversation({"messages": chat}, "messages", COLUMNS, 0, "train") == Conversation(chat, 0)
    assert to_conversation({"conversations": share}, "sharegpt", COLUMNS, 0, "train") == Conversation(
        [{"role": "system", "content": "Be kind"}, *chat], 0)
    assert to_conversation({"prompt": "2+2=", "completion": "4"}, "prompt-completion", COLUMNS, 0, "train") == \
        Conversation(["2+2=", "4"], 1, plain=True)
    assert to_conversation({"prompt": chat[:1], "completion": chat[1:]}, "prompt-completion", COLUMNS, 0,
                           "train") == Conversation(chat, 1)
    alpaca = {"instruction": "Add", "input": "2+2", "output": "4", "system": "Be exact"}
    assert to_conversation(alpaca, "alpaca", COLUMNS, 0, "train") == Conversation(
        [{"role": "system", "content": "Be exact"}, {"role": "user", "content": "Add\n\n2+2"},
         {"role": "assistant", "content": "4"}], 2)
    assert detect_format(["conversations", "id"], None, COLUMNS) == "sharegpt"
    assert detect_format(["instruction", "input", "output"], None, COLUMNS) == "alpaca"
    assert detect_format(["q", "a"], None, Columns(prompt="q", completion="a")) == "prompt-completion"
    with pytest.raises(HftuneError, match="matches several formats"):
        detect_format(["messages", "prompt", "completion"], None, COLUMNS)
    with pytest.raises(HftuneError, match="matches no sft format; set data_format"):
        detect_format(["text", "label"], None, COLUMNS)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, "message 1 has the unknown role 'bot'"),
    ({"messages": []}, "holds an empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn"),
    ({"messages": "Hi"}, "holds str, not a list of messages"),
])
def test_malformed_rows_name_the_row(row, message):
    with pytest.raises(HftuneError, match=f"row 7 of the train split.*{message}"):
        to_conversation(row, "messages", COLUMNS, 7, "train")


def test_truncation_modes(smol):
    long = [CONVERSATION[0], {"role": "user", "content": "word " * 60}, CONVERSATION[2], *CONVERSATION[3:]]
    full = label(smol, smol.chat_template, long)
    assert full["status"] == "kept"
    cut = label(smol, smol.chat_template, long, max_length=40)
    assert cut["status"] == NO_LABELS and cut["input_ids"] == []  # the first answer lies past token 40
    kept = label(smol, smol.chat_template, long, max_length=len(full["input_ids"]) - 3)
    assert kept["status"] == TRUNCATED and labelled_runs(smol, kept["input_ids"], kept["labels"])[0] == \
        "Blue, on a clear day.<|im_end|>"
    dropped_turns = label(smol, smol.chat_template, long, max_length=60, truncation="drop_turns")
    text = smol.decode(dropped_turns["input_ids"])
    assert text.startswith("<|im_start|>system\nYou answer briefly.") and "word" not in text  # system kept
    assert labelled_runs(smol, dropped_turns["input_ids"], dropped_turns["labels"]) == ["Green.<|im_end|>"]
    assert label(smol, smol.chat_template, long, max_length=60, truncation="drop_row")["status"] == TOO_LONG
    with pytest.raises(HftuneError, match="row 0 of the train split has .* tokens, more than max_seq_length=60"):
        label(smol, smol.chat_template, long, max_length=60, truncation="error")


def test_template_whose_prefix_renders_differently_is_refused(smol):
    unstable = "{% for m in messages %}{% if loop.last %}[final]{% endif %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    with pytest.raises(HftuneError, match="renders the conversation up to message 2 differently"):
        label(smol, unstable, CONVERSATION)
    no_end = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(HftuneError, match="never learn to stop"):
        label(smol, no_end, CONVERSATION)


def test_generation_prompt_is_the_training_prefix(smol):
    example = label(smol, smol.chat_template, CONVERSATION[:3])
    prompt, reference = prompts_and_references(example)
    rendered = smol.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == smol(rendered, add_special_tokens=False)["input_ids"]
    assert smol.decode(reference) == "Blue, on a clear day.<|im_end|>"
    seen = []  # what generate() is given: exactly these ids, left-padded

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = type("G", (), {"eos_token_id": smol.eos_token_id})()

        def generate(self, input_ids, attention_mask, **kwargs):
            seen.append((input_ids, attention_mask))  # answers: the prompt's last token, then EOS
            return torch.cat([input_ids, input_ids[:, -1:], torch.full((len(input_ids), 1), smol.eos_token_id)], dim=1)

    short = prompt[3:-2]
    answers = generate(Recorder(), smol, [prompt, short], max_new_tokens=4, batch_size=2)
    ids, mask = seen[0]  # one batch, the prompts by length: the short one first
    assert ids[1].tolist() == prompt and ids[0, 5:].tolist() == short and mask[0, :5].sum() == 0  # left padding
    assert answers == [([prompt[-1], smol.eos_token_id], True), ([short[-1], smol.eos_token_id], True)]  # in order


def test_padding_free_batches_equal_padded_ones(tiny_chat_llama, smol):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    rows = [{k: v for k, v in label(smol, smol.chat_template, c).items() if k != "status"}
            for c in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3])]
    flat = FlatteningCollator()(rows)
    starts = [0] + [len(r["input_ids"]) for r in rows]
    assert [flat["position_ids"][0, sum(starts[:k + 1])].item() for k in range(3)] == [0, 0, 0]  # restart per row
    padded = DataCollatorForSeq2Seq(smol, label_pad_token_id=IGNORE)(rows)

    def per_row_losses(batch, lengths):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        losses, offset = [], 0
        for row, n in enumerate(lengths):
            if logits.shape[0] == 1:  # flattened: one row, the examples one after another
                logit, target = logits[0, offset:offset + n], batch["labels"][0, offset:offset + n]
                offset += n
            else:
                logit, target = logits[row, :n], batch["labels"][row, :n]
            losses.append(torch.nn.functional.cross_entropy(logit[:-1], target[1:], ignore_index=IGNORE,
                                                            reduction="sum").item())
        return losses

    lengths = [len(r["input_ids"]) for r in rows]
    assert per_row_losses(flat, lengths) == pytest.approx(per_row_losses(padded, lengths), abs=1e-5, rel=1e-6)


def test_packed_rows_equal_padded_ones(tiny_chat_llama, smol):
    """Examples packed several to a row (no attention mask, position ids restarting) get the logits and
    per-example losses they get alone, on the tiny Llama's SDPA attention."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    conversations = (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3], CONVERSATION[3:])
    rows = [{k: v for k, v in label(smol, smol.chat_template, c, train_on="all").items() if k != "status"}
            for c in conversations]
    lengths = [len(r["input_ids"]) for r in rows]
    packed = pack_rows(Dataset.from_list(rows), max(lengths) + min(lengths))
    assert len(packed) < len(rows)  # at least two examples share a row
    batch = PackedRowsCollator(smol.pad_token_id)(list(packed))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    found = 0
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            ids = batch["input_ids"][row, start:end].tolist()
            if ids not in [r["input_ids"] for r in rows]:
                continue  # the padding at the row's end
            found += 1
            example = rows[[r["input_ids"] for r in rows].index(ids)]
            assert batch["labels"][row, start] == IGNORE  # never predicted from the example before it
            assert batch["labels"][row, start + 1:end].tolist() == example["labels"][1:]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(logits[row, start:end], alone, atol=1e-5)
    assert found == len(rows)


def test_packing_makes_the_same_update_as_padding(tiny_chat_llama, tmp_path):
    """One SGD step over 8 examples, trained on their whole text: packed rows update the weights as padded
    rows do (each example's first token is not predicted from the example packed before it)."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", answer_rows(8))
    for name, packing in (("padded", "false"), ("packed", "true")):
        main(one_update_args(tiny_chat_llama, train, tmp_path / name, 8, 1)
             + ["--packing", packing, "--train_on", "all", "--max_seq_length", "160"])
    assert read_json(tmp_path / "packed" / "all_results.json")["train_packed_rows"] < 8
    padded, packed = trained_weights(tmp_path / "padded"), trained_weights(tmp_path / "packed")
    start = trained_weights(tiny_chat_llama)
    assert max((padded[k] - start[k]).abs().max().item() for k in padded) > 1e-3
    assert max((padded[k] - packed[k]).abs().max().item() for k in padded) < 1e-6


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def color_rows(n, seed=0):
    """Learnable chat data: the assistant names the color the user mentions (one word)."""
    import random

    rng = random.Random(seed)
    colors = ["red", "blue", "green", "black"]
    rows = []
    for _ in range(n):
        color = rng.choice(colors)
        rows.append({"messages": [{"role": "user", "content": f"My {rng.choice(['car', 'hat', 'cup'])} is {color}. "
                                                                 "Which color?"},
                                  {"role": "assistant", "content": color}]})
    return rows


@pytest.mark.slow
def test_sft_run_learns_reports_and_saves_its_template(tiny_chat_llama, tmp_path):
    from hftune.run import main

    train = color_rows(96)
    train.append({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "red"}]})
    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_chat_llama, "--train_file", write_jsonl(tmp_path / "train.jsonl", train),
          "--validation_file", write_jsonl(tmp_path / "validation.jsonl", color_rows(24, seed=1)),
          "--output_dir", str(out), "--num_train_epochs", "8", "--learning_rate", "1e-2", "--logging_steps", "1",
          "--per_device_train_batch_size", "8", "--max_seq_length", "64", "--max_new_tokens", "3", "--seed", "0",
          "--padding_free", "false"])
    results = read_json(out / "all_results.json")
    assert results["train_dropped_no_labels"] == 1  # the long row's answer lies past token 64
    assert results["train_samples"] == 96
    losses = [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert results["eval_stop_rate"] == 1.0 and results["eval_exact_match"] >= 0.5  # 4 colors: chance is 0.25
    assert {"eval_token_f1", "eval_rougeL", "eval_perplexity"} <= set(results)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == AutoTokenizer.from_pretrained(tiny_chat_llama).chat_template
    assert read_json(out / "generation_config.json")["eos_token_id"] == saved.convert_tokens_to_ids("<|im_end|>")


def test_chatml_for_a_base_model_adds_its_tokens(tiny_llama, tmp_path):
    from hftune.run import main

    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_llama, "--task", "sft", "--chat_template", "chatml", "--max_steps", "2",
          "--train_file", write_jsonl(tmp_path / "train.jsonl", color_rows(16)), "--output_dir", str(out)])
    saved = AutoTokenizer.from_pretrained(out)
    end = saved.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in saved.chat_template and end not in (None, saved.unk_token_id)
    assert sorted(read_json(out / "generation_config.json")["eos_token_id"]) == sorted({saved.eos_token_id, end})
    config = read_json(out / "config.json")
    assert config["vocab_size"] == len(saved)


@pytest.mark.parametrize("argv, message", [
    (["--train_on", "last_assistant", "--data_format", "prompt-completion"], "train_on: last_assistant needs conversations"),
    (["--train_on", "turns"], "train_on 'turns' is not one of"),
    (["--truncation_mode", "cut"], "truncation_mode 'cut' is not one of"),
    (["--streaming", "true"], "sft does not stream yet"),
    (["--packing", "true", "--padding_free", "true"], "packing and padding_free both rearrange the batch"),
    (["--packing", "true", "--peft", "prompt_tuning"], "packing: true cannot be used with peft: prompt_tuning"),
])
def test_bad_settings(capsys, tiny_chat_llama, tmp_path, argv, message):
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--task", "sft", "--output_dir", str(tmp_path),
                         "--train_file", write_jsonl(tmp_path / "t.jsonl", color_rows(4)), *argv])
    assert message in line


def test_bad_data(capsys, tiny_chat_llama, tiny_llama, tmp_path):
    common = ["--task", "sft", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    rows = color_rows(4) + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Yo"}]}]
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--train_file", write_jsonl(tmp_path / "a.jsonl", rows),
                         "--validation_file", write_jsonl(tmp_path / "v.jsonl", color_rows(2)), *common])
    assert "row 4 of the train split: message 1 has the unknown role 'robot'; use one of ['assistant', 'system'," in line
    share = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "wizard", "value": "Yo"}]}]
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--train_file", write_jsonl(tmp_path / "s.jsonl", share),
                         "--validation_file", write_jsonl(tmp_path / "w.jsonl", share), *common])
    assert "row 0 of the train split: message 1 has the unknown role 'wizard (ShareGPT)'; use one of ['assistant', 'bard'" in line
    line = fail(capsys, ["--model_name_or_path", tiny_llama, "--train_file",
                         write_jsonl(tmp_path / "b.jsonl", color_rows(4)), *common])
    assert "has no chat template; set chat_template: chatml" in line
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--max_seq_length", "8", "--train_file",
                         write_jsonl(tmp_path / "c.jsonl", color_rows(4)), *common])
    assert "every row of the train split was dropped" in line
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--train_file",
                         write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 4), *common])
    assert "matches no sft format; set data_format" in line
    line = fail(capsys, ["--model_name_or_path", tiny_chat_llama, "--train_file",
                         write_jsonl(tmp_path / "e.jsonl", color_rows(1)), *common])  # datasets' ValueError before
    assert "validation_split_percentage 5 of the 1 train row(s) leaves no validation or no train row" in line


def answer_rows(n):
    """Rows whose answers differ in length, so micro-batches hold different numbers of trained tokens."""
    words = ["red", "blue", "green", "black", "white"]
    return [{"messages": [{"role": "user", "content": f"Name {k % 5 + 1} colors."},
                          {"role": "assistant", "content": " ".join(words[: k % 5 + 1])}]} for k in range(n)]


def trained_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def one_update_args(model, train, out, batch, accumulation, engine="trainer"):
    return ["--model_name_or_path", model, "--train_file", train, "--validation_split_percentage", "0",
            "--do_eval", "false", "--output_dir", str(out), "--max_steps", "1", "--optim", "sgd",
            "--learning_rate", "1.0", "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
            str(accumulation), "--train_sampling_strategy", "sequential", "--engine", engine, "--save_strategy", "no",
            "--max_grad_norm", "0", "--logging_steps", "1"]


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_accumulated_micro_batches_weigh_every_trained_token_alike(tiny_chat_llama, tmp_path, engine):
    """Batch 8 x 1 equals batch 2 x 4 accumulated although the micro-batches hold 3 to 13 trained tokens
    (a mean per micro-batch would weigh a token of a short answer more)."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", answer_rows(8))
    main(one_update_args(tiny_chat_llama, train, tmp_path / "whole", 8, 1, engine))
    main(one_update_args(tiny_chat_llama, train, tmp_path / "accumulated", 2, 4, engine))
    whole, accumulated = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "accumulated")
    start = trained_weights(tiny_chat_llama)
    assert max((whole[k] - start[k]).abs().max().item() for k in whole) > 1e-3  # the update is not nothing
    assert max((whole[k] - accumulated[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.slow
def test_two_processes_equal_one(tiny_chat_llama, tmp_path):
    from conftest import launch
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", answer_rows(16))
    main(one_update_args(tiny_chat_llama, train, tmp_path / "one", 8, 1) + ["--max_steps", "2"])
    launch("ddp.yaml", 2, one_update_args(tiny_chat_llama, train, tmp_path / "two", 4, 1) + ["--max_steps", "2"])
    one, two = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_inspect_audits_the_labels_without_model_weights(tiny_chat_llama, tmp_path, capsys, monkeypatch):
    from hftune.run import main

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)  # a weight load would fail
    train = write_jsonl(tmp_path / "train.jsonl", color_rows(12))
    main(["inspect", "--model_name_or_path", tiny_chat_llama, "--train_file", train, "--validation_split_percentage", "0"])
    report = capsys.readouterr().out
    assert "[[red<|im_end|>]]" in report or "[[blue<|im_end|>]]" in report or "[[green<|im_end|>]]" in report
    assert "end of each trained turn trained: 12/12" in report and "user: 0/" in report
    assert "pad == eos: True" in report and "default system prompt injected by the template: True" in report
    main(["inspect", "--model_name_or_path", tiny_chat_llama, "--train_file", train, "--max_seq_length", "20",
          "--validation_split_percentage", "0"])
    assert "rows: dropped_no_labels 12" in capsys.readouterr().out


def test_lora_sft_trains_only_adapters_and_merges(tiny_chat_llama, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hftune.run import main

    out = tmp_path / "lora"
    main(["--model_name_or_path", tiny_chat_llama, "--train_file", write_jsonl(tmp_path / "t.jsonl", color_rows(32)),
          "--validation_split_percentage", "0", "--do_eval", "false", "--output_dir", str(out), "--peft", "lora",
          "--merge_adapter", "true", "--max_steps", "4", "--learning_rate", "5e-2", "--per_device_train_batch_size", "8"])
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only the adapters were saved: nothing else trained
    adapted, merged = AutoPeftModelForCausalLM.from_pretrained(out).eval(), AutoModelForCausalLM.from_pretrained(
        out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(color_rows(1)[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, base(ids).logits, atol=1e-4)  # the adapter changed something
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert adapted.generate(input_ids=ids, **settings).tolist() == merged.generate(input_ids=ids, **settings).tolist()


@pytest.mark.parametrize("flattened", [False, True])
def test_logits_where_trained_give_the_same_loss_and_gradients(tiny_chat_llama, smol, flattened):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    rows = [{k: v for k, v in label(smol, smol.chat_template, c).items() if k != "status"}
            for c in (CONVERSATION, CONVERSATION[1:3], [CONVERSATION[1], {"role": "assistant", "content": "Sky."}])]
    pad = FlatteningCollator() if flattened else DataCollatorForSeq2Seq(smol, label_pad_token_id=IGNORE)
    full, kept = pad(rows), LogitsWhereTrained(pad)(rows)
    assert kept["logits_to_keep"].numel() < full["input_ids"].shape[1] / 3  # most positions skip the LM head
    results = []
    for batch in (full, kept):
        model.zero_grad()
        outputs = model(**batch, num_items_in_batch=(full["labels"][:, 1:] != IGNORE).sum())
        outputs.loss.backward()
        results.append((outputs.loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7, rtol=1e-5)


def test_the_accelerate_engine_generates_and_scores_answers(tiny_chat_llama, tmp_path):
    from hftune.run import main

    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_chat_llama, "--engine", "accelerate", "--max_steps", "2",
          "--train_file", write_jsonl(tmp_path / "t.jsonl", color_rows(16)), "--validation_file",
          write_jsonl(tmp_path / "v.jsonl", color_rows(6, seed=2)), "--output_dir", str(out), "--max_new_tokens", "2"])
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 6 and 0 <= results["eval_stop_rate"] <= 1 and "eval_exact_match" in results


def test_throughput_leaves_out_the_lm_head_where_it_did_not_run(tiny_chat_llama, tmp_path):
    from hftune.run import main

    train = write_jsonl(tmp_path / "t.jsonl", color_rows(32))
    per_token = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        main(["--model_name_or_path", tiny_chat_llama, "--train_file", train, "--validation_split_percentage", "0",
              "--do_eval", "false", "--max_steps", "3", "--output_dir", str(out), "--logits_where_trained", flag])
        per_token[flag] = read_json(out / "all_results.json")["train_model_flops_per_token"]
    head = 6 * 49152 * 32  # the tiny Llama's LM head: vocabulary x width
    assert per_token["false"] - per_token["true"] > 0.8 * head  # one-word answers: the head runs at few positions
