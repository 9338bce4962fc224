"""Base configuration: the DAFormer recipe (GTA5 -> Cityscapes), every number from the original.

Every benchmark config (`configs/gta2cs.py`, ...) starts from this one and then picks its method
(`pgpc_jax.methods.configure`), which adds the method's own group. The numbers and the file each
comes from are listed in `docs/method.md`; the reference is lhoyer/DAFormer's
`configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py` and its bases.

  python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs
"""

import ml_collections

from data_pipelines.labels import THING_CLASSES
from pgpc_jax import methods


def get_model_config() -> ml_collections.ConfigDict:
    """The `model` group: what `pgpc_jax.models.segmentor.build_segmentor` reads."""
    model = ml_collections.ConfigDict()
    # MiT variant: 'b0'..'b5' (NVlabs) or 'tiny' (tests and the embedded default run).
    model.backbone = "b5"
    # 'daformer' (DAFormer head) or 'segformer' (SegFormer all-MLP head).
    model.head = "daformer"
    # Output classes; 0 takes the count of the data (classes='data').
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
    # Activation recomputation in the backward pass (memory for compute): 'none'; 'blocks' (each
    # encoder block keeps only its input); 'all' (the blocks and the decode head).
    model.remat = "none"
    return model


def get_data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    # Where `python -m data_pipelines.build` wrote the datasets.
    data.data_dir = "data"
    # grain worker processes per host (0: read in the training process).
    data.num_workers = 0
    # Batches transferred to the devices ahead of the step, while it computes (0: none).
    data.prefetch = 2
    # Source domain: 2 crops per step (global batch), GTA resized keep-ratio into 1280x720.
    data.source = ml_collections.ConfigDict(
        dict(
            dataset="gta5/daformer",
            split="train",
            batch_size=2,
            crop_size=(512, 512),
            scale=(1280, 720),
            cat_max_ratio=0.75,
            # Horizontal flips; 0 when a mirror image means something else (text, digits, maps,
            # left / right classes) or the images have a fixed handedness.
            flip_prob=0.5,
            # Rare-class sampling: class temperature, min pixels of the class in the image,
            # min share of those pixels in the crop (re-drawn up to 10 times).
            rcs=True,
            rcs_temperature=0.01,
            rcs_min_pixels=3000,
            rcs_min_crop_ratio=0.5,
        )
    )
    # Target domain: 2 crops per step of Cityscapes resized to 1024x512.
    data.target = ml_collections.ConfigDict(
        dict(
            dataset="cityscapes/daformer",
            split="train",
            batch_size=2,
            crop_size=(512, 512),
            scale=(1024, 512),
            # As data.source.flip_prob (0 for text, digits, maps, left / right classes).
            flip_prob=0.5,
            # Each night image with its paired day image as `day_image`, resized, cropped and
            # flipped with it (Dark Zurich's train_night split; SePiCo's day-night variant).
            paired_day=False,
        )
    )
    # Target validation: whole images at the test scale, labels at full resolution.
    data.val = ml_collections.ConfigDict(
        dict(dataset="cityscapes/daformer", split="val", batch_size=2, scale=(1024, 512))
    )
    return data


