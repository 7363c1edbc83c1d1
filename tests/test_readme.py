"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index, capsys):
  exec(compile(_blocks()[index], f"README.md block {index}", "exec"), {})
