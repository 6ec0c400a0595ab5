"""The Vectors service on a real server on a loopback port: an extraction on a tiny maze streams its
progress and stores records that Get returns and Generate steers with; contrast extraction; Put /
Get / Delete keep tensor bytes bit for bit; Export then Import gives the same rows back; List
filters; every refusal answers its code with the field named in the message's own terms."""
import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import torch

from tests.server.conftest import module_server
from welfare_server.server import wire
from welfare_server.server.client import AsyncWelfareClient
from welfare_server.server.errors import field_violations
from welfare_server.server.proto import common_pb2 as pb
from welfare_server.server.proto import vectors_pb2 as vec
from welfare_server.vectors.formats import export_gguf
from welfare_server.vectors.types import ModelIdentity

D, L = 64, 4  # the tiny preset
CHAT = [{"role": "user", "content": "How's it going?"}]
TINY_MAZE = dict(size=12, episode_steps=3)
UNKNOWN_ID = "0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory)


@pytest.fixture(scope="module")
def extracted(client):
    """The progress messages of one maze extraction (a handful of trajectories per class)."""
    return list(client.extract(maze=TINY_MAZE, per_class=4, permutations=3, seed=1))


def _tensor(record: vec.VectorRecord) -> torch.Tensor:
    return wire.to_torch(record.tensor, "tensor", 1 << 20)