def get_config() -> ml_collections.ConfigDict:
    """The shared recipe, without a method: `pgpc_jax.methods.configure(config, name)` sets
    `config.method` and adds the method's group."""
    config = ml_collections.ConfigDict()
    # The training method, one of `pgpc_jax.methods.METHODS`; set by the benchmark config's
    # argument (`--config configs/gta2cs.py:daformer`), not by an override.
    config.method = ""
    config.seed = 0
    config.model = get_model_config()
    # Label space of the model's outputs: 'cityscapes' (the 19 classes, names and colours from
    # data_pipelines.labels) or 'data' (the builds' own class set, `configs/folder.py`).
    config.classes = "cityscapes"
    # Filled in at start-up for classes='data' from the source build (its class file): the
    # names and RGB colours, kept in the run's config.json for evaluate / predict / export.
    config.class_names = ()
    config.class_colors = ()
    config.data = get_data_config()

    config.num_train_steps = 40_000
    config.log_every_steps = 50
    # DAFormer evaluates every 4000 iterations and reports the final student.
    config.eval_every_steps = 4_000
    config.checkpoint_every_steps = 4_000
    config.keep_checkpoints = 2

    # Weights to start from: ImageNet MiT-B5 (NVlabs mit_b5.pth, format 'mit') in the real
    # configs; empty for a random initialisation. Any format `pgpc_jax.convert` reads.
    config.init_from = ml_collections.ConfigDict(dict(path="", format="mit", which="model"))

    # AdamW with mmcv's parameter groups and poly schedule (`_base_/schedules/adamw.py`,
    # `poly10warm.py`): head 10x lr, no weight decay on encoder norms, linear warm-up applied to
    # the poly-decayed rate.
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=6e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            head_lr_mult=10.0,
            norm_decay_mult=0.0,
            warmup_steps=1500,
            warmup_ratio=1e-6,
            poly_power=1.0,
            min_lr=0.0,
        )
    )

    # Self-training shared by the methods that use it (DACS as configured by DAFormer,
    # `_base_/uda/dacs.py` + the final config).
    config.uda = ml_collections.ConfigDict(
        dict(
            ema_alpha=0.999,
            pseudo_threshold=0.968,
            # 'scalar': DAFormer's one weight per batch (share of confident pixels);
            # 'pixel': confident pixels weight 1, the rest 0.
            pseudo_weight="scalar",
            # Rows of the target crop whose pseudo-label weight is 0 (Cityscapes' rectification
            # border and ego car); 0 for images without such rows.
            pseudo_ignore_top=15,
            pseudo_ignore_bottom=120,
            # Multiplies the target weight (PGPC's lambda_t = 0.8; DAFormer 1.0).
            target_weight=1.0,
            # DACS' augmentations of the mixed image (besides the ClassMix that defines it):
            # colour jitter (brightness, contrast, saturation, hue) of this strength.
            color_jitter_strength=0.2,
            # Probability of the colour jitter (DAFormer: when U > 0.2); 0 turns it off, for
            # data whose colour tells classes apart (stained tissue, land-cover spectra).
            color_jitter_prob=0.8,
            # Probability of the Gaussian blur (U > 0.5); 0 turns it off, for data whose fine
            # texture or thin structures are the class (cracks, vessels, text).
            blur_prob=0.5,
            # ImageNet feature distance on thing classes of the source (0 disables it).
            fd_lambda=0.005,
            fd_classes=THING_CLASSES,
            fd_min_ratio=0.75,
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            # 'whole' (DAFormer) or 'slide' (sliding windows of crop_size with stride).
            mode="whole",
            crop_size=(512, 512),
            stride=(341, 341),
            # Colour predictions of the first N validation images saved at each evaluation.
            num_visualizations=4,
            # Test-time class reweighting (SePiCo's day-night test, released 0.16): the
            # prediction is argmax(softmax x class weights of this strength); 0 = off.
            class_reweight=0.0,
        )
    )
    # Devices on the ('data',) mesh; 0 = all devices of all processes.
    config.mesh = ml_collections.ConfigDict(dict(num_devices=0))
    return ml_collections.ConfigDict(config, type_safe=True)


# FDA's self-training round (`:fda_sst`) and FDA + contrast (`:fda_supcon`) train on a
# pseudo-labelled target: the folder build of `python -m pgpc_jax.pseudo_label`'s output, built
# under this name (`docs/data.md`).
PSEUDO_LABELS = "folder/pseudo_labels"


def with_pseudo_label_target(config, dataset: str = PSEUDO_LABELS) -> ml_collections.ConfigDict:
    """The target stream of a method that trains on the target's labels (`methods.target_labels`:
    a self-training round): the pseudo-labelled build's train split (override
    `data.target.dataset` for another build)."""
    if methods.target_labels(config):
        config.data.target.dataset = dataset
        config.data.target.split = "train"
    return config
