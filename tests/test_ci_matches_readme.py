"""`.ci/run` must run the README's test command exactly."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_cmd in ci.splitlines()
