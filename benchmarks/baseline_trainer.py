"""The baseline hftune is benchmarked against: a plain Hugging Face Trainer fine-tune written the
way the transformers docs teach it (the `training`, `tasks/sequence_classification`,
`tasks/language_modeling` and `tasks/image_classification` guides, with HfArgumentParser as in
the example scripts). It imports nothing from hftune.

- text-classification: AutoTokenizer, `dataset.map(tokenize)` with `padding="max_length"` (the
  guides' first example) or `--padding dynamic` (DataCollatorWithPadding pads each batch),
  AutoModelForSequenceClassification, accuracy.
- causal-lm: each text (plus EOS) truncated to max_seq_length, batches padded by
  DataCollatorForLanguageModeling(mlm=False) (or pre-padded to max_length); perplexity.
- image-classification: an image folder, AutoImageProcessor in `with_transform`,
  AutoModelForImageClassification, accuracy.
- sft: JSON Lines of `messages`; the chat template applied to the whole conversation, the prompt
  (the template's rendering up to the last turn, with the generation prompt) tokenized apart and
  its length masked with -100, batches padded by DataCollatorForSeq2Seq; eval loss.

Like hftune, it reads a validation_file or carves validation_split_percentage of a CSV's rows
out as validation (same seed), and keeps the first max_train_samples / max_eval_samples rows, so both see the same data;
metrics go to output_dir/all_results.json through `trainer.save_metrics`, as hftune's do.

Example:
    python benchmarks/baseline_trainer.py --task text-classification --model_name_or_path MODEL_DIR \
        --train_file tweets.csv --label_column sentiment --padding max_length --max_train_samples 512 \
        --output_dir /tmp/baseline --per_device_train_batch_size 32 --learning_rate 1e-4 --report_to none
"""

import math
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
    AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding, DefaultDataCollator,
    HfArgumentParser,
    Trainer, TrainingArguments, set_seed,
)


@dataclass
class ScriptArguments:
    task: str = field(default="text-classification", metadata={"help": "text-classification, causal-lm, sft or image-classification."})
    model_name_or_path: str = field(default=None, metadata={"help": "Local checkpoint folder or Hub id."})
    train_file: str = field(default=None, metadata={"help": "A CSV (text tasks) or an image folder."})
    validation_file: str = field(default=None, metadata={"help": "A CSV or an image folder; text tasks carve one from train without it."})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    image_column: str = field(default="image")
    padding: str = field(default="max_length", metadata={"help": "max_length (pad when tokenizing) or dynamic (pad each batch)."})
    max_seq_length: int = field(default=128)
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)
    validation_split_percentage: float = field(default=5)


def first(dataset, n):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def csv_splits(args, seed):
    if args.validation_file:
        data = load_dataset("csv", data_files={"train": args.train_file, "validation": args.validation_file})
        train, evaluation = data["train"], data["validation"]
    else:
        split = load_dataset("csv", data_files=args.train_file)["train"].train_test_split(
            test_size=args.validation_split_percentage / 100, seed=seed)
        train, evaluation = split["train"], split["test"]
    return first(train, args.max_train_samples), first(evaluation, args.max_eval_samples)


def accuracy(eval_pred):
    predictions = np.argmax(eval_pred.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_pred.label_ids).mean())}


def text_classification(args, training_args):
    train, evaluation = csv_splits(args, training_args.seed)
    names = sorted(set(train[args.label_column]))
    label2id = {name: i for i, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    padding = "max_length" if args.padding == "max_length" else False

    def tokenize(examples):
        encoded = tokenizer(examples[args.text_column], padding=padding, truncation=True, max_length=args.max_seq_length)
        encoded["label"] = [label2id[name] for name in examples[args.label_column]]
        return encoded

    train, evaluation = (d.map(tokenize, batched=True, remove_columns=d.column_names) for d in (train, evaluation))
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id
    )
    return model, tokenizer, train, evaluation, DataCollatorWithPadding(tokenizer), accuracy


def causal_lm(args, training_args):
    train, evaluation = csv_splits(args, training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding = "max_length" if args.padding == "max_length" else False

    def tokenize(examples):
        # EOS ends every text (unless truncation cuts it), so the model learns where texts end.
        texts = [text + tokenizer.eos_token for text in examples[args.text_column]]
        return tokenizer(texts, padding=padding, truncation=True, max_length=args.max_seq_length)

    train, evaluation = (d.map(tokenize, batched=True, remove_columns=d.column_names) for d in (train, evaluation))
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    return model, tokenizer, train, evaluation, DataCollatorForLanguageModeling(tokenizer, mlm=False), None


def image_classification(args, training_args):
    train = first(load_dataset("imagefolder", data_dir=args.train_file, split="train"), args.max_train_samples)
    evaluation = first(load_dataset("imagefolder", data_dir=args.validation_file, split="train"), args.max_eval_samples)
    names = train.features[args.label_column].names
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)

    def transforms(examples):
        images = [image.convert("RGB") for image in examples.pop(args.image_column)]
        examples["pixel_values"] = processor(images, return_tensors="pt")["pixel_values"]
        return examples

    train, evaluation = train.with_transform(transforms), evaluation.with_transform(transforms)
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
    )
    training_args.remove_unused_columns = False  # the guide's setting: the transform needs the image column
    return model, processor, train, evaluation, DefaultDataCollator(), accuracy


def sft(args, training_args):
    data = load_dataset("json", data_files={"train": args.train_file, "validation": args.validation_file})
    train, evaluation = first(data["train"], args.max_train_samples), first(data["validation"], args.max_eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)

    def tokenize(example):
        messages = example["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=args.max_seq_length)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * prompt_length + ids[prompt_length:])[: len(ids)]}

    train, evaluation = (d.map(tokenize, remove_columns=d.column_names) for d in (train, evaluation))
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    return model, tokenizer, train, evaluation, DataCollatorForSeq2Seq(tokenizer), None


TASKS = {"text-classification": text_classification, "causal-lm": causal_lm, "image-classification": image_classification,
         "sft": sft}


def main():
    args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    model, processor, train, evaluation, collator, compute_metrics = TASKS[args.task](args, training_args)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=processor,
        data_collator=collator, compute_metrics=compute_metrics,
    )
    result = trainer.train()
    trainer.save_model()
    metrics = {**result.metrics, "train_samples": len(train)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    metrics = {**trainer.evaluate(), "eval_samples": len(evaluation)}
    if args.task in ("causal-lm", "sft"):
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
