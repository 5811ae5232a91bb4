"""Input validation shared by the ops and the modules: every problem is a ValueError that names the fix."""
import torch


def require(condition, message):
    if not condition:
        raise ValueError(message)


def check_bucket_multiple(length, bucket_size, what='sequence'):
    require(length % bucket_size == 0,
            f'{what} length {length} is not a multiple of the bucket size {bucket_size}; '
            f'pad it (wrap the model in sinkhorn_kernels.Autopadder) or pick a bucket size that divides it')


def check_mask(mask, batch, length, name):
    """Returns the mask as bool [batch, length], or None."""
    if mask is None:
        return None
    require(isinstance(mask, torch.Tensor), f'{name} must be a torch.Tensor of booleans, got {type(mask).__name__}')
    require(mask.dtype == torch.bool,
            f'{name} must have dtype torch.bool (True = real token), got {mask.dtype}; pass {name}.bool()')
    require(tuple(mask.shape) == (batch, length),
            f'{name} must have shape (batch, seq_len) = {(batch, length)}, got {tuple(mask.shape)}')
    return mask
