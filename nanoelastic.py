"""
nanoelastic: NVIDIA Nemotron 3 Nano Elastic (30B / 23B / 12B in one checkpoint) in one file.

What differs from a vanilla decoder-only transformer:
  1. Hybrid layers. 52 pre-norm residual layers, h = h + mixer(norm(h)), each with ONE mixer:
     Mamba-2 (M), mixture-of-experts FFN (E) or grouped-query attention (*), in the order of
     `hybrid_override_pattern`. No layer has both an attention and an FFN part.
  2. No positional encoding at all: the Mamba layers carry order; attention is plain causal GQA.
  3. Mamba-2 mixer: in_proj -> causal depthwise conv -> selective state space scan (chunked SSD for
     prefill, an O(1) recurrence step for decode) -> gated RMSNorm in groups -> out_proj.
  4. MoE: a sigmoid router whose bias only chooses the top-6 of 128 experts, weighted by unbiased
     scores renormalised and scaled by 2.5; relu^2 experts without a gate; one shared expert.
  5. FP8: ModelOpt per-tensor FP8 weights stay float8_e4m3fn in memory and are dequantised on use by
     the one `linear()` seam; nothing else in the model knows about FP8.
  6. Nested sizes: the 23B and 12B models are prefixes of the 30B's hidden (D) and routed-FFN (F)
     axes: the same module tree whose tensors are prefix *views* (table NESTED_AXES), no copies.
     One size can also be loaded alone, reading only its prefixes (from_pretrained(size=)).
  7. Caches: KV for attention layers, conv + SSM state for Mamba layers; all of them have the same
     shape at every size, so one cache serves every size and the size can change mid-generation.

Sections 1-6 are the network, in the order of the forward pass; 7-11 the machinery around it
(caches, fast paths, nested sizes, generation, the command line). checkpoint.py reads and writes
the checkpoint format; nanoelastic_kernels.py holds the Triton kernels.

Shapes: B batch, T new tokens, L cached + new tokens, D hidden (d when nested), V vocab, H heads,
P head dim, N SSM state, G groups, E experts, F expert FFN width (f when nested). README.md (How
the model works) gives the equations; tensor names are the HF checkpoint's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import numbers
import operator
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds): nothing to undo yet, exit
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # (run_cli restores it)

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NanoElasticError(ValueError):
    """Bad input: a missing file, a wrong shape, an unknown size, a prompt too long: one line."""


# --------------------------------------------------------------------------------------------------
# 1. Config: HF config.json's field names (checkpoint.py reads and checks config.json)

LAYER_LETTERS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}  # of the layer pattern


def layer_pattern(pattern: str) -> list[str]:  # "MEM*" -> ["mamba", "moe", "mamba", "attention"]
    return [LAYER_LETTERS[letter] for letter in pattern]


def token_id_list(ids: int | list) -> list[int]:  # eos_token_id: one id, or a list of them
    return ids if isinstance(ids, list) else [ids]


@dataclass
class Config:
    """The model's shape in config.json's field names; the defaults are the 30B's.
    layers_block_type: each layer's mixer, 'mamba', 'moe', 'attention' or 'mlp'."""
    vocab_size: int = 131072
    hidden_size: int = 2688
    layers_block_type: list = field(default_factory=lambda: layer_pattern(
        "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"))
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # Mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    time_step_limit: tuple = (0.0, math.inf)
    # MoE (and the dense MLP of '-' layers, unused by this model)
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    intermediate_size: int = 1856
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    mlp_hidden_act: str = "relu2"
    # the rest
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    bos_token_id: int = 1
    eos_token_id: int | list = 2
    pad_token_id: int = 0

    # Derived widths: computed from heads, never from `expand`.
    @property
    def mamba_inner(self) -> int:  # H * P
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:  # x | B | C channels that go through the conv
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:  # z | xBC | dt
        return self.mamba_inner + self.conv_dim + self.mamba_num_heads

    @property
    def cache_layout(self) -> tuple:  # what a Cache's shapes depend on: no nested size changes it
        return (tuple(self.layers_block_type), self.num_key_value_heads, self.head_dim,
                self.mamba_num_heads, self.mamba_head_dim, self.ssm_state_size, self.conv_dim,
                self.conv_kernel)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:  # config.json, checked (checkpoint.py)
        import checkpoint
        return checkpoint.read_config(Path(path))

    def nested_widths(self, d: int, f: int) -> dict:
        """The fields a nested size (hidden d, FFN f) sets: what its prefix views hold (a dense
        MLP narrower than f keeps its width)."""
        return {"hidden_size": d, "moe_intermediate_size": f,
                "intermediate_size": min(f, self.intermediate_size)}

    def sliced(self, d: int, f: int) -> Config:  # the nested model's config
        return Config(**{**self.__dict__, **self.nested_widths(d, f)})


# --------------------------------------------------------------------------------------------------
# 2. The seams: linear() (the one place that knows about FP8) and RMSNorm. A @kernel function is
#    the plain-torch reference of the Triton function of the same name in nanoelastic_kernels.py
#    (section 8).

def kernel(reference):
    """Route a call to kernels.<same name> if use_kernels(its first tensor); .reference: torch's,
    all through (the routed calls it makes run their references too: the MoE's per-expert
    linear(), say, which would otherwise reach the kernels on a GPU)."""
    @functools.wraps(reference)
    def routed(*args, **kwargs):
        fn = getattr(kernels, reference.__name__) if use_kernels(args[0]) else reference
        return fn(*args, **kwargs)

    @functools.wraps(reference)
    def torch_only(*args, **kwargs):
        global KERNELS
        routing, KERNELS = KERNELS, "torch"
        try:
            return reference(*args, **kwargs)
        finally:
            KERNELS = routing
    routed.reference = torch_only
    return routed


@kernel
def linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None,
           plus: Tensor | None = None) -> Tensor:
    """x @ weight^T in the wider of the two dtypes (the router's fp32 weight makes fp32 logits).
    An FP8 weight (weight_scale given) is dequantised on use to x's dtype: weight * scale.
    plus [..., j, N] fp32 (the routed experts' outputs) is summed into the result."""
    if weight_scale is not None:
        weight = (weight.float() * weight_scale).to(x.dtype)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    out = F.linear(x.to(dtype), weight.to(dtype))
    if plus is not None:
        out = (out.float() + plus.sum(-2)).to(dtype)
    return out


class Linear(nn.Module):
    """Bias-free; FP8 when the checkpoint gives it a weight_scale. Stacked experts: weight
    [E, out, in], scales [E]. (The checkpoint's input_scale, for FP8 activations, goes unused.)"""
    def __init__(self, in_features: int, out_features: int, experts: int | None = None):
        super().__init__()
        shape = (out_features, in_features) if experts is None else (experts, out_features,
                                                                     in_features)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.register_buffer("weight_scale", None)

    def forward(self, x: Tensor, plus: Tensor | None = None) -> Tensor:
        return linear(x, self.weight, self.weight_scale, plus)

    def extra_repr(self) -> str:  # from the weight itself, so a nested view shows its nested widths
        *experts, out_features, in_features = self.weight.shape
        return (f"in={in_features}, out={out_features}" + "".join(f", experts={e}" for e in experts)
                + (", fp8" if self.weight_scale is not None else ""))


