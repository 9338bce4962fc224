"""Base configuration: DAFormer (MiT-B5 + DAFormer head) on the 19 Cityscapes classes.

Every other config starts from this one. Used directly, it describes the model of the default
GTA5 -> Cityscapes run:

  python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
    """The `model` group: what `pgpc_jax.models.segmentor.build_segmentor` reads."""
    model = ml_collections.ConfigDict()
    # MiT variant: 'b0'..'b5' (NVlabs) or 'tiny' (tests and the embedded default run).
    model.backbone = "b5"
    # 'daformer' (DAFormer head) or 'segformer' (SegFormer all-MLP head).
    model.head = "daformer"
    model.num_classes = 19
    # Per-level embedding width of the head: 256 in DAFormer (SegFormer: 256 for b0/b1, else 768).
    model.head_embed_dim = 256
    # Width of the DAFormer ASPP fusion and bottleneck.
    model.head_channels = 256
    # Channel dropout before the classifier (mmseg Dropout2d).
    model.dropout_rate = 0.1
    # Stochastic depth, spread linearly over all encoder blocks (NVlabs default 0.1).
    model.drop_path_rate = 0.1
    # LayerNorm eps convention: 'mmseg' (1e-6 in blocks, as the checkpoints were trained) or 'hf'.
    model.layer_norm = "mmseg"
    # Compute dtype ('float32', 'bfloat16'); parameters are always float32.
    model.dtype = "float32"
    return model


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = get_model_config()
    # Label space of the model's outputs (names and colours from data_pipelines.labels).
    config.classes = "cityscapes"
    return ml_collections.ConfigDict(config, type_safe=True)
