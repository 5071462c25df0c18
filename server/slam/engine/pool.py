"""The slot pool: every running request's compressed cache in static, per-layer device buffers.

    k[l], v[l]:  [slots, kv_heads, budget + 1, head_dim]   column `budget` is scratch: masked writes go there
    pos[l]:      [slots, kv_heads, budget + 1]  original position of each column, -1 when empty (the mask)
    score[l]:    [slots, kv_heads, budget + 1]  float32, for the score-keeping policies (h2o, snapkv)
    ridx[l]:     [slots, kv_heads, budget + 1]  reserve index of the token a column recalled (slam), else -1
    reserve (slam only, sized for a request's prompt when it takes a slot, grown by at least a quarter):
    rk[l], rv[l]: [slots, kv_heads, cap + 1, head_dim]  evicted tokens, append-only (int8 + scales optional)
    rks[l]:      keys rotated at their original positions, for scoring (position_mode="cache" only)
    rpos:        [slots, cap + 1] their original positions (the same in every layer and head), -1 empty
    rq[l], rq_scale[l]: CPUs only, keys in int8 with a bfloat16 scale per key, for exact scoring
                 (selection.dot_int8); an int8 reserve scores its own keys instead
    two-stage selection (on the compute device, allocated when it starts):
    smin[l], smax[l]: [slots, kv_heads, cap // chunk + 1, head_dim] int8  element-wise bounds of the scoring
                 keys of each `chunk` reserve tokens, with sscale[l]: [slots, kv_heads, cap // chunk + 1]
                 float32 their scale per chunk (engine/bounds.py)
    cand[l]:     [slots, kv_heads, oversample * budget // chunk] int32  the chunks stage one chose last
    home:        [slots, kv_heads, cap + 1] int32 scratch of the GPU placement (cache/fused.py): reserve
                 index -> middle column, all -1 between uses

The reserve's reads (dequantized, by range or by rows) live in engine/reserve.py, its chunk bounds in
engine/bounds.py: mixins of the pool; on GPUs one kernel appends evicted tokens (engine/append.py). A host
reserve (pinned memory) is read and written by the device through aliases of the pinned buffers (unified
addressing): gathers and appends are device kernels, so decode steps stay capturable in CUDA graphs and only
the rows a step touches cross PCIe.

One tensor per layer (not views of one big tensor): compiled in-place writes stay cheap. Every buffer is
made and changed in inference mode, like the forward passes that write it. Running requests
occupy slots [0, n): a finished request's slot is filled by moving the last one, so a decode step over
slots [0, bucket) covers every running request and CUDA graphs per bucket stay valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slam.engine import append
from slam.engine.bounds import ChunkBounds
from slam.engine.reserve import ReserveReads


@dataclass
class StepPlan:
    """Per-step inputs of a decode step, computed on the host and copied to the device in one transfer."""

    tokens: torch.Tensor  # [b] int64 input ids
    pos: torch.Tensor  # [b] original position of the new token
    write: torch.Tensor  # [b] column the new token goes to
    evict: torch.Tensor  # [b] bool: the column held the ring's oldest token, which leaves now
    reserve_at: torch.Tensor  # [b] reserve index the evicted token takes (slam), else the scratch index
    reserve_n: torch.Tensor  # [b] reserve tokens after this step
    middle: torch.Tensor  # [b] middle columns of the slot
    sink: torch.Tensor  # [b] sink columns of the slot
    rank: torch.Tensor  # [b] position of the new token inside the cache (position_mode="cache")
    policy: torch.Tensor  # [b] policy index of the slot (engine's POLICY_IDS), -1 inactive
    prev: torch.Tensor  # [b] row of the input token in the last step's sampled ids (async scheduling), else -1
    kc: int  # static: middle columns the slam selection fills (max over slam slots)
    span: int = 0  # static: reserve indices [0, span) that may hold tokens (the capacity under CUDA graphs)
    is_middle: torch.Tensor | None = None  # [b, columns] bool, derived on the device from sink and middle
    refresh: bool = True  # static, per layer: slam's two-stage selection re-ranks the chunks (else reuses them)
    memo: dict = field(default_factory=dict)  # tensors derived from the plan, the same for every layer

    def once(self, key, make: Callable[[], object]):
        """make(), computed at the step's first layer and reused by the others: on CPUs each small op costs
        microseconds of dispatch whatever its size, thirty layers over."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