@kernel
def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1,
             gate: Tensor | None = None) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32, over `groups` equal slices of the
    channels, in x's dtype. With a gate (the Mamba output norm), x is first multiplied by
    silu(gate), and the result is in the gate's dtype (x is the scan's fp32 output there)."""
    xf = x.float() if gate is None else x.float() * F.silu(gate.float())
    xf = xf.unflatten(-1, (groups, -1))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf.flatten(-2)).to(x.dtype if gate is None else gate.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# --------------------------------------------------------------------------------------------------
# 3. Mamba-2: the chunked SSD scan (prefill) and its O(1) recurrence step (decode)

def segsum(a: Tensor) -> Tensor:
    """[..., Q] -> [..., Q, Q]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal.
    A masked cumsum: a difference of cumsums would lose precision to cancellation."""
    Q = a.shape[-1]
    tril = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril
    a = a[..., None].expand(*a.shape, Q)  # a[..., i, j] = a_i
    out = a.masked_fill(~tril(-1), 0).cumsum(-2)  # sum of a_k over j < k <= i
    return out.masked_fill(~tril(0), -math.inf)


@kernel
def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective scan S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t, by chunks.

    x [B, T, H, P], B and C [B, T, G, N] in the activations' dtype; dt [B, T, H] (after softplus)
    and A [H] (negative) fp32; initial_state [B, H, P, N] fp32 or None (zeros). Returns y
    [B, T, H, P] fp32 (without the D skip) and the final state [B, H, P, N] fp32. Head h reads
    group h // (H / G). This reference computes in dt's dtype; the kernel multiplies bf16 x, B, C.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    R = H // G  # heads per group
    # Chunks of Q = chunk tokens [b, c, Q, ...]; the zero-padded tail has dt = 0, changing nothing.
    pad = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, -T % chunk)).unflatten(1, (-1, chunk))
    x, dt, B, C = (pad(t.to(dt.dtype)) for t in (x, dt, B, C))
    x = x.unflatten(3, (G, R))  # [b, c, l, G, R, P]: the R heads of each group side by side
    a = (dt * A).permute(0, 3, 1, 2).unflatten(1, (G, R))  # log-decay per step, [b, G, R, c, l]
    a_cum = a.cumsum(-1)
    xdt = x * dt.unflatten(3, (G, R))[..., None]  # dt_t x_t, [b, c, l, G, R, P]

    # 1. Within each chunk (the quadratic, attention-like part), with the decay mask
    #    L_ij = exp(a_{j+1} + ... + a_i):  y_i = sum_{j<=i} (C_i . B_j) L_ij dt_j x_j.
    L = torch.exp(segsum(a))  # [b, G, R, c, l, s]
    CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)  # [b, G, c, l, s]
    y_diag = torch.einsum("bgcls,bgrcls,bcsgrp->bclgrp", CB, L, xdt)

    # 2. The state each chunk adds by its end: sum_j exp(a_{j+1} + ... + a_last) dt_j x_j B_j^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, G, R, c, l]
    states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", B, decay_to_end, xdt)

    # 3. Between chunks: the state entering chunk c is the decayed sum of all earlier chunks' states
    #    and of the initial state (a recurrence over c, written as one segsum matmul).
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, N)
    initial_state = initial_state.unflatten(1, (G, R))[:, None]  # [b, 1, G, R, P, N]
    states = torch.cat([initial_state, states], dim=1)  # [b, c+1, G, R, P, N]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, G, R, c+1, c+1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. Each chunk's entering state, read out at every position: y_i += exp(a_1 + ... + a_i) S C_i.
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C, states, torch.exp(a_cum))

    y = (y_diag + y_off).flatten(3, 4).flatten(1, 2)[:, :T]  # [b, T, H, P]
    return y, final_state.flatten(1, 2)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One step of the same recurrence on state [B, H, P, N], in place.
    x [B, H, P], dt [B, H], B and C [B, G, N] -> y [B, H, P]."""
    H, G = x.shape[1], B.shape[1]
    B, C = B.repeat_interleave(H // G, dim=1), C.repeat_interleave(H // G, dim=1)  # [B, H, N]
    state.mul_(torch.exp(dt * A)[..., None, None])
    state.add_((dt[..., None] * x)[..., None] * B[:, :, None, :])  # + dt x B^T
    return torch.einsum("bhpn,bhn->bhp", state, C)


def causal_conv(xBC: Tensor, conv_state: Tensor | None, weight: Tensor,
                bias: Tensor | None) -> Tensor:
    """silu(causal depthwise conv) over xBC [B, T, C] after the cached last K-1 inputs (or zeros);
    conv_state [B, C, K-1] becomes the last K-1 inputs."""
    b, T, ch = xBC.shape
    K = weight.shape[-1]
    past = conv_state if conv_state is not None else xBC.new_zeros(b, ch, K - 1)
    xBC = torch.cat([past, xBC.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    if conv_state is not None:
        conv_state.copy_(xBC[:, :, -(K - 1):])
    return F.silu(F.conv1d(xBC, weight, bias, groups=ch)).transpose(1, 2)


def split_heads(xBC: Tensor, H: int, G: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
    """The conv output [..., C] -> x [..., H, P], B [..., G, N], C [..., G, N]."""
    x, B, C = xBC.split([xBC.shape[-1] - 2 * G * N, G * N, G * N], dim=-1)
    return x.unflatten(-1, (H, -1)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))


def discretise(dt: Tensor, dt_bias: Tensor, A_log: Tensor, dt_limit: tuple) -> tuple[Tensor, ...]:
    """Raw dt [..., H] -> softplus(dt + dt_bias), fp32, clamped to the limit; A = -exp(A_log)."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit), -torch.exp(A_log.float())


@kernel
def mamba_step(xBC: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
               conv_bias: Tensor | None, dt_bias: Tensor, A_log: Tensor, D: Tensor, n_groups: int,
               dt_limit: tuple[float, float]) -> Tensor:
    """The decode step of one token after in_proj: xBC [B, C] and raw dt [B, H] -> y [B, H*P] fp32
    (with the D skip, before the gated norm); conv_state and ssm_state are updated in place."""
    H, P, N = ssm_state.shape[1:]
    xBC = causal_conv(xBC[:, None], conv_state, conv_weight, conv_bias)[:, 0]
    x, B, C = split_heads(xBC.float(), H, n_groups, N)
    dt, A = discretise(dt, dt_bias, A_log, dt_limit)
    y = ssd_step(ssm_state, x, dt, A, B, C)
    return (y + D.float()[:, None] * x).flatten(1)  # the D skip connection


class Mamba2Mixer(nn.Module):
    """in_proj -> causal conv -> selective scan -> gated RMSNorm -> out_proj. Its decode state is
    in the cache: conv [B, C, K-1], SSM [B, H, P, N]."""
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.in_proj = Linear(c.hidden_size, c.in_proj_dim)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim,
                                bias=c.use_conv_bias).requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.empty(c.mamba_num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(c.mamba_num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.empty(c.mamba_num_heads), requires_grad=False)
        self.norm = RMSNorm(c.mamba_inner, c.layer_norm_epsilon)
        self.out_proj = Linear(c.mamba_inner, c.hidden_size)

    def forward(self, u: Tensor, cache: Cache | None = None) -> Tensor:  # u [B, T, D] -> [B, T, D]
        c, conv = self.config, self.conv1d
        # z (the gate) [B, T, H*P], xBC (conv input) [B, T, H*P + 2*G*N], dt [B, T, H]
        z, xBC, dt = self.in_proj(u).split([c.mamba_inner, c.conv_dim, c.mamba_num_heads], dim=-1)
        conv_state, ssm_state = (None, None) if cache is None else cache.layers[self.layer_idx]
        if cache is not None and u.shape[1] == 1:  # decode: one recurrence step
            y = mamba_step(xBC[:, 0], dt[:, 0], conv_state, ssm_state, conv.weight, conv.bias,
                           self.dt_bias, self.A_log, self.D, c.n_groups, c.time_step_limit)
            y = y[:, None]  # [B, 1, H*P] fp32
        else:  # prefill: the conv, then the chunked scan from the cached state (or zeros)
            xBC = causal_conv(xBC, conv_state, conv.weight, conv.bias)  # [B, T, C]
            # x [B, T, H, P], B and C [B, T, G, N], in the activations' dtype
            x, B, C = split_heads(xBC, c.mamba_num_heads, c.n_groups, c.ssm_state_size)
            dt, A = discretise(dt, self.dt_bias, self.A_log, c.time_step_limit)  # [B, T, H], [H]
            y, final_state = ssd_chunked(x, dt, A, B, C, c.chunk_size, ssm_state)  # [B, T, H, P]
            if ssm_state is not None:
                ssm_state.copy_(final_state)
            y = (y + self.D.float()[:, None] * x.float()).flatten(2)  # + D skip, [B, T, H*P] fp32
        # Gated RMSNorm: gate y * silu(z) first, then normalise in G groups of H*P/G channels.
        y = rms_norm(y, self.norm.weight, self.norm.eps, groups=c.n_groups, gate=z)  # z's dtype
        return self.out_proj(y)


# --------------------------------------------------------------------------------------------------
# 4. Attention: GQA, no positional encoding; a prefill attends over what the cache's update()
#    returns, a decoded token goes through decode_attention (cache write and attention in one)

@kernel
def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     position: Tensor, window: int) -> Tensor:
    """One decoded token a row: its k, v [B, Hkv, 1, hd] go into the caches [B, Hkv, L, hd] at
    `position` (a device scalar: no host sync), then q [B, Hq, 1, hd] attends over positions
    0..position, all inside the first `window` (Cache.window(): shapes that stay the same, one
    CUDA graph, until the cache outgrows it) -> [B, Hq, 1, hd]. The G = Hq / Hkv query heads of
    KV head j (jG..jG+G-1) are G queries of it, so no backend has to take a GQA flag with a mask."""
    k_cache.index_copy_(2, position.view(1), k)
    v_cache.index_copy_(2, position.view(1), v)
    B, Hq, _, hd = q.shape
    seen = (torch.arange(window, device=q.device) <= position)[None]  # [1, window]
    o = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, hd), k_cache[:, :, :window],
                                       v_cache[:, :, :window], attn_mask=seen, scale=hd ** -0.5)
    return o.reshape(B, Hq, 1, hd)


class Attention(nn.Module):
    """Causal grouped-query attention without positional encoding; K and V go into the cache."""
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:  # x [B, T, D] -> [B, T, D]
        T, hd = x.shape[1], self.config.head_dim
        q = self.q_proj(x).unflatten(-1, (-1, hd)).transpose(1, 2)  # [B, Hq, T, hd]
        k = self.k_proj(x).unflatten(-1, (-1, hd)).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).unflatten(-1, (-1, hd)).transpose(1, 2)
        if cache is not None and T == 1:  # decode: into the cache, and attend over it
            k_cache, v_cache = cache.layers[self.layer_idx]
            o = decode_attention(q, k, v, k_cache, v_cache, cache.position, cache.window())
        else:
            mask = None  # None: plain causal
            if cache is not None:  # all keys and values so far [B, Hkv, L, hd]; what each sees
                k, v, mask = cache.update(self.layer_idx, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None and T > 1,
                                               scale=hd ** -0.5, enable_gqa=True)  # [B, Hq, T, hd]
        return self.o_proj(o.transpose(1, 2).flatten(2))


# --------------------------------------------------------------------------------------------------
# 5. MoE: a sigmoid router whose bias only selects, top-k relu^2 experts, a shared expert

class MLP(nn.Module):
    """down(relu(up(x))^2): the shared expert, and the dense FFN of '-' layers."""
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up_proj = Linear(hidden, ffn)
        self.down_proj = Linear(ffn, hidden)

    def forward(self, x: Tensor, cache: Cache | None = None,
                plus: Tensor | None = None) -> Tensor:  # plus: added in down_proj (see linear)
        up = self.up_proj
        return self.down_proj(relu2_linear(x, up.weight, up.weight_scale), plus)


@kernel
def relu2_linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None) -> Tensor:
    """relu(x @ weight^T)^2: the up-projection and activation of a relu^2 FFN."""
    return F.relu(linear(x, weight, weight_scale)).square()


class Router(nn.Module):
    """Sigmoid scores; the bias only chooses the top-k experts, whose unbiased scores
    (renormalised, times routed_scaling_factor) weight them."""
    def __init__(self, config: Config):
        super().__init__()
        E = config.n_routed_experts
        self.config = config
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(E), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [n, D] -> weights, experts [n, k]
        logits = linear(x, self.weight.float())  # [n, E] fp32, as the checkpoint's router
        return select_experts(logits, self.e_score_correction_bias, self.config)


@kernel
def select_experts(logits: Tensor, bias: Tensor, config: Config) -> tuple[Tensor, Tensor]:
    """Router logits [n, E] -> routing weights [n, k] fp32, chosen experts [n, k]."""
    c = config
    scores = torch.sigmoid(logits)
    choice = scores + bias.float()  # the bias only chooses experts
    if c.n_group > 1:  # group-limited routing: the topk_group groups of best top-2 sums
        groups = choice.unflatten(-1, (c.n_group, -1))
        best = groups.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
        choice = groups.masked_fill(~keep[..., None], -math.inf).flatten(1)
    experts = choice.topk(c.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, experts)
    if c.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * c.routed_scaling_factor, experts  # fp32, indices


@kernel
def moe_experts(x: Tensor, weights: Tensor, experts: Tensor, up_weight: Tensor,
                up_scale: Tensor | None, down_weight: Tensor, down_scale: Tensor | None) -> Tensor:
    """x [n, D], routing weights [n, k] fp32, chosen experts [n, k] -> [n, k, D] fp32, each
    chosen expert's weighted output weights_j down_j(relu(up_j(x))^2), with stacked up_weight
    [E, F, D], down_weight [E, D, F] and FP8 scales [E] (or None)."""
    # The n*k (token, expert) pairs grouped by expert: each expert runs once on its tokens.
    n, k = experts.shape
    pairs = experts.flatten().argsort(stable=True)  # pair p is token p // k's j = p % k
    E = up_weight.shape[0]
    counts = torch.bincount(experts.flatten(), minlength=E).tolist()  # a host sync: fine here
    up_scale = [None] * E if up_scale is None else up_scale  # None: BF16 weights
    down_scale = [None] * E if down_scale is None else down_scale
    pair_weights = weights.flatten()
    out = torch.zeros(n * k, x.shape[-1], device=x.device, dtype=torch.float32)
    for e, group in enumerate(pairs.split(counts)):
        if len(group):
            h = F.relu(linear(x[group // k], up_weight[e], up_scale[e])).square()
            y = linear(h, down_weight[e], down_scale[e]).float()
            out[group] = y * pair_weights[group, None]
    return out.view(n, k, -1)


class MoE(nn.Module):
    """The routed top-k relu^2 experts (stacked: up [E, F, D], down [E, D, F]) plus one shared
    expert that every token takes."""
    def __init__(self, config: Config):
        super().__init__()
        E, D, Fe = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate = Router(config)
        self.experts = nn.Module()
        self.experts.up_proj = Linear(D, Fe, experts=E)
        self.experts.down_proj = Linear(Fe, D, experts=E)
        self.shared_experts = MLP(D, config.moe_shared_expert_intermediate_size)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:  # x [B, T, D] -> [B, T, D]
        flat = x.flatten(0, 1)  # [n = B*T, D]
        weights, experts = self.gate(flat)  # [n, k]
        up, down = self.experts.up_proj, self.experts.down_proj
        routed = moe_experts(flat, weights, experts, up.weight, up.weight_scale, down.weight,
                             down.weight_scale)  # [n, k, D] fp32
        # shared(x) + the routed outputs, summed inside the shared down-projection: one rounding
        return self.shared_experts(x, plus=routed.view(*x.shape[:-1], *routed.shape[1:]))


# --------------------------------------------------------------------------------------------------
# 6. The block and the model

MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "moe": lambda c, i: MoE(c),
          "mlp": lambda c, i: MLP(c.hidden_size, c.intermediate_size)}


class Block(nn.Module):
    """One pre-norm residual layer; its mixer is Mamba-2, attention, MoE (or a dense MLP)."""
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MIXERS[config.layers_block_type[layer_idx]](config, layer_idx)

    def forward(self, h: Tensor, cache: Cache | None = None) -> Tensor:  # [B, T, D] -> [B, T, D]
        return h + self.mixer(self.norm(h), cache)


class Backbone(nn.Module):
    """Embeddings, the hybrid layers in the order of layers_block_type, the final norm."""
    def __init__(self, config: Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size).requires_grad_(False)
        self.layers = nn.ModuleList(Block(config, i) for i in range(len(config.layers_block_type)))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, tokens: Tensor, cache: Cache | None = None) -> Tensor:  # [B, T] -> [B, T, D]
        h = self.embeddings(tokens)  # no positions: the Mamba layers carry order
        for layer in self.layers:
            h = layer(h, cache)  # h + mixer(norm(h))
        return self.norm_f(h)


class Model(nn.Module):
    """Nemotron 3 Nano Elastic. Every size of the checkpoint is this one module tree:

        model = Model.from_pretrained(folder)
        logits = model(tokens, size="23B")        # tokens [B, T] -> fp32 logits [B, T, V]
        small = model.nested("12B")               # the same weights as prefix views, no copy
        cache = model.new_cache(1, 4096)          # one cache for every size:
        logits = model(tokens, cache, "12B")      # ... which then holds the tokens
        for t in generate(model, prompt, 100, size="23B", switch=Switch("30B", after=50)): ...

    Sizes: '30B', '23B', '12B' (any case), 'HIDDENxFFN' prefixes, None (the checkpoint's own)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self._nested = {}  # (d, f) -> this module tree with prefix views of every tensor
        # the ids that end a generation; from_pretrained: the checkpoint's generation_config.json's
        self.stop_tokens = tuple(token_id_list(config.eos_token_id))
        self.is_nested = False  # True for such a tree (model.nested(size)): its tensors are views

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: Cache | None = None, size: str | None = None,
                last_only: bool = False) -> Tensor:
        """tokens [B, T] -> fp32 logits [B, T, V] ([B, 1, V] with last_only), at nested `size`. With
        a cache, the tokens continue what it holds, and it holds them afterwards."""
        model = self.nested(size)
        tokens = checked_tokens(tokens, self.config.vocab_size).to(self.lm_head.weight.device)
        if cache is not None:
            check_cache(cache, self).begin(*tokens.shape)
        if use_kernels(tokens):  # the same sums, each residual add fused with the next norm
            h = fused_backbone(model.backbone, tokens, cache)
        else:
            h = model.backbone(tokens, cache)  # [B, T, D]
        logits = model.lm_head(h[:, -1:] if last_only else h).float()  # [B, T, V]
        if cache is not None:
            cache.end(tokens.shape[1])
        return logits

    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        """An empty Cache for `batch_size` sequences of up to `max_len` tokens, for every size."""
        dtype = self.backbone.embeddings.weight.dtype
        return Cache(self.config, batch_size, max_len, self.lm_head.weight.device, dtype)

    def nested(self, size: str | None) -> Model:
        """This model at a nested size: the same modules, its tensors prefix views (section 9)."""
        return nested_model(self, size)

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(): new tensors, new views
        self._forget_views("move or convert")
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args, **kwargs):  # assign=True puts new tensors in: new views
        self._forget_views("load a state dict into")
        return super().load_state_dict(*args, **kwargs)

    def _forget_views(self, action: str) -> None:
        if self.is_nested:  # its new tensors would be copies, which the full model then runs on
            raise NanoElasticError(f"cannot {action} model.nested(size): its tensors are views of "
                                   f"the full model's; do it to the full model")
        self._nested = {}

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) makes views of its own tensors
        return {**super().__getstate__(), "_nested": {}}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, verbose: bool = True,
                        size: str | None = None) -> Model:
        """Load an HF-format checkpoint folder, FP8 or BF16, sharded or not (checkpoint.py). dtype
        is the compute dtype (bfloat16 by default; float32 for exact tests); FP8 stays FP8. With
        `size`, only that nested size's prefixes are read: the model is the standalone model of
        that size (the one slice.py writes), in that much memory, and its own sizes are the ones
        nested in it."""
        import checkpoint
        return checkpoint.load_model(Path(path), device, dtype, verbose, size)

    def num_params(self, size: str | None = None) -> tuple[int, int]:
        """(total, active per token) parameters at `size`; active counts k of the E experts."""
        c, model = self.config, self.nested(size)
        total = sum(p.numel() for p in model.parameters())
        named = model.named_parameters()
        idle = sum(p.numel() for n, p in named if ".experts." in n and "shared" not in n)
        return total, total - idle + idle * c.num_experts_per_tok // c.n_routed_experts

    def extra_repr(self) -> str:
        c = self.config
        return f"size {c.hidden_size}x{c.moe_intermediate_size} (hidden x expert FFN)"


