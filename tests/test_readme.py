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


def config_keys() -> set[str]:
    """Every dotted key a user can override: the root config and every option of every group."""
    from omegaconf import DictConfig, OmegaConf

    from transfer.config import config_dir, group_options, groups

    def leaves(node, prefix: str) -> set[str]:
        found = set()
        for key, value in node.items():
            if key in ("defaults", "hydra"):
                continue
            name = f"{prefix}{key}"
            found |= leaves(value, name + ".") if isinstance(value, DictConfig) else {name}
        return found

    keys = leaves(OmegaConf.load(config_dir() / "train.yaml"), "")
    for group in groups():
        if group != "recipe":
            for option in group_options(group):
                path = config_dir() / group / f"{option}.yaml"
                is_global = path.read_text().startswith("# @package _global_")  # a task file sets shared keys too
                keys |= leaves(OmegaConf.load(path), "" if is_global else f"{group}.")
    return keys


def cheat_sheet() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Override cheat-sheet", 1)[1].split("\n## ", 1)[0]


def test_every_config_key_is_in_the_override_cheat_sheet():
    """A key written in full (`optim.lr`) or as a continuation (`.mean` after `preprocess.input_size`)."""
    sheet = cheat_sheet()
    missing = []
    for key in sorted(config_keys()):
        prefix, _, last = key.rpartition(".")
        written = f"`{key}`" in sheet or f"`{key}=" in sheet or (prefix and f"`.{last}`" in sheet
                                                                    and f"`{prefix}." in sheet)
        if not written:
            missing.append(key)
    assert not missing, f"keys missing from the README's override cheat-sheet: {missing}"
