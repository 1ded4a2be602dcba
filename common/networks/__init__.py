"""Networks: ``nn.Module`` definitions only, no I/O."""

from .backbones import BACKBONES, build_backbone, load_backbone_weights
from .csr import CSRNet, csr_densenet121, csr_resnet50, csr_tiny, csr_vit_b16
from .ct_vit import (
    ATTENTION_IMPLS,
    CTViT,
    ct_vit_base,
    ct_vit_small,
    ct_vit_tiny,
    patch_region_assignment,
    token_bias,
)
from .iris import IRISNet, iris_full, iris_small, masked_average_pool, pixel_shuffle, pixel_unshuffle
from .memory_bank import ClassMemoryBank
from .report_labeler import ENTITY_TAGS, ReportLabeler, decode_entities, spans_to_tags
from .text_encoder import DEFAULT_TEXT_MODEL_PACKAGE, FREEZE_MODES, TextEncoder, default_text_model_dir
from .yolo import YOLODetector, load_yolo_state_dict
