"""transfer: fine-tune ImageNet-pretrained timm backbones on your own images."""

__version__ = "0.1.0"