# ==================================================================================================
# The machinery: everything below serves the network above and changes none of its math.
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
# 7. Caches

def prefix_causal(T: int, L: int, like: Tensor):
    """What T new queries after L - T cached positions see: query i, keys 0..L - T + i. Where flash
    attention runs (16 bits on an sm_80+ GPU), torch's lower-right causal bias, which flash takes
    with no mask in memory (given a mask beside GQA, a backend without GQA support falls back to
    the math path, T x L scores a head); elsewhere that mask as bools [T, L]."""
    if (like.is_cuda and like.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(like.device) >= (8, 0)
            and torch.backends.cuda.flash_sdp_enabled()):
        # imported here: the module brings in torch._dynamo, seconds of start-up for every script
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(T, L)
    positions = torch.arange(L, device=like.device)
    return positions <= positions[L - T:, None]


class Cache:
    """Preallocated decode state, the same shapes at every nested size: K and V [B, Hkv, max_len,
    hd] per attention layer, conv [B, C, K-1] and SSM [B, H, P, N] fp32 per Mamba layer. It holds
    `length` tokens (`position`: the same count on the device, which a decode step reads)."""

    def __init__(self, config: Config, batch_size: int, max_len: int, device, dtype):
        c = config
        check_int("new_cache's batch_size", batch_size, 1)
        check_int("new_cache's max_len", max_len, 1)
        if max_len > c.max_position_embeddings:
            raise NanoElasticError(f"max_len {max_len} > max_position_embeddings "
                                   f"{c.max_position_embeddings}")
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.layout, self.dtype = c.cache_layout, dtype  # which models it fits: check_cache()
        self.position = torch.zeros((), dtype=torch.int64, device=device)
        self.interrupted = False  # set while a step is half-written (Ctrl-C): see begin()
        self.ids = []  # the ids it holds (and maybe one more) when generate() wrote last, else None
        self.kinds, self.layers = c.layers_block_type, []
        zeros = functools.partial(torch.zeros, device=device, dtype=dtype)
        for kind in c.layers_block_type:
            if kind == "attention":
                kv = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
                self.layers.append((zeros(kv), zeros(kv)))
            elif kind == "mamba":
                ssm = (batch_size, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)
                conv = zeros(batch_size, c.conv_dim, c.conv_kernel - 1)
                self.layers.append((conv, zeros(ssm, dtype=torch.float32)))
            else:
                self.layers.append(None)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Prefill: write attention layer `layer`'s new keys and values [B, Hkv, T, hd]; return
        the keys and values to attend over and the mask of what each new query sees (None:
        causal). A decoded token (T = 1) goes through decode_attention instead, at the device-side
        position (no host sync) over window() positions of the cache."""
        k_cache, v_cache = self.layers[layer]
        T = k.shape[2]
        start = self.length
        k_cache[:, :, start:start + T] = k
        v_cache[:, :, start:start + T] = v
        mask = None if start == 0 else prefix_causal(T, start + T, k)
        return k_cache[:, :, :start + T], v_cache[:, :, :start + T], mask

    def window(self) -> int:  # the KV positions a decoded token sees: > length, the next power
        # of two (at least 256), but never more than max_len
        return min(self.max_len, max(256, 1 << self.length.bit_length()))

    def begin(self, batch_size: int, new_tokens: int) -> None:
        """Check that a step of `new_tokens` per row fits; the cache is mid-step until end()."""
        self.check_step(batch_size, new_tokens)
        self.interrupted = True

    def check_step(self, batch_size: int, new_tokens: int) -> None:
        """Raise if the cache is mid-step or a step of `new_tokens` per row would not fit."""
        if self.interrupted:
            raise NanoElasticError("this cache was interrupted in the middle of a step: "
                                   "reset it and prefill again")
        if batch_size != self.batch_size:
            raise NanoElasticError(f"batch size {batch_size} != the cache's {self.batch_size}")
        if self.length + new_tokens > self.max_len:
            raise NanoElasticError(f"cache overflow: {self.length} cached + {new_tokens} new "
                                   f"tokens > max_len {self.max_len}")

    def end(self, new_tokens: int) -> None:  # the step begun by begin() is in the cache
        self.position += new_tokens  # on the device: a CUDA graph's replay advances it too
        self.length += new_tokens
        self.interrupted, self.ids = False, None  # which ids: generate() says, after this

    def reset(self) -> None:  # empty, keeping the memory: what a re-prefill starts from
        for state in self.layers:
            for t in state or ():
                t.zero_()
        self.position.zero_()
        self.length, self.interrupted, self.ids = 0, False, []

    def held(self, n: int) -> list[tuple[Tensor, ...]]:  # per layer, the state of n tokens
        return [tuple(t[:, :, :n] if kind == "attention" else t for t in state or ())
                for kind, state in zip(self.kinds, self.layers)]

    def snapshot(self) -> tuple[int, list]:
        """A copy of the state after the first `length` tokens (KV up to there, conv and SSM
        states). Mamba states cannot be rewound: this is how to go back to a prefix (chat.py)."""
        self.check_step(self.batch_size, 0)  # not a cache interrupted mid-step
        return self.length, [tuple(t.clone() for t in state) for state in self.held(self.length)]

    def restore(self, snapshot: tuple[int, list]) -> None:
        """Go back to a snapshot(): the cache holds its prefix again, nothing after it."""
        n, saved = snapshot
        held = self.held(n)
        like = lambda states: [[(t.shape, t.dtype) for t in state] for state in states]
        if not 0 <= n <= self.max_len or like(saved) != like(held):
            raise NanoElasticError("this snapshot is not of this cache: restore it into the cache "
                                   "it came from, or one that new_cache() made alike")
        for state, copies in zip(held, saved):
            for t, copy_ in zip(state, copies):
                t.copy_(copy_)
        self.position.fill_(n)
        self.length, self.interrupted, self.ids = n, False, None


def check_cache(cache: Cache, model: Model) -> Cache:
    """`cache` if `model` (at any size) can run on it: a Cache of its layers, dtype and device."""
    if not isinstance(cache, Cache):
        raise NanoElasticError(f"cache must be a Cache (model.new_cache()), got a "
                               f"{type(cache).__name__}; a size goes as size=...")
    weight = model.backbone.embeddings.weight
    if (cache.layout, cache.dtype, cache.position.device) != (model.config.cache_layout,
                                                              weight.dtype, weight.device):
        raise NanoElasticError(f"this cache is not of this model (its layers, {cache.dtype} on "
                               f"{cache.position.device}): make one with model.new_cache()")
    return cache


# --------------------------------------------------------------------------------------------------
# 8. Fast paths at the seams: the kernels, the fused residual add, CUDA-graph decoding. Each is
#    checked against the plain path by a test (test_nanoelastic.py, test_kernels.py).
#
# KERNELS, from NANOELASTIC_KERNELS at import: "" (unset) = Triton on CUDA tensors of an sm_80+ GPU;
# "torch" = the torch references everywhere; "triton" = Triton everywhere (CPU tensors need
# TRITON_INTERPRET=1).

try:
    import nanoelastic_kernels as kernels
except ImportError:  # no Triton (e.g. macOS): the references run everywhere
    kernels = None
KERNELS = os.environ.get("NANOELASTIC_KERNELS", "")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_kernels(t: Tensor) -> bool:
    """Whether calls on tensor t go to nanoelastic_kernels.py (KERNELS, see above)."""
    if KERNELS not in ("", "torch", "triton"):
        raise NanoElasticError(f"NANOELASTIC_KERNELS={KERNELS!r}: use 'torch' or 'triton', or "
                               f"leave it unset")
    if KERNELS == "triton" and kernels is None:
        raise NanoElasticError("NANOELASTIC_KERNELS=triton but Triton is not installed")
    if KERNELS == "triton" and not t.is_cuda and not INTERPRET:
        raise NanoElasticError("NANOELASTIC_KERNELS=triton on the CPU needs TRITON_INTERPRET=1 "
                               "(Triton's interpreter); or leave NANOELASTIC_KERNELS unset to use "
                               "the torch references")
    return KERNELS == "triton" or (KERNELS == "" and t.is_cuda and kernels is not None
                                   and kernels.supported(t.device))


@kernel
def add_rms_norm(h: Tensor, update: Tensor | None, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """The residual add fused with the next norm: (rms_norm(h + update), h + update)."""
    if update is not None:
        h = h + update
    return rms_norm(h, weight, eps), h


def fused_backbone(backbone: Backbone, tokens: Tensor, cache: Cache | None = None) -> Tensor:
    """Backbone.forward with each residual add fused into the next norm (add_rms_norm: one pass
    over h instead of two per layer): the same sums in the same order."""
    h, update = backbone.embeddings(tokens), None
    for layer in backbone.layers:
        x, h = add_rms_norm(h, update, layer.norm.weight, layer.norm.eps)  # h += update; norm(h)
        update = layer.mixer(x, cache)
    return add_rms_norm(h, update, backbone.norm_f.weight, backbone.norm_f.eps)[0]


class DecodeGraph:
    """The decode step on one cache: step(tokens [B, 1], size) -> fp32 logits [B, V], the cache one
    token longer. On a GPU with the kernels, CUDA graphs: one launch per token instead of hundreds
    (the logits are then a static buffer that the next step overwrites), one per size and KV window
    (section 7), each captured when first needed. Elsewhere (the torch MoE reference syncs with the
    host), model() itself. It holds the cache, which knows nothing of it: dropping it frees both.
    A replay does not range-check the token ids (reading them would be a host sync): model() does,
    as does generate(), whose ids are sampled or checked."""

    def __init__(self, model: Model, cache: Cache):
        self.model, self.cache = model, check_cache(cache, model)
        self.graphs = {}  # (size, window) -> (graph, static tokens, static logits)
        self.pools = {}  # size -> the memory pool that its graphs share
        self.capture_graphs = cache.position.is_cuda and use_kernels(cache.position)

    def __call__(self, tokens: Tensor, size: str | None = None) -> Tensor:
        cache = self.cache
        if (not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1
                or tokens.dtype not in TOKEN_DTYPES):
            got = (f"{tokens.dtype} of shape {list(tokens.shape)}" if isinstance(tokens, Tensor)
                   else type(tokens).__name__)
            raise NanoElasticError(f"a decode step takes token ids (int64 or int32) of shape "
                                   f"[batch, 1], got {got}")
        if not self.capture_graphs:
            return self.model(tokens, cache, size, last_only=True)[:, -1]
        sized = parse_size(size, self.model.config)
        key = (sized, cache.window())
        if key not in self.graphs:
            cache.check_step(*tokens.shape)  # before a capture records anything on the cache
            self.graphs[key] = self.capture(size, sized, tokens.shape[0])
        graph, static_tokens, logits = self.graphs[key]
        cache.begin(*tokens.shape)
        static_tokens.copy_(tokens)
        graph.replay()
        cache.length += 1  # the replay advanced cache.position
        cache.interrupted, cache.ids = False, None
        return logits

    def capture(self, size: str | None, sized: tuple[int, int], batch: int):
        """Record the decode step at the cache's window; the cache is left as it was."""
        model, cache = self.model, self.cache
        tokens = torch.zeros(batch, 1, dtype=torch.int64, device=cache.position.device)
        # Warm up (Triton compiles, SDPA picks its kernel) on a scratch cache, not the real one.
        scratch = model.new_cache(cache.batch_size, cache.max_len)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    scratch.length = cache.length  # the same window
                    model(tokens, scratch, size, last_only=True)
        finally:  # even when interrupted: the scratch's memory is reused only once this is done
            torch.cuda.current_stream().wait_stream(stream)
        del scratch
        graph, length, interrupted = torch.cuda.CUDAGraph(), cache.length, cache.interrupted
        pool = self.pools.setdefault(sized, torch.cuda.graph_pool_handle())
        try:
            with torch.cuda.graph(graph, pool=pool):  # records the kernels on the cache's tensors
                logits = model(tokens, cache, size, last_only=True)[:, -1]
        finally:
            cache.length, cache.interrupted = length, interrupted  # recorded, not run
        return graph, tokens, logits


