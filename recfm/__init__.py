"""recfm: multi-scenario foundation models for recommendation.

Subpackages: ``recfm.scenarios`` (scenario YAML, registry), ``recfm.foundation`` (data, samples, batches,
backbone), ``recfm.heads`` (per-scenario heads), ``recfm.kernels`` (fused kernels with PyTorch
references), ``recfm.recipes`` (pretrain / finetune / evaluate), ``recfm.configs`` (shipped YAML).
"""

__version__ = "0.1.0"
