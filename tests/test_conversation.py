"""Prompt building: differential tests against the installed fschat 0.2.36 templates."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from fastchat.conversation import SeparatorStyle as FastChatStyle
from fastchat.conversation import conv_templates, get_conv_template

from tests.fastchat_reference import fastchat_conversation
from upstreams.fastchat.conversation import (
    IMAGE_PLACEHOLDER,
    PromptError,
    SeparatorStyle,
    Template,
    build_prompt,
    stop_list,
)

# Templates a release worker can serve; the rest (chatgpt, bard, …) are API-only and
# have no separator style, so a worker would fail at int(None) on startup.
WORKER_TEMPLATES = sorted(n for n, c in conv_templates.items() if c.sep_style is not None)
API_ONLY_TEMPLATES = sorted(n for n, c in conv_templates.items() if c.sep_style is None)
ADD_COLON_TWO_TEMPLATES = [
    n for n in WORKER_TEMPLATES if conv_templates[n].sep_style == FastChatStyle.ADD_COLON_TWO
]
ONE_TEMPLATE_PER_OTHER_STYLE = sorted(
    {
        conv_templates[n].sep_style: n
        for n in WORKER_TEMPLATES
        if conv_templates[n].sep_style != FastChatStyle.ADD_COLON_TWO
    }.values()
)

URL1 = "data:image/png;base64,AAAA"
URL2 = "https://example.com/cat.jpg"


def worker_conv(name: str, **extra: Any) -> dict[str, Any]:
    """Return the "conv" dict a release worker sends for template `name`."""
    conv = get_conv_template(name)
    if conv.sep_style is not None:
        conv.sep_style = int(conv.sep_style)
    return json.loads(json.dumps({**dataclasses.asdict(conv), **extra}))


def fastchat_prompt(conv: dict[str, Any], messages: list[dict]) -> tuple[str, list]:
    """Build (prompt, images) the way release openai_api_server.get_gen_params does."""
    c = fastchat_conversation(conv)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            c.set_system_message(content)
        elif role == "user" and isinstance(content, list):
            images = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
            text = "\n".join(p["text"] for p in content if p["type"] == "text")
            c.append_message(c.roles[0], (text, images))
        elif role == "user":
            c.append_message(c.roles[0], content)
        elif role == "assistant":
            c.append_message(c.roles[1], content)
        else:
            raise ValueError(f"Unknown role: {role}")
    c.append_message(c.roles[1], None)
    return c.get_prompt(), c.get_images()


def ours(name: str, messages: str | list[dict]) -> tuple[str, list[str]]:
    return build_prompt(Template.from_worker(worker_conv(name)), messages)


def system(content: Any) -> dict:
    return {"role": "system", "content": content}


def developer(content: Any) -> dict:
    return {"role": "developer", "content": content}


def user(content: Any) -> dict:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict:
    return {"role": "assistant", "content": content}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def case(case_id: str, messages: list[dict], fastchat: list[dict] | None = None) -> Any:
    """A message list, and the one FastChat gets when it cannot take ours as is."""
    return pytest.param(messages, messages if fastchat is None else fastchat, id=case_id)


CASES = [
    case("single-user", [user("Hello!")]),
    case("system-user", [system("You are terse."), user("Hi")]),
    case("multi-turn", [system("Be kind."), user("Hi there"), assistant("Yo"), user("again")]),
    case(
        "last-system-wins",
        [user("Hi"), system("First"), assistant("Yo"), system("Second"), user("again")],
    ),
    case("empty", []),
    case("empty-system", [system(""), user("Hi")]),
    case("empty-assistant", [user("Hi"), assistant(""), user("more")]),
    case("assistant-first", [assistant("I start."), user("Fine.")]),
    case("consecutive-users", [user("one"), user("two")]),
    case(
        "unicode-newlines",
        [
            user("Grüße, 你好 🙂\r\nsecond line\n\nfourth"),
            assistant("Ça va ?\n\nOui.\r\n"),
            user("turn on <tag>"),
        ],
    ),
    case("braces", [system("Use {braces} and {system_message}"), user("{0} {x}")]),
    case("developer", [developer("Dev rules."), user("Hi")], [system("Dev rules."), user("Hi")]),
    case(
        "developer-after-system",
        [system("S"), user("Hi"), developer("D")],
        [system("S"), user("Hi"), system("D")],
    ),
    case(
        "text-parts",
        [
            system([text("Rule A"), text("Rule B")]),
            user([text("x"), text("y")]),
            assistant([text("p"), text("q")]),
            user([text("z")]),
        ],
        [system("Rule A\nRule B"), user("x\ny"), assistant("p\nq"), user("z")],
    ),
]

IMAGE_CASES = [
    case("one-image", [user([text("What?"), image(URL1)])]),
    case("image-only", [user([image(URL1)])]),
    case(
        "two-images-between-texts",
        [system("S"), user([text("a"), image(URL1), text("b"), image(URL2)])],
    ),
    case(
        "images-in-two-turns",
        [user([image(URL1), text("first")]), assistant("ok"), user([text("again"), image(URL2)])],
    ),
]


@pytest.mark.parametrize("name", WORKER_TEMPLATES)
@pytest.mark.parametrize("messages,fastchat_messages", CASES)
def test_it_matches_fastchat(name: str, messages: list, fastchat_messages: list) -> None:
    conv = worker_conv(name)
    assert build_prompt(Template.from_worker(conv), messages) == fastchat_prompt(
        conv, fastchat_messages
    )


@pytest.mark.parametrize("name", ADD_COLON_TWO_TEMPLATES)
@pytest.mark.parametrize("messages,fastchat_messages", IMAGE_CASES)
def test_it_matches_fastchat_with_images(
    name: str, messages: list, fastchat_messages: list
) -> None:
    conv = worker_conv(name)
    prompt, images = build_prompt(Template.from_worker(conv), messages)
    assert (prompt, images) == fastchat_prompt(conv, fastchat_messages)
    assert images and prompt.count(IMAGE_PLACEHOLDER) == len(images)


def test_it_covers_every_separator_style() -> None:
    covered = {conv_templates[n].sep_style for n in WORKER_TEMPLATES}
    assert covered == set(FastChatStyle)
    assert len(covered) == 19
    assert len(conv_templates) == 83
    assert [(s.name, s.value) for s in SeparatorStyle] == [
        (s.name, s.value) for s in FastChatStyle
    ]


@pytest.mark.parametrize(
    "name,messages,expected",
    [
        pytest.param(
            "vicuna_v1.1",
            [system("SYS"), user("Hi there"), assistant("Yo"), user("again")],
            "SYS USER: Hi there ASSISTANT: Yo</s>USER: again ASSISTANT:",
            id="vicuna",
        ),
        pytest.param(
            "vicuna_v1.1",
            [user([text("What?"), image(URL1)])],
            conv_templates["vicuna_v1.1"].system_message + " USER: $$<image>$$What? ASSISTANT:",
            id="vicuna-image",
        ),
        pytest.param(
            "llama-2",
            [system("S"), user("Hi"), assistant("Yo"), user("again")],
            "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] again [/INST]",
            id="llama-2",
        ),
        pytest.param(
            "qwen-7b-chat",
            [system("S"), user("Hi")],
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n",
            id="qwen",
        ),
        pytest.param("chatglm2", [user("Hi")], "[Round 1]\n\n问：Hi\n\n答：", id="chatglm2"),
        pytest.param("yuan2", [user("turn on")], "turn o<sep>", id="yuan2-strips-chars"),
    ],
)
def test_it_renders_known_prompts(name: str, messages: list, expected: str) -> None:
    assert ours(name, messages)[0] == expected


def test_it_returns_plain_string_prompts_verbatim() -> None:
    template = dataclasses.replace(Template.from_worker(worker_conv("vicuna_v1.1")), sep_style=99)
    assert build_prompt(template, "Raw {prompt}\r\n") == ("Raw {prompt}\r\n", [])


@pytest.mark.parametrize("name", ONE_TEMPLATE_PER_OTHER_STYLE)
def test_it_refuses_images_on_other_styles(name: str) -> None:
    with pytest.raises(PromptError, match=f"{name!r} does not accept images") as info:
        ours(name, [user([text("What?"), image(URL1)])])
    assert info.value.param == "messages"


def test_it_accepts_text_only_list_content_on_every_style() -> None:
    for name in ONE_TEMPLATE_PER_OTHER_STYLE:
        assert ours(name, [user([text("Hi")])]) == ours(name, [user("Hi")])


@pytest.mark.parametrize("role", ["system", "developer"])
def test_it_refuses_images_in_system_messages(role: str) -> None:
    messages = [{"role": role, "content": [text("S"), image(URL1)]}, user("Hi")]
    with pytest.raises(PromptError, match=f"{role} message cannot contain images"):
        ours("vicuna_v1.1", messages)


def test_it_returns_images_of_every_user_turn() -> None:
    messages = [user([image(URL1), text("a")]), user([image(URL2), text("b")])]
    prompt, images = ours("vicuna_v1.1", messages)
    assert images == [URL1, URL2]
    assert prompt.count(IMAGE_PLACEHOLDER) == 2
    # The release's get_images() skips the second turn (odd position): we fix that.
    assert fastchat_prompt(worker_conv("vicuna_v1.1"), messages) == (prompt, [URL1])


@pytest.mark.parametrize("sep_style", [0, 20, 23, None], ids=str)
def test_it_rejects_unknown_separator_styles(sep_style: int | None) -> None:
    template = Template.from_worker({**worker_conv("vicuna_v1.1"), "sep_style": sep_style})
    with pytest.raises(PromptError, match="'vicuna_v1.1' has separator style"):
        build_prompt(template, [user("Hi")])


@pytest.mark.parametrize("name", API_ONLY_TEMPLATES)
def test_it_rejects_api_only_templates(name: str) -> None:
    conv = worker_conv(name)
    with pytest.raises(ValueError):
        fastchat_prompt(conv, [user("Hi")])
    with pytest.raises(PromptError, match="separator style None"):
        build_prompt(Template.from_worker(conv), [user("Hi")])


def test_it_rejects_unknown_roles() -> None:
    with pytest.raises(PromptError, match="Unknown role 'tool'"):
        ours("vicuna_v1.1", [{"role": "tool", "content": "x"}])


def test_it_keeps_few_shot_turns_in_front() -> None:
    prompt, _ = ours("one_shot", [user("Hi")])
    few_shot = conv_templates["one_shot"].messages
    assert prompt.index(few_shot[1][1]) < prompt.index("### Human: Hi")


def test_from_worker_ignores_extra_keys() -> None:
    conv = worker_conv("vicuna_v1.1")
    head = worker_conv("vicuna_v1.1", system_message_vision="V", max_image_size_mb=5)
    assert Template.from_worker(head) == Template.from_worker(conv)


def test_from_worker_builds_a_hashable_template() -> None:
    template = Template.from_worker(worker_conv("one_shot"))
    assert template.roles == ("Human", "Assistant")
    assert template.messages == tuple(conv_templates["one_shot"].messages)
    assert template.sep_style == SeparatorStyle.ADD_COLON_SINGLE
    assert Template.from_worker(worker_conv("chatglm3")).stop_token_ids == (64795, 64797, 2)
    hash(template)


@pytest.mark.parametrize(
    "stop_str,expected",
    [(None, []), ("", []), ("###", ["###"]), (["</s>", "", "[UNK]"], ["</s>", "[UNK]"])],
    ids=["none", "empty", "str", "list"],
)
def test_stop_strings_normalises_stop_str(stop_str: Any, expected: list[str]) -> None:
    conv = {**worker_conv("vicuna_v1.1"), "stop_str": stop_str}
    assert Template.from_worker(conv).stop_strings == expected


def test_stop_list_puts_request_first_without_duplicates() -> None:
    template = Template.from_worker({**worker_conv("aquila"), "stop_str": ["A", "C", ""]})
    assert stop_list(["B", "", "A", "B"], template) == ["B", "A", "C"]
    assert stop_list("C", template) == ["C", "A"]
    assert stop_list(None, template) == ["A", "C"]
    assert stop_list([], Template.from_worker(worker_conv("vicuna_v1.1"))) == []


def fastchat_stop(request_stop: str | list[str] | None, stop_str: Any) -> set[str]:
    """The release's stop set: request and template stops, a str counting as one."""
    stops: set[str] = set()
    for value in (request_stop, stop_str):
        if value:
            stops.update([value] if isinstance(value, str) else value)
    return stops


