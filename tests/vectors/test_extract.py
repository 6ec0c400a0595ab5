"""Concept-vector extraction: the paper's synthetic trajectories (balanced, replayable, fresh
mazes), layer selection on data with a known answer, and extraction means equal to a float64
reference from HF's hidden states."""
import collections

import pytest
import torch

from welfare_server.maze import PATH, MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.vectors import model_identity
from welfare_server.vectors.extract import ExtractionConfig, _split, contrast_vectors, extract, maze_vectors
from welfare_server.vectors.selection import auroc, cohens_d, histogram_overlap, select_layer
from welfare_server.vectors.trajectories import CLASS_TILES, synthetic_trajectories

CLASSES = ("mold", "gold", "path")


@pytest.fixture(scope="module")
def table(smollm2_tokenizer):
    return MazeTokenTable.from_tokenizer(smollm2_tokenizer, MazeConfig(size=14, episode_steps=6))


def test_trajectories_are_balanced_fresh_and_replay_exactly(table):
    trajectories = synthetic_trajectories(table, 10, seed=3, num_envs=32)
    assert len(trajectories) == 30
    by_class = collections.Counter(t.label for t in trajectories)
    assert by_class == {0: 10, 1: 10, 2: 10}
    for c in range(3):
        moves = collections.Counter(t.final_move for t in trajectories if t.label == c)
        assert max(moves.values()) - min(moves.values()) <= 1  # letters balanced
    assert all(1 <= t.length <= 6 for t in trajectories)
    assert len({(t.env, t.episode) for t in trajectories}) == 30  # a fresh maze each
    assert [t.token_ids for t in synthetic_trajectories(table, 10, seed=3, num_envs=32)] == \
        [t.token_ids for t in trajectories]  # one seed fixes everything
    config = table.config.replace(wind_prob=0.0)
    action_of = {tok: a for a, tok in enumerate(table.action_token_ids)}
    prefix, end = table.conversation_prefix_ids, table.assistant_end_ids
    for t in trajectories:  # replay each on its own maze: Path steps, then the class's tile
        maze = MazeBatch(config, 32, seed=3)
        for _ in range(t.episode):
            maze.reset()
        conversation = list(prefix)
        for step in range(t.length):
            ids, lengths = maze.render_tokens(table)
            conversation += ([] if step == 0 else end) + ids[t.env, :lengths[t.env]].tolist()
            move = action_of[t.token_ids[len(conversation)]]
            conversation.append(table.action_token_ids[move])
            tile = int(maze.observe().neighbours[t.env, move])
            assert tile == (CLASS_TILES[CLASSES[t.label]] if step == t.length - 1 else PATH)
            actions = maze.observe().valid.int().argmax(1).to(torch.int32)  # any legal move elsewhere
            actions[t.env] = move
            maze.step(actions)
        assert conversation == t.token_ids and t.final_move == move


