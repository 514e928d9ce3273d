"""The README's lash.hf example runs as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_readme_hf_example_runs(capsys):
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme[readme.index("## Hugging Face models"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    exec(compile(code, "README.md", "exec"), {})
    printed = re.match(r"loss \d+\.\d+; early exit at layer 2 \(threshold [\d.]+\) took (\d+)% of the generated tokens",
                       capsys.readouterr().out)  # fmt: skip
    assert printed and 0 < int(printed[1]) < 100  # the example shows early exit at work, not 0% nor all
