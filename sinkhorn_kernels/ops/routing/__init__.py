from ..backends import resolve_backend
from . import reference


def topk_routing(scores, k, temperature=1.0, backend=None):
    """Differentiable top-k over the last axis of `[..., n_query_buckets, n_key_buckets]` routing scores.

    Returns `(indices, weights)`, both `[..., n_query_buckets, k]`: round j takes the softmax of the scores
    (with the j buckets already chosen removed) and keeps its most probable bucket and that probability.
    The dense one-hot form of the same routing is never built, so the cost is linear in the bucket count
    per query bucket instead of quadratic in the sequence."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f'k must be between 1 and the number of key buckets ({scores.shape[-1]}), got {k}')
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    resolve_backend(backend, scores.device)
    return reference.topk_routing(scores, k, temperature)
