"""The README's claims are the project's facts: its set-up commands are the ones CI and users run, and its
tables state the config's keys with their defaults, the CLI's commands and the recipes' own figures.

Each test matches the specific fact (a key with its default, a command name, a number beside its unit), so a
README that drifted from the code fails; a common word found anywhere in the text proves nothing."""

import functools
import math
import re
from pathlib import Path

import yaml

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


def readme() -> str:
    return (REPO / "README.md").read_text()


def section(title: str) -> str:
    return readme().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text` (`\\|` inside a cell is not a separator)."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def recipe_config(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())


def test_recipes_table_has_one_row_per_recipe_file():
    rows = [row[0] for row in table_rows(section("Recipes"))[1:]]
    assert sorted(rows) == sorted(f"`{path.stem}`" for path in (REPO / "recipes").glob("*.yaml"))


def test_every_recipe_figure_in_a_readme_table_is_the_recipes_own():
    """`fashion_mnist_lite0` (80 px, 12 epochs) in any table: its preprocess.input_size and trainer.epochs."""
    names = {path.stem for path in (REPO / "recipes").glob("*.yaml")}
    checked = 0
    for row in table_rows(readme()):
        described = " ".join(row[:2]) if row[0].strip("`") in names else row[0]
        name = re.match(r"`(\w+)`", described)
        if not name or name.group(1) not in names:
            continue
        recipe = recipe_config(name.group(1))
        for figure in re.findall(r"(\d+) px", described):
            assert int(figure) == recipe["preprocess"]["input_size"], (row[0], figure)
            checked += 1
        for figure in re.findall(r"(\d+) epochs", described):
            assert int(figure) == recipe["trainer"]["epochs"], (row[0], figure)
            checked += 1
    assert checked >= 10, checked


def test_commands_table_names_every_command_and_no_other():
    from transfer.cli import COMMANDS

    named = {re.match(r"`transfer ([\w-]+)", row[0]).group(1) for row in table_rows(section("Commands"))[1:]}
    assert named == set(COMMANDS)


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


def sheet_keys(cell: str) -> tuple[dict[str, list[str]], list[str]]:
    """A cheat-sheet key cell → ({group: the options it lists}, the keys its default column gives, in order).

    `optim=adamw\\|sgd` (`optim.opt`): one default, the group's own key; a group alone (`augment=...`) gives
    its default choice (written `=augment`); `.warmup_lr` continues the previous key; `optim.lr=auto` is an
    example value, not a key."""
    listed, keys, prefix = {}, [], ""
    for token in re.findall(r"`([^`]+)`", cell):
        name, _, value = token.partition("=")
        if "." not in name and value:
            listed[name] = value.split("\\|")
            keys.append(f"={name}")
        elif value:
            continue
        elif name.startswith("."):
            keys.append(prefix + name[1:])
        else:
            if keys and keys[-1] == f"={name.split('.')[0]}":
                keys.pop()
            keys.append(name)
            prefix = name.rpartition(".")[0] + "."
    return listed, keys


def readme_value(text: str):
    """A default as the README writes it (`1e-3`, `null`, `[2, 3, 4]`; `none`/`digits`/`the model's` for
    null) → the Python value."""
    if text in ("none", "digits", "the model's"):
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def same_value(written, actual) -> bool:
    if isinstance(written, bool) or isinstance(actual, bool):
        return written is actual
    if isinstance(written, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(written, actual)
    return written == actual or (written is None and actual == "none")  # `trainer.tta`: none


def lookup(config: dict, key: str):
    """The value at a dotted key, or KeyError."""
    for part in key.split("."):
        if not isinstance(config, dict):
            raise KeyError(key)
        config = config[part]
    return config


@functools.cache
def default_config() -> dict:
    from omegaconf import OmegaConf

    from transfer.config import compose

    return OmegaConf.to_container(compose([]))


def option_configs(group: str) -> list[dict]:
    """Each option file of a config group, as the keys it sets (a `_global_` file, such as a task's, at the root)."""
    from transfer.config import config_dir, group_options

    found = []
    for option in group_options(group):
        text = (config_dir() / group / f"{option}.yaml").read_text()
        content = yaml.safe_load(text) or {}
        found.append(content if text.startswith("# @package _global_") else {group: content})
    return found


def test_override_cheat_sheet_states_every_default_and_lists_every_option():
    """Each row's defaults, in the order of its keys, are the composed config's (a key only one option of a
    group sets, such as `task.decoder_channels`, that option's); a group row lists exactly the group's options.
    Rows whose default varies (`per preset`) or that show an example (`—`) state none."""
    from transfer.config import group_options

    choices = {key: value for entry in yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["defaults"]
               if isinstance(entry, dict) for key, value in entry.items()}
    rows = [(*sheet_keys(key_cell), written) for key_cell, written, _ in table_rows(cheat_sheet())[1:]]
    listed = {group: options for row_listed, _, _ in rows for group, options in row_listed.items()}
    for group, options in listed.items():
        assert options == ["NAME"] or sorted(options) == sorted(group_options(group)), (group, options)
    tasks = dict(zip(group_options("task"), option_configs("task")))
    per_task = {"trainer.monitor": [lookup(tasks[task], "trainer.monitor") if task != choices["task"] else
                                    lookup(default_config(), "trainer.monitor") for task in listed["task"]]}
    wrong, checked = [], 0
    for _, keys, written in rows:
        if written in ("per preset", "—") or keys == ["hydra.run.dir"]:
            continue
        values = [readme_value(value) for value in re.split(r",\s*(?![^\[]*\])", written)]
        if keys[0] in per_task:  # one default per task, in the order of the task row
            wrong += [] if values == per_task[keys[0]] else [f"{keys[0]}: README {values}, tasks {per_task[keys[0]]}"]
            checked += 1
            continue
        values = values * len(keys) if written == "the model's" else values
        assert len(values) == len(keys), f"{keys}: {len(keys)} keys but {len(values)} defaults ({written})"
        found = None
        for config in [default_config(), *option_configs(keys[0].split(".")[0])]:
            try:
                found = [choices[key[1:]] if key.startswith("=") else lookup(config, key) for key in keys]
                break
            except KeyError:
                continue
        assert found is not None, f"{keys}: not keys of one composed config"
        wrong += [f"{key}: README {value!r}, config {truth!r}" for key, value, truth in zip(keys, values, found)
                  if not same_value(value, truth)]
        checked += len(keys)
    assert not wrong, wrong
    assert checked >= 70, checked  # the sheet was read, not skipped
