"""What a from_pretrained call will find in a local folder, checked before it runs, so that a folder
that is no checkpoint, an unknown model type, a model of another kind, a damaged weights file or a
missing tokenizer is one line naming the folder and the fix, not a traceback or a silent fallback."""

import json
import os
from contextlib import contextmanager

from huggingface_hub.errors import StrictDataclassError

from hftune.errors import HftuneError

# Files any transformers tokenizer loads from (fast, WordPiece, BPE, SentencePiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "merges.txt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def is_local(name):
    """A path rather than a Hub id: absolute, relative with ./ or ~, or an existing file or folder."""
    name = str(name)
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def check_folder(name, path, role):
    """A local `role` (model_name_or_path, tokenizer_name, ...) must be a folder."""
    if is_local(path) and not os.path.isdir(os.path.expanduser(path)):
        what = "a file" if os.path.isfile(path) else "not a folder"
        raise HftuneError(f"{role} '{name}' is {what}; give the folder a run or save_pretrained wrote, or a Hub id.")


def check_checkpoint(name, path, role):
    """A local checkpoint folder: a config.json transformers knows, weights files that are whole."""
    check_folder(name, path, role)
    if not is_local(path):
        return
    config = read_config(name, path, role)
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = config.get("model_type")
    if "auto_map" in config:  # modelling code shipped with the checkpoint (trust_remote_code): its own checks
        return
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        import transformers

        raise HftuneError(f"{role} '{name}': config.json names model_type '{model_type}', which transformers "
                          f"{transformers.__version__} does not know; fix config.json or upgrade transformers.")
    with building(name, role):  # the values themselves: types, sizes (the tokenizer reads this config first)
        AutoConfig.from_pretrained(path)
    check_weight_files(name, path, role)


def check_architecture(name, config, auto_class, role="model_name_or_path"):
    """The task's Auto class must have a model for this config (a ResNet cannot classify text)."""
    if type(config) not in auto_class._model_mapping:
        fix = "distill from a teacher made for this task" if role.startswith("teacher") else \
            "choose a checkpoint made for this task (or set task to the one it was made for)"
        raise HftuneError(f"{role} '{name}' is a {config.model_type} model, for which {auto_class.__name__} has no "
                          f"class; {fix}.")


def read_config(name, path, role):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise HftuneError(f"{role} '{name}' has no config.json, so it is no transformers checkpoint; give the folder "
                          "a run or save_pretrained wrote.")
    try:
        with open(file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise HftuneError(f"{role} '{name}': config.json is not valid JSON ({err}); fix or replace it.") from None
    if not isinstance(config, dict):
        raise HftuneError(f"{role} '{name}': config.json holds no mapping of settings; fix or replace it.")
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise HftuneError(f"{role} '{name}': config.json's architectures is {names!r}, not a list of class names "
                          "(e.g. [\"BertForMaskedLM\"]); fix config.json.")
    return config


def check_weight_files(name, path, role):
    """Each safetensors file's header must match its size (a truncated copy or download fails here)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise HftuneError(f"{role} '{name}': {file} is damaged ({err}); copy or download it again.") from None


def check_processor_files(model_args, path, kind="tokenizer"):
    """The tokenizer (or image processor) a text (or image) task needs: tokenizer_name's, else the
    checkpoint's own. A folder without one would otherwise load an empty stand-in or fail later."""
    if model_args.tokenizer_name:
        check_folder(model_args.tokenizer_name, path, "tokenizer_name")
        return
    if not is_local(path) or not os.path.isdir(path):
        return
    wanted = TOKENIZER_FILES if kind == "tokenizer" else PROCESSOR_FILES
    if kind == "tokenizer" and any(os.path.isfile(os.path.join(path, file)) for file in PROCESSOR_FILES):
        if not any(os.path.isfile(os.path.join(path, file)) for file in wanted):
            raise HftuneError(f"model_name_or_path '{model_args.model_name_or_path}' is an image model (it has an "
                              "image processor, no tokenizer); use task: image-classification, or a text checkpoint.")
    if not any(os.path.isfile(os.path.join(path, file)) for file in wanted):
        raise HftuneError(f"model_name_or_path '{model_args.model_name_or_path}' holds no {kind} files "
                          f"({', '.join(wanted[:3])}, ...); set tokenizer_name to the {kind} it was trained with.")


@contextmanager
def building(name, role="model_name_or_path"):
    """Building a config or model from a checkpoint: what transformers or torch raise for values its
    config.json cannot hold (a wrong type, a width that the heads do not divide, a size of 0 or less)
    becomes one line naming the folder; the exception's type and first line stay in it."""
    try:
        yield
    except HftuneError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError, StrictDataclassError) as err:
        if "ignore_mismatched_sizes" in str(err):
            raise HftuneError(f"{role} '{name}': tensors in its weights have other shapes than its config says "
                              "(transformers' report above names them); fix config.json, or for a new task head "
                              "set ignore_mismatched_sizes: true.") from None
        first = (str(err).strip().splitlines() or [""])[0]
        raise HftuneError(f"{role} '{name}': transformers cannot build a model from its config.json "
                          f"({type(err).__name__}: {first}); fix config.json.") from None


def check_mismatched(info, model, model_args):
    """Only the task head may be re-initialised for a shape that differs from the checkpoint's (a
    checkpoint fine-tuned on other labels): a mismatch in the backbone (base_model_prefix) means the
    config and the weights disagree, which would otherwise quietly re-initialise a trained layer."""
    prefix = f"{model.base_model_prefix}."
    backbone = sorted((key, tuple(old), tuple(new)) for key, old, new in info.get("mismatched_keys", ())
                      if key.startswith(prefix))
    if not backbone:
        return
    if model_args.reinit_mismatched_backbone:
        import logging

        logging.getLogger("hftune").warning(f"{len(backbone)} backbone tensors re-initialised: their shapes differ "
                                            f"from the checkpoint's (reinit_mismatched_backbone: true)")
        return
    key, old, new = backbone[0]
    raise HftuneError(f"model_name_or_path '{model_args.model_name_or_path}': {key} has shape {list(old)} in the "
                      f"weights but {list(new)} in the config ({len(backbone)} tensors disagree); fix config.json "
                      "(or config_name / config_overrides), or set reinit_mismatched_backbone: true to train them anew.")