# --------------------------------------------------------------------------------------------------
# 9. Nested sizes, in one place: which tensor axes shrink, the size names, the nested module trees

SIZE_PRESETS = {"30B": (2688, 1856), "23B": (2304, 1600), "12B": (1920, 960)}  # (hidden, FFN)

# For each tensor, which of its trailing axes shrink: "d" = hidden, "f" = routed-expert (or dense
# MLP) FFN, "." = unchanged. A stacked expert tensor [E, F, D] matches on its last two axes. Tensors
# not listed (conv1d, A_log, D, dt_bias, the Mamba gated-norm weight, e_score_correction_bias, every
# *_scale) keep their shape at every size. The model's views and slice.py both read this table.
NESTED_AXES = [
    (r"embeddings\.weight|lm_head\.weight", ".d"),
    (r"(q|k|v)_proj\.weight|in_proj\.weight|gate\.weight|shared_experts\.up_proj\.weight", ".d"),
    (r"out_proj\.weight|o_proj\.weight|shared_experts\.down_proj\.weight", "d."),
    (r"layers\.\d+\.norm\.weight|norm_f\.weight", "d"),
    (r"experts\.(\d+\.)?up_proj\.weight|mixer\.up_proj\.weight", "fd"),  # routed experts, dense MLP
    (r"experts\.(\d+\.)?down_proj\.weight|mixer\.down_proj\.weight", "df"),
]


