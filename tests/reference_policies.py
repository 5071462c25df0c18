"""A deliberately simple per-request reference of the decoding policies, to hold the batched pool path to.

One request, one token at a time, every key and value kept in plain per-layer lists; at each step the
policy's rule decides which earlier positions each layer and KV head attends to:

    full       every position
    streaming  the first `sink` and the newest `budget - sink`
    slam       the first `sink`, the newest `recent`, and the `budget - sink - recent` evicted positions
               the current query scores highest (log-softmax over the evicted keys, max over the query group;
               with `int8_scoring`, as CPUs score: keys rounded to int8 with a bfloat16 scale per key, the
               query to int16 with a float32 scale per query, their products summed exactly, then scaled)
    h2o        the first `sink`, the newest `recent`, and the evicted positions with the most attention
               received so far (a leaving token replaces the weakest middle one only if it outranks it)
"""

from __future__ import annotations

import torch


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def int8_dots(qg, k):
    """q.k per KV head from int8 keys: qg [h, g, d], k [h, n, d] -> [h, g, n] float32."""
    k = k.float()
    s = (k.abs().amax(dim=-1).clamp_min(1e-8) / 127.0).to(torch.bfloat16)  # [h, n]
    kq = (k / s.float().unsqueeze(-1)).round().clamp(-127, 127)
    q = qg.float()
    qs = q.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 32767  # [h, g, 1]
    dots = torch.einsum("hgd,hnd->hgn", torch.round(q / qs).double(), kq.double()).float()  # exact integers
    return dots * (qs * s.float().unsqueeze(1))


@torch.no_grad()
def reference_generate(model, prompt: list[int], steps: int, policy: str, budget: int = 0, sink: int = 0,
                       recent: int = 0, int8_scoring: bool = False) -> list[int]:
    cfg = model.config
    layers = model.model.layers
    h, qh, d = cfg.num_key_value_heads, cfg.num_attention_heads, layers[0].self_attn.head_dim
    g = qh // h
    scale = d**-0.5
    ring = budget - sink if policy == "streaming" else recent
    middle = 0 if policy in ("full", "streaming") else budget - sink - recent
    keys = [[] for _ in layers]  # per layer: list of [h, d] rotated keys by position
    values = [[] for _ in layers]
    received = [[] for _ in layers]  # h2o: per layer, per position, [h] attention received
    kept_middle = [[set() for _ in range(h)] for _ in layers]  # h2o's middle positions per layer and head
    ids, out = list(prompt), []
    for t in range(len(prompt) + steps - 1):
        x = model.model.embed_tokens(torch.tensor([ids[t]]))
        cos, sin = model.model.rotary_emb(x, torch.tensor([[t]]))
        cos, sin = cos[0], sin[0]
        evicted_upto = max(t + 1 - ring, sink)  # positions in [sink, evicted_upto) have left the ring
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = rotate(attn.q_proj(y).view(qh, d), cos, sin)
            k = rotate(attn.k_proj(y).view(h, d), cos, sin)
            keys[li].append(k)
            values[li].append(attn.v_proj(y).view(h, d))
            received[li].append(torch.zeros(h))
            K, V = torch.stack(keys[li], 1), torch.stack(values[li], 1)  # [h, t + 1, d]
            qg = q.view(h, g, d)
            visible = torch.zeros(h, t + 1, dtype=torch.bool)
            if policy == "full":
                visible[:] = True
            else:
                visible[:, : min(sink, t + 1)] = True
                visible[:, max(evicted_upto, sink): t + 1] = True
            evicted = list(range(sink, evicted_upto))
            if policy == "slam" and evicted:
                middle_keys = K[:, sink:evicted_upto]
                if int8_scoring:
                    logits = int8_dots(qg, middle_keys) * scale
                else:
                    logits = torch.einsum("hgd,hnd->hgn", qg, middle_keys) * scale
                score = torch.log_softmax(logits.float(), dim=-1).amax(dim=1)  # [h, n]
                if int8_scoring:  # equal scores (equal keys) rank the older token first
                    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
                    best = order[:, : min(middle, len(evicted))] + sink
                else:
                    best = score.topk(min(middle, len(evicted)), dim=-1).indices + sink
                visible.scatter_(1, best, True)
            if policy == "h2o":
                leaving = evicted_upto - 1 if t + 1 - ring > sink else None
                for head in range(h):
                    mid = kept_middle[li][head]
                    if leaving is not None and leaving not in mid and leaving >= sink:
                        if len(mid) < middle:
                            mid.add(leaving)
                        elif middle:
                            weakest = min(mid, key=lambda p: (received[li][p][head].item(), -p))
                            if received[li][leaving][head] > received[li][weakest][head]:
                                mid.remove(weakest)
                                mid.add(leaving)
                    for p in mid:
                        visible[head, p] = True
            logits = torch.einsum("hgd,hnd->hgn", qg, K).float() * scale
            logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if policy == "h2o":
                got = probs.sum(dim=1)  # [h, t + 1]
                for p in range(t + 1):
                    received[li][p] = received[li][p] + got[:, p]
            o = torch.einsum("hgn,hnd->hgd", probs.to(V.dtype), V).reshape(1, qh * d)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if t >= len(prompt) - 1:
            token = int(model.lm_head(model.model.norm(x)).argmax())
            out.append(token)
            ids.append(token)
    return out
