"""transfer: fine-tune ImageNet-pretrained timm backbones on your own images.

The Python API (transfer/api.py) is reachable from here without importing torch up front, and importing
the package changes nothing in the caller's process: no environment variables, no sleeping, no plotting
backend, no Hydra state.

    import transfer
    run = transfer.train(["data.root=/my/images", "trainer.epochs=5"], run_dir="runs/mine")
    model = transfer.load(run.best)                # the fine-tuned model with its classes and preprocessing
    model.predict(["a.jpg", "b.jpg"])             # files or H×W×3 uint8 arrays
    transfer.export(run.best, "timm", "exports/mine")
    transfer.runs("runs")                          # every run in a folder, one dict each
"""

__version__ = "0.1.0"
__all__ = ["train", "load", "predict", "export", "report", "runs", "compare", "Run", "Model"]


def __getattr__(name: str):
    """The API's names, imported on first use (torch and timm take seconds to import)."""
    if name in __all__:
        from transfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
