"""Differentiable top-k bucket routing kept sparse: per query bucket the chosen key buckets and their weights."""
import torch


def topk_routing(scores, k, temperature):
    # k rounds of: softmax, take the most probable bucket (its probability is the weight), exclude it
    logits = scores / temperature
    indices, weights = [], []
    for _ in range(k):
        probs = logits.softmax(dim=-1)
        # topk, not max: the two break ties differently and checkpoints must route as in the reference
        weight, index = probs.topk(1, dim=-1)
        indices.append(index)
        weights.append(weight)
        logits.scatter_(-1, index, float('-inf'))  # in place: the softmax keeps its output, not its input
    return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)


def topk_routing_backward(scores, k, temperature, d_weights):
    """The gradient of `topk_routing`'s weights with respect to the scores, by hand: round j's weight is
    w_j = softmax(logits_j)[i_j], so d logits = sum_j dw_j * w_j * (onehot(i_j) - p_j); the rounds are replayed
    from the scores (the buckets chosen earlier have p = 0, and so no gradient)."""
    logits = scores / temperature
    d_logits = torch.zeros_like(logits)
    for j in range(k):
        probs = logits.softmax(dim=-1)
        weight, index = probs.topk(1, dim=-1)
        g = d_weights[..., j:j + 1] * weight
        d_logits.scatter_add_(-1, index, g).addcmul_(g, probs, value=-1)
        logits.scatter_(-1, index, float('-inf'))
    return d_logits.div_(temperature)
