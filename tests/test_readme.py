"""The README's set-up commands are the ones CI and users run."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ci_command() -> str:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))][-1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    assert ci_command() in readme.splitlines()
    assert ci_command().endswith("python -m pytest")


def test_readme_first_command_installs_and_trains():
    readme = (REPO / "README.md").read_text().splitlines()
    first = next(line for line in readme if line.startswith("pip install") and "transfer train" in line)
    assert first.endswith("&& transfer train")


def test_readme_mentions_every_recipe_and_augment_preset():
    readme = (REPO / "README.md").read_text()
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"`{recipe.stem}`" in readme
    for preset in (REPO / "conf" / "augment").glob("*.yaml"):
        assert preset.stem in readme