def nested_axes(name: str) -> str:  # the NESTED_AXES entry of a tensor name ('': none shrinks)
    return next((a for pattern, a in NESTED_AXES if re.search(rf"(^|\.)({pattern})$", name)), "")


def nested_index(name: str, ndim: int, d: int, f: int) -> tuple[slice, ...]:
    """Tensor `name`'s prefix at nested size (d, f) as one slice per axis: [:, :f, :d] etc."""
    prefix = {"d": slice(0, d), "f": slice(0, f), ".": slice(None)}
    axes = nested_axes(name)
    return (slice(None),) * (ndim - len(axes)) + tuple(prefix[a] for a in axes)


def nested_view(name: str, t: Tensor, d: int, f: int) -> Tensor:
    """The prefix view of tensor `name` at nested size (d, f): t[..., :f, :d] etc. Never a copy."""
    return t[nested_index(name, t.dim(), d, f)]


def nested_model(model: Model, size: str | None) -> Model:
    """`model` at a nested size: a copy of its module tree whose tensors are nested_view()s of its
    own and whose config is the sliced one (made once, kept in model._nested). The module code runs
    unchanged on the nested prefix of every weight."""
    d, f = parse_size(size, model.config)
    if (d, f) == (model.config.hidden_size, model.config.moe_intermediate_size):
        return model
    if (d, f) not in model._nested:
        # deepcopy's memo: the objects in it are replaced by these, not copied
        memo = {id(model.config): model.config.sliced(d, f)}
        for name, p in model.named_parameters():
            memo[id(p)] = nn.Parameter(nested_view(name, p, d, f), requires_grad=False)
        for b in model.buffers():
            memo[id(b)] = b
        nested = model._nested[(d, f)] = copy.deepcopy(model, memo)
        nested.is_nested = True
        nested.backbone.embeddings.embedding_dim = d  # its repr reads this attribute
    return model._nested[(d, f)]


