"""FastChat 0.2.36 itself, as the reference the differential tests compare the gateway with."""
from __future__ import annotations

from typing import Any

from fastchat.conversation import Conversation, SeparatorStyle


def fastchat_conversation(conv: dict[str, Any]) -> Conversation:
    """Rebuild a worker's template ("conv" of /worker_get_conv_template) the way the release's
    openai_api_server.get_gen_params does (its module is not imported: it replaces sys.stdout
    and writes a log file on import)."""
    return Conversation(
        name=conv["name"],
        system_template=conv["system_template"],
        system_message=conv["system_message"],
        roles=conv["roles"],
        messages=list(conv["messages"]),
        offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]),
        sep=conv["sep"],
        sep2=conv["sep2"],
        stop_str=conv["stop_str"],
        stop_token_ids=conv["stop_token_ids"],
    )
