"""The only code that touches the device: the slot pool, the decode step over it, prefill chunks, graphs.

A decode step runs every slot in [0, bucket) at once with static shapes: per layer, fused QKV, the ring
write (its oldest token evicted to the slot's policy), the policy's selection, one SDPA over the pool,
MLP. On CUDA it is captured once per bucket as a CUDA graph and replayed. Prefill runs eagerly, one
request chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slam.cache import POLICIES, POLICY_IDS, CachePolicy, Evicted, cpu_kernels, fused
from slam.compiled import compiled
from slam.engine import attention as A
from slam.engine import decode_attention, int8, ring
from slam.engine.layer import Layer
from slam.engine.pool import SlotPool, StepPlan
from slam.engine.prefill import device_longs, prefill_layer
from slam.model import LoadedModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_SPAN = 64  # reserve indices a CPU step scores at least (see decode)
PLAN_ROWS = ("tokens", "pos", "write", "evict", "reserve_at", "reserve_n", "middle", "sink", "rank", "policy",
             "prev")


class ModelRunner:
    def __init__(self, loaded: LoadedModel, slots: int, budget: int, reserve_device: str = "auto",
                 reserve_int8: bool = False, cache_positions: bool = False, int8_weights: bool = False,
                 enforce_eager: bool = False, select_every: int = 1, selection: tuple[int, int, int, int] = (8, 8, 4, 0),
                 compile: bool = False, max_reserve: int = 0):
        model = loaded.model
        self.config, self.device = model.config, loaded.device
        self.dtype = next(model.parameters()).dtype
        self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.layers = nn.ModuleList(Layer(layer) for layer in model.model.layers)
        attn = model.model.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.q_heads, self.kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.vocab_size = self.config.vocab_size
        cpu_ops = compile and self.device.type == "cpu" and cpu_kernels.available()
        if int8_weights:
            # Weight bytes bound a CPU decode step: int8 weights read 4x fewer of them (engine/int8.py).
            # Slam's int8 product pays only with a vector path: its scalar loop is far slower than aten's kernel.
            fast = cpu_ops and cpu_kernels.scoring_level() != "default"
            self.layers, self.lm_head = int8.quantize(self.layers, fast), int8.quantize(self.lm_head, fast)
        rdev = self.device if reserve_device == "auto" else torch.device(reserve_device)
        # Int8 weights (8 bits each) give keys and values no more precision than bfloat16 holds, so the cache keeps
        # them in bfloat16: half the bytes of a float32 pool and reserve, which a CPU step's placement and attention
        # read per request.
        cache_dtype = torch.bfloat16 if int8_weights else self.dtype
        self.pool = SlotPool(len(self.layers), slots, self.kv_heads, budget, self.head_dim, cache_dtype,
                             self.device, rdev, reserve_int8, cache_positions, *selection, int8_scoring=int8_weights,
                             max_reserve=max_reserve)
        self.pool.compile = compile and self.device.type == "cuda"
        self.pool.fused = compile and fused.available(self.pool)
        self.pool.cpu_kernels = cpu_ops
        # The fused ring write keeps stored keys rotated; position_mode="cache" needs the eager one's extras.
        self.fused_ring = compile and ring.available(self.device) and not cache_positions
        # Decode attention: flash decoding in Triton on GPUs (engine/decode_attention.py), a C++ op over a bfloat16
        # CPU cache (aten's SDPA in bfloat16 took 5x the op's time there), else SDPA.
        if compile and decode_attention.available(self.device):
            self.decode_attend = decode_attention.attend
        elif cpu_ops and cache_dtype == torch.bfloat16:
            self.decode_attend = cpu_kernels.decode_attend
        else:
            self.decode_attend = A.attend
        self.rope = A.Rope(model.model.rotary_emb, self.head_dim, self.device, self.dtype)
        self.rope.ensure(budget + 1)
        # Layer l runs stage one of two-stage selection when (step + l) % select_every == 0: staggered, so every
        # step costs the same. In between it re-ranks the tokens of the chunks it chose last (and of chunks
        # filled since) with each new query; exact selection picks at every step.
        self.select_every = self.pool.select_every = select_every
        self.steps = 0
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        self.plan_buf = torch.zeros(len(PLAN_ROWS), slots, dtype=torch.long, device=self.device)
        # The ids the last decode step sampled, row by row: a step launched before the host has them (async
        # scheduling) takes its input tokens from here (the plan's `prev`).
        self.sampled = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.zero = torch.zeros((), dtype=torch.float32, device=self.device)  # a device scalar: graph-safe writes

    # --- decode -----------------------------------------------------------------------------------
    def plan(self, b: int, kc: int, span: int | None = None) -> StepPlan:
        rows = dict(zip(PLAN_ROWS, self.plan_buf[:, :b].unbind(0)))
        rows["evict"] = rows["evict"].bool()
        return StepPlan(**rows, kc=kc, span=self.pool.cap if span is None else span)

    @torch.inference_mode()
    def decode(self, plan_rows: torch.Tensor, kc: int, policies: frozenset[str]) -> torch.Tensor:
        """One step over slots [0, b); plan_rows: [len(PLAN_ROWS), b] on the host. Returns logits [b, vocab]."""
        b = plan_rows.shape[1]
        # The refresh phase matters only to two-stage selection (exact selection picks at every step), so a
        # graph per phase is captured only then; two stages start with a new pool version, hence new graphs.
        phase = self.steps % self.select_every if self.pool.two_stage else 0
        self.steps += 1
        if not self.use_graphs:
            # CPU steps score only the filled part of the reserve. A graph must read its whole capacity, and
            # eager GPU steps do too, so that both run the same kernels and round alike. At least MIN_SPAN:
            # torch's CPU softmax reduces rows shorter than a vector in another order, and a slot's scores
            # must not depend on how far the other slots of its step have filled their reserves.
            span = None if self.device.type == "cuda" else min(
                max(int(plan_rows[PLAN_ROWS.index("reserve_n")].max()), kc, MIN_SPAN), self.pool.cap)
            self.plan_buf[:, :b].copy_(plan_rows)
            with int8.decode_step():
                return self.forward_decode(self.plan(b, kc, span), policies, phase)
        key = (b, kc, policies, phase, self.pool.version, self.rope.cos.data_ptr())
        if key not in self.graphs:
            self.graphs[key] = self.capture(b, kc, policies, phase)
        self.plan_buf[:, :b].copy_(plan_rows, non_blocking=True)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def dry_rows(self, b: int) -> torch.Tensor:
        """A plan in which every slot is inactive: all writes land in scratch columns."""
        rows = torch.zeros(len(PLAN_ROWS), b, dtype=torch.long, pin_memory=self.device.type == "cuda")
        rows[PLAN_ROWS.index("write")] = self.pool.budget
        rows[PLAN_ROWS.index("reserve_at")] = self.pool.cap
        rows[PLAN_ROWS.index("policy")] = -1
        rows[PLAN_ROWS.index("prev")] = -1
        return rows

    def capture(self, b: int, kc: int, policies: frozenset[str], phase: int):
        # The warm-up executes (lazy init, autotuning) with a dry plan so it changes no request's cache;
        # the capture only records. Replays then read whatever plan the buffer holds.
        self.plan_buf[:, :b].copy_(self.dry_rows(b))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward_decode(self.plan(b, kc), policies, phase)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self.forward_decode(self.plan(b, kc), policies, phase)
        self.graph_pool = graph.pool()
        return graph, logits

    def forward_decode(self, plan: StepPlan, policies: frozenset[str], phase: int = 0) -> torch.Tensor:
        pool, b, d = self.pool, plan.tokens.shape[0], self.head_dim
        classes = [POLICIES[name] for name in sorted(policies)]
        mine = {cls: (plan.policy == POLICY_IDS[cls.name]) for cls in classes}
        cols = torch.arange(pool.budget + 1, device=self.device)
        plan.is_middle = (cols >= plan.sink.view(-1, 1)) & (cols < (plan.sink + plan.middle).view(-1, 1))
        active = plan.policy >= 0
        cos, sin = self.rope.cos[plan.pos].unsqueeze(1), self.rope.sin[plan.pos].unsqueeze(1)  # [b, 1, D]
        cache_pos = pool.cache_positions
        fuse = pool.compile  # GPUs: small element-wise functions through torch.compile (slam/compiled.py)
        tokens = torch.where(plan.prev >= 0, self.sampled[plan.prev.clamp_min(0)], plan.tokens)  # [b]
        x = self.embed(tokens)  # [b, hidden]
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv_heads(x, self.q_heads, self.kv_heads, d)  # [b, heads, D]
            q_rot, k_rot = compiled(A.rotate_pair, fuse)(q, k, cos, sin)
            stored_k = (k if cache_pos else k_rot).to(pool.dtype)
            self.ring_write(li, plan, stored_k, v.to(pool.dtype), active, classes, mine)
            # Only stage one of two-stage selection waits for its refresh (the chunks chosen last are re-ranked
            # in between); exact selection keeping its picks between refreshes lost needles (docs/benchmarks.md).
            plan.refresh = not pool.two_stage or (phase + li) % self.select_every == 0
            for cls in classes:
                cls.select(pool, li, plan, q_rot, mine[cls])
            keys, values, pos = pool.k[li][:b], pool.v[li][:b], pool.pos[li][:b]
            valid = compiled(A.decode_mask, fuse)(pos, cols, pool.budget, active)  # [b, H, 1, C]
            q_att = q_rot
            if cache_pos:
                ranks = A.cache_ranks(pos)  # [b, H, C]
                keys = A.rotate(keys, self.rope.cos[ranks], self.rope.sin[ranks])
                q_att = A.rotate(q, self.rope.cos[plan.rank].unsqueeze(1), self.rope.sin[plan.rank].unsqueeze(1))
            q_att = q_att.unsqueeze(2)  # [b, QH, 1, D]
            out = self.decode_attend(q_att, keys.to(pool.dtype), values, valid, self.scale)
            # Score-keeping policies read the probabilities beside, not instead of, the attention every slot
            # gets: a request's tokens must not depend on which policies share its step.
            scorers = [cls for cls in classes if cls.decode_attention]
            if scorers:
                probs = A.attention_probs(q_att, keys.to(q_att.dtype), valid, self.scale)
                for cls in scorers:
                    cls.observe(pool, li, probs[:, :, :, 0], mine[cls])
            if fuse and layer.silu:
                x, h = compiled(A.add_rms_norm)(x, layer.o(out.reshape(b, -1).to(x.dtype)), layer.post_norm.weight,
                                                layer.post_norm.eps)
                x = x + layer.down(compiled(A.silu_mul)(layer.gate_up(h)))
            else:
                x = x + layer.o(out.reshape(b, -1).to(x.dtype))
                x = x + layer.mlp(x)
        return self.lm_head(self.norm(x)).float()

    def ring_write(self, li: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor,
                   classes: list, mine: dict) -> None:
        """Each slot's column `write` gives up its token (offered to the policies: on_evict) and takes the new
        one; k, v: [b, H, D] as stored."""
        pool, b = self.pool, k.shape[0]
        if self.fused_ring:
            old_k, old_v, old_pos, old_score = ring.ring_write(pool, li, plan.write, plan.pos, active, k, v)
            ev = Evicted(old_k.unsqueeze(2), old_v.unsqueeze(2), old_pos[:, :1], old_score.unsqueeze(-1))
        else:
            ar = torch.arange(b, device=self.device)
            old_pos = pool.pos[li][ar, 0, plan.write]  # [b]
            old_k = pool.k[li][ar, :, plan.write]  # [b, H, D]
            k_score = None
            if pool.cache_positions:
                c = old_pos.clamp_min(0)
                k_score = A.rotate(old_k, self.rope.cos[c].unsqueeze(1), self.rope.sin[c].unsqueeze(1))
                k_score = k_score.to(pool.dtype).unsqueeze(2)
            ev = Evicted(old_k.unsqueeze(2), pool.v[li][ar, :, plan.write].unsqueeze(2), old_pos.unsqueeze(1),
                         pool.score[li][ar, :, plan.write].unsqueeze(-1), k_score)
            pool.k[li][ar, :, plan.write] = k
            pool.v[li][ar, :, plan.write] = v
            pool.pos[li][ar, :, plan.write] = torch.where(active, plan.pos, -1).unsqueeze(1)
            pool.score[li][ar, :, plan.write] = self.zero
        # The policies see the evicted token after the new one is written: none of them writes the ring.
        for cls in classes:
            cls.on_evict(pool, li, plan, ev, mine[cls])
        pool.pos[li][:, :, pool.budget] = -1

    # --- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, policy: CachePolicy, ids: list[int], start: int) -> torch.Tensor:
        """Run tokens at positions [start, start + len(ids)) of the request in `slot`; logits of the last."""
        t = len(ids)
        self.rope.ensure(start + t + 1)
        evicted_after = policy.counts(start + t)[3]
        if policy.uses_reserve and evicted_after:
            self.pool.ensure_reserve(evicted_after)
        x = self.embed(device_longs(ids, self.device))  # [t, hidden]
        positions = torch.arange(start, start + t, device=self.device)
        for li, layer in enumerate(self.layers):
            x = prefill_layer(self, li, layer, x, slot, policy, start, positions)
        return self.lm_head(self.norm(x[-1:])).float()[0]