def preset_sizes(config: Config) -> list[str]:  # the named sizes (30B, 23B, 12B) nested in config
    return [n for n, (d, f) in SIZE_PRESETS.items()
            if d <= config.hidden_size and f <= config.moe_intermediate_size]


def parse_size(size: str | None, config: Config) -> tuple[int, int]:
    """'30B' | '23B' | '12B' | 'HIDDENxFFN' | None (the checkpoint's own) -> (d, f), checked."""
    D, Fe = config.hidden_size, config.moe_intermediate_size
    if size is None:
        return D, Fe
    name = str(size).strip().upper()  # 12b and 2304X1600 are what a user means too
    if name in SIZE_PRESETS:
        d, f = SIZE_PRESETS[name]
    elif re.fullmatch(r"\d+X\d+", name):
        d, f = map(int, name.split("X"))
    else:
        fit = preset_sizes(config)
        fit = ", ".join(fit) + " or " if fit else ""
        raise NanoElasticError(f"unknown size {size!r}: use {fit}HIDDENxFFN up to {D}x{Fe} "
                               f"(this checkpoint's widths)")
    if not (0 < d <= D and 0 < f <= Fe):
        raise NanoElasticError(f"size {size} = hidden {d} x expert FFN {f} does not fit in this "
                               f"model ({D}x{Fe})")
    return d, f


def size_name(size: str) -> str:
    """How a size is shown: 12b -> 12B, 192X96 -> 192x96."""
    size = size.strip()
    if size.upper() in SIZE_PRESETS:
        return size.upper()
    return size.lower() if re.fullmatch(r"\d+[xX]\d+", size) else size


def model_size(size: str, config: Config, size_names: dict[str, str] | None = None) -> str:
    """The size as the model knows it (any case; `size_names` maps names to stand-ins, as the
    demo's for 30B/23B/12B); a size that does not fit `config` fails here, with a hint naming the
    sizes that do."""
    given, size = size, (size_names or {}).get(size.strip().upper(), size)
    try:
        parse_size(size, config)
    except NanoElasticError as e:
        fits = []  # the named sizes that fit this checkpoint
        for name, real in (size_names or {p: p for p in SIZE_PRESETS}).items():
            try:
                parse_size(real, config)
                fits.append(name if name == real else f"{name} (= {real})")
            except NanoElasticError:
                pass
        # the hint below replaces parse_size's; the size as it was given (the demo's 30B)
        problem = str(e).split(": use ")[0]
        problem = problem.replace(f"size {size} ", f"size {size_name(given)} ", 1)
        named = ", ".join(fits) + ", or " if fits else ""
        raise NanoElasticError(f"{problem}: use {named}HIDDENxFFN up to "
                               f"{config.hidden_size}x{config.moe_intermediate_size}") from e
    return size_name(size)


# --------------------------------------------------------------------------------------------------
# 10. Sampling and generation: prefill, decode, sample, and change size mid-stream

MAX_SEED = 2**63 - 1  # the largest seed generate() takes: int64's largest
TOKEN_DTYPES = (torch.int64, torch.int32)  # the dtypes of token ids that model() takes


class Token(NamedTuple):
    """One generated token: its id and the nested size that wrote it (None = the full size)."""
    id: int
    size: str | None


@dataclass
class Switch:
    """Change size during a generation: right after `on_token` appears (e.g. </think>), or once
    `after` new tokens are out (a thinking budget; then `on_token`, if set, is forced first, closing
    the thought). mode "transplant" keeps the caches the old size filled (free, approximate);
    "reprefill" rebuilds them with the new size from all tokens so far (exact, costs one
    prefill; none when the new size is the old one, by whatever name)."""
    size: str | None
    on_token: int | None = None
    after: int | None = None
    mode: str = "transplant"

    def __post_init__(self):
        if self.mode not in ("transplant", "reprefill"):
            raise NanoElasticError(f"unknown switch mode {self.mode!r}: use transplant or "
                                   f"reprefill")
        if self.on_token is None and self.after is None:
            raise NanoElasticError("a Switch needs on_token, after, or both")
        if self.on_token is not None:
            check_int("Switch on_token (a token id)", self.on_token, 0)
        if self.after is not None:  # 0: on_token forced first; without one, size= says it
            check_int("Switch after (new tokens)", self.after,
                      0 if self.on_token is not None else 1)

    def forced(self, n: int) -> int | None:
        """The token written instead of a sampled one as new token n: on_token, once over budget."""
        return self.on_token if self.after is not None and n > self.after else None

    def due(self, n: int, token: int) -> bool:
        """Whether the size changes after new token n: it is on_token, or (if none) n >= after."""
        return token == self.on_token if self.on_token is not None else n >= self.after


