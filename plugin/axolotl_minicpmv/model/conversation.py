"""Conversations ({role, content} turns): the one set of checks that training data, `chat`, prediction
and serving share, and the one rule for system turns.

MiniCPM-V 2.0's prompt has no system role. A conversation may open with system turns; their text is put
in front of the first user turn's text (joined by a newline), where it is never supervised. Tests:
tests/test_processing.py (chat input) and tests/test_data_validation.py (training samples).
"""

from __future__ import annotations

import json

ROLES = ("user", "assistant")
SYSTEM_ROLE = "system"
IMAGE_TAG = "<image>"
IMAGE_END_TAG = "</image>"


class InvalidInputError(ValueError):
    """Input (image, messages, prompt) that the model cannot take, with the reason in the message."""


def json_type(value) -> str:
    """The JSON name of a Python value's type, for messages about user data."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_conversation(msgs, field: str = "msgs", for_training: bool = False) -> list[dict]:
    """Check a conversation and return it as plain `{role, content}` dicts, system turns folded in.

    Outside training `msgs` may also be a JSON string (as `MiniCPMVChat` takes it). `field` names the conversation in messages
    (`msgs[1] ...`, `conversations[1] ...`). Training samples must also alternate user/assistant, have an
    assistant turn, and not contain `</image>` (reserved for placeholders). Raises InvalidInputError.
    """
    if isinstance(msgs, str) and not for_training:
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{field}: not valid JSON ({err})") from None
    if not isinstance(msgs, list):
        raise InvalidInputError(
            f"{field!r} must be a list of {{role, content}} objects, got a JSON {json_type(msgs)}; expected a non-empty list"
        )
    if not msgs:
        raise InvalidInputError(f"{field!r} is empty; expected a non-empty list of {{role, content}} objects")
    turns = []
    for index, msg in enumerate(msgs):
        where = f"{field}[{index}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidInputError(f"{where} must be an object with 'role' and 'content', got {short_repr(msg)}")
        role, content = msg["role"], msg["content"]
        opening_system = role == SYSTEM_ROLE and all(t["role"] == SYSTEM_ROLE for t in turns)
        if role not in ROLES and not opening_system:
            after = " after the first user turn (a system turn may only open the conversation)" if role == SYSTEM_ROLE else ""
            raise InvalidInputError(f"{where} has unknown role {short_repr(role)}{after}; roles are 'user' and 'assistant'")
        if not isinstance(content, str):
            raise InvalidInputError(f"{where} ({role}): content must be a string, got a JSON {json_type(content)}; give a non-empty string")
        # An earlier answer may be empty (eos first): `chat` returns it in the history, which goes back in as context.
        if not content.strip() and (for_training or role != "assistant"):
            raise InvalidInputError(f"{where} ({role}) has empty content; content must be a non-empty string")
        if for_training and IMAGE_END_TAG in content:
            raise InvalidInputError(f"{where} ({role}) contains {IMAGE_END_TAG!r}, which is reserved for image placeholders")
        turns.append({"role": role, "content": content})
    system = [t["content"] for t in turns if t["role"] == SYSTEM_ROLE]
    turns = turns[len(system) :]
    if not turns:
        raise InvalidInputError(f"{field} has only system turns; the first message after them must come from 'user'")
    if turns[0]["role"] != "user":
        first = len(system)
        raise InvalidInputError(
            f"the first turn is {turns[0]['role']!r}; it must be 'user' "
            f"({field}[{first}]: the first message must come from 'user', after any system turn)"
        )
    if for_training:
        for i in range(1, len(turns)):
            if turns[i]["role"] == turns[i - 1]["role"]:
                a, b = i - 1 + len(system), i + len(system)
                raise InvalidInputError(f"roles do not alternate: {field}[{a}] and {field}[{b}] are both {turns[i]['role']!r}")
        if not any(t["role"] == "assistant" for t in turns):
            raise InvalidInputError("no assistant turn (nothing to train on)")
    if system:
        turns[0] = {"role": "user", "content": "\n".join(system + [turns[0]["content"]])}
    return turns
