"""Prompt building: render chat messages with a FastChat 0.2.36 conversation template."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

IMAGE_PLACEHOLDER = "$$<image>$$"
SYSTEM_ROLES = frozenset({"system", "developer"})

Turn = tuple[str, str | None]


class SeparatorStyle(IntEnum):
    """FastChat 0.2.36 separator styles; workers send these integers (HEAD renumbers them)."""

    ADD_COLON_SINGLE = 1
    ADD_COLON_TWO = 2
    ADD_COLON_SPACE_SINGLE = 3
    NO_COLON_SINGLE = 4
    NO_COLON_TWO = 5
    ADD_NEW_LINE_SINGLE = 6
    LLAMA2 = 7
    CHATGLM = 8
    CHATML = 9
    CHATINTERN = 10
    DOLLY = 11
    RWKV = 12
    PHOENIX = 13
    ROBIN = 14
    FALCON_CHAT = 15
    CHATGLM3 = 16
    DEEPSEEK_CHAT = 17
    METAMATH = 18
    YUAN2 = 19


class PromptError(ValueError):
    """A message list the template cannot render; .param names the request field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Template:
    """A FastChat conversation template as a worker describes it (release 0.2.36 fields)."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, ...]
    messages: tuple[Turn, ...]
    offset: int
    sep_style: int
    sep: str
    sep2: str | None
    stop_str: str | tuple[str, ...] | None
    stop_token_ids: tuple[int, ...] | None

    @classmethod
    def from_worker(cls, conv: dict[str, Any]) -> Template:
        """Build from the "conv" dict of /worker_get_conv_template.

        Unknown keys are ignored; a missing release key raises KeyError. A worker of FastChat's
        unreleased main branch (its templates carry system_message_vision / max_image_size_mb)
        numbers the styles differently: its numbers are translated to the release's.
        """
        stop_str = conv["stop_str"]
        stop_token_ids = conv["stop_token_ids"]
        return cls(
            name=conv["name"],
            system_template=conv["system_template"],
            system_message=conv["system_message"],
            roles=tuple(conv["roles"]),
            messages=tuple((role, message) for role, message in conv["messages"]),
            offset=conv["offset"],
            sep_style=release_sep_style(conv),
            sep=conv["sep"],
            sep2=conv["sep2"],
            stop_str=stop_str if not isinstance(stop_str, list) else tuple(stop_str),
            stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids),
        )

    @property
    def stop_strings(self) -> list[str]:
        """stop_str as a list, without falsy values."""
        return _as_list(self.stop_str)


# FastChat's main branch inserted LLAMA3 = 8 (shifting CHATGLM ... YUAN2 up by one) and
# appended GEMMA = 21, CLLM = 22, DEFAULT = 23, which the release has no renderer for.
HEAD_TEMPLATE_KEYS = frozenset({"system_message_vision", "max_image_size_mb"})
HEAD_ONLY_STYLES = {8: "LLAMA3", 21: "GEMMA", 22: "CLLM", 23: "DEFAULT"}
HEAD_ONLY_STYLE = -1


def release_sep_style(conv: dict[str, Any]) -> Any:
    """The template's sep_style in release 0.2.36 numbering; HEAD-only styles become
    HEAD_ONLY_STYLE (rendering them raises a PromptError that says so)."""
    style = conv["sep_style"]
    if not HEAD_TEMPLATE_KEYS & conv.keys() or not isinstance(style, int):
        return style
    if style in HEAD_ONLY_STYLES:
        return HEAD_ONLY_STYLE
    return style - 1 if 9 <= style <= 20 else style


def stop_list(request_stop: str | list[str] | None, template: Template) -> list[str]:
    """Return the request's stop strings, then the template's, de-duplicated in that order.

    FastChat builds a set here, so its order is not deterministic; ours is.
    """
    return list(dict.fromkeys(_as_list(request_stop) + template.stop_strings))


def build_prompt(template: Template, messages: str | list[dict]) -> tuple[str, list[str]]:
    """Return (prompt, image_urls) as FastChat 0.2.36's get_gen_params + get_prompt() would.

    A str is the prompt itself. Otherwise the template's few-shot turns come first, then
    the request's turns, then a blank assistant turn. Differences from the release, all
    for inputs it crashes on or mangles:
    - `developer` acts like `system` (the release answers "Unknown role" with a 500);
    - list content of system, developer and assistant messages is rendered as its text
      parts joined by "\\n" (the release renders the Python repr of the list, or crashes);
    - text-only user list content renders like the joined string (the release passes a
      (text, []) tuple that only ADD_COLON_TWO renders; the other styles crash or print it);
    - image URLs of every user turn are returned, so their number matches the image
      placeholders (the release's get_images() skips user turns at odd positions);
    - unsupported input raises PromptError rather than TypeError/ValueError.
    """
    if isinstance(messages, str):
        return messages, []
    render = _renderer(template)
    system, turns, images = _collect_turns(template, messages)
    turns.append((template.roles[1], None))
    conversation = replace(template, system_message=system, messages=tuple(turns))
    return render(conversation), images


def _as_list(stop: str | Iterable[str] | None) -> list[str]:
    if not stop:
        return []
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if s]


def _renderer(template: Template) -> Callable[[Template], str]:
    render = RENDERERS.get(template.sep_style)
    if template.sep_style == HEAD_ONLY_STYLE:
        raise PromptError(
            f"Conversation template {template.name!r} uses a separator style of FastChat's main "
            f"branch ({', '.join(HEAD_ONLY_STYLES.values())}) that FastChat 0.2.36 does not have."
        )
    if render is None:
        raise PromptError(
            f"Conversation template {template.name!r} has separator style "
            f"{template.sep_style!r}, which FastChat 0.2.36 does not define; "
            "the worker may run another FastChat version."
        )
    return render


def _collect_turns(template: Template, messages: list[dict]) -> tuple[str, list[Turn], list[str]]:
    """Return the system message, the turns to render and the image URLs of `messages`."""
    system, turns = template.system_message, list(template.messages)
    images: list[str] = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if role in SYSTEM_ROLES:
            system = _system_text(role, content)
        elif role == "user":
            text, urls = _split_parts(content)
            turns.append((template.roles[0], _user_message(template, text, urls)))
            images += urls
        elif role == "assistant":
            turns.append((template.roles[1], _split_parts(content)[0]))
        else:
            raise PromptError(f"Unknown role {role!r}.")
    return system, turns, images


def _split_parts(content: str | list[dict] | None) -> tuple[str, list[str]]:
    """Return (text parts joined by "\\n", image URLs) of a message's content."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts = [part["text"] for part in content if part["type"] == "text"]
    urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    return "\n".join(texts), urls


def _system_text(role: str, content: str | list[dict] | None) -> str:
    text, urls = _split_parts(content)
    if urls:
        raise PromptError(f"A {role} message cannot contain images.")
    return text


def _user_message(template: Template, text: str, urls: list[str]) -> str:
    if not urls:
        return text
    if template.sep_style != SeparatorStyle.ADD_COLON_TWO:
        raise PromptError(
            f"The model's conversation template {template.name!r} does not accept images."
        )
    return IMAGE_PLACEHOLDER * len(urls) + text


# Renderers: one per separator style, each a transcription of the release's get_prompt().
# A message counts only if truthy: "" renders like the blank assistant turn.

Present = Callable[[int, str, str], str]
Blank = Callable[[int, str], str]


def _system_prompt(t: Template) -> str:
    return t.system_template.format(system_message=t.system_message)


def _turns(t: Template, present: Present, blank: Blank) -> str:
    return "".join(
        present(i, role, message) if message else blank(i, role)
        for i, (role, message) in enumerate(t.messages)
    )


def _sep(t: Template, i: int) -> str:
    """The separator after message i of the two-separator styles: sep, sep2, sep, …"""
    return t.sep if i % 2 == 0 else _sep2(t)


def _sep2(t: Template) -> str:
    if t.sep2 is None:
        raise PromptError(f"Conversation template {t.name!r} lacks the sep2 its style needs.")
    return t.sep2


def _add_colon_single(t: Template) -> str:
    return _system_prompt(t) + t.sep + _turns(
        t, lambda i, r, m: r + ": " + m + t.sep, lambda i, r: r + ":"
    )


def _add_colon_two(t: Template) -> str:
    return _system_prompt(t) + t.sep + _turns(
        t, lambda i, r, m: r + ": " + m + _sep(t, i), lambda i, r: r + ":"
    )


def _add_colon_space_single(t: Template) -> str:
    return _system_prompt(t) + t.sep + _turns(
        t, lambda i, r, m: r + ": " + m + t.sep, lambda i, r: r + ": "
    )


def _no_colon_single(t: Template) -> str:
    return _system_prompt(t) + _turns(t, lambda i, r, m: r + m + t.sep, lambda i, r: r)


def _no_colon_two(t: Template) -> str:
    return _system_prompt(t) + _turns(t, lambda i, r, m: r + m + _sep(t, i), lambda i, r: r)


def _add_new_line_single(t: Template) -> str:
    system = _system_prompt(t)
    head = system + t.sep if system else ""
    return head + _turns(t, lambda i, r, m: r + "\n" + m + t.sep, lambda i, r: r + "\n")


def _llama2(t: Template) -> str:
    # The role tag is picked by position, and the first message is rendered without one.
    def present(i: int, role: str, message: str) -> str:
        return message + " " if i == 0 else t.roles[i % 2] + " " + message + _sep(t, i)

    head = _system_prompt(t) if t.system_message else "[INST] "
    return head + _turns(t, present, lambda i, r: t.roles[i % 2])


def _chatglm(t: Template) -> str:
    first_round = 1 if t.name == "chatglm2" else 0

    def round_tag(i: int) -> str:
        return f"[Round {i // 2 + first_round}]{t.sep}" if i % 2 == 0 else ""

    system = _system_prompt(t)
    head = system + t.sep if system else ""
    return head + _turns(
        t, lambda i, r, m: f"{round_tag(i)}{r}：{m}{t.sep}", lambda i, r: f"{round_tag(i)}{r}："
    )


def _chatml(t: Template) -> str:
    system = _system_prompt(t)
    head = system + t.sep + "\n" if system else ""
    return head + _turns(t, lambda i, r, m: r + "\n" + m + t.sep + "\n", lambda i, r: r + "\n")


def _chatintern(t: Template) -> str:
    def bos(i: int) -> str:
        return "<s>" if i % 2 == 0 else ""

    def present(i: int, role: str, message: str) -> str:
        return bos(i) + role + ":" + message + _sep(t, i) + "\n"

    return _system_prompt(t) + _turns(t, present, lambda i, r: bos(i) + r + ":")


def _dolly(t: Template) -> str:
    def present(i: int, role: str, message: str) -> str:
        return role + ":\n" + message + _sep(t, i) + ("\n\n" if i % 2 == 1 else "")

    return _system_prompt(t) + _turns(t, present, lambda i, r: r + ":\n")


def _rwkv(t: Template) -> str:
    def present(i: int, role: str, message: str) -> str:
        return role + ": " + message.replace("\r\n", "\n").replace("\n\n", "\n") + "\n\n"

    return _system_prompt(t) + _turns(t, present, lambda i, r: r + ":")


def _phoenix(t: Template) -> str:
    return _system_prompt(t) + _turns(
        t, lambda i, r, m: r + ": <s>" + m + "</s>", lambda i, r: r + ": <s>"
    )


def _robin(t: Template) -> str:
    return _system_prompt(t) + t.sep + _turns(
        t, lambda i, r, m: r + ":\n" + m + t.sep, lambda i, r: r + ":\n"
    )


def _falcon_chat(t: Template) -> str:
    head = _system_prompt(t) + t.sep if t.system_message else ""
    return head + _turns(t, lambda i, r, m: r + ": " + m + t.sep, lambda i, r: r + ":")


def _chatglm3(t: Template) -> str:
    head = _system_prompt(t) if t.system_message else ""
    return head + _turns(t, lambda i, r, m: r + "\n" + m, lambda i, r: r)


def _deepseek_chat(t: Template) -> str:
    return _system_prompt(t) + _turns(
        t, lambda i, r, m: r + ": " + m + _sep(t, i), lambda i, r: r + ":"
    )


def _metamath(t: Template) -> str:
    # sep2 opens the assistant's answer rather than closing it.
    def opening(i: int, role: str) -> str:
        return role + (":\n" if i % 2 == 0 else ": " + _sep2(t))

    system = _system_prompt(t)
    head = system + t.sep if system else ""
    return head + _turns(
        t, lambda i, r, m: opening(i, r) + m + (t.sep if i % 2 == 0 else ""), opening
    )


def _yuan2(t: Template) -> str:
    head = _system_prompt(t) + _sep2(t) if t.system_message else ""
    body = head + _turns(t, lambda i, r, m: m + "<n>", lambda i, r: "")
    # rstrip() takes a set of characters: like the release, this also eats a trailing
    # "n", "<" or ">" of the last message ("turn on" becomes "turn o").
    return body.rstrip("<n>") + t.sep


RENDERERS: dict[int, Callable[[Template], str]] = {
    SeparatorStyle.ADD_COLON_SINGLE: _add_colon_single,
    SeparatorStyle.ADD_COLON_TWO: _add_colon_two,
    SeparatorStyle.ADD_COLON_SPACE_SINGLE: _add_colon_space_single,
    SeparatorStyle.NO_COLON_SINGLE: _no_colon_single,
    SeparatorStyle.NO_COLON_TWO: _no_colon_two,
    SeparatorStyle.ADD_NEW_LINE_SINGLE: _add_new_line_single,
    SeparatorStyle.LLAMA2: _llama2,
    SeparatorStyle.CHATGLM: _chatglm,
    SeparatorStyle.CHATML: _chatml,
    SeparatorStyle.CHATINTERN: _chatintern,
    SeparatorStyle.DOLLY: _dolly,
    SeparatorStyle.RWKV: _rwkv,
    SeparatorStyle.PHOENIX: _phoenix,
    SeparatorStyle.ROBIN: _robin,
    SeparatorStyle.FALCON_CHAT: _falcon_chat,
    SeparatorStyle.CHATGLM3: _chatglm3,
    SeparatorStyle.DEEPSEEK_CHAT: _deepseek_chat,
    SeparatorStyle.METAMATH: _metamath,
    SeparatorStyle.YUAN2: _yuan2,
}
