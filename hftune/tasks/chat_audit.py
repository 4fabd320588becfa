"""`hftune inspect --config recipe.yaml`: the sft label audit, before any training and without model
weights (the tokenizer and the data only).

It prints a few rendered rows with the trained text marked `[[...]]`, the share of each role's tokens
that are trained, whether each trained turn's end-of-turn token (and EOS) is trained, pad == eos, a
default system prompt the template injects, and how many rows truncation cut or dropped. A run does
the same labelling at start-up and stops when no row keeps a trained token.

Example:
    $ hftune inspect --model_name_or_path asset:SmolLM2-135M-Instruct --train_file chats.jsonl
"""

from collections import Counter

from hftune.tasks.chat import to_conversation
from hftune.tasks.chat_mask import IGNORE, KEPT, Labeller

SHOWN_ROWS = 3
AUDITED_ROWS = 1000


def role_of_each_token(labeller, conversation, offsets):
    """The role whose rendering (header, text, end marker) holds each token; the first message's
    includes what the template puts before it (an injected system prompt); 'template': the rest."""
    messages = conversation.messages
    if conversation.plain:
        bounds = [("user", 0, len(messages[0])), ("assistant", len(messages[0]), len(messages[0] + messages[1]))]
    else:
        ends = [len(labeller.apply(messages[: k + 1], "audit")) for k in range(len(messages))]
        bounds = [(m["role"], ends[k - 1] if k else 0, ends[k]) for k, m in enumerate(messages)]
    return [next((role for role, start, end in bounds if start <= a < end), "template") for a, _ in offsets]


def audit(tokenizer, template, dataset, fmt, columns, data_args, split="train"):
    """The report's lines."""
    labeller = Labeller(tokenizer, template, data_args.train_on, data_args.max_seq_length, data_args.truncation_mode)
    trained, seen, statuses, ends_trained, turns = Counter(), Counter(), Counter(), 0, 0
    shown = []
    for index, row in enumerate(dataset.select(range(min(len(dataset), AUDITED_ROWS)))):
        conversation = to_conversation(row, fmt, columns, index, split)
        example = labeller.example(conversation, index, split)
        statuses[example["status"]] += 1
        text, spans, offsets, _, labels = labeller.labelled(conversation, f"row {index}")
        for role, label in zip(role_of_each_token(labeller, conversation, offsets), labels):
            seen[role] += 1
            trained[role] += label != IGNORE
        turns += len(spans)
        ends_trained += sum(end_is_trained(offsets, labels, span) for span in spans)
        if len(shown) < SHOWN_ROWS:
            shown.append(marked(text, spans))
    lines = [f"sft label audit: {sum(statuses.values())} {split} rows ({fmt}), train_on: {data_args.train_on}, "
             f"max_seq_length {data_args.max_seq_length}, truncation_mode {data_args.truncation_mode}"]
    for k, text in enumerate(shown):
        lines += [f"--- row {k} (trained text in [[...]]) ---", text]
    lines.append("--- trained share of each role's tokens ---")
    lines += [f"  {role}: {trained[role]}/{seen[role]} ({trained[role] / seen[role]:.0%})" for role in sorted(seen)]
    lines.append(f"end of each trained turn trained: {ends_trained}/{turns}")
    lines.append(f"pad == eos: {tokenizer.pad_token_id == tokenizer.eos_token_id} (labels are set per position, "
                 "so a trained EOS stays trained)")
    lines.append(f"default system prompt injected by the template: {injects_system_prompt(labeller)}")
    lines.append("rows: " + ", ".join(f"{status} {n}" for status, n in sorted(statuses.items())))
    if not statuses[KEPT] and not any(s.startswith("truncated") for s in statuses):
        lines.append("NO row keeps a trained token: a run would stop; check train_on and max_seq_length.")
    return lines


def end_is_trained(offsets, labels, span):
    """Whether the last token of a trained span is labelled (its end-of-turn, or the EOS after plain text)."""
    last = max((k for k, (a, b) in enumerate(offsets) if a < span[1] and span[0] < b), default=None)
    return last is not None and labels[last] != IGNORE


def marked(text, spans):
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + "[[" + text[start:end] + "]]" + text[end:]
    return text


def injects_system_prompt(labeller):
    if labeller.template is None:
        return False
    alone = labeller.apply([{"role": "user", "content": "x"}], "audit")
    return "system" in alone


def main(argv):
    from transformers import AutoTokenizer

    from hftune.config import parse_config
    from hftune.data import load_raw_datasets, limit_splits
    from hftune.tasks.chat import detect_format
    from hftune.tasks.common import pretrained_source, processor_path
    from hftune.tasks.chat_template import load_template, needs_template
    from hftune.tasks.sft import columns_of

    model_args, data_args, training_args = parse_config(["--task", "sft", *argv])
    path, common = pretrained_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = limit_splits(load_raw_datasets(data_args, training_args.seed, model_args.cache_dir), data_args)
    fmt = detect_format(raw["train"].column_names, data_args.data_format, columns_of(data_args))
    template = load_template(tokenizer, None, data_args.chat_template,
                             model_args.tokenizer_name or model_args.model_name_or_path,
                             needs_template(raw["train"], columns_of(data_args), fmt))
    print("\n".join(audit(tokenizer, template, raw["train"], fmt, columns_of(data_args), data_args)))
