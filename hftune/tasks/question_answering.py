"""question-answering (extractive, as run_qa.py): the answer is a span of the context.

Rows hold `question`, `context` and `answers` ({"text": [...], "answer_start": [...]}, SQuAD's form; other
names through question_column / context_column / answer_column). A context longer than max_seq_length is
split into overlapping features `doc_stride` tokens apart; a feature that does not hold the answer is
trained to point at [CLS]. Evaluation picks, per question, the best of the `n_best_size` start and end
logits of all its features (spans up to `max_answer_length` tokens) and scores the text with SQuAD's exact
match and F1 (0-100, offline: hftune.metrics squad). With `version_2_with_negative` a question may have
no answer (empty answers): "" is predicted when the [CLS] score beats the best span by more than
`null_score_diff_threshold`. The saved model loads in `pipeline("question-answering")`.

Example:
    >>> from hftune.tasks.question_answering import QAFeatures
    >>> f = QAFeatures(example=[0], offsets=[[None, (0, 5), (6, 11), None]])
    >>> best_answers(f, ["hello world"], (np.array([[0, 5, 1, 0]]), np.array([[0, 1, 6, 0]])), n_best=5,
    ...              max_length=30, allow_null=False, threshold=0.0)
    ['hello world']
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding

from hftune.data import limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.metrics import load_metric
from hftune.tasks.common import TaskBundle, TaskTraits, load_config, load_weights, pretrained_source, processor_path


@dataclass
class DataFields:
    """question-answering's own data fields (run_qa.py's names)."""

    question_column: str = field(default="question", metadata={"help": "question-answering: the question column."})
    context_column: str = field(default="context", metadata={"help": "question-answering: the context column."})
    answer_column: str = field(
        default="answers", metadata={"help": "question-answering: the answers column ({text: [...], "
                                             "answer_start: [...]}, SQuAD's form)."})
    doc_stride: int = field(
        default=128, metadata={"help": "question-answering: tokens shared by consecutive features of a long context."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input (question-answering: 384 unless set, as run_qa.py)."})
    n_best_size: int = field(default=20, metadata={"help": "question-answering: start/end candidates per feature."})
    max_answer_length: int = field(default=30, metadata={"help": "question-answering: longest answer, tokens."})
    version_2_with_negative: bool = field(
        default=False, metadata={"help": "question-answering: some questions have no answer (SQuAD v2)."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "question-answering, SQuAD v2: answer \"\" when the null score beats the "
                                       "best span's by more than this."})


DEFAULTS = {"max_seq_length": 384}  # run_qa.py's: a question and a context part per feature

TRAITS = TaskTraits(auto_model="AutoModelForQuestionAnswering", output="spans", inputs="question-context",
                    peft_task_type="QUESTION_ANS")


def check_config(model_args, data_args, training_args):
    if training_args.engine == "pipeline":
        raise HftuneError("question-answering does not run on engine: pipeline (its stages carry one logits "
                          "tensor, a span model has two); use engine: trainer or accelerate.")
    if data_args.doc_stride >= data_args.max_seq_length:
        raise HftuneError(f"doc_stride ({data_args.doc_stride}) must be smaller than max_seq_length "
                          f"({data_args.max_seq_length}): features would not overlap; lower doc_stride.")


@dataclass
class QAFeatures:
    """What post-processing needs of a split's features, kept out of the model's inputs."""

    example: list  # feature -> index of its question
    offsets: list  # feature -> per token (start, end) character offsets in the context, None outside it


def check_rows(raw, data_args):
    """Every answer must sit at its answer_start in the context (row named), before any tokenizing."""
    for split, dataset in raw.items():
        answers = data_args.answer_column if split != "test" or data_args.answer_column in dataset.column_names else None
        require_columns(dataset, split, question_column=data_args.question_column,
                        context_column=data_args.context_column, answer_column=answers)
        if answers is None:
            continue
        for row, (context, answer) in enumerate(zip(dataset[data_args.context_column], dataset[answers])):
            texts, starts = answer.get("text", []), answer.get("answer_start", [])
            if len(texts) != len(starts):
                raise HftuneError(f"{split} row {row}: answers has {len(texts)} text(s) and {len(starts)} "
                                  "answer_start(s); give one start per text.")
            if not texts and not data_args.version_2_with_negative:
                raise HftuneError(f"{split} row {row} has no answer; set version_2_with_negative: true for data with "
                                  "unanswerable questions (SQuAD v2), or drop the row.")
            for text, start in zip(texts, starts):
                if context[start:start + len(text)] != text:
                    raise HftuneError(f"{split} row {row}: answer {text!r} is not at answer_start {start} of its "
                                      f"context (found {context[start:start + len(text)]!r}); fix answer_start.")


def load_model(model_args):
    path, common = pretrained_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    if not tokenizer.is_fast:
        raise HftuneError(f"question-answering maps tokens to context characters with a fast tokenizer; "
                          f"{type(tokenizer).__name__} is not one: use a checkpoint with tokenizer.json.")
    config = load_config(model_args, path, common)
    model = load_weights(AutoModelForQuestionAnswering, model_args, path, config,
                         ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, dtype=torch.float32, **common)
    return model, tokenizer


def span_positions(encoded, i, answer, context_index, cls_id):
    """(start, end) token positions of a feature's answer; (cls, cls) where the feature does not hold it."""
    ids = encoded["input_ids"][i]
    cls = ids.index(cls_id) if cls_id in ids else 0
    if not answer["text"]:
        return cls, cls
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    sequence = encoded.sequence_ids(i)
    tokens = [t for t, s in enumerate(sequence) if s == context_index]
    offsets = encoded["offset_mapping"][i]
    if offsets[tokens[0]][0] > start_char or offsets[tokens[-1]][1] < end_char:
        return cls, cls
    start = next(t for t in tokens if offsets[t][1] > start_char)
    end = next(t for t in reversed(tokens) if offsets[t][0] < end_char)
    return start, end