def check_int(name: str, value, least: int, most: int | None = None) -> None:
    """One clear error unless value is an integer (not a bool) in least..most."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least
            or (most is not None and value > most)):
        bound = f">= {least}" if most is None else f"in {least}..{most}"
        raise NanoElasticError(f"{name} must be an integer {bound}, got {value!r}")


def check_sampling(temperature: float, top_p: float, top_k: int,
                   names: tuple[str, str, str] = ("temperature", "top_p", "top_k")) -> None:
    """One clear error for each sampling setting of the wrong type or out of range; `names` are
    the settings' names in it (a command line's flags, say)."""
    for name, value in [(names[0], temperature), (names[1], top_p)]:
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise NanoElasticError(f"{name} must be a finite number, got {value!r}")
    check_int(f"{names[2]} (0 = no limit)", top_k, 0)
    if not temperature >= 0:
        raise NanoElasticError(f"{names[0]} must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise NanoElasticError(f"{names[1]} must be in (0, 1], got {top_p}")


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> Tensor:
    """logits [V] fp32 -> token id (0-d tensor). temperature 0 = greedy; else softmax(logits /
    temperature) kept to the top_k most likely tokens (0 = all) and to the smallest set whose
    probability reaches top_p (1 = all). No host sync."""
    check_sampling(temperature, top_p, top_k)
    if logits.dim() != 1:
        raise NanoElasticError(f"sample takes one position's logits [V], got {list(logits.shape)}")
    if temperature == 0:
        return logits.argmax()
    logits = (logits - logits.max()) / temperature  # <= 0: a tiny temperature cannot overflow
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -math.inf)
    if top_p < 1.0:  # drop the tokens after the set; the first is always kept
        probs, order = logits.softmax(-1).sort(descending=True)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    probs = logits.softmax(-1)
    # Sampling by argmax(p / Exp(1)) draws from p (the exponential race) without a host sync.
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax()


def checked_tokens(tokens: Tensor, vocab_size: int) -> Tensor:
    """Token ids [B, T], at least one per row, every id < vocab_size. The range check reads the ids
    on the host: free on the CPU, a sync on a GPU, skipped while DecodeGraph captures."""
    integer = isinstance(tokens, Tensor) and tokens.dtype in TOKEN_DTYPES
    if not integer or tokens.dim() != 2:
        raise NanoElasticError("tokens must be an integer tensor of shape [batch, seq_len]")
    if tokens.numel() == 0:
        raise NanoElasticError(f"tokens of shape {list(tokens.shape)}: need at least one token per "
                               f"row")
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        return tokens
    check_range(int(tokens.min()), int(tokens.max()), vocab_size)
    return tokens


def check_range(low: int, high: int, vocab_size: int) -> None:  # the lowest and highest token id
    if low < 0 or high >= vocab_size:
        raise NanoElasticError(f"token id out of range: {low}..{high} not in 0..{vocab_size - 1}")


def prompt_ids(prompt: list[int] | Tensor, vocab_size: int) -> list[int]:
    """A prompt as a list of ints: from a list, a 1-D tensor or a [1, T] tensor (one sequence)."""
    what = f"a {type(prompt).__name__}"
    if isinstance(prompt, Tensor):
        what = f"a {prompt.dtype} tensor of shape {list(prompt.shape)}"
        prompt = prompt[0] if prompt.dim() == 2 and prompt.shape[0] == 1 else prompt
        prompt = prompt.tolist() if prompt.dim() == 1 and prompt.dtype in TOKEN_DTYPES else None
    try:
        ids = list(prompt)
        if isinstance(prompt, (str, bytes)) or any(isinstance(t, bool) for t in ids):
            raise TypeError  # text, or bools: not token ids
        ids = [operator.index(t) for t in ids]
    except TypeError:  # not a sequence of ints (None, floats, strings)
        ids = None
    if ids is None:
        raise NanoElasticError(f"prompt must be token ids: a list of ints, or an int64 or int32 "
                               f"tensor of shape [T] or [1, T], got {what}")
    if not ids:
        raise NanoElasticError("empty prompt")
    check_range(min(ids), max(ids), vocab_size)
    return ids


def prefill(model: Model, tokens: Tensor, cache: Cache, size: str | None = None,
            chunk: int = 8192) -> Tensor:
    """Feed tokens [B, T] into `cache` in pieces of `chunk` tokens (bounded activation memory)
    -> fp32 logits [B, V] of the last token."""
    checked_tokens(tokens, model.config.vocab_size)
    check_int("prefill's chunk", chunk, 1)
    for i in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, i:i + chunk], cache, size, last_only=True)
    return logits[:, -1]


def generation_cache(model: Model, prompt: list[int], max_new_tokens: int,
                     cache: Cache | DecodeGraph | None) -> DecodeGraph:
    """The decode step for a generation, on the given cache (or a new one that fits it), checked."""
    check_int("max_new_tokens", max_new_tokens, 0)
    max_len = model.config.max_position_embeddings
    if cache is None:
        if len(prompt) >= max_len:
            raise NanoElasticError(f"prompt too long: {len(prompt)} tokens, the model takes "
                                   f"{max_len - 1}")
        cache = model.new_cache(1, min(len(prompt) + max_new_tokens, max_len))
    if isinstance(cache, DecodeGraph) and cache.model is not model:
        raise NanoElasticError("cache is a DecodeGraph of another model (or size): make it with "
                               "DecodeGraph(model, cache) and pass the size as size=")
    step = cache if isinstance(cache, DecodeGraph) else DecodeGraph(model, cache)
    cache = step.cache
    # what generate() left in it (ids known) is continued only if it is a prefix of prompt
    other = cache.ids is not None and cache.ids[:cache.length] != prompt[:cache.length]
    if cache.interrupted or cache.length >= len(prompt) or other:
        cache.reset()
    if len(prompt) + max_new_tokens > cache.max_len:
        raise NanoElasticError(f"prompt too long: {len(prompt)} + {max_new_tokens} new tokens "
                               f"> {cache.max_len}")
    return step


def generate(model: Model, prompt: list[int] | Tensor, max_new_tokens: int, *,
             size: str | None = None, switch: Switch | None = None,
             stop_tokens: tuple[int, ...] | None = None, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             cache: Cache | DecodeGraph | None = None,
             prefill_chunk: int = 8192) -> Iterator[Token]:
    """Stream the continuation of `prompt` one Token at a time, stopping after a stop token or
    max_new_tokens. A `cache` already holding a prefix of `prompt` (an earlier turn) is continued,
    and serves this one generation until it ends: one that generate() wrote last is checked (it
    starts over if it holds other ids); after model() or restore() its first cache.length tokens
    are taken to be prompt's. Ctrl-C ends the stream (the program goes on). The arguments are
    checked by this call, before the first token is asked for.

    prompt: token ids as a list, a 1-D tensor or a [1, T] tensor (one sequence). size: the nested
    size ('30B', '23B', '12B', 'HIDDENxFFN'; None = the checkpoint's own). switch: a Switch to
    change size on the way. stop_tokens: ids that end the stream (they are yielded; None: the
    checkpoint's, model.stop_tokens). temperature, top_p, top_k: see sample(); seed makes sampling
    repeatable. prefill_chunk: prompt tokens per forward pass (bounds memory). cache: a Cache, or a
    DecodeGraph of one, whose CUDA graphs are then kept from one call to the next."""
    vocab = model.config.vocab_size
    prompt = prompt_ids(prompt, vocab)
    check_sampling(temperature, top_p, top_k)
    check_int("prefill_chunk", prefill_chunk, 1)
    try:
        stops = {operator.index(t) for t in (model.stop_tokens if stop_tokens is None
                                             else stop_tokens)}
    except TypeError:
        raise NanoElasticError(f"stop_tokens must be token ids, got {stop_tokens!r}") from None
    if switch is not None and not isinstance(switch, Switch):
        raise NanoElasticError(f"switch must be a Switch, got a {type(switch).__name__}")
    if switch is not None and switch.on_token is not None and switch.on_token >= vocab:
        raise NanoElasticError(f"Switch on_token {switch.on_token} is not a token id: the "
                               f"vocabulary is 0..{vocab - 1}")
    for s in (size, switch.size if switch else None):
        parse_size(s, model.config)  # unknown or too large sizes fail before any work
    generator = None
    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED)
        generator = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    step = generation_cache(model, prompt, max_new_tokens, cache)
    pick = functools.partial(sample, temperature=temperature, top_p=top_p, top_k=top_k,
                             generator=generator)
    return stream(model, step, prompt, max_new_tokens, size, switch, stops, pick, prefill_chunk)


def stream(model: Model, step: DecodeGraph, prompt: list[int], max_new_tokens: int,
           size: str | None, switch: Switch | None, stops: set[int], pick, chunk: int):
    """generate()'s tokens, from its checked arguments; pick(logits) samples one."""
    cache, device, tokens = step.cache, model.lm_head.weight.device, list(prompt)
    run = lambda ids: prefill(model, torch.tensor([ids], device=device), cache, size,  # noqa: E731
                              chunk)[0]
    try:
        logits = run(tokens[cache.length:])
        for n in range(1, max_new_tokens + 1):
            token = switch.forced(n) if switch is not None else None
            if token is None:
                token = int(pick(logits))
            tokens.append(token)
            cache.ids = tokens  # what it holds, and the token that goes in next
            yield Token(token, size)
            if token in stops or n == max_new_tokens:
                return
            if cache.length != len(tokens) - 1:  # something else ran on it while we yielded
                raise NanoElasticError("the cache changed during this generation: a cache serves "
                                       "one generate() at a time")
            if switch is not None and switch.due(n, token):
                rebuild = (switch.mode == "reprefill"  # (the same size: nothing to rebuild)
                           and parse_size(switch.size, model.config)
                           != parse_size(size, model.config))
                size, switch = switch.size, None  # one switch per generation
                if rebuild:
                    cache.reset()
                    logits = run(tokens)
                    continue
            logits = step(torch.tensor([[token]], device=device), size)[0]
    except KeyboardInterrupt:
        return


# --------------------------------------------------------------------------------------------------
# 11. Command line: a demo on random weights, or a raw completion from a real checkpoint

DEMO_CONFIG = Config(vocab_size=512, hidden_size=256, layers_block_type=layer_pattern("MEM*EMEME"),
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32, mamba_num_heads=16,
                     mamba_head_dim=16, ssm_state_size=32, n_groups=4, chunk_size=32,
                     n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                     intermediate_size=128, moe_shared_expert_intermediate_size=256,
                     max_position_embeddings=4096)
DEMO_SIZES = {"30B": "256x128", "23B": "192x96", "12B": "128x64"}  # stand-ins inside DEMO_CONFIG


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so that the same cleanup runs (finally, with), but is not a
    KeyboardInterrupt, which only stops a generation: the CLIs exit with 143."""
    received = False  # set by the signal: C code it cuts short may raise another exception


def signals_unwind() -> None:
    """From now on SIGTERM (kill, a job scheduler) raises Terminated, and Ctrl-C KeyboardInterrupt
    again (the scripts exit at once on one while torch imports): temporary files go."""
    def raise_terminated(signum, frame):
        Terminated.received = True
        raise Terminated()
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted_exit_code(e: BaseException) -> int:
    """The exit code of a run stopped by Ctrl-C (130) or SIGTERM (143): 128 + the signal."""
    return 143 if isinstance(e, Terminated) else 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, but a usage error is one line (exit 1), like every other error here."""
    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def parse_args(argv: list[str] | None):
    ap = ArgumentParser(prog="nanoelastic.py", description="Run Nemotron 3 Nano Elastic. Without "
                        "--ckpt: a demo on a small random checkpoint (random weights: the tokens "
                        "are noise, the mechanics are real).")
    ap.add_argument("--ckpt", help="checkpoint folder (HF format, FP8 or BF16)")
    ap.add_argument("--size", help="30B, 23B, 12B or HIDDENxFFN (default: the checkpoint's own)")
    ap.add_argument("--load", metavar="SIZE", help="read only this size's weights (less memory; "
                    "no larger size can run)")
    ap.add_argument("--switch-to", help="change to this size after --switch-after tokens")
    ap.add_argument("--switch-after", type=int, default=16)
    ap.add_argument("--switch-mode", default="transplant", choices=["transplant", "reprefill"])
    ap.add_argument("--prompt", default="The three nested models of Nemotron Elastic are",
                    help="with --ckpt (the demo has no tokenizer: its prompt is ids 1..32)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")
    args = ap.parse_args(argv)
    args.prompt = args.prompt.encode(errors="surrogateescape").decode(errors="replace")  # U+FFFD
    return args


def load(args):
    """The model, the prompt's ids, the stop ids and how to show a token: from --ckpt, or the
    demo's."""
    import tempfile

    import checkpoint
    device = checkpoint.resolve_device(args.device)  # a bad device fails before anything loads
    if args.ckpt:
        tokenizer = checkpoint.load_tokenizer(Path(args.ckpt))
        config = Config.from_file(Path(args.ckpt) / "config.json")
        if args.load:  # every size checked before the (long) load
            config = config.sliced(*parse_size(model_size(args.load, config), config))
        for size in (args.size, args.switch_to):
            if size is not None:
                model_size(size, config)
        model = Model.from_pretrained(args.ckpt, device=device, size=args.load)
        prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        return model, prompt, lambda t: tokenizer.decode([t])

    def stand_in(size: str | None, config: Config, default: str | None) -> str | None:
        return model_size(size, config, DEMO_SIZES) if size else default  # the demo's 30B, ...

    load = stand_in(args.load, DEMO_CONFIG, None)  # every size checked before anything is written
    config = DEMO_CONFIG.sliced(*parse_size(load, DEMO_CONFIG))
    demo_switch = (None, None) if args.load else (DEMO_SIZES["23B"], DEMO_SIZES["30B"])
    args.size = stand_in(args.size, config, demo_switch[0])
    args.switch_to = stand_in(args.switch_to, config, demo_switch[1])
    print("demo: random weights, so the tokens are noise; sizes, caches and the switch are real")
    with tempfile.TemporaryDirectory() as tmp:  # the demo's checkpoint, removed on the way out
        path = checkpoint.write_random_checkpoint(Path(tmp) / "random-fp8", DEMO_CONFIG)
        model = Model.from_pretrained(path, device=device, dtype=torch.float32, size=load)
    return model, list(range(1, 33)), lambda t: f"[{t}]"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, prompt, show = load(args)
    switch = None
    if args.switch_to:
        switch = Switch(args.switch_to, after=args.switch_after, mode=args.switch_mode)
    phases, t, ids = {}, time.time(), [None]  # size -> [tokens, seconds]
    widths = model.config.hidden_size, model.config.moe_intermediate_size
    # a token of size None: the model's own size, by name when it has one
    whole = next((n for n, w in SIZE_PRESETS.items() if w == widths), f"{widths[0]}x{widths[1]}")
    for token in generate(model, prompt, args.max_new_tokens, size=args.size, switch=switch,
                          temperature=args.temperature, seed=args.seed):
        now = time.time()
        phase = phases.setdefault(token.size or whole, [0, 0.0])
        phase[0] += 1
        phase[1] += now - t
        t = now
        ids.append(token.id)
        print(show(token.id), end="", flush=True)
    print()
    if len(ids) <= args.max_new_tokens and ids[-1] not in model.stop_tokens:
        raise KeyboardInterrupt  # generate() ends a stream early only on Ctrl-C: exit 130
    for i, (size, (n, s)) in enumerate(phases.items()):
        prefill_note = " (includes the prefill)" if i == 0 else ""
        print(f"{size}: {n} token{'s' if n != 1 else ''}, {n / s:.1f} tokens/s{prefill_note}")


def run_cli(prog: str, main, *args) -> None:
    """How every command line here runs main(*args): SIGTERM unwinds like Ctrl-C (temporary files
    go); bad input, a corrupt shard or an OS error (a full disk) is one line; an interruption exits
    with 130 or 143; an int that main returns is the exit code."""
    from safetensors import SafetensorError

    sys.stdout.reconfigure(errors="replace")  # a path or text it cannot show: '?', not a crash
    signals_unwind()
    try:
        code = main(*args)
    except (KeyboardInterrupt, Terminated) as e:
        sys.exit(interrupted_exit_code(e))
    except Exception as e:
        if Terminated.received:  # e.g. a TypeError from torch's argument parsing, cut short
            sys.exit(143)
        if isinstance(e, (NanoElasticError, OSError, SafetensorError)):
            sys.exit(f"{prog}: error: {e}")
        if isinstance(e, torch.cuda.OutOfMemoryError):  # a model or cache too big for the GPU
            sys.exit(f"{prog}: error: {str(e).splitlines()[0]}")
        raise
    if isinstance(code, int):
        sys.exit(code)


def cli(argv: list[str] | None = None) -> None:
    run_cli("nanoelastic.py", main, argv)


if __name__ == "__main__":
    import nanoelastic  # this file as the module checkpoint.py imports, not a second copy of it

    nanoelastic.cli()
