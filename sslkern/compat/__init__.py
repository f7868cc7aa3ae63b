"""Drop-in modules for existing SSL codebases: same names and call forms, sslkern ops inside.

``sslkern.compat.lightly``  lightly's ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``,
                            ``update_momentum``, ``get_at_index``, ``set_at_index``, ``random_token_mask``
``sslkern.compat.dinov2``   dinov2's ``DINOLoss``, ``iBOTPatchLoss``, ``KoLeoLoss`` (+ fused calls)
``sslkern.compat.timm``     timm's ``ModelEmaV3``

None of them imports its peer library (timm is used, when present, for bf16 stochastic
rounding only). ``sslkern.patch.patch_timm_vit`` patches a timm ViT. See docs/integration.md.
"""
