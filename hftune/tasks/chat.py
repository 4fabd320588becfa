"""sft's data formats: each row becomes one `Conversation` (messages, and which of them are trained).

Formats, detected from the columns (or named by `data_format`):
- `messages`: a list of {role, content}, roles system / user / assistant / tool;
- `sharegpt`: `conversations` = [{from, value}], with human/gpt/system/tool/... mapped to those roles;
- `prompt-completion`: `prompt` and `completion`, both strings (plain text: no chat template, an EOS
  after the completion, as trl's SFTTrainer does) or both message lists (rendered with the template);
- `alpaca`: `instruction`, optional `input` (appended after a blank line), `output`, optional `system`.
Only assistant turns are trained, and for prompt-completion only the completion's.

Example:
    >>> to_conversation({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca", COLUMNS, 0, "train")
    Conversation(messages=[{'role': 'user', 'content': 'Add\\n\\n2+2'}, {'role': 'assistant', 'content': '4'}], \
completion_start=0, plain=False)
"""

from dataclasses import dataclass

from trl import maybe_convert_to_chatml

from hftune.errors import HftuneError

FORMATS = ("messages", "sharegpt", "prompt-completion", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "assistant"}


@dataclass(frozen=True)
class Columns:
    """The columns each format reads (messages_column, prompt_column, completion_column; None: the defaults)."""

    messages: str = None
    prompt: str = None
    completion: str = None

    def of(self, fmt):
        """{part: column} of a format."""
        if fmt == "messages":
            return {"messages": self.messages or "messages"}
        if fmt == "sharegpt":
            return {"messages": self.messages or "conversations"}
        if fmt == "prompt-completion":
            return {"prompt": self.prompt or "prompt", "completion": self.completion or "completion"}
        return {"prompt": self.prompt or "instruction", "completion": self.completion or "output"}


COLUMNS = Columns()


@dataclass
class Conversation:
    messages: list  # [{role, content}]; for plain prompt-completion: [prompt, completion] strings
    completion_start: int  # messages before this index are prompt, never trained
    plain: bool = False  # prompt-completion strings: plain text, no chat template


def detect_format(column_names, wanted, columns):
    """The format named by `data_format`, else the one format whose columns the data has."""
    if wanted is not None:
        if wanted not in FORMATS:
            raise HftuneError(f"data_format '{wanted}' is not one of {list(FORMATS)}.")
        missing = [c for c in columns.of(wanted).values() if c not in column_names]
        if missing:
            raise HftuneError(f"data_format {wanted} reads the column(s) {missing}, which the data lacks (columns: "
                              f"{list(column_names)}); set {'messages_column' if 'messages' in columns.of(wanted) else 'prompt_column/completion_column'}.")
        return wanted
    found = [fmt for fmt in FORMATS if all(c in column_names for c in columns.of(fmt).values())]
    if set(found) == {"messages", "sharegpt"} and columns.messages:
        found = ["messages"]  # one named column: its rows say which (role/content or from/value)
    if set(found) == {"prompt-completion", "alpaca"} and (columns.prompt or columns.completion):
        found = ["prompt-completion"]  # named columns: a pair; Alpaca is data_format: alpaca
    if len(found) != 1:
        what = "matches several formats " + str(found) if found else "matches no sft format"
        raise HftuneError(f"the data (columns {list(column_names)}) {what}; set data_format (one of {list(FORMATS)}) "
                          "and, if the names differ, messages_column / prompt_column / completion_column.")
    return found[0]


def to_conversation(row, fmt, columns, index, split):
    """The row's Conversation; a malformed row is a one-line error naming it."""
    where = f"row {index} of the {split} split"
    parts = columns.of(fmt)
    if fmt in ("messages", "sharegpt"):
        messages = _messages(row[parts["messages"]], where, parts["messages"])
        return Conversation(_checked(messages, where), 0)
    if fmt == "alpaca":
        instruction, output = row[parts["prompt"]], row[parts["completion"]]
        extra = row.get("input")
        prompt = [{"role": "user", "content": _text(instruction, where, parts["prompt"])
                   + (f"\n\n{extra}" if extra not in (None, "") else "")}]
        if row.get("system"):
            prompt.insert(0, {"role": "system", "content": str(row["system"])})
        messages = prompt + [{"role": "assistant", "content": _text(output, where, parts["completion"])}]
        return Conversation(_checked(messages, where), len(prompt))
    prompt, completion = row[parts["prompt"]], row[parts["completion"]]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise HftuneError(f"{where} has an empty completion; drop the row or fill it in.")
        return Conversation([prompt, completion], 1, plain=True)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise HftuneError(f"{where}: prompt and completion must both be strings or both be message lists "
                          f"(got {type(prompt).__name__} and {type(completion).__name__}).")
    prompt, completion = _messages(prompt, where, parts["prompt"]), _messages(completion, where, parts["completion"])
    if not any(m["role"] == "assistant" for m in completion):
        raise HftuneError(f"{where}: the completion has no assistant message to train; fix the row.")
    return Conversation(_checked(prompt + completion, where), len(prompt))


def _text(value, where, column):
    if not isinstance(value, str) or not value.strip():
        raise HftuneError(f"{where} has no text in column '{column}'; drop the row or fill it in.")
    return value


def _messages(value, where, column):
    """[{role, content}] from a message list, ShareGPT's {from, value} keys (trl) and role names mapped."""
    if not isinstance(value, list) or not value:
        raise HftuneError(f"{where}: column '{column}' holds {'an empty list' if value == [] else type(value).__name__},"
                          " not a list of messages; fix or drop the row.")
    if not all(isinstance(m, dict) for m in value):
        raise HftuneError(f"{where}: column '{column}' must hold messages as {{role, content}} (or ShareGPT's "
                          "{from, value}) objects; fix or drop the row.")
    if not any(m.get("from") is not None for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    messages = maybe_convert_to_chatml({"messages": [dict(m) for m in value]})["messages"]
    return [{"role": SHAREGPT_ROLES.get(m.get("role"), f"{m.get('role')} (ShareGPT)"), "content": m.get("content")}
            for m in messages]


def _checked(messages, where):
    """Known roles, text content, a non-empty assistant turn somewhere."""
    for k, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            known = sorted(SHAREGPT_ROLES) if str(role).endswith("(ShareGPT)") else sorted(ROLES)
            raise HftuneError(f"{where}: message {k} has the unknown role {role!r}; use one of {known}.")
        if not isinstance(content, str):
            raise HftuneError(f"{where}: message {k} ({role}) has no text content; fix or drop the row.")
        if role == "assistant" and not content.strip():
            raise HftuneError(f"{where}: message {k} is an empty assistant turn; fill it in or drop the row.")
    if not any(m["role"] == "assistant" for m in messages):
        raise HftuneError(f"{where} has no assistant turn to train; fix or drop the row.")
    return messages
