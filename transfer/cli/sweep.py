"""`transfer sweep [options] overrides`: an Optuna search over a space written in Hydra's override grammar.

    transfer sweep recipe=fashion_mnist_lite0 data.val_fraction=0.2 trials=16 \\
        'optim.lr=tag(log, interval(1e-4, 1e-2))' 'optim.layer_decay=interval(0.6, 1.0)' \\
        'mixup=choice(none, mixup)' 'preprocess.input_size=choice(48, 64, 80)'

Hydra's parser reads the space: `interval(a, b)` is a float range (integers when both ends are), `tag(log,
interval(...))` log-scaled, `choice(...)` and `a,b,c` categorical, `range(start, stop, step)` integers. Each
trial is a `transfer train` run in SWEEP/trial_NNN that reports its validation metric after every validated
epoch, so the pruner (median by default) ends weak trials early; trials never touch the test split. The
study lives in SWEEP/study.db (SQLite): the same command again continues it, and a trial that was running
when the sweep was killed is marked failed. At the end: SWEEP/trials.csv (sorted by the objective),
history.png and importances.png (Optuna's plots), best_recipe.yaml (a recipe overlay of the best trial's
whole config) and the best trial's test metrics, evaluated once.

Options: trials (16), objective (trainer.monitor; a val/ metric), direction (auto: min for a loss, else max),
sampler (tpe | random), pruner (median | none), startup_trials (5: trials before TPE and the pruner act),
warmup_epochs (1: epochs before a trial can be pruned), hydra.sweep.dir (default sweeps/<date>_<time>).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from transfer.cli.options import positive_int, split_options
from transfer.cli.multirun import aligned, format_value, sweep_dir
from transfer.cli.train import compose_run, train_in
from transfer.config import require, without_hydra
from transfer.engine.rundir import lock_run_dir
from transfer.errors import UserError
from transfer.files import save_figure, write_csv, write_json, write_text

OPTIONS = ("trials", "objective", "direction", "sampler", "pruner", "startup_trials", "warmup_epochs")


def sweep_command(arguments: list[str]) -> int:
    optuna = import_optuna()
    options, overrides = split_options(arguments, OPTIONS)
    folder, overrides, chosen = sweep_dir(overrides)
    if not chosen:
        folder = Path("sweeps") / folder.name
    fixed, space = search_space(overrides)
    if not space:
        raise UserError("transfer sweep needs a search space: e.g. 'optim.lr=tag(log, interval(1e-4, 1e-2))' or "
                        "'mixup=choice(none, mixup)'. For a plain grid use transfer train -m.")
    cfg, _ = compose_run(fixed + [sample_override(key, spec) for key, spec in space.items()])  # fails fast
    objective = options.get("objective") or str(cfg.trainer.monitor)
    if not objective.startswith("val/"):
        raise UserError(f"objective={objective}: a sweep chooses on validation; name a val/ metric, e.g. val/top1.")
    if not cfg.data.get("val_fraction") and cfg.data.root is not None:
        print("sweep: data.val_fraction=0: the trials need the data's own val/ folder (else set data.val_fraction, "
              "e.g. 0.2, to hold some training images out for the choice)", flush=True)
    settings = {"trials": positive_int(options, "trials", 16), "objective": objective,
                "direction": direction(options.get("direction", "auto"), objective),
                "sampler": options.get("sampler", "tpe"), "pruner": options.get("pruner", "median"),
                "startup_trials": positive_int(options, "startup_trials", 5),
                "warmup_epochs": int(options.get("warmup_epochs", 1)), "fixed": fixed,
                "space": {key: spec["text"] for key, spec in space.items()}}
    require(settings["sampler"], ("tpe", "random"), "sampler")
    require(settings["pruner"], ("median", "none"), "pruner")
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(folder)
    try:
        check_same_sweep(folder, settings)
        return run_study(optuna, folder, settings, space)
    finally:
        if lock is not None:
            lock.close()


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("transfer sweep needs Optuna: pip install 'transfer[sweep]' (or pip install optuna).") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def search_space(overrides: list[str]) -> tuple[list[str], dict[str, dict]]:
    """(the fixed overrides, {key: distribution spec}) read with Hydra's override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(str(error).splitlines()[0]) from None
    fixed, space = [], {}
    for override, text in zip(parsed, overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(text)
            continue
        sweep = override.value()
        tags = set(getattr(sweep, "tags", set()) or set())
        if isinstance(sweep, IntervalSweep):
            integer = isinstance(sweep.start, int) and isinstance(sweep.end, int)
            space[key] = {"kind": "int" if integer else "float", "low": sweep.start, "high": sweep.end,
                          "log": "log" in tags}
        elif isinstance(sweep, RangeSweep):
            space[key] = {"kind": "int", "low": sweep.start, "high": sweep.stop - sweep.step, "step": sweep.step,
                          "log": False}
        elif isinstance(sweep, ChoiceSweep):
            space[key] = {"kind": "choice", "choices": [item for item in sweep.list]}
        else:
            raise UserError(f"{text}: not a search space transfer sweep understands (interval, range, choice).")
        space[key]["text"] = text.split("=", 1)[1]
    return fixed, space


def direction(setting: str, objective: str) -> str:
    require(setting, ("auto", "max", "min"), "direction")
    if setting == "auto":
        return "minimize" if objective.endswith("loss") else "maximize"
    return "maximize" if setting == "max" else "minimize"


def sample_override(key: str, spec: dict, trial=None) -> str:
    """`key=value` for one trial (`trial` None: the space's first value, to check the config composes)."""
    if spec["kind"] == "choice":
        value = trial.suggest_categorical(key, spec["choices"]) if trial else spec["choices"][0]
    elif spec["kind"] == "int":
        value = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"]) \
            if trial else spec["low"]
    else:
        value = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"]) if trial else spec["low"]
    return f"{key}={value}"


def check_same_sweep(folder: Path, settings: dict) -> None:
    """A sweep directory continues only the search it was made for."""
    path = folder / "sweep.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        differs = [key for key in ("objective", "direction", "fixed", "space") if earlier.get(key) != settings[key]]
        if differs:
            raise UserError(f"{folder} holds a sweep with another {', '.join(differs)}. Continue it with its own "
                            f"command (see {path}) or choose another hydra.sweep.dir.")
    write_json(path, settings, sort_keys=False)


def run_study(optuna, folder: Path, settings: dict, space: dict) -> int:
    from optuna.trial import TrialState

    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=settings["startup_trials"]) \
        if settings["sampler"] == "tpe" else optuna.samplers.RandomSampler(seed=0)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"],
                                         n_warmup_steps=settings["warmup_epochs"]) \
        if settings["pruner"] == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=f"sqlite:///{(folder / 'study.db').resolve()}", study_name="transfer",
                                load_if_exists=True, direction=settings["direction"], sampler=sampler, pruner=pruner)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # we hold the lock: it died
        study.tell(trial.number, state=TrialState.FAIL)
        print(f"sweep: trial {trial.number} was running when the sweep stopped: marked failed", flush=True)
    counted = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = settings["trials"] - len(study.get_trials(deepcopy=False, states=counted))
    goal = "maximising" if settings["direction"] == "maximize" else "minimising"
    print(f"sweep: {settings['trials']} trials ({remaining} to run) {goal} {settings['objective']} over "
          f"{', '.join(space)}; study in {folder / 'study.db'}", flush=True)
    if remaining > 0:
        study.optimize(lambda trial: objective(optuna, trial, folder, settings, space), n_trials=remaining,
                       catch=(UserError,), callbacks=[lambda study, trial: write_trials(study, folder, settings)])
    return finish_study(study, folder, settings)