class SlotPool(ChunkBounds, ReserveReads):
    @torch.inference_mode()
    def __init__(self, layers: int, slots: int, kv_heads: int, budget: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, reserve_device: torch.device | None = None,
                 reserve_int8: bool = False, cache_positions: bool = False, chunk: int = 0,
                 oversample: int = 0, min_ratio: int = 4, candidate_floor: int = 0, int8_scoring: bool = False,
                 max_reserve: int = 0):
        self.layers, self.slots, self.kv_heads, self.budget, self.head_dim = layers, slots, kv_heads, budget, head_dim
        self.dtype, self.device = dtype, device
        cols = budget + 1
        shape = (slots, kv_heads, cols, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pos = [torch.full(shape[:3], -1, dtype=torch.long, device=device) for _ in range(layers)]
        self.score = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(layers)]
        self.ridx = [torch.full(shape[:3], -1, dtype=torch.long, device=device) for _ in range(layers)]
        # Row r of a [slots, kv_heads, n, head_dim] buffer viewed as [slots * kv_heads * n, head_dim] starts
        # at (slot * kv_heads + head) * n: whole rows are gathered and written (index_select/index_copy_),
        # which reads and writes far less index data than an element-wise gather or scatter.
        self.heads_base = torch.arange(slots * kv_heads, device=device).view(slots, kv_heads, 1)
        self.replaced = torch.zeros(slots, dtype=torch.long, device=device)  # slam churn per slot
        # Where the reserve's bytes live. The compute device's kernels index them wherever they are: a pinned
        # host reserve through device aliases (device_alias), so every reserve index lives on `device`.
        self.reserve_memory = reserve_device or device
        self.slot_index = torch.arange(slots, device=device)  # slots [0, b) as an index: [:b]
        self.reserve_int8 = reserve_int8
        self.cache_positions = cache_positions
        # CPU scoring reads every reserve key per step and is bound by their bytes: with int8 weights (whose
        # decode rows are bfloat16 already) it reads int8 copies, a quarter of float32's. Rotated scoring
        # keys (position_mode="cache") are scored as stored.
        self.int8_scoring = int8_scoring and device.type == "cpu" and not cache_positions
        self.rq: list[torch.Tensor] = []
        self.rq_scale: list[torch.Tensor] = []
        # Two-stage selection: bounds per `chunk` reserve tokens pick `oversample` x the critical columns'
        # worth of chunks (at least `candidate_floor` tokens: first_chunks), whose tokens are then scored
        # exactly. 0: every reserve token scored exactly.
        # It runs once the reserve's capacity is `min_ratio` times the candidates (oversample x budget):
        # on shorter reserves exact scoring reads about as much and launches fewer kernels. Bounds are
        # kept (and allocated) only while it runs; they are rebuilt from the reserve when it starts.
        self.chunk = chunk if oversample else 0
        self.oversample = oversample if chunk else 0
        self.min_ratio = min_ratio
        self.candidate_floor = candidate_floor
        self.two_stage = False
        self.select_every = 1  # steps between stage one's refreshes of a layer's chunks (set by the runner)
        self.compile = False  # GPUs: decode-step and selection functions through torch.compile (set by the runner)
        self.fused = False  # write the chosen tokens with one Triton kernel (cache/fused.py; set likewise)
        self.cpu_kernels = False  # CPUs: selection tail and placement as C++ ops (cache/cpu_kernels.py; likewise)
        self.smin: list[torch.Tensor] = []
        self.smax: list[torch.Tensor] = []
        self.sscale: list[torch.Tensor] = []
        self.cand: list[torch.Tensor] = []
        self._pinned: list[torch.Tensor] = []  # host buffers behind the device aliases
        self.cap = 0  # reserve capacity per slot; 0: not allocated
        self.max_reserve = max_reserve  # the most a request can evict (its longest length); 0: no bound
        self.rk: list[torch.Tensor] = []
        self.rv: list[torch.Tensor] = []
        self.rk_scale: list[torch.Tensor] = []
        self.rv_scale: list[torch.Tensor] = []
        self.rks: list[torch.Tensor] = []
        self.rpos = torch.empty(0)
        self.home = torch.empty(0, dtype=torch.int32)  # cache/fused.py: reserve index -> column, all -1 between calls
        self.version = 0  # bumped when buffers are reallocated: captured graphs must be recaptured

    # --- reserve tier ------------------------------------------------------------------------------
    @torch.inference_mode()
    def ensure_reserve(self, need: int) -> None:
        """Make room for `need` evicted tokens per slot (grows every layer's reserve: grown_capacity)."""
        if need <= self.cap:
            return
        cap = self.grown_capacity(need, self.cap)
        n = self.cap
        pin = self.reserve_memory.type == "cpu" and self.device.type == "cuda"
        pinned = []

        def grown(old: torch.Tensor | None, shape, dtype, host: bool = True) -> torch.Tensor:
            if pin and host:
                t = torch.zeros(shape, dtype=dtype, pin_memory=True)
                pinned.append(t)
                t = device_alias(t, self.device)
            else:
                t = torch.zeros(shape, dtype=dtype, device=self.reserve_memory if host else self.device)
            if old is not None and n:
                t[:, :, : old.shape[2] - 1] = old[:, :, :-1]  # all but the old scratch index
            return t

        shape = (self.slots, self.kv_heads, cap + 1, self.head_dim)
        kv_dtype = torch.int8 if self.reserve_int8 else self.dtype
        old = lambda lst, i: lst[i] if lst else None  # noqa: E731
        self.rk = [grown(old(self.rk, i), shape, kv_dtype) for i in range(self.layers)]
        self.rv = [grown(old(self.rv, i), shape, kv_dtype) for i in range(self.layers)]
        if self.reserve_int8:
            self.rk_scale = [grown(old(self.rk_scale, i), shape[:3], torch.float32) for i in range(self.layers)]
            self.rv_scale = [grown(old(self.rv_scale, i), shape[:3], torch.float32) for i in range(self.layers)]
        if self.cache_positions:
            self.rks = [grown(old(self.rks, i), shape, self.dtype) for i in range(self.layers)]
        if self.int8_scoring and not self.reserve_int8:
            self.rq = [grown(old(self.rq, i), shape, torch.int8) for i in range(self.layers)]
            self.rq_scale = [grown(old(self.rq_scale, i), shape[:3], torch.bfloat16) for i in range(self.layers)]
        started = not self.two_stage and self.chunk and cap >= self.min_ratio * self.oversample * self.budget
        if started or self.two_stage:
            bounds = (self.slots, self.kv_heads, cap // self.chunk + 1, self.head_dim)
            self.smin = [grown(old(self.smin, i), bounds, torch.int8, host=False) for i in range(self.layers)]
            self.smax = [grown(old(self.smax, i), bounds, torch.int8, host=False) for i in range(self.layers)]
            self.sscale = [grown(old(self.sscale, i), bounds[:3], torch.float32, host=False) for i in range(self.layers)]
            if not self.cand:
                picks = (self.slots, self.kv_heads, -(-self.oversample * self.budget // self.chunk))
                self.cand = [torch.zeros(picks, dtype=torch.int32, device=self.device) for _ in range(self.layers)]
        rpos = torch.full((self.slots, cap + 1), -1, dtype=torch.long, device=self.device)  # small: on device
        if n:
            rpos[:, :n] = self.rpos[:, :n]
        self.rpos = rpos
        self.home = torch.full((self.slots, self.kv_heads, cap + 1), -1, dtype=torch.int32, device=self.device)
        self._pinned = pinned
        self.cap = cap
        if started:
            self.two_stage = True
            self._rebuild_bounds(n)
        self.version += 1

    def first_chunks(self, kc: int) -> int:
        """Stage one's chunks for a step whose widest middle is kc: oversample x kc tokens, or candidate_floor
        (config.candidate_floor) if more, within the candidate buffer (oversample x the pool's budget)."""
        tokens = min(max(self.oversample * kc, self.candidate_floor), self.oversample * self.budget)
        return -(-tokens // self.chunk)

    def grown_capacity(self, need: int, cap: int) -> int:
        """The capacity ensure_reserve grows `cap` to for `need` tokens: at least a quarter more (so appends
        cost amortized O(1)), rounded up to a size class, an eighth of a power of two, so a prompt's reserve
        holds at most 12.5% more rows than it evicts plus the decode steps that fit there (doubling from a
        capacity just short of the need held twice the need); up to max_reserve, in whole chunks."""
        want = max(need, cap + cap // 4, 256)
        step = 1 << (want.bit_length() - 4)
        cap = -(-want // step) * step
        if self.max_reserve:  # growing past what any request can evict would only hold empty rows
            cap = max(need, min(cap, self.max_reserve))
        return -(-cap // self.chunk) * self.chunk if self.chunk else cap

    def reserve_write(self, layer: int, idx: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values at reserve index `idx` (a tuple of index tensors / slices)."""
        # In the cache's dtype first: int8 copies and bounds are made from the values the reserve keeps.
        k, v = (x.to(self.rk[layer].device, self.dtype, non_blocking=True) for x in (k, v))
        if self.reserve_int8:
            for store, scale, x in ((self.rk, self.rk_scale, k), (self.rv, self.rv_scale, v)):
                store[layer][idx], scale[layer][idx] = quantize_rows(x, torch.float32)
        else:
            self.rk[layer][idx] = k
            self.rv[layer][idx] = v
            if self.rq:
                self.rq[layer][idx], self.rq_scale[layer][idx] = quantize_rows(k, torch.bfloat16)

    def reserve_append(self, layer: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One evicted token per slot of [0, b) at reserve index at [b] (the scratch index for slots that append
        nothing; on the compute device); k, v: [b, kv_heads, head_dim]."""
        if self.cpu_kernels and not self.reserve_int8:  # the same writes in one C++ op (cache/cpu_writes.cpp)
            rq = (self.rq[layer], self.rq_scale[layer]) if self.rq else (
                torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.bfloat16))
            torch.ops.slam_cpu.reserve_append(self.rk[layer], self.rv[layer], *rq, at, k, v)
            return
        b = k.shape[0]
        self.reserve_write(layer, (self.slot_index[:b], slice(None), at), k, v)

    def append_evicted(self, layer: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_score: torch.Tensor | None = None) -> None:
        """reserve_append, and the scoring keys (k_score where the pool keeps its own, else k) folded into
        their chunks' bounds while two stages run; k, v, k_score: [b, kv_heads, head_dim]. On GPUs in one
        kernel (engine/append.py) where the scoring keys are the reserve's own."""
        if self.fused and not self.cache_positions:  # k_score is given exactly when the pool keeps its own
            return append.append(self, layer, at, k, v)
        self.reserve_append(layer, at, k, v)
        if k_score is not None:
            self.rks[layer][self.slot_index[: k.shape[0]], :, at] = k_score
        if self.two_stage:
            self.summarize_append(layer, at, k if k_score is None else k_score)

    def middle_columns(self, sink: torch.Tensor, take: torch.Tensor, kc: int) -> torch.Tensor:
        """Where the j-th best of kc picks goes in slots [0, b): column sink + j while j < take, else the
        scratch column; sink, take: [b] -> [b, kv_heads, kc]."""
        j = torch.arange(kc, device=sink.device)
        col = torch.where(j < take.view(-1, 1), sink.view(-1, 1) + j, self.budget)
        return col.unsqueeze(1).expand(-1, self.kv_heads, -1)

    def column_rows(self, col: torch.Tensor) -> torch.Tensor:
        """Flat row numbers of columns `col` [b, kv_heads, m] of slots [0, b) -> [b * kv_heads * m]."""
        return (self.heads_base[: col.shape[0]] * (self.budget + 1) + col).view(-1)

    def write_columns(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      ridx: torch.Tensor) -> None:
        """Column rows `rows` (column_rows of [b, kv_heads, m] columns) take keys and values [b, kv_heads, m,
        head_dim], their positions and reserve indices [b, kv_heads, m]. Writes to the scratch column land there."""
        d = self.head_dim
        self.k[layer].view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
        self.v[layer].view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
        self.pos[layer].view(-1).index_copy_(0, rows, pos.reshape(-1))
        self.ridx[layer].view(-1).index_copy_(0, rows, ridx.reshape(-1))
        self.pos[layer][:, :, self.budget] = -1  # the scratch column stays empty

    # --- slots -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        for pos in self.pos:
            pos[slot].fill_(-1)
        for t in self.k + self.v:
            t[slot, :, self.budget].zero_()  # scratch: whatever an idle step wrote there stays out of sight
        for score in self.score:
            score[slot].zero_()
        for ridx in self.ridx:
            ridx[slot].fill_(-1)
        for cand in self.cand:
            cand[slot].zero_()
        if self.cap:
            self.rpos[slot].fill_(-1)
        self.replaced[slot] = 0

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (compaction after a request leaves)."""
        for group in (self.k, self.v, self.pos, self.score, self.ridx, self.rk, self.rv, self.rk_scale, self.rv_scale, self.rks,
                      self.rq, self.rq_scale, self.smin, self.smax, self.sscale, self.cand):
            for t in group:
                t[dst].copy_(t[src])
        if self.cap:
            self.rpos[dst].copy_(self.rpos[src])
        self.replaced[dst] = self.replaced[src]
        self.clear(src)

    def reserve_nbytes_on_device(self) -> int:
        """Bytes of reserve state in device memory (all slots): the summaries always, the tokens unless
        they live in host memory."""
        host = {t.data_ptr() for t in self._pinned}
        groups = (self.rk, self.rv, self.rk_scale, self.rv_scale, self.rks, self.smin, self.smax, self.sscale)
        return sum(t.nbytes for g in groups for t in g if t.data_ptr() not in host)

    def nbytes_per_slot(self) -> int:
        """Bytes of one slot's active cache (keys and values, all layers): what the budget bounds."""
        per = self.kv_heads * self.budget * self.head_dim * self.k[0].element_size()
        return 2 * self.layers * per


def quantize_rows(x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., head_dim] -> int8 rows and one scale per row [...] in `scale_dtype`, which the rows are
    rounded against (a bfloat16 scale is rounded first, so int8 x scale stays nearest to the row)."""
    x = x.float()
    # Times the reciprocal, as CUDA divides by a number: CPUs, GPUs and engine/append.py's kernel then agree.
    s = (x.abs().amax(dim=-1).clamp_min(1e-8) * (1 / 127.0)).to(scale_dtype)
    return (x / s.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), s


_TYPESTR = {torch.int8: "|i1", torch.int16: "<i2", torch.float16: "<f2", torch.float32: "<f4", torch.int64: "<i8"}


def device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A `device` tensor over the pinned, contiguous `host` tensor's memory (no copy): with unified
    addressing the device reads and writes pinned host memory directly. The caller keeps `host` alive."""
    if host.dtype == torch.bfloat16:  # the array interface has no bfloat16: alias the bits as int16
        return device_alias(host.view(torch.int16), device).view(torch.bfloat16)

    class Interface:
        __cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": _TYPESTR[host.dtype],
                                    "data": (host.data_ptr(), False), "version": 3, "strides": None}

    with torch.cuda.device(device):
        return torch.as_tensor(Interface(), device=device)
