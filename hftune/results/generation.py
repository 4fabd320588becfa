"""Generation metrics of a chat model (sft) on a labelled split: each row is prompted with exactly
the token ids training used before its last trained turn (no decode and re-encode, so the template
cannot change), left-padded, and answered greedily; the answer is scored against that turn's text.

Metrics (`<prefix>_...`): exact_match (case and punctuation ignored), token_f1 (SQuAD's), rougeL
(rouge-score), stop_rate (share of answers that end with an EOS / end-of-turn token before
max_new_tokens). Rows with labels: {prompt_ids, reference_ids} from `prompts_and_references`.

Example:
    >>> prompts_and_references({"input_ids": [5, 6, 7, 8, 2], "labels": [-100, -100, 7, 8, 2]})
    ([5, 6], [7, 8, 2])
"""

import logging

import torch

from hftune.metrics import load_metric
from hftune.tasks.chat_mask import IGNORE

logger = logging.getLogger("hftune")

DEFAULT_NEW_TOKENS = 20


def prompts_and_references(row):
    """(prompt ids, reference ids): the last run of labelled tokens is the reference, all before it the prompt."""
    labels = row["labels"]
    end = max(i for i, label in enumerate(labels) if label != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return list(row["input_ids"][:start]), list(row["input_ids"][start:end])


def stop_ids(model, tokenizer):
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return sorted({*ids, tokenizer.eos_token_id} - {None})


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
    """[(new token ids, stopped)] per prompt: greedy, left-padded batches, stopping at any stop id.
    Batches are formed from prompts of similar length (less padding to prefill), answers come back
    in the prompts' order."""
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device, training = next(model.parameters()).device, model.training
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    answers = {}
    try:
        for first in range(0, len(order), batch_size):
            chosen = order[first:first + batch_size]
            batch = [prompts[i] for i in chosen]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad)
            for i, new in zip(chosen, output[:, width:].tolist()):
                end = next((k for k, t in enumerate(new) if t in stops), None)
                answers[i] = (new if end is None else new[: end + 1], end is not None)
    finally:
        model.train(training)
    return [answers[i] for i in range(len(prompts))]


def answer_text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generation_rows(model, tokenizer, dataset, max_new_tokens, batch_size):
    """One dict per row: prompt (decoded, with the template's markers), generated and reference text, stopped."""
    pairs = [prompts_and_references(row) for row in dataset]
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    return [{"index": i, "prompt": tokenizer.decode(prompt), "generated": answer_text(tokenizer, new),
             "reference": answer_text(tokenizer, reference), "stopped": stopped}
            for i, ((prompt, reference), (new, stopped)) in enumerate(zip(pairs, answers))]


def generation_metrics(rows, prefix):
    predictions, references = [r["generated"] for r in rows], [r["reference"] for r in rows]
    scores = {
        "exact_match": load_metric("exact_match").compute(
            predictions=predictions, references=references, ignore_case=True, ignore_punctuation=True)["exact_match"],
        "token_f1": load_metric("token_f1").compute(predictions=predictions, references=references)["token_f1"],
        "rougeL": load_metric("rouge").compute(predictions=predictions, references=references,
                                               rouge_types=["rougeL"])["rougeL"],
        "stop_rate": sum(r["stopped"] for r in rows) / max(len(rows), 1),
    }
    return {f"{prefix}_{name}": value for name, value in scores.items()}