@pytest.mark.parametrize("name", WORKER_TEMPLATES)
def test_stop_list_matches_fastchat_set(name: str) -> None:
    conv = worker_conv(name)
    stops = stop_list(["STOP"], Template.from_worker(conv))
    assert set(stops) == fastchat_stop(["STOP"], conv["stop_str"]) - {""}
    assert stops[0] == "STOP"


# Workers of FastChat's unreleased main branch number the separator styles differently.


def head_worker_template(name: str, head_style: int) -> dict:
    conv = worker_conv(name)
    conv["sep_style"] = head_style
    conv["system_message_vision"] = ""
    conv["max_image_size_mb"] = None
    return conv


@pytest.mark.parametrize("name", ["qwen-7b-chat", "chatglm2", "yuan2", "deepseek-chat"])
def test_it_translates_the_main_branchs_style_numbers(name):
    release = worker_conv(name)
    head = head_worker_template(name, release["sep_style"] + 1)
    messages = [{"role": "user", "content": "Hi"}]
    assert build_prompt(Template.from_worker(head), messages) == build_prompt(Template.from_worker(release), messages)


def test_styles_shared_by_both_numberings_are_unchanged():
    head = head_worker_template("vicuna_v1.1", 2)
    assert Template.from_worker(head).sep_style == 2


@pytest.mark.parametrize("head_style", [8, 21, 22, 23])
def test_the_main_branchs_own_styles_are_refused_by_name(head_style):
    template = Template.from_worker(head_worker_template("vicuna_v1.1", head_style))
    with pytest.raises(PromptError, match="main branch"):
        build_prompt(template, [{"role": "user", "content": "Hi"}])
