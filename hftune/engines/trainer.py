"""The default engine: Hugging Face Trainer over a TaskBundle."""

from transformers import Trainer


class HftuneTrainer(Trainer):
    """Trainer that adds a task's derived metrics (e.g. perplexity from eval_loss) to every log
    line, so they reach log_history, the results files and metric_for_best_model."""

    def __init__(self, *args, derived_metrics=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.derived_metrics = derived_metrics

    def log(self, logs, *args, **kwargs):
        if self.derived_metrics:
            logs.update(self.derived_metrics(logs))  # in place: evaluate() returns this same dict
        super().log(logs, *args, **kwargs)


def build_trainer(bundle, training_args):
    return HftuneTrainer(
        model=bundle.model,
        args=training_args,
        train_dataset=bundle.train_dataset if training_args.do_train else None,
        eval_dataset=bundle.eval_dataset if training_args.do_eval else None,
        processing_class=bundle.processor,
        data_collator=bundle.data_collator,
        compute_metrics=bundle.compute_metrics,
        derived_metrics=bundle.derived_metrics,
    )
