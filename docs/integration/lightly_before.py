"""DINO with lightly (the shape of lightly's examples/pytorch/dino.py), tiny sizes."""
import copy

import torch
from torch import nn

from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule


class DINO(nn.Module):
    def __init__(self, backbone, input_dim, hidden_dim, bottleneck_dim, output_dim):
        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(input_dim, hidden_dim, bottleneck_dim, output_dim, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(input_dim, hidden_dim, bottleneck_dim, output_dim)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


def build(batch=4, output_dim=256, n_local=2, global_size=32, local_size=16, width=32, epochs=2, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model = DINO(backbone, 2 * width, 4 * width, width, output_dim)
    criterion = DINOLoss(output_dim=output_dim, warmup_teacher_temp_epochs=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    gen = torch.Generator().manual_seed(seed + 1)

    def step(epoch):
        views = [torch.randn(batch, 3, global_size, global_size, generator=gen) for _ in range(2)]
        views += [torch.randn(batch, 3, local_size, local_size, generator=gen) for _ in range(n_local)]
        momentum_val = cosine_schedule(epoch, epochs, 0.996, 1)
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum_val)
        update_momentum(model.student_head, model.teacher_head, m=momentum_val)
        global_views = views[:2]
        teacher_out = [model.forward_teacher(view) for view in global_views]
        student_out = [model.forward(view) for view in views]
        loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def main(steps=3):
    step = build()
    return [float(step(epoch)) for epoch in range(steps)]


if __name__ == "__main__":
    print(main())
