"""The README's 'use the primitives in your own step' snippet runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_snippet_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tested: primitives -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested primitives snippet"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    params = namespace["params"]
    # One private step moved the parameters away from their zero init.
    assert float(abs(params["w"]).sum()) > 0
