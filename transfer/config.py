"""Finding and composing the Hydra configs, for editable installs and built wheels alike.

The repository keeps `conf/` and `recipes/` at the top level; a wheel carries them as
`transfer/conf/` (recipes as its `recipe/` group). The CLI is the only caller that passes user
overrides; tests compose through the same function.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.errors import UserError

PRIMARY_CONFIG = "train"


def config_dir() -> Path:
    """The conf/ folder: inside the package when installed from a wheel, else the repository's."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / f"{PRIMARY_CONFIG}.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / f"{PRIMARY_CONFIG}.yaml").is_file():
        return checkout
    raise RuntimeError(f"transfer's configs are missing: looked in {packaged} and {checkout}")


def group_options(group: str) -> list[str]:
    """Names usable as `group=NAME` (recipes live in the `recipe` group)."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def groups() -> list[str]:
    root = config_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def compose(overrides: list[str] | None = None, with_hydra: bool = False,
            config_file: str | Path | None = None) -> DictConfig:
    """The composed config; a bad override becomes a UserError that lists the valid choices.

    `config_file` starts from a saved run's config.yaml instead of conf/train.yaml.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    folder, name = str(config_dir()), PRIMARY_CONFIG
    if config_file is not None:
        path = Path(config_file).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--config {config_file}: no such file (a run directory's config.yaml).")
        folder, name = str(path.parent), path.stem
    hydra = GlobalHydra.instance()
    callers = hydra.hydra if hydra.is_initialized() else None  # a caller's own Hydra app is put back afterwards
    hydra.clear()
    try:
        with initialize_config_dir(config_dir=folder, version_base="1.3"):
            cfg = hydra_compose(name, overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise UserError(explain_override_error(str(error), overrides)) from None
    finally:  # Hydra's context manager puts back its own copy of the global state: work on the current one
        GlobalHydra.instance().clear()
        if callers is not None:
            GlobalHydra.instance().initialize(callers)
    return cfg


def explain_override_error(message: str, overrides: list[str]) -> str:
    """Turn Hydra's message into one that names the valid choices."""
    missing_group = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", message)  # load: in a list
    if missing_group:
        group, name = missing_group.groups()
        return _unknown_choice(group, name)
    bad_key = re.search(r"Could not override '([^']+)'", message) or re.search(
        r"Key '([^']+)' is not in struct", message
    )
    if bad_key:
        return _unknown_key(bad_key.group(1))
    first_line = message.strip().splitlines()[0] if message.strip() else "invalid override"
    return f"invalid override ({' '.join(overrides)}): {first_line}. Overrides look like key=value, e.g. trainer.epochs=5."


def _unknown_choice(group: str, name: str) -> str:
    options = group_options(group)
    if not options:
        folder = (config_dir() / group).resolve()
        return f"unknown {group} '{name}': there are no {group} configs yet (add {name}.yaml to {folder})."
    hint = difflib.get_close_matches(name, options, n=1)
    did_you_mean = f" Did you mean {group}={hint[0]}?" if hint else ""
    return f"unknown {group} '{name}'.{did_you_mean} Choose one of: {', '.join(options)}."


def _unknown_key(dotted: str) -> str:
    cfg = compose([])
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    full = [f"{parent}.{k}" if parent else k for k in valid]
    elsewhere = [path for path in _dotted_keys(cfg) if path.rsplit(".", 1)[-1] == leaf]
    hint = elsewhere or [f"{parent + '.' if parent else ''}{m}" for m in difflib.get_close_matches(leaf, valid, n=1)]
    did_you_mean = f" Did you mean {hint[0]}?" if hint else ""
    listing = f" Valid keys: {', '.join(full)}." if full else ""
    return f"unknown config key '{dotted}'.{did_you_mean}{listing} (To add a new key use +{dotted}=...)"


def _dotted_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys.extend(_dotted_keys(value, path + "."))
    return keys


def require(value: str, choices: list[str] | tuple[str, ...], key: str) -> str:
    """Check a config value against its valid choices, naming them in the error."""
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        did_you_mean = f" Did you mean {hint[0]}?" if hint else ""
        raise UserError(f"{key}={value} is not valid.{did_you_mean} Choose one of: {', '.join(choices)}.")
    return value


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's own node, which only resolves inside a Hydra app."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg.keys() if key != "hydra"])


def to_dict(cfg: DictConfig) -> dict:
    """Plain resolved dict (what the run directory and checkpoints record)."""
    return OmegaConf.to_container(without_hydra(cfg), resolve=True)
