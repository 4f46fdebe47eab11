"""Llama-3.x forward pass in plain torch (gpt-fast style): weights come in, activations go out.

No I/O happens here. Per-layer weights are asked of a WeightSource, one group at a time, right
before they are needed: the resident source hands out tensors it holds; the streaming source
waits on the copy event of a GPU group buffer. The same code runs on cuda and cpu.

Tensor parallel (workers.tensor_parallel, checkpoint.sharding): the config and weights are one
rank's shard (local q/kv heads, intermediate rows, output rows of o/down/lm_head), and the model
all_gathers after attention, o_proj, silu(gate)*up, down_proj and lm_head, so that every rank
holds full activations and full logits. Without `tp` the gathers are not there.

Shapes: B batch, T new tokens, S cache slots in use, H heads, K kv heads, D head_dim, V vocab.
Batches are left-padded: row b's real tokens occupy cache slots pad[b].. and its rotary
positions start at 0 there; `key_valid[b, s]` masks the padding slots.
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
    """Static cache: k, v of shape [layers, B, K, max_seq, D], filled slot by slot."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_seq: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_seq, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    @staticmethod
    def nbytes(cfg: LlamaConfig, batch: int, max_seq: int, dtype: torch.dtype) -> int:
        return cfg.kv_cache_bytes(batch, max_seq, dtype.itemsize)


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

    def _output(self, x: torch.Tensor, attn_out: torch.Tensor, o: Weight) -> torch.Tensor:
        """x + o_proj(attention output [.., local q_size]): gathered before and after o."""
        return x + self._gather(self._linear(self._gather(attn_out, "attn_out"), o), "hidden")

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq           # [B, T, D/2] in float32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]  # [B, 1, T, D]

    def _attention(self, x, w: AttnWeights, layer, cache: KVCache, start, cos, sin, mask):
        cfg, (B, T, _) = self.cfg, x.shape
        h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
        q = self._linear(h, w.q).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self._linear(h, w.k).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self._linear(h, w.v).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        end = start + T
        cache.k[layer, :, :, start:end] = k
        cache.v[layer, :, :, start:end] = v
        keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]   # [B, K, S, D]
        rep = cfg.num_heads // cfg.num_kv_heads
        if rep > 1:
            keys = keys[:, :, None].expand(B, cfg.num_kv_heads, rep, end, cfg.head_dim).reshape(
                B, cfg.num_heads, end, cfg.head_dim)
            values = values[:, :, None].expand(B, cfg.num_kv_heads, rep, end, cfg.head_dim).reshape(
                B, cfg.num_heads, end, cfg.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)     # [B, H, T, D]
        return self._output(x, out.transpose(1, 2).reshape(B, T, cfg.q_size), w.o)

    def _ffn(self, x, w: FfnWeights):
        h = rms_norm(x, w.post_norm, self.cfg.rms_norm_eps)
        gated = self._gather(F.silu(self._linear(h, w.gate)) * self._linear(h, w.up), "intermediate")
        return x + self._gather(self._linear(gated, w.down), "hidden")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (host ids, or on any device) -> activations [B, T, hidden] on the device."""
        table = self.resident.embed
        rows = table[tokens.to(table.device)]          # gathered where the table lives
        return rows.to(device=self.device, dtype=self.dtype, non_blocking=True)

    @torch.inference_mode()
    def warm_up_kernels(self, batch: int, prompt_len: int, attn: AttnWeights, ffn: FfnWeights) -> None:
        """Run one layer of a prefill and of a decode step on throwaway data, so that one-time
        costs (kernel loading, library handles, workspaces) are paid now and not in the first pass.
        Tensor parallel: a collective like forward, every rank calls it with the same arguments."""
        from dataclasses import replace

        one = replace(self.cfg, num_layers=1)
        cache = KVCache(one, batch, prompt_len + 1, self.dtype, self.device)
        for tokens, start in ((prompt_len, 0), (1, prompt_len)):
            end = start + tokens
            x = torch.zeros(batch, tokens, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            pos = torch.arange(start, end, device=self.device)[None].expand(batch, tokens)
            cos, sin = self._rope(pos)
            slots = torch.arange(start, end, device=self.device)
            mask = (slots[:, None] >= torch.arange(end, device=self.device)[None, :])[None, None]
            x = self._attention(x, attn, 0, cache, start, cos, sin, mask.expand(batch, 1, tokens, end))
            x = self._ffn(x, ffn)
        x = rms_norm(x[:, -1], self.resident.final_norm, self.cfg.rms_norm_eps)
        self._logits(x).argmax(-1).tolist()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                key_valid: torch.Tensor, all_logits: bool = False, attend: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: [B, T] filling cache slots start..start+T-1; key_valid: [B, max_seq].

        attend (a tree of tokens, workers.spec_decode): [T, A] bool over the last A slots up to
        start+T: new token i sees slot start+T-A+j iff attend[i, j] (itself and its ancestors);
        every slot before those is seen (the accepted sequence). None: causal (A = T, lower
        triangle). key_valid masks padding either way.

        Returns float32 logits [B, V] for the last position, or [B, T, V] with all_logits.
        """
        cfg = self.cfg
        B, T = tokens.shape
        end = start + T
        slots = torch.arange(start, end, device=self.device)
        if attend is None:
            seen = slots[:, None] >= torch.arange(end, device=self.device)[None, :]          # [T, S] causal
        else:
            before = torch.ones(T, end - attend.shape[1], dtype=torch.bool, device=self.device)
            seen = torch.cat((before, attend.to(self.device)), dim=1)                      # [T, S]
        mask = seen[None] & key_valid[:, None, :end]                                         # [B, T, S]
        mask = mask | (slots[:, None] == torch.arange(end, device=self.device)[None, :])[None]  # pad rows see themselves
        mask = mask[:, None]                                                                # [B, 1, T, S]
        cos, sin = self._rope(positions)
        x = self.embed(tokens)
        for layer in range(cfg.num_layers):
            x = self._attention(x, self.weights.attn(layer), layer, cache, start, cos, sin, mask)
            self.weights.release(layer, "attn")
            x = self._ffn(x, self.weights.ffn(layer))
            self.weights.release(layer, "ffn")
        if not all_logits:
            x = x[:, -1]
        return self._logits(rms_norm(x, self.resident.final_norm, cfg.rms_norm_eps))


