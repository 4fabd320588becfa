"""The chat template sft renders rows with: the tokenizer's own, a Jinja file, or ChatML for a base
model without one (its markers added as special tokens, new embedding rows at the mean of the old).
The chosen template is set on the tokenizer, so the saved tokenizer carries exactly it.
"""

import logging
import os

from hftune.errors import HftuneError

logger = logging.getLogger("hftune")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def needs_template(dataset, columns, fmt):
    """Plain prompt-completion text (strings) is trained without a chat template. columns: chat.Columns."""
    if fmt != "prompt-completion" or len(dataset) == 0:
        return True
    return not isinstance(dataset[0][columns.of(fmt)["prompt"]], str)


def load_template(tokenizer, model, wanted, name, required=True):
    """The template rows are rendered with (`wanted`: the chat_template field), set on the tokenizer
    (None for plain text without one). model: None where only the tokenizer is loaded (inspect)."""
    if wanted == "chatml":
        add_chatml_tokens(tokenizer, model)
        template = CHATML
    elif wanted:
        if not os.path.isfile(wanted):
            raise HftuneError(f"chat_template '{wanted}' is not a file; give a Jinja file or chatml.")
        with open(wanted, encoding="utf-8") as handle:
            template = handle.read()
    else:
        template = tokenizer.chat_template
    if not template and not required:
        return None
    if not template:
        raise HftuneError(f"the tokenizer of '{name}' has no chat template; set chat_template: chatml (adds its tokens) "
                          "or a Jinja file.")
    tokenizer.chat_template = template
    return template


def add_chatml_tokens(tokenizer, model):
    """ChatML's markers as special tokens; new embedding rows start at the mean of the old ones."""
    new = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        if model is not None:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info(f"chat_template: chatml added the tokens {new} (embeddings resized to {len(tokenizer)})")
