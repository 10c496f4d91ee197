"""The chat template: how a conversation becomes tokens, and which of them a model is trained on.

A fine-tuned model carries its template as ``chat_template.json`` beside its ``tokenizer.json``;
training and inference both encode through ``ChatTemplate.encode``, so a prompt at inference is
tokenized exactly as it was in training. The default renders a conversation as::

    <|endoftext|>### User:
    {prompt}

    ### Assistant:
    {response}<|endoftext|>

The leading end-of-text token is where every pretraining document started; the one ending each
assistant turn is trained, so the model learns to stop, and generation stops there. Each piece
(header, content, separator) is encoded on its own and the ids concatenated, so no BPE merge
straddles the boundary between the prompt and the response, and the trained mask is exact.

Only JSON and plain strings: a template is data, never code run at load time (unlike Jinja
templates).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from gptflow.data.tokenizer import EOT_TOKEN

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    headers: dict[str, str] = field(default_factory=lambda: {
        "system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n",
    })
    """Text put before each message's content, per role."""
    separator: str = "\n\n"
    """Text after each message (after the end token of an assistant message)."""
    begin_token: str = EOT_TOKEN
    """Special token starting every conversation."""
    end_token: str = EOT_TOKEN
    """Special token ending every assistant message; generation stops at it."""

    def __post_init__(self) -> None:
        missing = [role for role in ROLES if role not in self.headers]
        if missing:
            raise ValueError(f"chat template has no header for role(s) {', '.join(missing)}")

    def encode(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per id, whether it is trained on: the content and
        end token of assistant messages. ``add_generation_prompt`` appends the assistant header,
        for generating the next assistant message."""
        ids, trained = [self.token_id(tokenizer, self.begin_token)], [False]

        def add(piece_ids: list[int], is_trained: bool) -> None:
            ids.extend(piece_ids)
            trained.extend([is_trained] * len(piece_ids))

        for message in messages:
            is_assistant = message.role == "assistant"
            add(_encode(tokenizer, self.headers[message.role]), False)
            add(_encode(tokenizer, message.content), is_assistant)
            if is_assistant:
                add([self.token_id(tokenizer, self.end_token)], True)
            add(_encode(tokenizer, self.separator), False)
        if add_generation_prompt:
            add(_encode(tokenizer, self.headers["assistant"]), False)
        return ids, trained

    @staticmethod
    def token_id(tokenizer: Tokenizer, token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token, which the chat template needs")
        return token_id

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CHAT_TEMPLATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> ChatTemplate:
        """The template of a ``chat_template.json``, or of the directory holding one."""
        path = Path(path)
        return cls(**json.loads((path / CHAT_TEMPLATE_FILE if path.is_dir() else path).read_text()))


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []
