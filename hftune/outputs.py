"""Names of what a run writes into output_dir, in one place: the config writes the resolved config,
checkpoints copy it, the card links it, PEFT writes the base config and merged model, the Hub push
picks among them."""

CONFIG_FILE = "hftune_config.yaml"  # the resolved config every training run writes
EVALUATE_CONFIG_FILE = "hftune_evaluate_config.yaml"  # an evaluation alone keeps the trained model's config
BASE_CONFIG_DIR = "base_config"  # not output_dir/config.json: transformers would take the folder for a full model
MERGED_DIR = "merged"  # base + adapter as a plain checkpoint (merge_adapter: true)
