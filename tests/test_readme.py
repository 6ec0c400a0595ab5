"""README's Python example runs as written (on the bundled model), so the front page never rots."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.real_model
def test_readme_python_example_runs(bundled_model_dir, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["first"].finish_reason in ("stop", "length")
    assert namespace["handle"].done and namespace["out"][0].token_ids
    assert not namespace["engine"].sessions.sessions  # the example closes its session
