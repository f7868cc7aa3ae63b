"""The public ops: one module per op, each registering ``torch.ops.sslkern.<op>``."""
from .ema_update import ema_update_  # noqa: F401
from .alibi_attention import alibi_attention, alibi_slopes  # noqa: F401
from .layer_average_targets import layer_average_targets  # noqa: F401
from .masked_regression_loss import data2vec_cls_loss, masked_regression_loss  # noqa: F401
from .data2vec_loss import data2vec_loss  # noqa: F401
from .tokens import gather_tokens, restore_tokens  # noqa: F401
from .dino_loss import dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp_teacher  # noqa: F401
from .info_nce_loss import info_nce_loss  # noqa: F401
from .prototype_loss import prototype_loss  # noqa: F401
from .relation_loss import relation_loss  # noqa: F401
from .hog_targets import hog_targets  # noqa: F401
from .render_views import RaggedImages, render_views  # noqa: F401
from .cross_correlation_loss import cross_correlation_loss  # noqa: F401
from .vicreg_loss import vicreg_loss  # noqa: F401
from .swav_loss import swav_codes, swav_loss  # noqa: F401
