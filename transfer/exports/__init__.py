"""`transfer export`: hand a fine-tuned checkpoint to another project, in the form that project loads.

Formats (one folder each, with a model card README.md):

- timm: `config.json` + `model.safetensors` (timm's `save_for_hf`: label names and the preprocessing
  actually used); loads with `timm.create_model('local-dir:DIR', pretrained=True)`, uploads as is.
- backbone: `backbone.safetensors` (no head) + `feature_info.json`, for detectors and segmenters that
  call `timm.create_model(name, features_only=True, pretrained_cfg_overlay=dict(file=...))`.
- onnx: `model.onnx` (dynamic batch, opset 17) + `preprocess.json`; preprocessing also in its metadata.
- torchscript: `model.torchscript.pt` (+ `preprocess.json`, also embedded as an extra file).

Every writer loads its files back the consumer's way and compares outputs with the fine-tuned model
before the folder is published, so an export that exists has been checked. Folders are written
under a hidden temporary name beside the target and renamed into place only when complete.
"""


from transfer.exports.formats import WRITERS, export
from transfer.exports.publish import prepare_output, staged_folder
from transfer.exports.source import FORMATS, Check, Source, check_dense_formats, load_source

__all__ = ["FORMATS", "WRITERS", "Check", "Source", "check_dense_formats", "export", "load_source", "prepare_output",
           "staged_folder"]
