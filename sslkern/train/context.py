"""What a recipe's step sees: its position in the run, schedules, and per-sample randomness.

A recipe never sees a rank. ``forward(images, ctx)`` receives this rank's images (a ragged
uint8 batch, :class:`sslkern.RaggedImages`) and draws everything random through ``ctx``:

    views = ctx.views(images, self.view_specs)          # rendered on the device, normalised
    masks = ctx.per_sample(sslkern.masks.random_mask, n_tokens, 0.75)
    noise = ctx.randn(n_masked, dim)                     # (rows, n_masked, dim)

Each draw is made for the global batch from generators seeded by (seed, step) and this
rank's rows are kept, so any number of ranks, workers or prefetched batches gives the same
step, and a resumed run redraws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


def _rows_of(x, rows: slice):
    """``x`` (a tensor, dataclass of tensors, tuple or list) with dim 0 cut to ``rows``."""
    if isinstance(x, torch.Tensor):
        return x[rows] if x.dim() else x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _rows_of(getattr(x, f.name), rows) for f in dataclasses.fields(x)})
    if isinstance(x, (tuple, list)):
        return type(x)(_rows_of(v, rows) for v in x)
    return x


@dataclass
class StepContext:
    """A step's position, schedules and random draws (see the module docstring)."""

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    generator: torch.Generator           # on the training device: masks, noise
    batch_size: int = 1                  # the global batch
    rank: int = 0                        # the loop's business: recipes use the draws below
    world_size: int = 1
    lr: float = 0.0
    weight_decay: float = 0.0
    values: dict = field(default_factory=dict)  # the method's schedule(ctx) for this step
    host_generator: torch.Generator | None = None  # on the CPU: view parameters (need the images' sizes)
    mean: tuple = (0.0,)                 # normalisation of rendered views
    std: tuple = (1.0,)
    view_dtype: torch.dtype = torch.float32

    def __getattr__(self, name):  # ctx.momentum, ctx.teacher_temp, ... from values
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"StepContext has no {name!r} (the method's schedule() gives: {sorted(values)})")

    @property
    def _rows(self) -> slice:
        return slice(self.rank, None, self.world_size)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # -- per-sample draws (global batch, this rank's rows) --------------------------------
    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape ``(rows, *shape)``."""
        return torch.rand(self.batch_size, *shape, generator=self.generator, device=self.device, dtype=dtype)[self._rows]

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) of shape ``(rows, *shape)``."""
        return torch.randn(self.batch_size, *shape, generator=self.generator, device=self.device, dtype=dtype)[self._rows]

    def randint(self, high: int, *shape) -> torch.Tensor:
        """Integers in [0, high) of shape ``(rows, *shape)``."""
        return torch.randint(high, (self.batch_size, *shape), generator=self.generator, device=self.device)[self._rows]

    def per_sample(self, fn, *args, **kwargs):
        """``fn(global_batch, *args, generator=ctx.generator, **kwargs)`` cut to this rank's rows
        (a mask generator of :mod:`sslkern.masks`, say; its outputs' dim 0 is the batch)."""
        return _rows_of(fn(self.batch_size, *args, generator=self.generator, **kwargs), self._rows)

    # -- views -----------------------------------------------------------------------------
    def views(self, images, specs) -> list[torch.Tensor]:
        """One rendered view per spec (:class:`sslkern.views.ViewSpec`), each ``(rows, C, S, S)``,
        normalised, in ``ctx.view_dtype``. Views of one size are rendered in one call."""
        import sslkern
        from sslkern.views import ViewParams, draw_view_params

        hw = getattr(images, "hw_host", None)  # the loader keeps the sizes on the host: no device sync here
        if hw is None:
            hw = images.hw.cpu()
        params = []
        for spec in specs:  # drawn in order: the k-th spec always consumes the same numbers
            u = torch.rand(self.batch_size, spec.num_uniforms, generator=self.host_generator, dtype=torch.float64)
            params.append(draw_view_params(spec, hw, u[self._rows]))
        out: list = [None] * len(specs)
        for size in dict.fromkeys(s.size for s in specs):
            which = [i for i, s in enumerate(specs) if s.size == size]
            both = ViewParams.cat([params[i] for i in which]).to(images.data.device, non_blocking=True)
            rendered = sslkern.render_views(images, both, size, mean=self.mean, std=self.std, out_dtype=self.view_dtype,
                                            # the parameters are ours and checked on the host; on a GPU
                                            # the kernels clamp and mask, and the step keeps no host sync
                                            check_values=images.data.device.type == "cpu").split(len(hw))
            for i, v in zip(which, rendered):
                out[i] = v
        return out
