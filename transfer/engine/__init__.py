"""The one training engine: it runs every task (transfer/tasks) and names none of them.

setup.py      config → task → data → model → fine-tune plan → loaders, and the runtime (device, precision)
fit.py        train(cfg, run_dir): resume, epochs with validation, best.pt by the monitor, early stop, interrupt,
              the final evaluation of the best weights
loop.py       one epoch: the task's training step, accumulation, clipping, GradScaler, EMA, bad steps
techniques.py timm's optimizer and schedule, accumulation, EMA, compile, optim.lr=auto
monitor.py    trainer.monitor checked against the task's metrics, with its direction; early stopping
state.py      checkpoints of a run's progress and resuming from them (mid-epoch too)
rundir.py     the run directory: made, locked, filled (config, run info, metrics.csv, skipped files)
runs.py       run directories read back: `transfer runs`, `transfer compare`, the table that ends a run
report.py     RUN/report.html from the run directory's files (`transfer report`)
inference.py  a checkpoint made runnable again for eval, predict and the Python API
ema.py, optim.py, lr_find.py, interrupt.py   the parts those use
"""