def check_room(tokenizer, questions, max_length, doc_stride):
    """Each feature holds the whole question: the context's part must still be longer than doc_stride
    (the tokenizers library panics otherwise)."""
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    room = max_length - max(lengths, default=0) - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= doc_stride:
        raise HftuneError(f"a question of {max(lengths)} tokens leaves {max(room, 0)} tokens of context per feature "
                          f"in max_seq_length {max_length}, not more than doc_stride {doc_stride}; raise max_seq_length "
                          "or lower doc_stride.")


def encode_split(dataset, tokenizer, data_args, labelled):
    """(features: input ids and, with labels, start/end positions; QAFeatures) of one split."""
    pad_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in dataset[data_args.question_column]]  # run_qa.py: leading spaces waste tokens
    contexts = list(dataset[data_args.context_column])
    pair = (questions, contexts) if pad_right else (contexts, questions)
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    check_room(tokenizer, questions, max_length, data_args.doc_stride)
    encoded = tokenizer(*pair, truncation="only_second" if pad_right else "only_first", max_length=max_length,
                        stride=data_args.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    context_index = 1 if pad_right else 0
    example = list(encoded.pop("overflow_to_sample_mapping"))
    offsets = [[o if s == context_index else None for o, s in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
               for i in range(len(example))]
    if labelled:
        answers = list(dataset[data_args.answer_column])
        positions = [span_positions(encoded, i, answers[e], context_index, tokenizer.cls_token_id) for i, e in enumerate(example)]
        encoded["start_positions"], encoded["end_positions"] = map(list, zip(*positions))
    encoded.pop("offset_mapping")
    from datasets import Dataset

    return Dataset.from_dict(dict(encoded)), QAFeatures(example, offsets)


def best_answers(features, contexts, logits, n_best, max_length, allow_null, threshold):
    """Per question: the text of the best-scoring span (start + end logit) over all its features, as
    run_qa.py's postprocess_qa_predictions picks it; "" where allow_null and the null score wins."""
    starts, ends = logits
    best = [(-np.inf, "")] * len(contexts)
    null = [np.inf] * len(contexts)
    for i, (e, offsets) in enumerate(zip(features.example, features.offsets)):
        n = len(offsets)
        null[e] = min(null[e], starts[i][0] + ends[i][0])
        top_starts = np.argsort(starts[i][:n])[::-1][:n_best]
        top_ends = np.argsort(ends[i][:n])[::-1][:n_best]
        for s in top_starts:
            for t in top_ends:
                if offsets[s] is None or offsets[t] is None or t < s or t - s + 1 > max_length:
                    continue
                score = starts[i][s] + ends[i][t]
                if score > best[e][0]:
                    best[e] = (score, contexts[e][offsets[s][0]:offsets[t][1]])
    return ["" if allow_null and null[e] - score > threshold else text for e, (score, text) in enumerate(best)]


class SpanAnswers:
    """Each split's features, contexts and reference answers: turns a split's start/end logits into answer
    texts (do_predict) and scores them (compute_metrics, for whichever split is evaluated)."""

    def __init__(self, data_args):
        self.data_args, self.splits, self.questions = data_args, {}, {}
        self.metric = load_metric("squad")

    def add(self, split, dataset, features, positions):
        labelled = self.data_args.answer_column in dataset.column_names
        references = [a["text"] for a in dataset[self.data_args.answer_column]] if labelled else None
        self.splits[split] = (features, list(dataset[self.data_args.context_column]), references, positions)
        self.questions[split] = list(dataset[self.data_args.question_column])

    def texts(self, split, logits):
        args = self.data_args
        features, contexts = self.splits[split][:2]
        return best_answers(features, contexts, logits[:2], args.n_best_size, args.max_answer_length,
                            args.version_2_with_negative, args.null_score_diff_threshold)

    def compute_metrics(self, eval_pred):
        split = self.split_of(eval_pred)
        return self.metric.compute(predictions=self.texts(split, eval_pred.predictions),
                                   references=self.splits[split][2])

    def split_of(self, eval_pred):
        """The labelled split whose features these are (validation during training; test or train when
        do_eval names them): the one with as many features and the same start/end positions."""
        for split, (features, _, references, positions) in self.splits.items():
            if references is not None and len(features.example) == len(eval_pred.predictions[0]) and all(
                    np.array_equal(a, b) for a, b in zip(eval_pred.label_ids, positions)):
                return split
        raise HftuneError("question-answering: the evaluated features belong to no labelled split of this run.")


def answer(model_dir, question, context, **settings):
    """The answer to a question about a context by a saved question-answering model: transformers 5 has no
    question-answering pipeline, so this runs the features and span choice evaluation uses.

    Example:
        >>> answer("outputs/minilm-squad", "Who wrote it?", "It was written by Ada in 1843.")  # doctest: +SKIP
        'Ada'
    """
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    args = DataFields(**{**DEFAULTS, **settings})
    features, spans = encode_split(Dataset.from_dict({"question": [question], "context": [context]}), tokenizer, args,
                                   labelled=False)
    with torch.no_grad():
        outputs = model(**DataCollatorWithPadding(tokenizer)(features.to_list()))
    logits = outputs.start_logits.numpy(), outputs.end_logits.numpy()
    return best_answers(spans, [context], logits, args.n_best_size, args.max_answer_length,
                        args.version_2_with_negative, args.null_score_diff_threshold)[0]


USAGE = ('from hftune.tasks.question_answering import answer  # transformers 5 has no question-answering pipeline\n'
         'answer("{ref}", question="Who wrote it?", context="It was written by Ada in 1843.")')


def build(model_args, data_args, raw):
    check_rows(raw, data_args)
    model, tokenizer = load_model(model_args)
    tokenized, answers = {}, SpanAnswers(data_args)
    for split, dataset in limit_splits(raw, data_args).items():
        labelled = data_args.answer_column in dataset.column_names
        tokenized[split], features = encode_split(dataset, tokenizer, data_args, labelled)
        positions = tuple(np.array(tokenized[split][k]) for k in ("start_positions", "end_positions")) if labelled else None
        answers.add(split, dataset, features, positions)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"), test_dataset=tokenized.get("test"),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=answers.compute_metrics,
        main_metric="eval_f1", pipeline_task="question-answering", span_answers=answers, usage=USAGE,
    )
