import os

import pytest
import torch

# without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are imported
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import sinkhorn_kernels as sk  # noqa: E402

# under pytest-xdist (-n auto) each worker takes one core: intra-op threads spinning on cores the other workers
# hold slowed small-op tests tenfold
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_pair(cls_name, *args, tie_values_to_keys=True, **kwargs):
    """The reference model and ours with the same weights. With `tie_values_to_keys`, every value projection
    equals its key projection, so the reference's routed-values bug (it routes keys as values) cannot show and
    the two must agree exactly."""
    import sinkhorn_transformer as st
    ref = getattr(st, cls_name)(*args, **kwargs)
    ours = getattr(sk, cls_name)(*args, **kwargs)
    state = ref.state_dict()
    if tie_values_to_keys:
        for name, weight in state.items():
            if name.endswith('to_kv.weight'):
                half = weight.shape[0] // 2
                weight[half:] = weight[:half]
        ref.load_state_dict(state)
    sk.load_reference_weights(ours, state)
    return ref, ours


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
