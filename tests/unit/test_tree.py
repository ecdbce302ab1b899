"""The repository holds the project's own files: no wheels, eggs, archives or caches that a build,
a bench run or a pip download left behind (nine wheels, 3.7 MB, were once committed at the root)."""

import subprocess

from conftest import ROOT

DROPPINGS = (".whl", ".egg", ".tar.gz", ".pyc", ".pyo")


def test_no_build_droppings_are_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked, "git ls-files listed nothing: is this a git checkout?"
    dropped = [path for path in tracked if path.endswith(DROPPINGS) or "__pycache__/" in path
               or path.startswith((".venv/", "build/")) or ".egg-info/" in path]
    assert dropped == [], f"build droppings are tracked (git rm them; .gitignore keeps them out): {dropped}"
