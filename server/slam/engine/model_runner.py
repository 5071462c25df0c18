"""The only code that touches the device: one forward pass over a packed batch of request chunks.

The batch is packed: all requests' new tokens form one [tokens, hidden] matrix, so projections and MLPs
run as single matrix products whatever the mix of prefill chunks and decode tokens. Only attention is
per request, because each request has its own compressed cache and policy.
"""

from __future__ import annotations

import torch

from slam.engine.attention import Rope, cached_attention
from slam.engine.sequence import Sequence
from slam.model import LoadedModel


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        model = loaded.model
        self.config = model.config
        self.device = loaded.device
        self.dtype = next(model.parameters()).dtype
        self.backbone = model.model
        self.lm_head = model.lm_head
        self.layers = list(self.backbone.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.q_heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.vocab_size = self.config.vocab_size
        self.replacements = 0  # critical tokens swapped in, over the runner's life (a metric)
        self.rope = Rope(self.backbone.rotary_emb, self.head_dim, self.device, self.dtype)

    def allocate(self, seq: Sequence) -> None:
        seq.caches = [seq.policy.new_cache(self.kv_heads, self.head_dim, self.dtype, self.device) for _ in self.layers]
        for cache in seq.caches:
            cache.rotate = self.rope

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """Process each request's chunk of new tokens; return logits [len(batch), vocab] of each chunk's last token."""
        ids, positions, spans, start = [], [], [], 0
        for seq, chunk in batch:
            if seq.caches is None:
                self.allocate(seq)
            ids.extend(chunk)
            positions.append(torch.arange(seq.num_cached, seq.num_cached + len(chunk)))
            spans.append((start, start + len(chunk)))
            start += len(chunk)
        tokens = torch.tensor(ids, device=self.device)
        pos = torch.cat(positions).to(self.device)
        x = self.backbone.embed_tokens(tokens)  # [tokens, hidden]
        rotations = [self.rope.at(pos[a:b]) for a, b in spans]
        n = x.shape[0]
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, -1, self.head_dim)  # [tokens, q_heads, head_dim]
            k = attn.k_proj(h).view(n, -1, self.head_dim)  # [tokens, kv_heads, head_dim]
            v = attn.v_proj(h).view(n, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes queries and keys per head before rotation.
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            outs = []
            for (seq, _), (a, b), cos_sin in zip(batch, spans, rotations):
                out, replaced = cached_attention(
                    seq.policy, seq.caches[li], q[:, a:b], k[:, a:b], v[:, a:b], pos[a:b], cos_sin, self.rope, self.scale
                )
                seq.replacements += replaced
                self.replacements += replaced
                outs.append(out)
            o = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1)  # [tokens, q_heads * head_dim]
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor([b - 1 for _, b in spans], device=self.device)
        return self.lm_head(self.backbone.norm(x[last])).float()
