"""The README's install and test commands are exactly what CI runs (.ci/run), in the same order."""

import re

from conftest import ROOT


def commands(lines) -> list[str]:
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_test_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"and the tests .*?```bash\n(.*?)```", readme, re.S)
    assert block, "README: the tests' command block after 'and the tests' is missing"
    ci = commands((ROOT / ".ci" / "run").read_text().splitlines())
    ci = [c for c in ci if not c.startswith(("set ", "cd ", "export "))]
    assert commands(block.group(1).splitlines()) == ci == [
        "pip install -r requirements.txt", "python -m pytest -q", "python -m pytest -q -m slow"]
