"""Thin modules over the sslkern ops (losses, EMA teacher, attention for timm).

The modules hold what a functional op does not: state (the DINO / iBOT centers, the EMA
teacher), schedules, and the collectives across ranks."""
from .ema import EMATeacher  # noqa: F401
from .masking import DecoderInput, block_outputs, embed_visible, encode_with_mask_token  # noqa: F401
from .attention import AlibiAttention, AlibiContext, use_alibi  # noqa: F401
from .dino import DINOLoss, IBOTPatchLoss  # noqa: F401
from .heads import DINOHead, GlobalBatchNorm1d, MultiCropWrapper, WeightNormLinear  # noqa: F401
from .contrastive import CPCLoss, InfoNCELoss  # noqa: F401
from .redundancy import BarlowTwinsLoss, VICRegLoss  # noqa: F401
from .swav import SwAVLoss, SwAVPrototypes  # noqa: F401
