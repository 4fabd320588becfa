"""hftune: fine-tune Hugging Face checkpoints from one config and one command."""

__version__ = "0.1.0"