def _refused(call, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert raised.value.code() == code, raised.value.details()
    return raised.value


def _field(error) -> str:
    violations = field_violations(error)
    assert len(violations) == 1, violations
    return violations[0][0]


def test_maze_extraction_streams_progress_and_its_records_steer_generation(server, client, extracted):
    *progress, final = extracted
    stages = [m.stage for m in progress]
    assert {"trajectories", "train", "held-out"} <= set(stages)
    assert stages.index("trajectories") < stages.index("train") < stages.index("held-out")
    assert all(0 < m.done <= m.total for m in progress)
    assert final.stage == "done" and set(final.vector_ids) == {"mold", "gold", "path"}
    assert list(final.counts) == [3, 3, 3]  # 4 per class, one of each held out
    for cls, record_id in final.vector_ids.items():
        figures = final.selection[cls]
        assert len(figures.auroc) == len(figures.cohens_d) == len(figures.overlap) == L
        record = client.get_vector(record_id)
        meta = json.loads(record.meta.meta_json)
        assert (record.meta.id, record.meta.method, record.meta.point) == (record_id, "maze_classes", "block_input")
        assert list(record.meta.layers) == list(range(L)) and record.meta.hidden_size == D
        assert meta["concept"] == cls and meta["best_layer"] == figures.best_layer
        assert meta["source"]["maze"]["size"] == TINY_MAZE["size"]
        assert record.meta.model_fingerprint == server.server.state.identity.weights_sha256
        assert _tensor(record).shape == (L, D)
        assert record.meta.norms == pytest.approx(_tensor(record).norm(dim=1).tolist())
    listed = {m.id for m in client.list_vectors(name="maze_classes", this_model_only=True)}
    assert listed == set(final.vector_ids.values())

    # Generate steers with a record by id: a strong push along v_Mold at l* changes the greedy text.
    mold = client.get_vector(final.vector_ids["mold"])
    layer = final.selection["mold"].best_layer
    coefficient = 8.0 / mold.meta.norms[layer]
    plain = client.generate_unary(chat=CHAT, max_new_tokens=8, ignore_eos=True, temperature=0)
    steered = client.generate_unary(chat=CHAT, max_new_tokens=8, ignore_eos=True, temperature=0,
                                    steering=[client.term(mold.meta.id, layers=[layer], coefficient=coefficient)])
    assert list(plain.token_ids) != list(steered.token_ids)
    metrics = server.server.state.metrics
    assert metrics.value("welfare_requests_total", method="Extract", code="OK") == 1
    assert metrics.value("welfare_requests_in_flight", method="Extract") == 0


def test_contrast_extraction(client):
    happy = [[{"role": "user", "content": f"Tell me something nice about day {i}."},
              {"role": "assistant", "content": "What a wonderful, happy day!"}] for i in range(3)]
    sad = [[{"role": "user", "content": f"Tell me about day {i}."}] for i in range(3)]
    *_, final = client.extract(contrast=(happy, sad), permutations=2, name="mood")
    assert set(final.vector_ids) == {"positive", "negative"} and list(final.counts) == [2, 2]
    positive = client.get_vector(final.vector_ids["positive"])
    negative = client.get_vector(final.vector_ids["negative"])
    assert positive.meta.name == "mood" and positive.meta.method == "contrast"
    assert torch.allclose(_tensor(positive), -_tensor(negative), atol=1e-6)  # two classes: v_neg = -v_pos


def test_put_get_delete_keep_the_bytes(server, client):
    rows = torch.randn(2, D, generator=torch.Generator().manual_seed(0)) * 1e3
    rows[0, :4] = torch.tensor([-0.0, 1e-40, -1.2345678e15, 1.5e-45])  # signed zero, subnormals, a wide range
    record_id = client.put_vector(rows, [1, 3], name="bits", method="handmade", point="block_output")
    record = client.get_vector(record_id)
    assert record.tensor.data == wire.from_torch(rows).data  # bit for bit
    assert np.array_equal(np.frombuffer(record.tensor.data, "<f4").view("<u4"), rows.numpy().view(np.uint32).ravel())
    assert (record.meta.name, record.meta.method, record.meta.point, list(record.meta.layers)) == \
        ("bits", "handmade", "block_output", [1, 3])
    assert client.put_vector(rows, [1, 3], name="bits", method="handmade", point="block_output") == record_id

    # [D] with several layers: the same row at each (as a steering term's inline [D]).
    one = torch.linspace(-1, 1, D)
    both = _tensor(client.get_vector(client.put_vector(one, [0, 2], name="same")))
    assert torch.equal(both, torch.stack([one, one]))
    # bf16 and fp16 bytes are widened exactly.
    for dtype, torch_dtype, view in ((pb.DTYPE_BFLOAT16, torch.bfloat16, torch.int16),
                                     (pb.DTYPE_FLOAT16, torch.float16, torch.int16)):
        narrow = (torch.randn(D, generator=torch.Generator().manual_seed(1))).to(torch_dtype)
        message = pb.Tensor(dtype=dtype, shape=[D], data=narrow.view(view).numpy().astype("<i2").tobytes())
        stored = _tensor(client.get_vector(client.put_vector(message, [2], name=f"narrow-{dtype}")))
        assert torch.equal(stored[0], narrow.float())

    # List filters: exact name, exact method, this model only.
    other = ModelIdentity(name="other", family="llama", hidden_size=D, num_layers=L, weights_sha256="f" * 64)
    foreign = server.server.state.registry.put(rows, model=other, layers=[1, 3], method="handmade", name="bits")
    assert {m.id for m in client.list_vectors(name="bits")} == {record_id, foreign}
    assert {m.id for m in client.list_vectors(name="bits", this_model_only=True)} == {record_id}
    assert {m.id for m in client.list_vectors(method="handmade", this_model_only=True)} == {record_id}
    assert client.list_vectors(name="nobody") == []

    metrics = server.server.state.metrics
    missed = metrics.value("welfare_requests_total", method="Get", code="NOT_FOUND")
    assert client.delete_vector(record_id) is True
    _refused(lambda: client.get_vector(record_id), grpc.StatusCode.NOT_FOUND)
    _refused(lambda: client.delete_vector(record_id), grpc.StatusCode.NOT_FOUND)
    assert metrics.value("welfare_requests_total", method="Get", code="NOT_FOUND") == missed + 1


def test_export_then_import_gives_the_rows_back(client, extracted):
    record = client.get_vector(extracted[-1].vector_ids["gold"])
    data = client.export_vector(record.meta.id)
    assert data[:4] == b"GGUF"
    back = client.get_vector(client.import_vector(data, name="gold-again"))
    # block_input rows 0 and 1 have no llama.cpp form (the embeddings, block 0's output): left out.
    assert list(back.meta.layers) == [2, 3] and back.meta.point == "block_input"
    assert (back.meta.name, back.meta.method) == ("gold-again", "gguf_import")
    assert torch.equal(_tensor(back), _tensor(record)[2:])
    doubled = client.get_vector(client.import_vector(client.export_vector(record.meta.id, scale=2.0), name="x2"))
    assert torch.equal(_tensor(doubled), _tensor(record)[2:] * 2)
    assert json.loads(back.meta.meta_json)["source"]["provenance"]["record_id"] == record.meta.id
    one = client.get_vector(client.import_vector(client.export_vector(record.meta.id, layers=[3]), name="l3"))
    assert list(one.meta.layers) == [3] and torch.equal(_tensor(one), _tensor(record)[3:])


def test_refusals_name_their_field(client, extracted, tmp_path):
    good = wire.from_torch(torch.ones(D))
    short = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[D], data=good.data[:-4])
    unset = pb.Tensor(shape=[D], data=good.data)
    cases = [
        (lambda: client.put_vector(short, [1]), "tensor.data"),
        (lambda: client.put_vector(unset, [1]), "tensor.dtype"),
        (lambda: client.put_vector(torch.ones(D - 1), [1]), "tensor.shape"),
        (lambda: client.put_vector(torch.ones(2, D), [1]), "layers"),
        (lambda: client.put_vector(torch.ones(D), []), "layers"),
        (lambda: client.put_vector(torch.ones(D), [L]), "layers[0]"),
        (lambda: client.put_vector(torch.full((D,), float("nan")), [1]), "tensor"),
        (lambda: client.get_vector("not-an-id"), "id"),
        (lambda: client.export_vector(extracted[-1].vector_ids["mold"], scale=float("inf")), "scale"),
        (lambda: client.export_vector(extracted[-1].vector_ids["mold"], layers=[L]), "layers[0]"),
        (lambda: client.export_vector(extracted[-1].vector_ids["mold"], layers=[0]), "layers"),
        (lambda: client.import_vector(b"not a gguf file"), "gguf"),
        (lambda: client.import_vector(b""), "gguf"),
        (lambda: client.extract(maze=TINY_MAZE, per_class=1), "per_class"),
        (lambda: client.extract(maze=TINY_MAZE, permutations=10 ** 6), "permutations"),
        (lambda: client.extract(maze=TINY_MAZE, heldout_fraction=1.5), "heldout_fraction"),
        (lambda: client.extract(maze=TINY_MAZE, seed=-1), "seed"),
        (lambda: client.extract(maze=dict(size=3)), "maze.size"),
        (lambda: client.extract(maze=dict(glyphs="runes")), "maze.glyphs"),
        (lambda: client.extract(maze=dict(size=100, episode_steps=15)), "maze.episode_steps"),  # past the context
        (lambda: client.extract(contrast=([CHAT], [CHAT, CHAT])), "contrast.positive"),
        (lambda: client.extract(contrast=([CHAT, [{"role": "robot", "content": "beep"}]], [CHAT, CHAT])),
         "contrast.positive[1].messages[0].role"),
        (lambda: client.extract(contrast=([CHAT, CHAT], [CHAT, []])), "contrast.negative[1].messages"),
        (lambda: client.extract(maze=TINY_MAZE, name="n" * 201), "name"),
        (lambda: client.vectors.Extract(vec.ExtractRequest()), "source"),
    ]
    for call, field in cases:
        assert _field(_refused(call)) == field
    # A vector of another hidden size, as a GGUF.
    path = tmp_path / "wide.gguf"
    export_gguf(path, torch.ones(2, 32), [2, 3], model_hint="llama")
    error = _refused(lambda: client.import_vector(path.read_bytes()))
    assert _field(error) == "gguf" and "hidden size" in error.details()
    # The record a call is about: NOT_FOUND when there is none.
    for call in (client.get_vector, client.delete_vector, client.export_vector):
        assert "no record" in _refused(lambda: call(UNKNOWN_ID), grpc.StatusCode.NOT_FOUND).details()


