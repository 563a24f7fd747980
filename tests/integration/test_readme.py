"""The README's Python examples run as written (in order, one namespace, as a reader pastes them into a
script) and print and return the shapes their comments say."""

import ast
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SHAPE = r"\(\d+(?:, \d+)*\)"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_examples_run_and_match_their_comments():
    blocks = _python_blocks()
    assert len(blocks) >= 4, "the README lost its examples"
    namespace = {"__name__": "__main__"}
    checked = 0
    for block in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
        # "print(y.shape)   # (7, 8, 128): ...": the printed shape is the commented one
        for expected in re.findall(rf"^print\(.*\)\s*#\s*({SHAPE})", block, flags=re.M):
            assert expected in printed.getvalue().splitlines(), (expected, printed.getvalue())
            checked += 1
        # "y = layer(x, ...)   # (700, 256); ...": the assigned tensor has the commented shape
        for name, expected in re.findall(rf"^(\w+) = .*#\s*({SHAPE})", block, flags=re.M):
            assert tuple(namespace[name].shape) == ast.literal_eval(expected), (name, expected)
            checked += 1
        if "branch_paths(" in block:  # off Ascend every branch is composite, with a reason for each
            paths, reasons = namespace["paths"], namespace["reasons"]
            assert set(paths) == {"compress", "compressed_attention", "selection", "selected_attention",
                                  "sliding_window"}
            assert set(paths.values()) == {"mindspore"} and set(reasons) == set(paths)
            checked += 1
    assert checked >= 3, "the README examples lost the comments this test checks"