# --- one pass over several segments (continuous batching, workers.batching) -------------------
# Slot-based KV: a request owns one row of a KVCache [layers, rows, K, max_context, D] and its slot
# s holds its position s (no left padding), so a row's keys are exactly slots 0..pos.

class DecodeRows(NamedTuple):
    """One new token for each of several rows, each at its own position (= the slot it fills)."""
    rows: Sequence[int]
    tokens: Sequence[int]
    positions: Sequence[int]


class PrefillChunk(NamedTuple):
    """One request's prompt tokens filling slots start..start+T-1 of its row; later chunks of the
    same prompt attend to the earlier ones already in the cache."""
    row: int
    tokens: Sequence[int]
    start: int
    wants_logits: bool     # the prompt's last chunk: its last token's logits give the first new token
    all_logits: bool = False   # logits for every token of the chunk (the prompt's logprobs: echo)


def _expand_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    """[B, K, S, D] -> [B, K*rep, S, D], each kv head repeated for its query heads (GQA)."""
    if rep == 1:
        return t
    B, K, S, D = t.shape
    return t[:, :, None].expand(B, K, rep, S, D).reshape(B, K * rep, S, D)


class SegmentPass:
    """The Llama layers applied to decode rows and prefill chunks in one pass: each layer's
    weights are fetched once and multiply every segment's tokens together (concatenated into one
    [1, N, hidden] sequence); only attention runs per segment, against the segment's own row."""

    def __init__(self, model: "Llama"):
        self.model = model

    @torch.inference_mode()
    def forward(self, cache: KVCache, decode: DecodeRows | None, prefills: Sequence[PrefillChunk]) -> torch.Tensor:
        """Returns float32 logits [M, V]: one per decode row (in order), then per prefill chunk (in
        order) one for each of its tokens with all_logits, else one with wants_logits. Rows not
        named are not touched."""
        m, cfg, dev = self.model, self.model.cfg, self.model.device
        decode = decode if decode is not None and len(decode.rows) else None
        tokens, positions = [], []
        if decode is not None:
            tokens += list(decode.tokens)
            positions += list(decode.positions)
        for chunk in prefills:
            tokens += list(chunk.tokens)
            positions += range(chunk.start, chunk.start + len(chunk.tokens))
        if not tokens:
            raise ValueError("a pass needs at least one segment")
        pos = torch.tensor(positions, device=dev)[None]                    # [1, N]
        cos, sin = m._rope(pos)                                            # [1, 1, N, D]
        plan = self._attention_plan(cache, decode, prefills)
        x = m.embed(torch.tensor(tokens)[None])                            # [1, N, hidden]
        for layer in range(cfg.num_layers):
            x = self._attention(x, m.weights.attn(layer), layer, cache, cos, sin, plan)
            m.weights.release(layer, "attn")
            x = m._ffn(x, m.weights.ffn(layer))
            m.weights.release(layer, "ffn")
        # logits only where a token is drawn (every decode row, each prompt's last chunk) or a
        # request asked for its prompt's logprobs: a [N, V] float32 for every pass costs too much
        wanted, offset = [], 0
        if decode is not None:
            wanted += range(len(decode.rows))
            offset = len(decode.rows)
        for chunk in prefills:
            if chunk.all_logits:
                wanted += range(offset, offset + len(chunk.tokens))
            offset += len(chunk.tokens)
            if chunk.wants_logits and not chunk.all_logits:
                wanted.append(offset - 1)
        return m._logits(rms_norm(x[0, wanted], m.resident.final_norm, cfg.rms_norm_eps))

    def _attention_plan(self, cache, decode, prefills) -> list:
        """Per segment, built once per pass: (offset, length, rows, write slots, keys seen, mask)."""
        dev, plan, offset = self.model.device, [], 0
        if decode is not None:
            R = len(decode.rows)
            rows = torch.tensor(list(decode.rows), device=dev)
            slots = torch.tensor(list(decode.positions), device=dev)
            seen = int(max(decode.positions)) + 1
            # each row sees its own slots 0..pos (its other slots hold nothing of its own yet)
            mask = (torch.arange(seen, device=dev)[None, :] <= slots[:, None])[:, None, None]  # [R,1,1,S]
            plan.append((offset, R, rows, slots, seen, mask))
            offset += R
        for chunk in prefills:
            T, end = len(chunk.tokens), chunk.start + len(chunk.tokens)
            if end > cache.max_seq:
                raise ValueError(f"prefill to slot {end} past the cache's {cache.max_seq}")
            new = torch.arange(chunk.start, end, device=dev)
            mask = (new[:, None] >= torch.arange(end, device=dev)[None, :])[None, None]       # [1,1,T,S]
            plan.append((offset, T, chunk.row, chunk.start, end, mask))
            offset += T
        return plan

    def _attention(self, x, w: AttnWeights, layer, cache: KVCache, cos, sin, plan):
        m, cfg, (_, N, _) = self.model, self.model.cfg, x.shape
        H, K, D, rep = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
        q = m._linear(h, w.q).view(1, N, H, D).transpose(1, 2)             # [1, H, N, D]
        k = m._linear(h, w.k).view(1, N, K, D).transpose(1, 2)
        v = m._linear(h, w.v).view(1, N, K, D).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        ck, cv = cache.k[layer], cache.v[layer]                            # [rows, K, max_seq, D]
        outs = []
        for offset, n, rows, slots, seen, mask in plan:
            seg = slice(offset, offset + n)
            if isinstance(rows, torch.Tensor):                             # the decode rows: T = 1 each
                ck[rows, :, slots] = k[0, :, seg].transpose(0, 1)          # [R, K, D] at each row's slot
                cv[rows, :, slots] = v[0, :, seg].transpose(0, 1)
                keys, values = ck[rows, :, :seen], cv[rows, :, :seen]     # [R, K, S, D]
                qs = q[0, :, seg].transpose(0, 1)[:, :, None]              # [R, H, 1, D]
            else:                                                          # one prompt chunk
                ck[rows, :, slots:seen] = k[0, :, seg]
                cv[rows, :, slots:seen] = v[0, :, seg]
                keys, values = ck[rows:rows + 1, :, :seen], cv[rows:rows + 1, :, :seen]
                qs = q[:, :, seg]                                          # [1, H, T, D]
            out = F.scaled_dot_product_attention(qs, _expand_kv(keys, rep), _expand_kv(values, rep),
                                                 attn_mask=mask)           # [B, H, T, D]
            outs.append(out.transpose(1, 2).reshape(n, cfg.q_size))
        out = torch.cat(outs)[None] if len(outs) > 1 else outs[0][None]    # [1, N, H*D]
        return m._output(x, out, w.o)