def test_an_extraction_past_its_deadline_stops(server, client):
    admission = server.server.state.admission
    with pytest.raises(grpc.RpcError) as late:
        list(client.vectors.Extract(vec.ExtractRequest(maze=vec.MazeClasses(**TINY_MAZE), per_class=400, name="late"),
                                    timeout=0.2))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 10
    while admission.active and time.time() < deadline:
        time.sleep(0.02)
    assert admission.active == 0
    time.sleep(1.0)  # the worker stops at its next progress report, before anything is stored
    assert client.list_vectors(name="late") == []


def test_async_client(server, extracted):
    async def main():
        async with AsyncWelfareClient(server.address, timeout=60) as client:
            progress = [m async for m in client.extract(maze=TINY_MAZE, per_class=4, permutations=3, seed=1)]
            assert dict(progress[-1].vector_ids) == dict(extracted[-1].vector_ids)  # same content, same ids
            record_id = await client.put_vector(torch.arange(D, dtype=torch.float32), [2], name="async")
            assert _tensor(await client.get_vector(record_id))[0, 5] == 5.0
            assert record_id in {m.id for m in await client.list_vectors(name="async")}
            data = await client.export_vector(record_id)
            imported = await client.import_vector(data, name="async-back")
            assert torch.equal(_tensor(await client.get_vector(imported)), _tensor(await client.get_vector(record_id)))
            assert await client.delete_vector(record_id)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.get_vector(record_id)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
