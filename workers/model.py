"""Llama-3.x forward pass in plain torch (gpt-fast style): weights come in, activations go out.

No I/O happens here. Per-layer weights are asked of a WeightSource, one group at a time, right
before they are needed: the resident source hands out tensors it holds; the streaming source
waits on the copy event of a GPU group buffer. The same code runs on cuda and cpu.

Tensor parallel (workers.tensor_parallel, checkpoint.sharding): the config and weights are one
rank's shard (local q/kv heads, intermediate rows, output rows of o/down/lm_head), and the model
all_gathers after attention, o_proj, silu(gate)*up, down_proj and lm_head, so that every rank
holds full activations and full logits. Without `tp` the gathers are not there.

One forward, over segments: a pass carries any number of them, each one request's run of new
tokens in its own KV row (a prompt chunk, or the newest token with its draft tree). Every layer's
weights are fetched once and multiply all segments' tokens together as one [1, N, hidden]
sequence; only attention is per segment, against the segment's own row. A row has no padding: its
slot s holds its token at position s (a tree node's position is its depth below the root instead).

Shapes: N tokens in the pass, R rows, S slots seen, H heads, K kv heads, D head_dim, V vocab.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F

from ringllm.checkpoint.llama_config import LlamaConfig
from ringllm.workers.quantized import DEQUANT, SCALED_MM, QuantizedWeight, dense, linear

if TYPE_CHECKING:
    from ringllm.workers.tensor_parallel import TensorParallel

# A Linear weight (q..down, lm_head) is a tensor or a QuantizedWeight (workers.quantized): Weight.
Weight = torch.Tensor | QuantizedWeight


class AttnWeights(NamedTuple):
    input_norm: torch.Tensor  # [hidden]
    q: Weight                 # [H*D, hidden]
    k: Weight                 # [K*D, hidden]
    v: Weight                 # [K*D, hidden]
    o: Weight                 # [hidden, H*D]


class FfnWeights(NamedTuple):
    post_norm: torch.Tensor   # [hidden]
    gate: Weight              # [ffn, hidden]
    up: Weight                # [ffn, hidden]
    down: Weight              # [hidden, ffn]


class ResidentWeights(NamedTuple):
    embed: torch.Tensor       # [V, hidden]; may live in host memory (rows are gathered there)
    final_norm: torch.Tensor  # [hidden]
    lm_head: Weight           # [V, hidden]; the embed tensor itself when tied


class WeightSource(Protocol):
    """Hands the model one group's weights at a time, in forward order."""

    def attn(self, layer: int) -> AttnWeights: ...

    def ffn(self, layer: int) -> FfnWeights: ...

    def release(self, layer: int, kind: str) -> None:
        """All compute reading this group has been issued (its buffer may be reused after it runs)."""


