"""Scratch batch normalization for PyTorch.

Layout: NCHW (4-D) or NC (2-D). Training mode comes from the module's own
`self.training` flag (`model.train()` / `model.eval()`), never from
`torch.is_grad_enabled()`: a forward under `no_grad` in train mode still uses
batch statistics and still updates the running statistics, as in nn.BatchNorm.
"""
import torch
from torch import nn


def batch_norm(x, gamma, beta, running_mean, running_var, *, training, decay, epsilon):
    """Return (y, new_running_mean, new_running_var).

    Training: normalise with the batch mean and biased (1/n) batch variance over
    the batch axis (2-D) or batch and spatial axes (4-D), and blend them into the
    running statistics. Eval: normalise with the running statistics, which are
    returned unchanged.
    """
    if x.dim() not in (2, 4):
        raise ValueError(f"batch_norm expects 2-D (N, C) or 4-D (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}; flatten or reshape before the BN layer")
    axes = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    if training:
        if x.numel() // x.shape[1] < 2:
            raise ValueError(f"training-mode batch_norm needs more than one value per channel, "
                             f"got input shape {tuple(x.shape)}; use a batch of at least 2 or eval mode")
        var, mean = torch.var_mean(x, dim=axes, correction=0)  # biased (1/n), as the spec says
        # .detach(): the running statistics must not carry autograd history
        new_mean = decay * running_mean + (1.0 - decay) * mean.detach()
        new_var = decay * running_var + (1.0 - decay) * var.detach()
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + epsilon)
    return gamma.view(shape) * y + beta.view(shape), new_mean, new_var


class BatchNorm(nn.Module):
    """Holds gamma, beta (parameters) and the running statistics (buffers, so they are
    saved in state_dict and moved by .to())."""

    def __init__(self, num_features, *, decay=0.9, epsilon=1e-5):
        super().__init__()
        self.num_features, self.decay, self.epsilon = num_features, decay, epsilon
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        y, new_mean, new_var = batch_norm(
            x, self.gamma, self.beta, self.running_mean, self.running_var,
            training=self.training, decay=self.decay, epsilon=self.epsilon)
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return y

    def extra_repr(self):
        return f"{self.num_features}, decay={self.decay}, epsilon={self.epsilon}"
