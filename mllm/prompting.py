"""Conversations -> token ids and labels, through the LLM's own chat template, with exact label masks.

The failure this module exists to prevent: LLaVA-style code masks labels by re-deriving each template's separators by
hand, so swapping the LLM silently misaligns the mask ("tokenization mismatch") and the model trains on nothing, or
on the prompts. Here nothing about any template is hard-coded. The template renders the conversation, and each
assistant reply's character span is found by rendering the conversation up to that reply twice: once ending with the
generation prompt (`add_generation_prompt=True`), once with the reply. The reply's span is what the second adds to the
first, trailing whitespace removed: the reply's text plus the template's end-of-turn marker (`<|im_end|>`,
`<|eot_id|>`, ...), which the model must learn to emit so that generation stops. Every such prefix must be a prefix
of the full rendering; a template that renders differently (one that rewrites earlier turns) is refused with a clear
error instead of being masked wrongly.

The rendered text is then tokenized piece by piece (prompt pieces, reply pieces, split at every image placeholder),
so a reply's tokens are exactly the tokens of its span, and a prompt is tokenized the same way at training and at
inference. Placeholders (`<image>` in a user turn) become `IMAGE_TOKEN_ID` runs, one position per visual token; the
model replaces them with the projected image features. No token is added to the LLM's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uniflow.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200  # never a real token id: replaced by visual features before the LLM's embedding lookup
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PROBE_REPLY = "Zq7uniflowprobe"


@dataclass
class EncodedConversation:
    """ids: token ids with IMAGE_TOKEN_ID runs for the images; labels: the same length, IGNORE_INDEX except on the
    assistant replies' tokens (training) or all IGNORE_INDEX (a generation prompt). num_images: placeholders."""

    ids: list[int]
    labels: list[int]
    num_images: int

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def check_messages(messages: Any, for_generation: bool) -> list[dict[str, str]]:
    """Validated copies of `messages`: a list of {"role", "content"} dicts, an optional system message first, then
    user and assistant turns alternating from a user turn; a generation prompt ends with a user turn, a training
    conversation with an assistant turn. Contents are non-empty text. Errors name the message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ConfigError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConfigError(f"messages[{i}].role: expected one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content: expected text, got {type(content).__name__}")
        if role != "system" and not content.strip():
            raise ConfigError(f"messages[{i}].content: empty {role} message")
        if role == "system" and i != 0:
            raise ConfigError(f"messages[{i}]: a system message may only come first")
        if role == "assistant" and IMAGE_PLACEHOLDER in content:
            raise ConfigError(f"messages[{i}]: an image placeholder {IMAGE_PLACEHOLDER!r} in an assistant reply")
        out.append({"role": role, "content": content})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    if not turns:
        raise ConfigError("messages: no user message (the prompt is empty)")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + (len(out) - len(turns))
            raise ConfigError(f"messages[{index}].role: expected {expected!r} (turns alternate, starting with the "
                              f"user), got {m['role']!r}")
    last = turns[-1]["role"]
    if for_generation and last != "user":
        raise ConfigError("messages: a prompt for generation must end with a user message")
    if not for_generation and last != "assistant":
        raise ConfigError("messages: a training conversation must end with an assistant reply")
    return out


def count_placeholders(messages: Sequence[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


class ChatFormat:
    """The LLM's chat template, checked once: renders conversations, finds the assistant spans, knows the
    end-of-turn token(s) generation stops at.

    system_prompt: a system message put first when a conversation has none (None: the template's own default)."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, name: str = "the LLM's tokenizer") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{name} has no chat template (tokenizer.chat_template is empty); use an instruct "
                              f"model's tokenizer, or set one on the tokenizer before building the model")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.name = name
        self.end_of_turn = self._end_of_turn()
        self.stop_ids = self._stop_ids()

    # --------------------------------------------------------------------------------------------- rendering
    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja errors (a template that raises on this conversation)
            raise ConfigError(f"{self.name}: the chat template failed on this conversation "
                              f"({type(exc).__name__}: {exc})") from None
        if not isinstance(text, str):
            raise ConfigError(f"{self.name}: the chat template returned {type(text).__name__}, expected text")
        return text

    def _end_of_turn(self) -> str:
        """What the template writes right after a reply (stripped): the marker a reply's labels end with."""
        probe = self.with_system([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}])
        text = self.render(probe, False)
        if _PROBE_REPLY not in text:
            raise ConfigError(f"{self.name}: the chat template drops assistant replies; cannot train on it")
        return text[text.rindex(_PROBE_REPLY) + len(_PROBE_REPLY):].strip()

    def _stop_ids(self) -> list[int]:
        """Token ids that end a reply: the end-of-turn marker's first token (when the template has one) and EOS."""
        ids: list[int] = []
        if self.end_of_turn:
            marker = self.tokenizer.encode(self.end_of_turn, add_special_tokens=False)
            if marker:
                ids.append(int(marker[0]))
        eos = self.tokenizer.eos_token_id
        for e in (eos if isinstance(eos, list) else [eos]):
            if e is not None and int(e) not in ids:
                ids.append(int(e))
        if not ids:
            raise ConfigError(f"{self.name}: no end-of-turn marker in the chat template and no eos_token: "
                              f"generation could never stop")
        return ids

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.stop_ids[-1]

    # --------------------------------------------------------------------------------------------- encoding
    def _pieces(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_label) pieces at every assistant span."""
        full = self.render(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], True)
            upto = self.render(messages[:i + 1], False)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ConfigError(f"{self.name}: the chat template does not render conversations incrementally "
                                  f"(the text up to reply {i} is not a prefix of the whole), so its replies cannot "
                                  f"be located exactly; this template is not supported for training")
            reply = upto[len(prefix):].rstrip()
            if m["content"].strip() not in reply:
                raise ConfigError(f"{self.name}: reply {i} is not found where the chat template renders it")
            spans.append((len(prefix), len(prefix) + len(reply)))
        pieces, pos = [], 0
        for start, end in spans:
            pieces += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        pieces.append((full[pos:], False))
        return [(text, label) for text, label in pieces if text]

    def encode(self, messages: Any, image_tokens: Sequence[int] = (), for_generation: bool = False,
               source: str = "conversation") -> EncodedConversation:
        """Token ids and labels of a conversation. image_tokens: LLM positions of each image, in placeholder order
        (their count must equal the placeholders'). for_generation: a prompt ending with the generation prompt, no
        labels; else every assistant reply is labelled."""
        messages = self.with_system(check_messages(messages, for_generation))
        found = count_placeholders(messages)
        if found != len(image_tokens):
            raise ConfigError(f"{source}: {found} image placeholder(s) {IMAGE_PLACEHOLDER!r} in the messages but "
                              f"{len(image_tokens)} image(s) given; put one {IMAGE_PLACEHOLDER} in a user message "
                              f"per image")
        ids: list[int] = []
        labels: list[int] = []
        images = iter(image_tokens)
        rendered = 0
        for text, is_label in self._pieces(messages, for_generation):
            parts = text.split(IMAGE_PLACEHOLDER)
            for k, part in enumerate(parts):
                if k > 0:
                    n = next(images)
                    ids += [IMAGE_TOKEN_ID] * n
                    labels += [IGNORE_INDEX] * n
                    rendered += 1
                if part:
                    tokens = self.tokenizer.encode(part, add_special_tokens=False)
                    ids += tokens
                    labels += tokens if is_label and not for_generation else [IGNORE_INDEX] * len(tokens)
        if rendered != found:
            raise ConfigError(f"{self.name}: the chat template rendered {rendered} of the {found} image "
                              f"placeholder(s) in the messages (it drops or rewrites message text)")
        out = EncodedConversation(ids, labels, found)
        if not for_generation and out.num_labels == 0:
            raise ConfigError(f"{source}: no assistant token is labelled (the chat template of {self.name} hides "
                              f"the replies); refusing to train on nothing")
        return out


def truncate(encoded: EncodedConversation, max_length: int, source: str = "sample") -> EncodedConversation:
    """Cut a training sequence to `max_length` tokens on the right. An image is never cut: a sample whose images
    do not all fit is an error naming it (raise `max_length`)."""
    if len(encoded.ids) <= max_length:
        return encoded
    if IMAGE_TOKEN_ID in encoded.ids[max_length:]:
        raise ConfigError(f"{source}: {len(encoded.ids)} tokens with its image(s) exceed max_length {max_length} "
                          f"and an image would be cut; raise model.max_length")
    return EncodedConversation(encoded.ids[:max_length], encoded.labels[:max_length], encoded.num_images)


def llava_messages(conversations: Any, source: str) -> list[dict[str, str]]:
    """LLaVA's `conversations` ([{"from": "human"|"gpt"|"system", "value": ...}]) as chat messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    if not isinstance(conversations, list) or not conversations:
        raise ConfigError(f"{source}: 'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConfigError(f"{source}: conversations[{i}]: expected {{'from', 'value'}}, got {turn!r}")
        if turn["from"] not in roles:
            raise ConfigError(f"{source}: conversations[{i}].from: expected one of {sorted(roles)}, got "
                              f"{turn['from']!r}")
        out.append({"role": roles[turn["from"]], "content": str(turn["value"])})
    return out
