"""The README's Python example runs as written and prints what it says."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_as_written():
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().splitlines()
    assert "convnextv2_debug" in lines[0] and "native" in lines[0]
    # loss, pred shape (2 images of 224x160 -> 7 * 5 patches of 32*32*3), only head.* missing
    assert "torch.Size([2, 35, 3072])" in lines[1]
    assert "['head.norm.weight', 'head.norm.bias', 'head.fc.weight', 'head.fc.bias']" in lines[1]
