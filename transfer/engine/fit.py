"""`train(cfg, run_dir)`: the one training run for every task, top to bottom — set-up, resume, epochs with
validation every `trainer.eval_every`, best.pt by the monitor, early stop, interrupt, and the final
evaluation of the best weights on every held-out split. The task (transfer/tasks) brings what differs."""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from transfer import distributed
from transfer.checkpoint import final_weights, load_checkpoint, remove_temporaries, rng_state
from transfer.config import to_dict
from transfer.distributed import is_main
from transfer.engine.interrupt import Interrupted, StopSignal, ignore_stop_signals
from transfer.engine.loop import Loop
from transfer.engine.monitor import Monitor, build_monitor
from transfer.engine.parallel import agree, broadcast_weights, evaluate, lost_peer, sync_batchnorm
from transfer.engine.report import write_html_report
from transfer.engine.rundir import SkippedFiles, log, write_epochs, write_run_info
from transfer.engine.runs import split_table
from transfer.engine.setup import Setup, build_setup, seed_everything
from transfer.engine.state import NonFiniteError, check_finite, fresh_state, last_good, resume, save_progress
from transfer.engine.techniques import Techniques
from transfer.errors import ReportedElsewhere, UserError
from transfer.files import write_json
from transfer.metrics.plots import plot_curves
from transfer.models.backbone import count_parameters
from transfer.tasks.base import Evaluation
from transfer.trackers import Trackers, build_trackers


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a caller that runs many trainings (a sweep) adds: `observe(row)` after every epoch's checkpoint (it may
    raise to end the run there, as a pruned trial does), and the splits evaluated at the end (a sweep's trials
    leave the test split alone: it is scored once, for the best trial). `started`: the command's start, so the
    start-up printed and written to metrics.json (`startup_seconds`) includes the imports before train() ran."""

    observe: Callable[[dict], None] | None = None
    final_splits: tuple[str, ...] = ("val", "test")
    started: float | None = None  # time.time() when the command began (start-up is counted from it); None: train()


def train(cfg: DictConfig, run_dir: Path, hooks: Hooks = Hooks()) -> dict[str, float]:
    """Fine-tune as configured, write the run directory, return the final metrics. With several processes, a
    process that ends (killed, out of memory) makes the others stop with one line instead of a traceback."""
    try:
        return train_run(cfg, run_dir, hooks)
    except Exception as error:
        if not (distributed.active() and lost_peer(error)):
            raise
        ignore_stop_signals()  # the launcher's SIGTERM to the survivors must not cut this message short
        raise UserError(f"process {distributed.rank()}: another process of this run ended ({first_line(error)}), so "
                        f"this one stops too. The last checkpoint is {last_good(run_dir)}; resume with as many "
                        f"processes and trainer.resume={run_dir / 'last.pt'}.") from None


def train_run(cfg: DictConfig, run_dir: Path, hooks: Hooks) -> dict[str, float]:
    setup, trackers, error = None, None, None
    started = hooks.started or time.time()
    try:
        trackers = build_trackers(cfg.get("logger"), active=is_main())  # a missing package: before any work
        before_setup = time.time()
        setup = build_setup(cfg)
        setup_seconds = time.time() - before_setup
    except UserError as raised:  # several processes: each stops, rank 0 says why once
        error = raised
    agree(error)
    task, data = setup.task, setup.data
    monitor = build_monitor(cfg.trainer.monitor, cfg.trainer.get("monitor_mode") or "auto",
                            task.metric_modes(data.classes), validated="val" in setup.loaders)
    # a cheaper way to the same updates where the task has one (classification's linear probe on cached features)
    model, loaders, runtime, shortcut_seconds = task.shortcut(cfg, setup.model, data, setup.loaders, setup.runtime,
                                                              run_dir, log)
    model = sync_batchnorm(model, bool(cfg.trainer.get("sync_batchnorm")), runtime.device)
    broadcast_weights(model)  # every rank (and the EMA built next) starts from rank 0's weights
    kit = Techniques(cfg, model, setup.plan, task, loaders["train"], runtime, run_dir, log)
    meta = {"task": task.name, "classes": data.classes, "preprocess": setup.preprocess,
            "weights_source": setup.weights_source, "config": to_dict(cfg), **task.checkpoint_entries(),
            **kit.checkpoint_entries(), "world_size": distributed.world_size()}
    # resume before anything is written: a refused resume leaves its run directory as it was
    state = fresh_state(shortcut_seconds)
    timing = {"started": started, "setup_seconds": setup_seconds}  # this process's start-up (never checkpointed)
    if cfg.trainer.resume:
        state.update(resume(cfg.trainer.resume, model, kit.optimizer, kit.scaler, meta, run_dir) or {})
        kit.resume(state)
        # timm schedules are functions of the update count: follow this run's length (trainer.epochs may have
        # grown), not the checkpoint's, and set the learning rate of the next update
        kit.scheduler.step_update(num_updates=state["epoch"] * len(loaders["train"]) + state["step"])
    total, trainable = count_parameters(model)
    splits = {name: len(dataset) for name, dataset in data.datasets.items()}
    write_run_info(run_dir, meta, splits, data.description, total, trainable, batch_plan(cfg))
    log(f"{task.name}: {cfg.model.name} ({setup.weights_source}), {trainable:,}/{total:,} parameters trained, "
        f"{len(data.classes)} classes, splits {splits}, input {setup.preprocess['input_size'][1:]}, device "
        f"{runtime.device}{', amp ' + str(runtime.amp_dtype).split('.')[-1] if runtime.amp_dtype else ''}, "
        f"best.pt by {monitor.name} ({monitor.mode})")
    if distributed.launched():
        plan = batch_plan(cfg)
        log(f"{plan['processes']} processes: effective batch {plan['effective_batch']} = data.batch_size "
            f"{plan['batch_size']} per process × {plan['processes']} processes × {plan['accumulate_steps']} "
            "accumulation steps; optim.lr is used as given (not scaled with the processes)")
    skipped = SkippedFiles(run_dir)
    skipped.add(data.skipped)
    if is_main():
        remove_temporaries(run_dir)  # left by a run killed while saving; we hold the run directory's lock
    run = dataclasses.replace(setup, model=model, loaders=loaders, runtime=runtime)
    try:
        with trackers.started(meta["config"], run_dir, state["history"]):  # rank 0's; closed however the run ends
            best_val = run_epochs(cfg, run, kit, monitor, meta, state, run_dir, skipped, hooks.observe, trackers,
                                  timing)
            metrics = finish(cfg, run, monitor, state, run_dir, skipped, best_val if kit.ema is None else None,
                             hooks.final_splits, timing.get("startup_seconds"))
            trackers.log_final(metrics, state["epoch"], run_dir)
            return metrics
    except NonFiniteError as error:
        if not is_main():  # every rank met the same agreed step: rank 0 says it
            raise ReportedElsewhere("") from None
        raise UserError(f"{error}. The last good checkpoint is {last_good(run_dir, state.get('resumed_from'))}. "
                        "Lower optim.lr, set trainer.grad_clip or check the data; or let up to N such steps be "
                        "skipped with trainer.max_bad_steps=N.") from None
    finally:
        skipped.report()


def run_epochs(cfg: DictConfig, run: Setup, kit: Techniques, monitor: Monitor, meta: dict, state: dict,
               run_dir: Path, skipped: SkippedFiles, observe: Callable[[dict], None] | None = None,
               trackers: Trackers | None = None, timing: dict | None = None) -> Evaluation | None:
    """The epochs from where `state` stands; returns the val evaluation of the best weights when it was the
    last epoch's (the final report then needs no second pass). Each checkpointed row also goes to `trackers`;
    the start-up (`timing`: when the command began) is logged after the first epoch and kept in `timing`."""
    loop = Loop(run.model, run.task, kit, run.runtime, cfg, skipped, trackers.log_step if trackers else None)
    loaders, epochs, best_val = run.loaders, cfg.trainer.epochs, None
    with StopSignal() as stop:
        for epoch in range(state["epoch"], epochs):
            started = time.perf_counter()
            if not state["step"]:  # a mid-epoch resume continues the saved random streams instead
                # dropout, drop-path, mixup: keyed by epoch (exact on resume) and by rank (each its own stream)
                seed_everything(cfg.seed * 1_000 + epoch + distributed.rank() * 1_000_003)
            earlier = (state["partial"] or {}).get("seconds", 0.0)
            result = loop.train_epoch(loaders["train"], epoch, state, stop)
            if result is None:  # stopped between two steps: save the position, not an epoch
                state["train_seconds"] += time.perf_counter() - started
                state["partial"]["seconds"] = earlier + time.perf_counter() - started
                meta.update({**run.task.checkpoint_entries(), **kit.checkpoint_entries()})  # as of this step
                if distributed.active():  # each rank's random streams and BatchNorm statistics, for an exact resume
                    meta["ranks"] = distributed.gather(rank_state(run.model, kit))
                skipped.share()
                save_progress(run.model, kit.optimizer, kit.scheduler, kit.scaler, state, meta, run_dir, False)
                raise interrupted(stop, run_dir, epoch, state["step"], len(loaders["train"]), epochs)
            skipped.share()
            check_finite(run.model, epoch + 1)  # before validation, whose metrics cannot take NaN outputs
            row, evaluation = {"epoch": epoch + 1, **result}, None
            if "val" in loaders and ((epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == epochs):
                evaluation = validate(run, kit, row, skipped)
            row["seconds"] = time.perf_counter() - started
            state["train_seconds"] += row["seconds"]
            row["seconds"] += earlier
            state["history"].append(row)
            improved = monitor.improved(kit.scored(row, monitor), state)  # with EMA, the better weights compete
            if improved:
                best_val = evaluation
            state["epoch"], state["step"], state["partial"] = epoch + 1, 0, None
            write_epochs(run_dir, state["history"])
            meta.update({**run.task.checkpoint_entries(), **kit.checkpoint_entries()})  # e.g. thresholds tuned on val
            save_progress(run.model, kit.optimizer, kit.scheduler, kit.scaler, state, meta, run_dir, improved)
            if trackers:  # after the checkpoint: a resumed run never logs an epoch twice
                trackers.log_epoch(row)
            if timing is not None and "startup_seconds" not in timing and loop.first_batch_at is not None:
                timing["startup_seconds"] = loop.first_batch_at - timing["started"]
                log(startup_line(timing))
            log(summary(row, epochs, monitor.name, improved))
            if observe is not None:
                observe(row)
            if loop.stop_agreed(stop):
                raise interrupted(stop, run_dir, epoch + 1, 0, len(loaders["train"]), epochs)
            if state["epoch"] < epochs and monitor.should_stop(cfg.trainer.get("early_stop_patience"), state):
                log(f"early stop: {monitor.name} has not improved for {state['epoch'] - state['best_epoch']} epochs "
                    f"(trainer.early_stop_patience={cfg.trainer.early_stop_patience}); best epoch {state['best_epoch']}")
                break
    return best_val


def validate(run: Setup, kit: Techniques, row: dict, skipped: SkippedFiles) -> Evaluation:
    """val/* of the model (and val_ema/* of the EMA weights) into `row`."""
    evaluation = evaluate(run.task, run.model, run.loaders["val"], run.runtime)
    skipped.add(evaluation.skipped)
    row.update(prefixed(evaluation.metrics, "val"))
    if kit.ema is not None:
        row.update(prefixed(evaluate(run.task, kit.ema.module, run.loaders["val"], run.runtime).metrics, "val_ema"))
    return evaluation


def finish(cfg: DictConfig, run: Setup, monitor: Monitor, state: dict, run_dir: Path, skipped: SkippedFiles,
           best_val: Evaluation | None, splits: tuple[str, ...] = ("val", "test"),
           startup_seconds: float | None = None) -> dict[str, float]:
    """Evaluate the best weights on every held-out split; reports, pictures, metrics.json and the curves."""
    best_path = run_dir / "best.pt"
    if distributed.broadcast(best_path.exists() if is_main() else None):
        if is_main():
            best = load_checkpoint(best_path)
            run.model.load_state_dict(final_weights(best))  # the EMA's when they were best
            run.task.load_best(best)  # what the task saved with them (multi-label: thresholds tuned on val)
        broadcast_weights(run.model)  # rank 0 wrote best.pt; other machines may not see its folder
    metrics = {"train_seconds": state["train_seconds"], "best_epoch": state["best_epoch"] or state["epoch"]}
    if startup_seconds is not None:  # none when this process trained no step (a run resumed after its last epoch)
        metrics["startup_seconds"] = startup_seconds
    tta = cfg.trainer.get("tta") or "none"
    runtime = dataclasses.replace(run.runtime, tta=tta)
    for split in splits:
        if split not in run.loaders:
            continue
        reuse = split == "val" and best_val is not None and tta == "none"
        evaluation = best_val if reuse else evaluate(run.task, run.model, run.loaders[split], runtime)
        skipped.add(evaluation.skipped)
        metrics.update(prefixed(evaluation.metrics, split))
        if is_main():
            run.task.report(run_dir / "reports", split, evaluation, run.data.datasets.get(split))
    if is_main():
        count = int(cfg.task.get("overlays") or 0)
        shown = next((split for split in ("val", "test", "train") if split in run.data.datasets))
        if count:
            run.task.draw(run.model, run.data.datasets[shown], run_dir / "overlays", run.runtime, count)
        write_json(run_dir / "metrics.json", metrics)
        plot_curves(state["history"], monitor.name, run_dir / "curves.png")
        write_html_report(run_dir)
    log(done_report(metrics, run.task.metric_modes(run.data.classes), run_dir))
    return metrics


def done_report(metrics: dict[str, float], modes: dict[str, str], run_dir: Path) -> str:
    """The last lines of a run: the task's headline metrics (not the loss, not per-class ones) as metric × split,
    then the time, best epoch and where everything is."""
    names = [name for name in modes if name != "loss" and "/" not in name]
    table = split_table(metrics, names)
    return (f"{table}\n" if table else "") + (f"done in {metrics['train_seconds']:.1f}s of training; best epoch "
                                              f"{metrics['best_epoch']}; run directory {run_dir}")


def rank_state(model, kit: Techniques) -> dict:
    """What differs between ranks in the middle of an epoch: random streams, and the BatchNorm running statistics
    (averaged at the epoch's end) of the model and its EMA."""
    buffers = {name: tensor.cpu() for name, tensor in model.named_buffers()}
    ema = {name: t.cpu() for name, t in kit.ema.module.named_buffers()} if kit.ema is not None else {}
    return {"rng": rng_state(), "buffers": buffers, "ema_buffers": ema}


def batch_plan(cfg: DictConfig) -> dict[str, int]:
    """How many samples one optimizer update sees."""
    batch, processes = int(cfg.data.batch_size), distributed.world_size()
    accumulate = int(cfg.trainer.get("accumulate_steps") or 1)
    return {"batch_size": batch, "processes": processes, "accumulate_steps": accumulate,
            "effective_batch": batch * processes * accumulate}


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{split}/{key}": value for key, value in metrics.items()}


def startup_line(timing: dict) -> str:
    """Where the time before the first training step went: the command's start to the first batch, of which
    building the data (index, cache), model and loaders took `setup_seconds`; most of the rest is imports."""
    return (f"start-up {timing['startup_seconds']:.1f}s from the command to the first training step (of which "
            f"data, model and loaders {timing['setup_seconds']:.1f}s)")


def summary(row: dict, epochs: int, monitor: str, improved: bool) -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"train loss {row['train/loss']:.4f}"]
    parts += [f"{key.replace('/', ' ')} {row[key]:.4f}" for key in ("train/top1", "val/loss") if key in row]
    if monitor in row and monitor != "val/loss":
        parts.append(f"{monitor.replace('/', ' ')} {row[monitor]:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return " | ".join(parts) + (" *" if improved else "")


def interrupted(stop: StopSignal, run_dir: Path, epoch: int, step: int, steps: int, epochs: int) -> Interrupted:
    """The exception that ends a run stopped by a signal, with the command that continues it."""
    where = f"in epoch {epoch + 1}/{epochs} after step {step}/{steps}" if step else f"after epoch {epoch}/{epochs}"
    command = ["transfer", "train", "--config", str(run_dir / "config.yaml"), f"trainer.resume={run_dir / 'last.pt'}"]
    return Interrupted(f"interrupted {where}; last.pt written; resume with: {shlex.join(command)}", stop.exit_code)
