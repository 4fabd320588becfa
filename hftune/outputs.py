"""Names of what a run writes into output_dir, in one place: the config writes the resolved config,
checkpoints copy it, the card links it, PEFT writes the base config and merged model, the Hub push
picks among them."""

CONFIG_FILE = "hftune_config.yaml"  # the resolved config every training run writes
EVALUATE_CONFIG_FILE = "hftune_evaluate_config.yaml"  # an evaluation alone keeps the trained model's config
BASE_CONFIG_DIR = "base_config"  # not output_dir/config.json: transformers would take the folder for a full model
MERGED_DIR = "merged"  # base + adapter as a plain checkpoint (merge_adapter: true)


def check_output_location(out):
    """output_dir must be a folder hftune can write, checked before anything loads or is written:
    an existing folder, or a path whose nearest existing parent is a folder where files can be made.
    (A temporary file there, never a folder: every process of a launch runs this check at once.)"""
    import os
    import tempfile

    from hftune.errors import HftuneError

    if not str(out).strip():
        raise HftuneError("output_dir is empty; name the folder the run writes to (e.g. output_dir: out/my-run).")
    if os.path.lexists(out) and not os.path.isdir(out):
        what = "a link to nothing" if os.path.islink(out) else "a file"
        raise HftuneError(f"output_dir '{out}' is {what}, not a folder; choose another output_dir.")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HftuneError(f"output_dir '{out}' lies under '{parent}', which is a file; choose another output_dir.")
    try:
        tempfile.TemporaryFile(dir=parent).close()  # root ignores permission bits: only trying tells
    except OSError as err:
        raise HftuneError(f"output_dir '{out}' cannot be written ({err.strerror} in '{parent}'); choose a folder "
                          "you can write to.") from None