def objective(optuna, trial, folder: Path, settings: dict, space: dict) -> float:
    """One trial: compose, train with per-epoch reports to the pruner, return the best epoch's val metric."""
    from transfer.engine.fit import Hooks

    overrides = settings["fixed"] + [sample_override(key, spec, trial) for key, spec in space.items()]
    run_dir = folder / f"trial_{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("overrides", overrides)
    cfg, record = compose_run(overrides + [f"hydra.run.dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=False)
    name = settings["objective"]
    print(f"sweep: trial {trial.number}: {' '.join(overrides[len(settings['fixed']):])}", flush=True)

    def observe(row: dict) -> None:
        if name in row:
            trial.report(row[name], row["epoch"])
            if trial.should_prune():
                print(f"sweep: trial {trial.number} pruned after epoch {row['epoch']} ({name} {row[name]:.4f})",
                      flush=True)
                raise optuna.TrialPruned()

    metrics = train_in(without_hydra(cfg), run_dir, record, Hooks(observe=observe, final_splits=("val",)))
    if name not in metrics:
        reported = ", ".join(key for key in metrics if key.startswith("val/")) or "no val/ metric (no val split)"
        raise UserError(f"objective={name}: the trial reported {reported}.")
    return metrics[name]


def write_trials(study, folder: Path, settings: dict) -> tuple[list[str], list[list]]:
    """SWEEP/trials.csv: every trial, best first (failed and running ones last); its columns and rows."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({key for trial in trials for key in trial.params})
    sign = -1 if settings["direction"] == "maximize" else 1
    ordered = sorted(trials, key=lambda t: (t.value is None, sign * (t.value or 0.0), t.number))
    columns = ["trial", "state", settings["objective"], "epochs", *keys, "run_dir"]
    rows = [[t.number, t.state.name.lower(), format_value(t.value) if t.value is not None else "",
             max(t.intermediate_values, default=""), *(short(t.params.get(k, "")) for k in keys),
             t.user_attrs.get("run_dir", "")] for t in ordered]
    write_csv(folder / "trials.csv", columns, rows)
    return columns, rows


def short(value) -> str:
    """A sampled value, readable and exact enough to find the trial again (4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def finish_study(study, folder: Path, settings: dict) -> int:
    """The table, the plots, the best trial's recipe and its test metrics (the test split's one use)."""
    from optuna.trial import TrialState

    columns, rows = write_trials(study, folder, settings)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"no trial of {folder} completed (see {folder / 'trials.csv'}): nothing to choose from.")
    plots(study, folder)
    best = study.best_trial
    best_dir = Path(best.user_attrs["run_dir"])
    recipe = write_recipe(folder, best, settings)
    print(f"\nsweep: {len(study.trials)} trials ({len(complete)} complete, "
          f"{len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))} pruned); best first:\n"
          f"{aligned(columns[:-1], [row[:-1] for row in rows[:10]])}", flush=True)
    print(f"sweep: best trial {best.number}, {settings['objective']} {best.value:.4f}: {best_dir}; its test split, "
          "evaluated once:", flush=True)
    from transfer.cli.evaluate import eval_command

    eval_command([f"checkpoint={best_dir / 'best.pt'}", "split=test"])
    test = json.loads((best_dir / "eval-test" / "metrics.json").read_text())
    write_json(folder / "best.json", {"trial": best.number, "objective": settings["objective"], "value": best.value,
                                      "params": best.params, "run_dir": str(best_dir),
                                      "test": {k: v for k, v in test.items() if k.startswith("test/")}},
               sort_keys=False)
    print(f"sweep: reproduce with transfer train --config {best_dir / 'config.yaml'} (or copy {recipe} into "
          "recipes/ and train recipe=NAME); plots in history.png and importances.png", flush=True)
    return 0


def plots(study, folder: Path) -> None:
    """Optuna's own views (they draw through pyplot: each figure is closed once saved)."""
    import matplotlib.pyplot as pyplot
    from optuna.visualization import matplotlib as views

    with warnings.catch_warnings():  # Optuna marks its matplotlib views experimental
        warnings.simplefilter("ignore")
        for name, view in (("history.png", views.plot_optimization_history),
                           ("importances.png", views.plot_param_importances)):
            try:
                figure = fitted(view(study).figure)
            except (ValueError, RuntimeError) as error:  # importances: too few complete trials or parameters
                print(f"sweep: no {name} ({error})", flush=True)
                continue
            save_figure(figure, folder / name)
            pyplot.close(figure)


def fitted(figure):
    """Room for long parameter names (Optuna's layout cuts them)."""
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    return figure


def write_recipe(folder: Path, best, settings: dict) -> Path:
    """The best trial's whole resolved config as a recipe overlay (# @package _global_): every key set, so
    composing it over the defaults gives that config exactly."""
    config = OmegaConf.load(Path(best.user_attrs["run_dir"]) / "config.yaml")
    config.trainer.resume = None
    header = (f"# @package _global_\n# Best trial {best.number} of the sweep in {folder} ({time.strftime('%Y-%m-%d')}):"
              f" {settings['objective']} {best.value:.4f}\n# its search values: "
              f"{', '.join(f'{k}={v}' for k, v in best.params.items())}\n")
    path = folder / "best_recipe.yaml"
    write_text(path, header + OmegaConf.to_yaml(config))
    return path
