"""Thin modules over the sslkern ops (losses, EMA teacher, attention for timm)."""
from .ema import EMATeacher  # noqa: F401
from .masking import DecoderInput, embed_visible, encode_visible  # noqa: F401
from .attention import AlibiAttention, AlibiContext, use_alibi  # noqa: F401
from .dino import DINOLoss, IBOTPatchLoss  # noqa: F401
from .heads import DINOHead, GlobalBatchNorm1d, MultiCropWrapper, WeightNormLinear  # noqa: F401
from .contrastive import InfoNCELoss  # noqa: F401
from .redundancy import BarlowTwinsLoss, VICRegLoss  # noqa: F401
from .swav import SwAVLoss, SwAVPrototypes  # noqa: F401