class KVCache:
    """Static cache: k, v of shape [layers, rows, K, max_seq, D]; a request owns one row."""

    def __init__(self, cfg: LlamaConfig, rows: int, max_seq: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_seq, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    @staticmethod
    def nbytes(cfg: LlamaConfig, rows: int, max_seq: int, dtype: torch.dtype) -> int:
        return cfg.kv_cache_bytes(rows, max_seq, dtype.itemsize)

    def move(self, row: int, dst: Sequence[int], src: Sequence[int]) -> None:
        """Copy slots src[i] -> dst[i] of one row, every layer (a verified tree's accepted path
        to where the sequence continues). The source is gathered first: overlaps are safe."""
        if not dst:
            return
        d = torch.tensor(list(dst), device=self.k.device)
        s = torch.tensor(list(src), device=self.k.device)
        self.k[:, row, :, d] = self.k[:, row, :, s]
        self.v[:, row, :, d] = self.v[:, row, :, s]


NO_LOGITS, LAST, ALL = 0, 1, 2      # Segment.logits: none, its last token's, every token's


class Segment(NamedTuple):
    """One request's new tokens in a pass: they fill slots start..start+T-1 of KV row `row`.

    positions: rotary positions (None: start + i, a causal run). attend: [T, A] bool over the
    last A slots up to start+T (A >= T): token i sees slot start+T-A+j iff attend[i, j], and every
    slot before those (the accepted sequence); None: causal (A = T, the lower triangle). A draft
    tree's segment is its root and nodes, each node seeing itself and its ancestors."""
    row: int
    tokens: Sequence[int]
    start: int
    positions: Sequence[int] | None = None
    attend: torch.Tensor | None = None
    logits: int = LAST

    def seen(self) -> torch.Tensor:
        """[T, start+T] bool on the cpu: which of the row's slots each token attends to."""
        T, end = len(self.tokens), self.start + len(self.tokens)
        if self.attend is None:
            return torch.arange(end)[None, :] <= torch.arange(self.start, end)[:, None]
        A = self.attend.shape[1]
        return torch.cat((torch.ones(T, end - A, dtype=torch.bool), self.attend.cpu()), dim=1)

    def logit_count(self) -> int:
        return (0, 1, len(self.tokens))[self.logits]


# Segments up to this many tokens attend together in one batched call (their rows' keys gathered:
# decode steps and draft trees); longer ones (prompt chunks) one by one, on views of their rows.
BATCHED_TOKENS = 64


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with Llama-3.1's 'llama3' scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32, cast back, then scale: the order Hugging Face Llama uses.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _w(t, dtype: torch.dtype) -> torch.Tensor:
    """A Linear weight as the matrix to multiply with: a tensor converted to the compute dtype if
    it is not in it, a QuantizedWeight (FP8) dequantized, just before its one use (what
    Llama._linear multiplies by on the dequant way; the memory plan counts it)."""
    return dense(t, dtype)


class Llama:
    def __init__(self, cfg: LlamaConfig, resident: ResidentWeights, weights: WeightSource,
                 dtype: torch.dtype, device: torch.device | str, fp8_matmul: str = DEQUANT,
                 tp: "TensorParallel | None" = None):
        """fp8_matmul: how FP8 Linears multiply, as quantized.choose_fp8_matmul chose it for this
        device ("dequant" | "scaled_mm"; dense weights ignore it). tp: this rank of a tensor
        parallel model (cfg and weights are then its shard), None on one device."""
        if fp8_matmul not in (DEQUANT, SCALED_MM):
            raise ValueError(f"fp8_matmul={fp8_matmul!r}: {DEQUANT} or {SCALED_MM} (resolve auto first)")
        self.cfg, self.resident, self.weights = cfg, resident, weights
        self.dtype, self.device, self.fp8_matmul = dtype, torch.device(device), fp8_matmul
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.tp = tp

    def _linear(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        return linear(x, w, self.dtype, self.fp8_matmul)

    def _gather(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """The full last dimension from every rank's block of it (ShardPlan `part`); x on one device."""
        return x if self.tp is None else self.tp.gather_part(x, part)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary (each rank computes its vocab rows)."""
        return self._gather(self._linear(h, self.resident.lm_head), "vocab").float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq           # [1, N, D/2] in float32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]  # [1, 1, N, D]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [1, N] (host ids, or on any device) -> activations [1, N, hidden] on the device."""
        table = self.resident.embed
        rows = table[tokens.to(table.device)]          # gathered where the table lives
        return rows.to(device=self.device, dtype=self.dtype, non_blocking=True)

    @torch.inference_mode()
    def forward(self, cache: KVCache, segments: Sequence[Segment]) -> torch.Tensor:
        """One pass over every segment. Returns float32 logits [M, V]: per segment in order, as
        many rows as its `logits` asks (none, its last token's, or every token's). Rows of the
        cache that no segment names are not touched."""
        if not segments:
            raise ValueError("a pass needs at least one segment")
        cfg, dev = self.cfg, self.device
        tokens, positions, wanted, offset = [], [], [], 0
        for seg in segments:
            T = len(seg.tokens)
            if T == 0 or seg.start + T > cache.max_seq:
                raise ValueError(f"row {seg.row}: {T} tokens at slot {seg.start} (the cache has {cache.max_seq})")
            tokens += seg.tokens
            positions += seg.positions if seg.positions is not None else range(seg.start, seg.start + T)
            wanted += range(offset + T - seg.logit_count(), offset + T)
            offset += T
        # token ids stay on the host: the embedding gathers them where its table lives (DRAM for
        # the streaming engine on cuda), so no pass copies ids back from the device
        cos, sin = self._rope(torch.tensor(positions, device=dev)[None])
        plan = _AttentionPlan(segments, dev)
        x = self.embed(torch.tensor(tokens)[None])                           # [1, N, hidden]
        for layer in range(cfg.num_layers):
            x = self._attention(x, self.weights.attn(layer), layer, cache, cos, sin, plan)
            self.weights.release(layer, "attn")
            x = self._ffn(x, self.weights.ffn(layer))
            self.weights.release(layer, "ffn")
        # logits only where asked: a [N, V] float32 for every pass costs too much
        rows = x[0] if len(wanted) == offset else x[0, wanted]
        return self._logits(rms_norm(rows, self.resident.final_norm, cfg.rms_norm_eps))

    def _attention(self, x, w: AttnWeights, layer: int, cache: KVCache, cos, sin, plan: "_AttentionPlan"):
        cfg, N = self.cfg, x.shape[1]
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
        q = self._linear(h, w.q).view(1, N, H, D).transpose(1, 2)             # [1, H, N, D]
        k = self._linear(h, w.k).view(1, N, K, D).transpose(1, 2)
        v = self._linear(h, w.v).view(1, N, K, D).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = plan.run(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                       cache.k[layer], cache.v[layer])                       # [N, H, D]
        attn_out = out.reshape(1, N, cfg.q_size)
        return x + self._gather(self._linear(self._gather(attn_out, "attn_out"), w.o), "hidden")

    def _ffn(self, x, w: FfnWeights):
        h = rms_norm(x, w.post_norm, self.cfg.rms_norm_eps)
        gated = self._gather(F.silu(self._linear(h, w.gate)) * self._linear(h, w.up), "intermediate")
        return x + self._gather(self._linear(gated, w.down), "hidden")

    @torch.inference_mode()
    def warm_up_kernels(self, rows: int, prompt_len: int, attn: AttnWeights, ffn: FfnWeights) -> None:
        """Run one layer of a pass like the engine's biggest (a prompt chunk and `rows` decode
        steps) on throwaway data, so that one-time costs (kernel loading, library handles,
        workspaces) are paid now and not in the first pass. Tensor parallel: a collective like
        forward, every rank calls it with the same arguments."""
        from dataclasses import replace

        one = Llama(replace(self.cfg, num_layers=1), self.resident, OneLayer(attn, ffn), self.dtype, self.device,
                    self.fp8_matmul, self.tp)
        cache = KVCache(one.cfg, rows + 1, prompt_len + 1, self.dtype, self.device)
        prompt = Segment(rows, [0] * prompt_len, 0)
        one.forward(cache, [prompt]).argmax(-1).tolist()
        steps = [Segment(r, [0], prompt_len) for r in range(rows)]
        one.forward(cache, [*steps, Segment(rows, [0], prompt_len)]).argmax(-1).tolist()


class OneLayer:
    """A WeightSource of one layer's groups (a model of num_layers=1 over them): the warm-up's and
    the compute measurement's."""

    def __init__(self, attn: AttnWeights, ffn: FfnWeights):
        self._attn, self._ffn = attn, ffn

    def attn(self, layer: int) -> AttnWeights:
        return self._attn

    def ffn(self, layer: int) -> FfnWeights:
        return self._ffn

    def release(self, layer: int, kind: str) -> None:
        pass


def _grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with grouped query heads (GQA) without repeating the keys: q [B, H, T, D] is regrouped
    as [B, K, rep*T, D] (query head h = k*rep + r reads kv head k, as Llama's repeat_kv has it),
    keys/values [B, K, S, D] are used as they are (views of the cache where they can be), mask
    [B, 1, T, S] is repeated for the rep query heads of a group. Returns [B, H, T, D]."""
    B, H, T, D = q.shape
    K = keys.shape[1]
    rep = H // K
    if rep > 1:
        q = q.reshape(B, K, rep * T, D)
        mask = mask[:, :, None].expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.view(B, H, T, D)


class _AttentionPlan:
    """Where each segment's tokens go and what they see, built once per pass (every layer reuses
    it). Short segments (decode steps, draft trees) attend in one batched call: their rows' keys
    gathered, each padded to the longest, one mask [B, 1, Tmax, S]. Long ones (prompt chunks)
    attend one by one on views of their rows, so a pass never gathers a long context twice."""

    def __init__(self, segments: Sequence[Segment], device):
        self.alone = []                                  # (token offset, row, start, end, mask [1,1,T,end])
        short, offset = [], 0
        for seg in segments:
            T = len(seg.tokens)
            if T <= BATCHED_TOKENS:
                short.append((offset, seg))
            else:
                self._alone(offset, seg, device)
            offset += T
        if len(short) == 1:           # nothing to batch with: views of its row, no gather
            self._alone(*short[0], device)
            short = []
        self.batched = None
        if short:
            T_max = max(len(s.tokens) for _, s in short)
            S = max(s.start + len(s.tokens) for _, s in short)
            mask = torch.zeros(len(short), T_max, S, dtype=torch.bool)
            mask[:, :, 0] = True                         # padding queries see slot 0 (their output is dropped)
            token_at, rows, slots, pad_at = [], [], [], []
            for b, (off, seg) in enumerate(short):
                T = len(seg.tokens)
                mask[b, :T] = False
                mask[b, :T, :seg.start + T] = seg.seen()
                token_at += range(off, off + T)
                rows += [seg.row] * T
                slots += range(seg.start, seg.start + T)
                pad_at += range(b * T_max, b * T_max + T)
            t = lambda values: torch.tensor(values, device=device)   # noqa: E731
            self.batched = (t([s.row for _, s in short]), S, T_max, t(token_at), t(rows), t(slots), t(pad_at),
                            mask.to(device)[:, None])

    def _alone(self, offset: int, seg: Segment, device) -> None:
        self.alone.append((offset, seg.row, seg.start, seg.start + len(seg.tokens), seg.seen().to(device)[None, None]))

    def run(self, q, k, v, ck, cv) -> torch.Tensor:
        """q [N, H, D], k/v [N, K, D] of the pass; ck/cv one layer's cache [rows, K, max_seq, D].
        Writes every token's k/v into its row's slot, then returns the attention output [N, H, D]."""
        out = torch.empty_like(q)
        if self.batched is not None:
            seg_rows, S, T_max, token_at, rows, slots, pad_at, mask = self.batched
            ck[rows, :, slots] = k[token_at]                                 # [n, K, D] at (row, slot)
            cv[rows, :, slots] = v[token_at]
            B, H, D = len(seg_rows), q.shape[1], q.shape[2]
            qs = q.new_zeros(B * T_max, H, D)
            qs[pad_at] = q[token_at]
            qs = qs.view(B, T_max, H, D).transpose(1, 2)                    # [B, H, Tmax, D]
            o = _grouped_attention(qs, ck[seg_rows, :, :S], cv[seg_rows, :, :S], mask)   # keys gathered [B, K, S, D]
            out[token_at] = o.transpose(1, 2).reshape(B * T_max, H, D)[pad_at]
        for offset, row, start, end, mask in self.alone:
            seg = slice(offset, offset + end - start)
            ck[row, :, start:end] = k[seg].transpose(0, 1)
            cv[row, :, start:end] = v[seg].transpose(0, 1)
            o = _grouped_attention(q[seg].transpose(0, 1)[None], ck[row:row + 1, :, :end], cv[row:row + 1, :, :end],
                                   mask)                                   # [1, H, T, D], on views of the row
            out[seg] = o[0].transpose(0, 1)
        return out
