"""transfer: fine-tune ImageNet-pretrained timm backbones on your own images."""

import os

# torch's OpenMP threads spin while they wait for work (GNU libgomp's default). On a machine whose cores are
# shared (other jobs, DataLoader workers, a laptop) a spinning thread holds the core that the thread it waits
# for needs: measured here (2 cores, load ~4), EfficientNet-Lite0 trained at 7 images/s spinning and at 124
# sleeping. Read once when torch loads, so it is set before anything imports torch; export
# OMP_WAIT_POLICY=ACTIVE to get the spinning back.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
