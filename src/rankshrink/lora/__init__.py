"""LoRA: low-rank adapters on Linear, Conv1d/Conv2d and factorized layers.

The PEFT split: ``config`` (what an adapter is), ``layer`` (how one layer carries
adapters), ``model`` (how a model gets them), ``io`` (files in PEFT's layout),
``training`` (the shared training loop on adapter parameters only); the CLI lives in
``rankshrink.cli.lora``::

    from rankshrink import lora
    adapted = lora.add_adapters(model, r=4, lora_alpha=8, target_modules=["layers.0", "layers.2"])
    print(lora.count_parameters(adapted))
    lora.train_adapter(adapted, splits.train, val_data=splits.val, epochs=5)
    lora.save_adapter(adapted, "adapter/")
    again = lora.load_adapter(fresh_base, "adapter/")
    plain = lora.remove_adapters(again, merge=True)     # W + s·B·A, plain torch layers
"""

from .config import LoraConfig, alpha_for, scaling_for
from .io import CONFIG_NAME, WEIGHTS_NAME, adapter_size_bytes, load_adapter, peft_key, read_adapter, save_adapter
from .layer import ConvWithLoRA, FactorizedWithLoRA, LinearWithLoRA, LoraLayerBase, layer_digest, wrap_layer
from .model import (
                    DEFAULT_ADAPTER,
                    ParameterCount,
                    active_adapters,
                    adaptable_layers,
                    adapter_names,
                    adapter_parameters,
                    adapters_disabled,
                    add_adapters,
                    combine_adapters,
                    count_parameters,
                    delete_adapter,
                    disable_adapters,
                    enable_adapters,
                    find_targets,
                    fingerprint,
                    lora_layers,
                    mark_only_adapters_trainable,
                    merge_adapters,
                    remove_adapters,
                    set_adapter,
                    unmerge_adapters,
)
from .training import train_adapter

__all__ = [
    "LoraConfig", "ParameterCount", "LoraLayerBase", "LinearWithLoRA", "ConvWithLoRA", "FactorizedWithLoRA",
    "DEFAULT_ADAPTER", "CONFIG_NAME", "WEIGHTS_NAME",
    "add_adapters", "remove_adapters", "delete_adapter", "find_targets", "adaptable_layers", "lora_layers",
    "set_adapter", "active_adapters", "adapter_names", "disable_adapters", "enable_adapters", "adapters_disabled",
    "combine_adapters", "merge_adapters", "unmerge_adapters",
    "count_parameters", "adapter_parameters", "mark_only_adapters_trainable", "fingerprint", "layer_digest",
    "save_adapter", "load_adapter", "read_adapter", "adapter_size_bytes", "peft_key",
    "train_adapter", "scaling_for", "alpha_for", "wrap_layer",
]