def test_selection_measures_and_a_known_best_layer():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g) + 1.0, torch.randn(70, generator=g)
    pairs = (pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()
    assert auroc(pos, neg) == pytest.approx(float(pairs))
    pooled = (((49 * pos.double().var()) + 69 * neg.double().var()) / 118).sqrt()
    assert cohens_d(pos, neg) == pytest.approx(float((pos.double().mean() - neg.double().mean()) / pooled))
    assert histogram_overlap(pos, pos) == pytest.approx(1.0)
    assert histogram_overlap(pos, pos + 100) == 0.0
    # One layer separates far better than the rest: every measure points there.
    L, N = 10, 200
    is_class = torch.arange(N) < 80
    shift = torch.tensor([0.4] * 6 + [2.5] + [0.4] * 3)
    projections = torch.randn(N, L, generator=g) + is_class[:, None] * shift
    selection = select_layer(projections, is_class)
    assert selection.best_layer == 6
    assert max(range(L), key=lambda l: selection.auroc[l]) == 6
    with pytest.raises(ValueError, match="in and out of the class"):
        select_layer(projections, torch.ones(N, dtype=torch.bool))


def test_extraction_means_equal_a_float64_reference(tiny, table):
    lm = tiny
    L = lm.config.num_hidden_layers
    engine = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=1024))
    config = ExtractionConfig(per_class=6, permutations=5, seed=2, num_envs=32)
    cv = maze_vectors(engine, model_identity(lm), table, config)
    trajectories = synthetic_trajectories(table, 6, seed=2, num_envs=32)
    labels = [t.label for t in trajectories]
    train, held = _split(labels, 3, config.heldout_fraction, torch.Generator().manual_seed(2))
    sums = torch.zeros(L, 3, lm.config.hidden_size, dtype=torch.float64)
    counts = [0, 0, 0]
    for i in train:
        with torch.inference_mode():
            hidden = lm.model(torch.tensor([trajectories[i].token_ids]), output_hidden_states=True).hidden_states
        sums[:, labels[i]] += torch.stack([hidden[l][0, -1] for l in range(L)]).double()
        counts[labels[i]] += 1
    assert cv.counts == counts and sum(counts) + len(held) == 18
    want = sums / torch.tensor(counts, dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(cv.means.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cv.vector("gold").double(), want[:, 1] - (want[:, 0] + want[:, 2]) / 2,
                               rtol=1e-4, atol=1e-4)
    # A permutation keeps the class sizes, so the count-weighted mean of the classes is unchanged.
    weights = torch.tensor(counts, dtype=torch.float32)[:, None]
    overall = (cv.means * weights).sum(1) / weights.sum()
    for k in range(5):
        torch.testing.assert_close((cv.permuted_means[k] * weights).sum(1) / weights.sum(), overall,
                                   rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cv.permuted_means[0], cv.means)
    assert set(cv.selection) == set(CLASSES) and all(0 <= s.best_layer < L for s in cv.selection.values())
    assert cv.source["extraction"]["per_class"] == 6 and cv.method == "maze_classes"


def test_contrast_vectors_from_chats(tiny):
    lm = tiny
    engine = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=256))
    happy = [[{"role": "user", "content": f"I feel wonderful today, number {i}."}] for i in range(6)]
    sad = [[{"role": "user", "content": f"I feel terrible today, number {i}."}] for i in range(6)]
    cv = contrast_vectors(engine, model_identity(lm), happy, sad, ExtractionConfig(per_class=2, permutations=3))
    assert cv.classes == ("positive", "negative") and cv.counts == [5, 5]
    torch.testing.assert_close(cv.vector("positive"), cv.means[:, 0] - cv.means[:, 1])
    with pytest.raises(ValueError, match="3 labels for 2 examples"):
        extract(engine, model_identity(lm), [[1], [2]], [0, 1, 0], ("a", "b"), "contrast")


def test_an_extraction_saves_and_loads_whole(tiny, table, tmp_path):
    engine = Engine(tiny, EngineConfig(max_batch_slots=4, max_context_len=1024))
    cv = maze_vectors(engine, model_identity(tiny), table, ExtractionConfig(per_class=3, permutations=2, num_envs=16))
    again = type(cv).load(cv.save(tmp_path / "x.safetensors"))
    assert torch.equal(again.means, cv.means) and torch.equal(again.permuted_means, cv.permuted_means)
    assert (again.classes, again.counts, again.method, again.model, again.source) == \
        (cv.classes, cv.counts, cv.method, cv.model, cv.source)
    assert {k: v.best_layer for k, v in again.selection.items()} == {k: v.best_layer for k, v in cv.selection.items()}
    with pytest.raises(ValueError, match="not a saved extraction"):
        from safetensors.torch import save_file

        save_file({"means": cv.means}, str(tmp_path / "plain.safetensors"))
        type(cv).load(tmp_path / "plain.safetensors")
