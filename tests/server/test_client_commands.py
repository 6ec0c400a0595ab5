"""The command line's client side against a real loopback server: info, generate, maze rollouts and
the vector registry (`vectors list|export|import|delete --address`)."""

import json

import torch

from welfare_server.cli import main
from welfare_server.maze import GOLD, MOLD
from welfare_server.server.client import WelfareClient


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_info_and_generate(running_server, capsys):
    server = running_server()
    code, out = run(capsys, "info", "--address", server.address)
    assert code == 0 and json.loads(out)["num_layers"] == 4
    code, out = run(capsys, "generate", "hello", "--address", server.address, "--max-new-tokens", "3")
    with WelfareClient(server.address) as client:
        expected = client.generate_unary(chat=[{"role": "user", "content": "hello"}], max_new_tokens=3).text
    assert code == 0 and out == expected + "\n"


def test_maze_rollout_lines_and_jsonl(running_server, capsys, tmp_path):
    server = running_server()
    path = tmp_path / "episodes.jsonl"
    code, out = run(capsys, "maze", "--address", server.address, "--num-mazes", "2", "--group-size", "2",
                    "--policy", "oracle", "--size", "12", "--episode-steps", "3", "--out", str(path))
    assert code == 0 and len(out.splitlines()) == 4
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["maze"], r["member"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in records:
        tiles = r["tiles_entered"] + [t for t in r["tiles_pushed"] if t >= 0]
        assert (r["gold"], r["mold"]) == (tiles.count(GOLD), tiles.count(MOLD))
        assert len(r["actions"]) == 3 and abs(sum(r["rewards"]) - r["return"]) < 1e-4 and r["token_ids"]
    code, out = run(capsys, "maze", "--address", server.address, "--num-mazes", "1", "--temperature", "0",
                    "--size", "12", "--episode-steps", "2")
    assert code == 0 and len(out.splitlines()) == 1


def test_vector_registry_through_the_server(running_server, capsys, tmp_path):
    server = running_server()
    with WelfareClient(server.address) as client:
        record_id = client.put_vector(torch.randn(3, 64), [1, 2, 3], name="cli")
    code, out = run(capsys, "vectors", "list", "--address", server.address)
    assert code == 0 and record_id in out
    gguf = tmp_path / "v.gguf"
    code, _ = run(capsys, "vectors", "export", record_id, str(gguf), "--address", server.address, "--layers", "2", "3")
    assert code == 0 and gguf.read_bytes()[:4] == b"GGUF"
    code, out = run(capsys, "vectors", "import", str(gguf), "--address", server.address, "--name", "back")
    imported = out.split()[-1]
    with WelfareClient(server.address) as client:
        back = client.get_vector(imported)
        assert list(back.meta.layers) == [2, 3] and back.meta.name == "back"
    assert run(capsys, "vectors", "delete", record_id, "--address", server.address)[0] == 0
    code, out = run(capsys, "vectors", "delete", record_id, "--address", server.address)
    assert code == 1 and "not found" in out
    code, out = run(capsys, "vectors", "list", "--address", server.address)
    assert record_id not in out and imported in out
    code = main(["vectors", "export", "0123456789abcdef", str(gguf), "--address", server.address])
    assert code == 1 and "NOT_FOUND" in capsys.readouterr().err
