"""The HF example scripts' argument names (run_glue.py, run_classification.py, run_clm.py,
run_image_classification.py), accepted with the scripts' meaning as aliases of hftune's fields, so
their documented commands run as written. One canonical name goes to the docs and the resolved config.
A script name hftune does not support is refused with what to use instead, never ignored.

Example:
    >>> to_canonical(["--label_column_name", "sentiment", "--train_val_split=0.15"])
    ['--label_column', 'sentiment', '--validation_split_percentage=15.0']
"""

from hftune.errors import HftuneError


def _percent(fraction):
    try:
        return str(float(fraction) * 100)
    except ValueError:
        raise HftuneError(f"train_val_split must be a fraction such as 0.15, got '{fraction}'.") from None


def _same(value):
    return value


# script name -> (hftune's name, how the value converts)
ALIASES = {
    "label_column_name": ("label_column", _same),
    "text_column_names": ("text_column", _same),  # several columns, comma-separated: joined with a space
    "text_column_name": ("text_column", _same),  # run_ner.py: the words column
    "image_column_name": ("image_column", _same),
    "train_val_split": ("validation_split_percentage", _percent),  # a fraction there, a percentage here
    "train_dir": ("train_file", _same),
    "validation_dir": ("validation_file", _same),
    "image_processor_name": ("tokenizer_name", _same),
}

# script names with no hftune equivalent -> what to do instead
UNSUPPORTED = {
    "overwrite_cache": "datasets caches each preprocessing step by its inputs and code, so a changed setting is "
                       "never served stale; drop overwrite_cache",
    "use_fast_tokenizer": "hftune loads the fast tokenizer wherever one exists; drop use_fast_tokenizer",
    "low_cpu_mem_usage": "transformers 5 always loads weights without initialising them first; drop it",
    "torch_dtype": "hftune keeps float32 master weights; use bf16: true or fp16: true for mixed precision",
    "dtype": "hftune keeps float32 master weights; use bf16: true or fp16: true for mixed precision",
    "token": "set HF_TOKEN (or run `hf auth login`) to read private checkpoints and data sets",
    "use_auth_token": "set HF_TOKEN (or run `hf auth login`) to read private checkpoints and data sets",
    "max_predict_samples": "do_predict predicts every row of predict_split; give a smaller test_file",
    "text_column_delimiter": "hftune joins the columns of text_column_names with a space; drop it",
    "remove_splits": "hftune reads only the train, validation and test splits; drop remove_splits",
    "remove_columns": "hftune reads only the columns it is told or detects; drop remove_columns",
    "metric_name": "hftune computes every metric of the task (accuracy and macro-F1; MSE, RMSE, Pearson and "
                   "Spearman for regression; micro/macro-F1 and subset accuracy for multi-label); choose the one "
                   "that selects checkpoints with metric_for_best_model",
}


def _split(token):
    name, has_value, value = token[2:].partition("=")
    return name.replace("-", "_"), has_value, value


def to_canonical(argv):
    """argv with every script name replaced by hftune's (values converted); the CLI and the recipe
    (as tokens) each go through on their own. A script name and its hftune name both given: an error."""
    out, seen = [], {_split(t)[0]: _split(t)[0] for t in argv if t.startswith("--")}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            out.append(token)
            i += 1
            continue
        name, has_value, value = _split(token)
        if name in UNSUPPORTED:
            raise HftuneError(f"{name} is an HF example-script option hftune does not support: {UNSUPPORTED[name]}.")
        if name not in ALIASES:
            out.append(token)
            i += 1
            continue
        canonical, convert = ALIASES[name]
        if seen.get(canonical, name) != name:
            raise HftuneError(f"{name} and {seen[canonical]} both set {canonical}; keep one.")
        seen[canonical] = name
        if has_value:
            out.append(f"--{canonical}={convert(value)}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out += [f"--{canonical}", convert(argv[i + 1])]
            i += 1
        else:
            raise HftuneError(f"{name} needs a value.")
        i += 1
    return out
