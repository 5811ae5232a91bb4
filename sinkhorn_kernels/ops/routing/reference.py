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
        logits = logits.scatter(-1, index, float('-inf'))
    return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)
