"""Token rendering table: each prompt fragment's token ids, built once from a HF tokenizer.

Rendering a user turn is then a concatenation of id runs, done in C++/CUDA with no Python per env
(MazeBatch.render_tokens). That is only valid when the tokenizer tokenizes a prompt as the
concatenation of its fragments (true for byte-level BPE tokenizers whose pre-tokenizer splits
before " word" and around digits, such as SmolLM2's), so the builder checks it on many sampled
states against tokenizer(text) and refuses a tokenizer for which it does not hold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from welfare_server.maze import text as T
from welfare_server.maze.config import DIRECTION_LETTERS, MazeConfig

DEFAULT_CHECK_SAMPLES = 512
"""States sampled by the compositionality check (every coordinate value is covered as well)."""

_SENTINEL = "\u2063MAZE_TURN\u2063"  # invisible separator: never produced by a chat template itself


@dataclass
class MazeTokenTable:
    """Fragment token ids of one (tokenizer, MazeConfig) pair, ready for the C++/CUDA renderer."""

    config: MazeConfig
    fragment_ids: list[list[int]]
    """Token ids of every fragment, indexed as in welfare_server.maze.text."""
    max_len: int
    """Upper bound of one rendered user turn's length (the width of the [B, L] id buffer)."""
    pad_id: int
    """Id written after each env's turn in the [B, L] buffer."""
    action_token_ids: list[int]
    """Single token id of N, E, S, W (in direction order): the four choices sampling is masked to."""
    conversation_prefix_ids: list[int] = field(default_factory=list)
    """Ids the chat template puts before the first user turn (e.g. SmolLM2's default system prompt)."""
    assistant_end_ids: list[int] = field(default_factory=list)
    """Ids the chat template puts after an assistant answer, before the next user turn."""
    _device_tables: dict = field(default_factory=dict, repr=False)

    def flat_tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int32 [total], offsets int32 [num_fragments + 1]) on device, cached per device."""
        key = str(torch.device(device))
        if key not in self._device_tables:
            flat = [i for ids in self.fragment_ids for i in ids]
            offsets = [0]
            for ids in self.fragment_ids:
                offsets.append(offsets[-1] + len(ids))
            self._device_tables[key] = (
                torch.tensor(flat or [0], dtype=torch.int32, device=device),
                torch.tensor(offsets, dtype=torch.int32, device=device),
            )
        return self._device_tables[key]

    @classmethod
    def from_tokenizer(cls, tokenizer, config: MazeConfig, *, chat_wrapper: bool = True,
                       check_samples: int = DEFAULT_CHECK_SAMPLES, seed: int = 0) -> "MazeTokenTable":
        """Build and verify the table. chat_wrapper: include the chat template's user-turn wrapper
        (the text around a later user turn of a conversation) in every rendered turn."""
        turn_prefix = turn_suffix = ""
        conversation_prefix_ids: list[int] = []
        assistant_end_ids: list[int] = []
        if chat_wrapper:
            turn_prefix, turn_suffix, conversation_prefix, assistant_end = _chat_wrapper(tokenizer)
            conversation_prefix_ids = _encode(tokenizer, conversation_prefix)
            assistant_end_ids = _encode(tokenizer, assistant_end)
        texts = T.fragment_texts(config, turn_prefix, turn_suffix)
        fragment_ids = [_encode(tokenizer, text) for text in texts]

        action_ids = []
        for letter in DIRECTION_LETTERS:
            ids = _encode(tokenizer, letter)
            if len(ids) != 1:
                raise ValueError(f"tokenizer encodes the action {letter!r} as {len(ids)} tokens {ids}; "
                                 f"the maze needs each of N/E/S/W to be a single token")
            action_ids.append(ids[0])

        lengths = [len(ids) for ids in fragment_ids]
        clause_max = max(lengths[T.CLAUSE_BASE:T.NUMBER_BASE])
        number_max = max(lengths[T.NUMBER_BASE:T.NUMBER_BASE + config.size])
        y_max = max(lengths[T.NUMBER_BASE + config.size:])
        wind_max = max(lengths[T.WIND_BASE:T.WIND_BASE + 4]) + lengths[T.HEAD_AFTER_WIND]
        max_len = (lengths[T.TURN_PREFIX] + max(wind_max, lengths[T.HEAD_PLAIN]) + number_max + y_max
                   + lengths[T.CLOSE] + 4 * clause_max + lengths[T.TAIL] + lengths[T.TURN_SUFFIX])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        table = cls(config=config, fragment_ids=fragment_ids, max_len=max_len, pad_id=int(pad_id or 0),
                    action_token_ids=action_ids, conversation_prefix_ids=conversation_prefix_ids,
                    assistant_end_ids=assistant_end_ids)
        table._check_compositional(tokenizer, texts, check_samples, seed)
        return table

    def render_fragments(self, fragments: list[int]) -> list[int]:
        return [i for f in fragments for i in self.fragment_ids[f]]

    def _check_compositional(self, tokenizer, texts: list[str], samples: int, seed: int) -> None:
        config = self.config
        rng = random.Random(seed)
        states = []
        for k in range(max(samples, config.size)):
            listed_dirs = [d for d in range(4) if rng.random() < 0.8] or [rng.randrange(4)]
            if len(listed_dirs) < 2:
                listed_dirs.append((listed_dirs[0] + 1) % 4)
            rng.shuffle(listed_dirs)
            listed = [(d, rng.randrange(3)) for d in listed_dirs]
            # Every coordinate value appears as x and as y at least once.
            row, col = (k % config.size, (k * 7 + 3) % config.size) if k < config.size else (
                rng.randrange(config.size), rng.randrange(config.size))
            wind_from = rng.randrange(4) if rng.random() < 0.5 else -1
            states.append(T.prompt_fragments(config, row, col, wind_from, listed, with_wrapper=True))
        full_texts = ["".join(texts[f] for f in fragments) for fragments in states]
        expected = tokenizer(full_texts, add_special_tokens=False)["input_ids"]
        for fragments, text, want in zip(states, full_texts, expected):
            got = self.render_fragments(fragments)
            if got != list(want):
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} does not tokenize maze prompts as the "
                    f"concatenation of their fragments (e.g. {text!r}: fragments give {got}, "
                    f"tokenizer gives {list(want)}); token rendering is unavailable for it")
            if len(got) > self.max_len:
                raise AssertionError(f"rendered length {len(got)} exceeds max_len {self.max_len}")


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_wrapper(tokenizer) -> tuple[str, str, str, str]:
    """(turn_prefix, turn_suffix, conversation_prefix, assistant_end) from the chat template.

    A later user turn is what the template adds to a conversation [user, assistant] when a user
    turn and the generation prompt follow; the conversation prefix is what precedes the first
    user turn's content minus that turn prefix (e.g. a default system prompt).
    """
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             tokenize=False)

    answered = [{"role": "user", "content": "a"}, {"role": "assistant", "content": _SENTINEL}]
    before = render(answered, False)
    after = render(answered + [{"role": "user", "content": _SENTINEL}], True)
    if not after.startswith(before):
        raise ValueError("the tokenizer's chat template does not render a conversation as a prefix "
                         "of its continuation; build the table with chat_wrapper=False")
    turn_prefix, turn_suffix = after[len(before):].split(_SENTINEL)
    # What follows the assistant's content in [user, assistant] ends an answer.
    assistant_end = before.split(_SENTINEL)[1]
    head = render([{"role": "user", "content": _SENTINEL}], True).split(_SENTINEL)[0]
    if not head.endswith(turn_prefix):
        raise ValueError("the chat template's first user turn does not start like its later ones")
    conversation_prefix = head[: len(head) - len(turn_prefix)]
    return turn_prefix, turn_suffix, conversation_prefix, assistant_end
