"""Chat prompts rendered with the tokenizer's own template, with the chat role of every token.

The role of each prompt token is what the paper's scope needs (user turns are never steered).
It is found by rendering the conversation prefix by prefix: message i owns the characters that
rendering messages[:i+1] adds to rendering messages[:i]; the generation prompt (e.g.
"<|im_start|>assistant\\n") belongs to the assistant. A token takes the role of the character its
offset starts at. Templates that are not prefix-stable (a later message rewrites earlier text)
are refused with a clear error rather than mislabelled.
"""

from __future__ import annotations

from typing import Sequence


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True
                ) -> tuple[list[int], list[str]]:
    """Returns (token ids, role per token)."""
    if not messages:
        raise ValueError("messages: empty conversation")
    texts = [""]
    for i in range(1, len(messages) + 1):
        texts.append(tokenizer.apply_chat_template(list(messages[:i]), tokenize=False))
    full = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    texts.append(full)
    for i in range(1, len(texts)):
        if not texts[i].startswith(texts[i - 1]):
            raise ValueError(
                "messages: the tokenizer's chat template is not prefix-stable (rendering message "
                f"{i - 1} changes earlier text), so per-turn roles cannot be assigned")
    roles_by_span = [(len(texts[i]), len(texts[i + 1]), messages[i]["role"]) for i in range(len(messages))]
    roles_by_span.append((len(texts[-2]), len(full), "assistant"))  # generation prompt
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    roles = []
    span = 0
    for start, _end in enc["offset_mapping"]:
        while span < len(roles_by_span) - 1 and start >= roles_by_span[span][1]:
            span += 1
        roles.append(roles_by_span[span][2])
    return ids, roles
