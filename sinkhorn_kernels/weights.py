"""Loading checkpoints of sinkhorn-transformer 0.11.4 models into the equally configured classes here."""
import re

import torch

from .attention import SinkhornSelfAttention

# reference key pattern -> ours; applied in order to every key
KEY_RULES = [
    (r'(^|\.)to_token_emb\.', r'\1token_emb.'),
    (r'(^|\.)axial_pos_emb\.', r'\1pos_emb.'),
    (r'(^|\.)sinkhorn_transformer\.project_(in|out)\.', r'\1project_\2.'),
    (r'(^|\.)sinkhorn_transformer\.(fn\.)?', r'\1transformer.'),
    (r'(^|\.)layers\.layers\.', r'\1layers.'),
    (r'(^|\.)layers\.blocks\.(\d+)\.f\.net\.', r'\1layers.\2.0.'),
    (r'(^|\.)layers\.blocks\.(\d+)\.g\.net\.', r'\1layers.\2.1.'),
    (r'\.fn\.fn\.(w1|w2)\.', r'.fn.\1.'),  # the reference wraps the feed-forward in a Chunk module
    (r'(^|\.)sinkhorn_attention\.sort_net\.linear$', r'\1sort_net.weight'),
    (r'(^|\.)sinkhorn_attention\.null_(keys|values)$', r'\1null_\2'),
]


def translate_key(key):
    for pattern, replacement in KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def load_reference_weights(model, state_dict):
    """Loads a sinkhorn-transformer 0.11.4 `state_dict` into `model`, an equally configured model of this package
    (LM, transformer, attention layer, or one of the wrappers), strictly: every parameter must be accounted for.

    The reference feeds the raw context to its cross-attention layers; here they project it. When the inner
    width equals the model width (heads * dim_head == dim) their projections are set to identities, so the loaded
    model computes what the checkpoint did. Otherwise they keep their initialisation and a ValueError says so."""
    ours = {translate_key(k): v for k, v in state_dict.items()}
    target = model.state_dict()
    for name, module in model.named_modules():
        key = f'{name}.to_kv.weight' if name else 'to_kv.weight'
        if isinstance(module, SinkhornSelfAttention) and module.context_only and key not in ours:
            weight = target[key]
            if weight.shape[0] != 2 * weight.shape[1]:
                raise ValueError(f'{name or type(model).__name__}: the checkpoint has no context projection and '
                                 'heads * dim_head != dim, so no projection reproduces it; load with '
                                 'dim_head = dim // heads')
            eye = torch.eye(weight.shape[1], dtype=weight.dtype)
            ours[key] = torch.cat((eye, eye), dim=0)
    missing = sorted(set(target) - set(ours))
    unexpected = sorted(set(ours) - set(target))
    if missing or unexpected:
        raise ValueError(f'the checkpoint does not match this model: missing {missing[:8]}, unexpected '
                         f'{unexpected[:8]}; build the model with the same arguments as the reference model')
    model.load_state_dict(ours)
    return model
