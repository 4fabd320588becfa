"""The default engine: Hugging Face Trainer over a TaskBundle."""

from transformers import Trainer


def build_trainer(bundle, training_args, callbacks=None):
    return Trainer(
        model=bundle.model,
        args=training_args,
        train_dataset=bundle.train_dataset if training_args.do_train else None,
        eval_dataset=bundle.eval_dataset if training_args.do_eval else None,
        processing_class=bundle.processor,
        data_collator=bundle.data_collator,
        compute_metrics=bundle.compute_metrics,
        callbacks=callbacks,
    )
