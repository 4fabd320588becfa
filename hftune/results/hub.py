"""Push the run to the Hugging Face Hub: `push_to_hub: true`, `hub_model_id`, `hub_private_repo`,
`hub_strategy`, and for PEFT runs the adapter (default) or, with `hub_push_merged: true`, the merged model.

hftune pushes once at the end of the run, after the model card (output_dir/README.md) is written,
with huggingface_hub's own create_repo + upload_folder / create_commit, for every engine. With
`engine: trainer` and `hub_strategy` every_save, checkpoint or all_checkpoints, Trainer also pushes
at each save during training (HftuneTrainer lets it; it never lets Trainer write a card of its own).

The token comes from the environment (HF_TOKEN) or the HF login (`hf auth login`), as huggingface_hub
finds it; `hub_token` is refused, because TrainingArguments would pickle it into training_args.bin.
A push that cannot happen (no token, a malformed repo id, the Hub refusing) is an HftuneError after
training, with the trained model kept in output_dir; the first two are also warned about at the start.

Example:
    >>> from hftune.run import main
    >>> main(["--push_to_hub", "true", "--hub_model_id", "me/minilm-tweets", "--hub_strategy", "end"])  # doctest: +SKIP
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hftune.errors import HftuneError
from hftune.outputs import MERGED_DIR

logger = logging.getLogger("hftune")

# Not pushed: Trainer's own exclusions (private files, checkpoint-* folders).


@dataclass
class TrainingFields:
    """Hub fields beyond TrainingArguments' own (push_to_hub, hub_model_id, hub_private_repo, hub_strategy)."""

    hub_push_merged: bool = field(
        default=False,
        metadata={"help": "PEFT runs: push the merged model (output_dir/merged, needs merge_adapter: true) instead "
                          "of the adapter; needs hub_strategy: end."},
    )


IGNORE = ["_*", "checkpoint-*"]
ADAPTER_FILES = ["adapter_*", "base_config/*"]  # what a merged push leaves out


# ---- parse time ----

def repo_id_for(args):
    """hub_model_id, or as Trainer does, the name of output_dir (the Hub puts it in the token's namespace)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def check_hub_args(model_args, args):
    """Refuse Hub settings that cannot work or would leak the token; warn, on the first process, about what
    would make the push at the end fail (training still runs and saves)."""
    if args.hub_token:
        raise HftuneError("hub_token is not accepted in a config or on the command line (it would be saved with "
                          "the run); set the HF_TOKEN environment variable or run `hf auth login`.")
    if args.hub_push_merged:
        _check_merged(model_args, args)
    if not args.push_to_hub:
        return
    if args.engine != "trainer" and args.hub_strategy != "end":
        raise HftuneError(f"hub_strategy {args.hub_strategy.value} pushes at each save, which only engine: trainer "
                          f"does; engine: {args.engine} pushes once at the end: set hub_strategy: end.")
    if os.environ.get("RANK", "0") == "0":
        for problem in push_problems(args):
            logger.warning(f"push_to_hub: {problem}; training goes ahead, but the push at the end will fail.")


def check_config(model_args, data_args, training_args):
    """The feature's parse-time check (hftune.features)."""
    check_hub_args(model_args, training_args)


def _check_merged(model_args, args):
    if not args.push_to_hub:
        raise HftuneError("hub_push_merged is set but push_to_hub is not; set push_to_hub: true or drop it.")
    if model_args.peft is None or not model_args.merge_adapter:
        raise HftuneError("hub_push_merged pushes output_dir/merged, which a PEFT run writes with merge_adapter: true; "
                          "set peft and merge_adapter: true, or drop hub_push_merged.")
    if args.hub_strategy != "end":
        raise HftuneError("hub_push_merged needs hub_strategy: end (pushes during training hold the adapter, "
                          "which the merged model would sit beside).")


def push_problems(args):
    """What would make a push fail before it reaches the Hub: a malformed repo id, no token, offline mode."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems = []
    try:
        validate_repo_id(repo_id_for(args))
    except HFValidationError as err:
        problems.append(f"hub_model_id '{repo_id_for(args)}' is not a valid repo id ({_first_line(err)})")
    if get_token() is None:
        problems.append("no Hugging Face token found (set HF_TOKEN or run `hf auth login`)")
    if constants.HF_HUB_OFFLINE:
        problems.append("HF_HUB_OFFLINE is set, so nothing can reach the Hub")
    return problems


# ---- end of the run ----

def push_results(trainer, bundle, training_args):
    """Push output_dir when push_to_hub is set; a push that fails is a one-line HftuneError, the model stays on disk."""
    args = training_args
    if not args.push_to_hub or not trainer.is_world_process_zero():
        return
    out, repo_id = os.path.abspath(args.output_dir), repo_id_for(args)
    problems = push_problems(args)
    target = "NAMESPACE/NAME" if any("not a valid repo id" in p for p in problems) else repo_id
    keep = f"the trained model is kept in {out}; push it later with `hf upload {target} {out} --exclude 'checkpoint-*'`"
    _report_pushes_during_training(trainer)
    if problems:
        raise HftuneError(f"cannot push to the Hub: {problems[0]}; {keep}.")
    merged = args.hub_push_merged
    try:
        url = _push(repo_id, out, args, merged)
    except Exception as err:  # anything the Hub or the network answers: the run itself succeeded
        raise HftuneError(f"push to the Hub repo '{repo_id}' failed: {describe_error(err)}; {keep}.") from None
    what = "merged model" if merged else "adapter" if bundle.adapter is not None else "model"
    print(f"  pushed the {what} to {url}")


def _push(repo_id, out, args, merged):
    """create_repo (exist_ok) then one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
    message = "End of training"
    if not merged:  # the adapter or the full model: output_dir as Trainer pushes it, minus the merged copy
        api.upload_folder(repo_id=repo.repo_id, folder_path=out, commit_message=message, revision=args.hub_revision,
                          ignore_patterns=IGNORE + [f"{MERGED_DIR}/*"])
    else:
        api.create_commit(repo_id=repo.repo_id, operations=_merged_operations(out), commit_message=message,
                          revision=args.hub_revision)
    return str(repo)


def _merged_operations(out):
    """The merged model at the repo's root (so from_pretrained(repo) loads it without peft), plus the card,
    results and config from output_dir; the adapter files stay local."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import filter_repo_objects

    def files(root, ignore):
        paths = [p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()]
        return {rel: os.path.join(root, rel) for rel in filter_repo_objects(paths, ignore_patterns=ignore)}

    chosen = files(out, IGNORE + ADAPTER_FILES + [f"{MERGED_DIR}/*"])
    chosen.update(files(os.path.join(out, MERGED_DIR), []))  # the merged model's files win
    return [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path) for rel, path in sorted(chosen.items())]


def _report_pushes_during_training(trainer):
    """Trainer pushes at each save in the background and drops failures silently: wait, and warn about them."""
    pending = getattr(trainer, "push_in_progress", None)
    if pending is None:
        return
    pending.wait_until_done()
    failed = [job.exception() for job in pending.jobs if not job.cancelled() and job.exception() is not None]
    if failed:
        logger.warning(f"{len(failed)} push(es) during training failed: {describe_error(failed[0])}")


def _first_line(err):
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def describe_error(err):
    """One line: the HTTP status and the Hub's own message when there is one."""
    response = getattr(err, "response", None)
    server = getattr(err, "server_message", None)
    if response is not None and server:
        return f"{response.status_code} {server.splitlines()[0]}"
    return f"{type(err).__name__}: {_first_line(err)}"
