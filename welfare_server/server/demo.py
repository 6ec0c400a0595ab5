"""`welfare-server serve --demo`: once the served model's welfare vectors are in the registry, a
client asks the server "How's it going?" unsteered and steered along v_Gold and v_Mold at a few
coefficients (the paper's scope and layer l*), then asks the model to rate how it feels from 1 to
9 (the expected value over the nine digit tokens' probabilities), and prints the table. It talks
to the server over gRPC like any client; the server keeps serving."""

from __future__ import annotations

import asyncio
import sys

from welfare_server.server.background import welfare_vector_ids
from welfare_server.server.client import AsyncWelfareClient
from welfare_server.vectors.dose import DEFAULT_RATING_QUESTION, expected_rating, rating_token_ids

QUESTION = "How's it going?"
COEFFICIENTS = (-8.0, -4.0, 4.0, 8.0)
"""Steering coefficients of the demo (the paper's dose-response spans -8..8)."""
ANSWER_TOKENS = 40
WAIT_POLL_S = 2.0


async def rate(client, messages, steering, digit_ids) -> float:
    """The model's own 1-9 rating under the steering (dose.expected_rating of the digits' scores)."""
    scores = None
    async for event in client.generate(chat=messages + [{"role": "user", "content": DEFAULT_RATING_QUESTION}],
                                       steering=steering, max_new_tokens=1, score_token_ids=digit_ids):
        if event.DESCRIPTOR.name == "TokenDelta":
            scores = list(event.scores)
    return expected_rating(scores)[0]


async def run_demo(server, out=sys.stdout) -> None:
    state = server.state
    address = f"127.0.0.1:{server.port}"
    while welfare_vector_ids(state) is None:
        status = state.background.get("extraction", "")
        if status.startswith(("failed", "skipped")):
            print(f"demo: no welfare vectors ({status})", file=out)
            return
        print(f"demo: waiting for the welfare vectors ({status})", file=out, flush=True)
        await asyncio.sleep(WAIT_POLL_S * 5)
    ids = welfare_vector_ids(state)
    layers = {name: state.registry.meta(rid).best_layer for name, rid in ids.items()}
    digit_ids = rating_token_ids(state.engine.tokenizer)
    conditions = [("unsteered", None, 0.0)] + [(name, name, c) for name in ("gold", "mold") for c in COEFFICIENTS]
    token = state.config.auth_token
    rows = []
    async with AsyncWelfareClient(address, token=token) as client:
        for label, name, coefficient in conditions:
            steering = []
            if name is not None:
                layer = layers[name] if layers[name] is not None else state.engine.L // 2
                steering = [client.term(ids[name], [layer], coefficient)]
            chat = [{"role": "user", "content": QUESTION}]
            answer = await client.generate_unary(chat=chat, steering=steering, max_new_tokens=ANSWER_TOKENS)
            messages = chat + [{"role": "assistant", "content": answer.text}]
            score = await rate(client, messages, steering, digit_ids)
            rows.append((label, coefficient, score, " ".join(answer.text.split())[:70]))
    print(f"\n{QUESTION}  (vectors {ids}; layers {layers})", file=out)
    print(f"{'steering':10} {'alpha':>6} {'rating':>6}  answer", file=out)
    for label, coefficient, score, text in rows:
        print(f"{label:10} {coefficient:6.1f} {score:6.2f}  {text}", file=out)
    print("the server keeps serving; Ctrl-C or SIGTERM to stop", file=out, flush=True)
