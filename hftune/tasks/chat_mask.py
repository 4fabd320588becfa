"""sft's examples: input_ids and labels of one conversation, from ONE rendering of the whole
conversation by the chat template and ONE tokenization of that text.

The trained characters of an assistant turn run from the end of the generation prompt before it
(the template rendering the conversation up to that turn, `add_generation_prompt=True`) to the end
of the template's rendering of the conversation up to and including the turn, trailing whitespace
excluded: the turn's text and its end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, ...). Boundary
rule: a token is trained when any of its characters is, so " blue" after "The sky is " is trained
and covers "blue". The mask needs no `{% generation %}` tags; where the template has them, both
masks must agree. Labels are set per token, never by token id, so an EOS that is also the pad token
stays trained.

Example:
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> labeller = Labeller(tokenizer, tokenizer.chat_template, "assistant", 128, "keep_start")  # doctest: +SKIP
    >>> labeller.example(Conversation([{"role": "user", "content": "Hi"},
    ...                                {"role": "assistant", "content": "Hello"}], 0), 0, "train")  # doctest: +SKIP
    {'input_ids': [...], 'labels': [-100, ..., 19556, 2], 'status': 'kept'}
"""

from dataclasses import dataclass

from jinja2 import TemplateError

from hftune.errors import HftuneError

TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("keep_start", "drop_turns", "drop_row", "error")
KEPT, TRUNCATED, TOO_LONG, NO_LABELS = "kept", "truncated", "dropped_too_long", "dropped_no_labels"
IGNORE = -100


def has_generation_tags(template):
    return "generation" in template and "endgeneration" in template


@dataclass
class Labeller:
    tokenizer: object
    template: str  # None: plain prompt-completion text only
    train_on: str
    max_length: int
    truncation: str

    def example(self, conversation, index, split):
        """{input_ids, labels, status}: status says whether the row was kept whole, truncated or dropped."""
        where = f"row {index} of the {split} split"
        while True:
            ids, labels = self.encode(conversation, where)
            if len(ids) <= self.max_length:
                return self._done(ids, labels, KEPT)
            if self.truncation == "error":
                raise HftuneError(f"{where} has {len(ids)} tokens, more than max_seq_length={self.max_length} "
                                  "(truncation_mode: error); raise max_seq_length or choose another truncation_mode.")
            if self.truncation == "drop_row":
                return self._done([], [], TOO_LONG)
            if self.truncation == "keep_start":
                return self._done(ids[: self.max_length], labels[: self.max_length], TRUNCATED)
            conversation = drop_first_exchange(conversation)
            if conversation is None:
                return self._done([], [], TOO_LONG)

    @staticmethod
    def _done(ids, labels, status):
        if status != TOO_LONG and all(label == IGNORE for label in labels[1:]):  # the first token predicts nothing
            return {"input_ids": [], "labels": [], "status": NO_LABELS}
        return {"input_ids": ids, "labels": labels, "status": status}

    def encode(self, conversation, where):
        """(input_ids, labels) of the whole conversation, untruncated."""
        _, _, _, ids, labels = self.labelled(conversation, where)
        return ids, labels

    def labelled(self, conversation, where):
        """(text, trained spans, token offsets, input_ids, labels) of the whole conversation, untruncated."""
        text, spans = self.render(conversation, where)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [token if any(a < end and start < b for start, end in spans) else IGNORE
                  for token, (a, b) in zip(ids, encoded["offset_mapping"])]
        if conversation.plain:  # no template marks the end: EOS does, trained with the completion
            eos = self.tokenizer.eos_token_id
            ids.append(eos)
            labels.append(eos)
        elif self.train_on == "assistant" and has_generation_tags(self.template) and not any(
                m["role"] == "assistant" for m in conversation.messages[: conversation.completion_start]):
            self.check_tags(conversation.messages, ids, labels, where)
        return text, spans, encoded["offset_mapping"], ids, labels

    def render(self, conversation, where):
        """(text, trained character spans)."""
        messages = conversation.messages
        if conversation.plain:
            prompt, completion = messages
            text = prompt + completion
            return text, [(0 if self.train_on == "all" else len(prompt), len(text))]
        text = self.apply(messages, where)
        if self.train_on == "all":  # up to the last end-of-turn marker: generation learns to stop there
            return text, [(0, len(text.rstrip()))]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= conversation.completion_start]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        return text, [self.turn_span(messages, i, text, where) for i in turns]

    def turn_span(self, messages, i, text, where):
        before = self.apply(messages[:i], where, generation_prompt=True) if i else ""
        through = self.apply(messages[: i + 1], where)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise HftuneError(
                f"{where}: the chat template renders the conversation up to message {i} differently from the start "
                "of the whole conversation, so the trained tokens cannot be located; use a template whose rendering "
                "of a prefix is a prefix of the whole (chat_template).")
        span = through[len(before):].rstrip()
        if span.endswith(messages[i]["content"].strip()):
            raise HftuneError(
                f"{where}: the chat template ends assistant turns with nothing after their text, so the model would "
                "never learn to stop; use a template with an end-of-turn token (e.g. chat_template: chatml).")
        return len(before), len(before) + len(span)

    def apply(self, messages, where, generation_prompt=False):
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise HftuneError(f"{where}: the chat template refuses it ({err}); fix or drop the row.") from None

    def check_tags(self, messages, ids, labels, where):
        """The template's own `{% generation %}` mask must equal the offset mask."""
        tagged = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                    return_dict=True, return_assistant_tokens_mask=True)
        ours = [int(label != IGNORE) for label in labels]
        if list(tagged["input_ids"]) != ids or list(tagged["assistant_masks"]) != ours:
            first = next((k for k, (a, b) in enumerate(zip(tagged["assistant_masks"], ours)) if a != b), len(ours))
            raise HftuneError(
                f"{where}: the template's {{% generation %}} tags train other tokens than its assistant turns (first "
                f"difference at token {first}); fix the tags or use a template without them.")


def drop_first_exchange(conversation):
    """The conversation without its earliest turns up to and including the first assistant turn (a
    leading system message stays); None when no trained turn would be left."""
    messages = conversation.messages
    if conversation.plain:
        return None
    first = 1 if messages[0]["role"] == "system" else 0
    answer = next((i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"), None)
    if answer is None:
        return None
    kept = messages[:first] + messages[answer + 1:]
    start = max(first, conversation.completion_start - (answer + 1 - first))
    if not any(m["role"] == "assistant" for m in kept[start:]):
        return None
    return type(conversation)(kept, start)
