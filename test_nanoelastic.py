"""Tests for nanoelastic.py on small random checkpoints written in the real on-disk format
(CPU, fp32).

The references: the sequential recurrence for the chunked scan, transformers' NemotronHForCausalLM
for the whole model (fed the same dequantised, sliced weights), the same size loaded alone (its
prefixes, contiguous) for the nested views.
"""

import copy
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
import nanoelastic as ne
from nanoelastic import Config, Model, NanoElasticError, Switch, generate

ROOT = Path(__file__).parent


def small_config(pattern: str, **kw) -> Config:
    """Awkward on purpose: head_dim != hidden / heads, GQA, several SSM groups, top-k > 1, chunk 8
    so a prompt spans several chunks and ends mid-chunk, a Mamba layer right before every attention
    layer."""
    base = dict(vocab_size=97, hidden_size=48, layers_block_type=ne.layer_pattern(pattern),
                num_attention_heads=4, num_key_value_heads=2, head_dim=20, mamba_num_heads=8,
                mamba_head_dim=6, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=8,
                num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=24,
                moe_shared_expert_intermediate_size=40, max_position_embeddings=64)
    return Config(**{**base, **kw})


CONFIGS = {
    "A": small_config("MEM*EME*M"),
    # group-limited routing (n_group 2, topk_group 1), a dense '-' layer, conv without bias,
    # starts with E
    "B": small_config("EM*-EM*E", n_group=2, topk_group=1, use_conv_bias=False,
                      num_experts_per_tok=2),
}
SIZES = [None, "40x16", "32x8"]  # full, and two nested sizes (hidden x expert FFN)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {(name, fp8): checkpoint.write_random_checkpoint(
                root / f"{name}-{'fp8' if fp8 else 'bf16'}", cfg, fp8=fp8, shards=3,
                seed=len(name) + fp8)
            for name, cfg in CONFIGS.items() for fp8 in (True, False)}


@pytest.fixture(scope="session")
def models(checkpoints):
    return {key: Model.from_pretrained(path, device="cpu", dtype=torch.float32, verbose=False)
            for key, path in checkpoints.items()}


MODEL_KEYS = [(name, fp8) for name in CONFIGS for fp8 in (True, False)]
KEY_IDS = [f"{n}-{'fp8' if f else 'bf16'}" for n, f in MODEL_KEYS]


def tokens(B, T, seed=0, vocab=97):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# config and sizes

def test_config_reads_both_spellings():
    new = {"hybrid_override_pattern": "M*E-", "n_groups": 4, "conv_kernel": 3, "chunk_size": 64,
           "hidden_size": 64, "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16,
           "expand": 7}
    old = {"layers_block_type": ["mamba", "attention", "moe", "mlp"], "mamba_n_groups": 4,
           "mamba_d_conv": 3, "mamba_chunk_size": 64, "hidden_size": 64, "mamba_num_heads": 8,
           "mamba_head_dim": 16, "ssm_state_size": 16, "expand": 7}
    hf_list = {**old, "layers_block_type": ["linear_attention", "full_attention", "moe", "mlp"]}
    a, b, c = (checkpoint.config_from_dict(d) for d in (new, old, hf_list))
    assert a == b == c
    assert a.layers_block_type == ["mamba", "attention", "moe", "mlp"]
    assert (a.n_groups, a.conv_kernel, a.chunk_size) == (4, 3, 64)
    assert a.mamba_inner == 128  # heads x head_dim, not expand x hidden = 448
    assert a.conv_dim == 128 + 2 * 4 * 16 and a.in_proj_dim == 128 + a.conv_dim + 8
    assert a.time_step_limit == (0.0, math.inf)
    assert checkpoint.config_from_dict(checkpoint.config_json(a)) == a  # config.json round trip
    with pytest.raises(NanoElasticError, match="unknown layer types"):
        checkpoint.config_from_dict({"hybrid_override_pattern": "MX"})


@pytest.mark.parametrize("size,total,active",
                         [("30B", 31.58, 3.58), ("23B", 23.59, 2.91), ("12B", 12.43, 2.08)])
def test_real_configs_param_counts(size, total, active):
    with torch.device("meta"):
        model = Model(Config())  # the defaults are the real 30B config.json
    n_total, n_active = model.num_params(size)
    assert round(n_total / 1e9, 2) == total
    assert round(n_active / 1e9, 2) == active
    # The sliced config builds the same model directly, and its full size is the nested size.
    d, f = ne.SIZE_PRESETS[size]
    with torch.device("meta"):
        sliced = Model(Config().sliced(d, f))
    assert sliced.num_params() == (n_total, n_active)


def release_fp8_linears(config: Config) -> set[str]:
    """The Linears the FP8 release quantises, named as the model holds them (experts stacked)."""
    return {re.sub(r"\.experts\.\d+\.", ".experts.", name)
            for name in checkpoint.fp8_recipe(config)}


def test_no_module_here_shadows_an_installed_package():
    """Every script run from this folder imports its .py files ahead of site-packages: a module
    named like a package (kernels.py did, once transformers 5.25 required Hugging Face's `kernels`)
    would replace that package for transformers too."""
    import importlib.metadata

    ours = {path.stem for path in ROOT.glob("*.py")}
    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert "nanoelastic" in ours and not ours & taken, ours & taken


def test_readme_memory_table_is_what_loading_the_release_takes():
    """The README's table of the weights' bytes per size loaded alone: placed_bytes on the real
    config, with the FP8 release's recipe."""
    with torch.device("meta"):
        model = Model(Config())
    fp8 = release_fp8_linears(model.config)
    rows = re.findall(r"^\| (\d+B)(?: \(all\))? \| ([\d.]+) GB \(([\d.]+) GiB\) \|",
                      (ROOT / "README.md").read_text(), re.M)
    assert [size for size, _, _ in rows] == list(ne.SIZE_PRESETS)
    for size, gb, gib in rows:
        placed = checkpoint.placed_bytes(model.nested(size), fp8, torch.bfloat16)
        assert (f"{placed / 1e9:.1f}", f"{placed / 2**30:.1f}") == (gb, gib), size


def test_sizes_are_validated():
    cfg = CONFIGS["A"]
    assert ne.parse_size(None, cfg) == (48, 24)
    assert ne.parse_size("40x16", cfg) == (40, 16)
    for bad, msg in [("XL", "unknown size"), ("23B", "does not fit"), ("49x8", "does not fit"),
                     ("40x25", "does not fit"), ("0x8", "does not fit")]:
        with pytest.raises(NanoElasticError, match=msg):
            ne.parse_size(bad, cfg)
    assert ne.parse_size("23B", Config()) == (2304, 1600)
    with pytest.raises(NanoElasticError, match="does not fit"):
        ne.parse_size("30B", Config().sliced(2304, 1600))


def test_nested_table_matches_spec():
    expect = {  # one tensor of each row of the nesting rules
        "backbone.embeddings.weight": ".d", "lm_head.weight": ".d",
        "backbone.layers.3.mixer.q_proj.weight": ".d",
        "backbone.layers.0.mixer.in_proj.weight": ".d", "backbone.layers.1.mixer.gate.weight": ".d",
        "backbone.layers.1.mixer.shared_experts.up_proj.weight": ".d",
        "backbone.layers.0.mixer.out_proj.weight": "d.",
        "backbone.layers.3.mixer.o_proj.weight": "d.",
        "backbone.layers.1.mixer.shared_experts.down_proj.weight": "d.",
        "backbone.layers.7.norm.weight": "d", "backbone.norm_f.weight": "d",
        "backbone.layers.1.mixer.experts.5.up_proj.weight": "fd",
        "backbone.layers.1.mixer.experts.up_proj.weight": "fd",
        "backbone.layers.1.mixer.experts.5.down_proj.weight": "df",
        "backbone.layers.0.mixer.conv1d.weight": "", "backbone.layers.0.mixer.A_log": "",
        "backbone.layers.0.mixer.norm.weight": "",
        "backbone.layers.1.mixer.gate.e_score_correction_bias": "",
        "backbone.layers.1.mixer.experts.5.up_proj.weight_scale": "",
        "backbone.layers.0.mixer.in_proj.input_scale": "",
    }
    for name, axes in expect.items():
        assert ne.nested_axes(name) == axes, name
    w = torch.zeros(8, 6, 5)
    v = ne.nested_view("x.experts.up_proj.weight", w, d=3, f=4)
    assert v.shape == (8, 4, 3) and v.data_ptr() == w.data_ptr()


# --------------------------------------------------------------------------------------------------
# the scan

@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 8), (37, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_recurrence(T, chunk, with_state):
    g = torch.Generator().manual_seed(T)
    b, H, P, G, N = 2, 6, 5, 3, 7
    x = torch.randn(b, T, H, P, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, T, H, generator=g, dtype=torch.float64))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2
    B = torch.randn(b, T, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(b, T, G, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, H, P, N, generator=g, dtype=torch.float64) if with_state else None

    y, final = ne.ssd_chunked(x, dt, A, B, C, chunk, s0)

    # The sequential recurrence written out, independent of ssd_step:
    # S = exp(dt A) S + dt x B^T, y = S C.
    S = s0.clone() if with_state else torch.zeros(b, H, P, N, dtype=torch.float64)
    heads_group = torch.arange(H) // (H // G)
    ys = []
    for t in range(T):
        Bh, Ch = B[:, t, heads_group], C[:, t, heads_group]  # [b, H, N]
        S = (torch.exp(dt[:, t] * A)[..., None, None] * S
             + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None])
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch))
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, S, rtol=1e-9, atol=1e-9)

    # The decode step reproduces the same recurrence in place.
    state = s0.clone() if with_state else torch.zeros(b, H, P, N, dtype=torch.float64)
    for t in range(T):
        y_t = ne.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        torch.testing.assert_close(y_t, ys[t], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, S, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# loading

def test_fp8_stays_fp8(models, checkpoints):
    fp8, bf16 = models[("A", True)], models[("A", False)]
    experts = fp8.backbone.layers[1].mixer.experts
    assert (experts.up_proj.weight.dtype == torch.float8_e4m3fn
            and experts.up_proj.weight.shape == (8, 24, 48))
    assert experts.up_proj.weight_scale.shape == (8,)
    # input_scale (FP8 activations) is checked from the headers but not held: activations stay BF16
    assert not any(name.endswith("input_scale") for name, _ in fp8.named_buffers())
    mamba_before_attention, mamba = fp8.backbone.layers[2].mixer, fp8.backbone.layers[0].mixer
    assert (mamba.in_proj.weight.dtype == torch.float8_e4m3fn
            and mamba.in_proj.weight_scale is not None)
    assert mamba_before_attention.in_proj.weight.dtype == torch.float32  # BF16 in the recipe
    assert mamba_before_attention.in_proj.weight_scale is None
    assert fp8.backbone.layers[3].mixer.q_proj.weight.dtype == torch.float32
    assert fp8.backbone.layers[1].mixer.gate.weight.dtype == torch.float32
    assert all(m.weight_scale is None for m in bf16.modules() if isinstance(m, ne.Linear))
    # ModelOpt's per-tensor scale, amax / 448: every FP8 weight (each expert's) reaches +-448
    for m in fp8.modules():
        if isinstance(m, ne.Linear) and m.weight_scale is not None:
            amax = m.weight.float().abs().flatten(m.weight.dim() - 2).amax(-1)
            assert torch.equal(amax, torch.full_like(amax, 448.0))
    # The loaded FP8 model holds about the checkpoint's FP8 bytes, not 4x (fp32) of them.
    fp8_bytes = sum(p.numel() for p in fp8.parameters() if p.dtype == torch.float8_e4m3fn)
    index = json.loads((checkpoints[("A", True)] / "model.safetensors.index.json").read_text())
    assert fp8_bytes > 0.5 * index["metadata"]["total_size"]


def test_checkpoint_layout(checkpoints):
    path = checkpoints[("A", True)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) == 3 and all((path / s).is_file() for s in shards)
    names = index["weight_map"]
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in names
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight_scale" in names
    assert "backbone.layers.0.mixer.in_proj.input_scale" in names
    # Mamba right before attention
    assert "backbone.layers.2.mixer.in_proj.weight_scale" not in names
    assert json.loads((path / "config.json").read_text())["hybrid_override_pattern"] == "MEM*EME*M"


def test_single_file_and_mtp_and_kv_scales(tmp_path, checkpoints, models):
    """A one-file checkpoint loads too; mtp.* tensors and FP8-KV scales are ignored."""
    from safetensors.torch import load_file, save_file
    src = checkpoints[("A", True)]
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    tensors["mtp.layers.0.norm.weight"] = torch.ones(48)
    tensors["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(0.1)
    dst = tmp_path / "one"
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    model = Model.from_pretrained(dst, device="cpu", dtype=torch.float32, verbose=False)
    t = tokens(1, 11)
    torch.testing.assert_close(model(t), models[("A", True)](t), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# caches

@pytest.mark.parametrize("key", MODEL_KEYS, ids=KEY_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_prefill_in_pieces_then_decode_equals_full_forward(models, key, size):
    model = models[key]
    t = tokens(2, 29, seed=1)
    full = model(t, size=size)
    cache = model.new_cache(2, 32)
    pieces = [model(t[:, :5], cache, size), model(t[:, 5:19], cache, size)]  # 19 = 2 chunks + 3
    pieces += [model(t[:, i:i + 1], cache, size) for i in range(19, 29)]
    assert cache.length == 29
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    last = model(t[:, :1], model.new_cache(2, 4), size, last_only=True)
    assert last.shape == (2, 1, 97) and last.dtype == torch.float32


def test_decoding_across_kv_windows_equals_full_forward():
    """A decoded token attends over a window of the cache (Cache.window(): 256 positions, then the
    next power of two, at most max_len) that must hold it and every position before it: decoding
    from 250 to 530 tokens crosses the windows of 256 and 512 and ends in one cut at max_len."""
    config = replace(CONFIGS["A"], max_position_embeddings=600)
    model = checkpoint.random_model(config, device="cpu", dtype=torch.float32)
    t = tokens(1, 530, seed=5)
    with torch.no_grad():
        full = model(t)
        cache = model.new_cache(1, 530)
        windows = []
        pieces = [model(t[:, :250], cache)]
        for i in range(250, 530):
            windows.append(cache.window())
            pieces.append(model(t[:, i:i + 1], cache))
    assert sorted(set(windows)) == [256, 512, 530]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_prefill_after_a_prefix_with_the_lower_right_causal_bias(models, monkeypatch):
    """On a GPU in 16 bits a prefill after cached tokens passes torch's lower-right causal bias
    (flash takes it with no mask): the same attention as the bool mask used elsewhere."""
    model = models[("A", True)]
    t = tokens(2, 29, seed=2)
    bools = model.new_cache(2, 32)
    expected = [model(t[:, :5], bools), model(t[:, 5:29], bools)]
    from torch.nn.attention.bias import causal_lower_right

    monkeypatch.setattr(ne, "prefix_causal", lambda T, L, like: causal_lower_right(T, L))
    bias = model.new_cache(2, 32)
    got = [model(t[:, :5], bias), model(t[:, 5:29], bias)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), rtol=1e-5, atol=1e-5)
    assert isinstance(ne.prefix_causal(3, 8, torch.zeros(1)), torch.Tensor)  # CPU: the bools


def test_the_scripts_start_without_torch_dynamo():
    """torch.nn.attention.bias imports torch._dynamo (seconds on a CPU): prefix_causal imports it
    where a GPU prefill needs it, not every script at start-up."""
    code = "import sys, nanoelastic, chat, slice, bench; print('torch._dynamo' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.stdout.strip() == "False", run.stderr


@pytest.mark.parametrize("T,L", [(100, 300), (300, 300)])
def test_prefill_attention_at_the_real_head_counts_on_this_device(T, L):
    """What a prefill passes SDPA (none cached: is_causal; after cached tokens, prefix_causal: on
    a GPU in 16 bits torch's lower-right causal bias, which flash attention takes with GQA and no
    mask in memory) attends as an explicit bool mask in fp32 does, at the 30B's 32 query heads over
    2 KV heads of 128, with keys and values viewed out of a longer cache as Cache.update gives."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 32, T, 128, generator=gen).to(device, torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 2, 512, 128, generator=gen).to(device, torch.bfloat16)
                        for _ in range(2))
    k, v = k_cache[:, :, :L], v_cache[:, :, :L]
    mask = None if T == L else ne.prefix_causal(T, L, q)  # as Attention.forward and update()
    if mask is not None and device == "cuda" and torch.cuda.get_device_capability() >= (8, 0):
        assert not isinstance(mask, torch.Tensor)  # the bias, not a mask in memory
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, scale=128 ** -0.5,
               enable_gqa=True)
    positions = torch.arange(L, device=device)
    seen = positions <= positions[L - T:, None]  # query i: keys 0 .. L - T + i
    ref = sdpa(q.float(), k.float(), v.float(), attn_mask=seen, scale=128 ** -0.5,
               enable_gqa=True)
    assert out.shape == ref.shape == (2, 32, T, 128)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_one_cache_serves_every_size(models):
    model = models[("A", True)]
    caches = [model.new_cache(1, 8) for _ in SIZES]
    for cache, size in zip(caches, SIZES):
        model(tokens(1, 8), cache, size)
    for small in caches[1:]:
        for a, b in zip(caches[0].layers, small.layers):
            assert (a is None) == (b is None)
            for x, y in zip(a or (), b or ()):
                assert x.shape == y.shape and x.dtype == y.dtype and not torch.equal(x, y)


def test_fused_residual_equals_the_readable_path(models):
    """The fast path used with the kernels (each residual add fused into the next norm,
    add_rms_norm) computes exactly what Backbone.forward's h = h + mixer(norm(h)) does: prefill and
    a decode step."""
    model = models[("A", True)]
    t = tokens(2, 12, seed=12)
    for size in SIZES:
        backbone = model.nested(size).backbone
        plain_cache, fused_cache = model.new_cache(2, 16), model.new_cache(2, 16)
        with torch.no_grad():
            for piece in (t[:, :11], t[:, 11:]):  # 11 tokens of prefill, then one decode step
                plain = backbone(piece, plain_cache)
                fused = ne.fused_backbone(backbone, piece, fused_cache)
                assert torch.equal(plain, fused), size
                for cache in (plain_cache, fused_cache):
                    cache.end(piece.shape[1])
        for a, b in zip(plain_cache.layers, fused_cache.layers):
            assert all(torch.equal(x, y) for x, y in zip(a or (), b or ()))


def test_decode_graph_holds_its_cache_and_dropping_it_frees_both():
    """DecodeGraph holds the cache and the cache knows nothing of it: no reference cycle, so
    dropping the graph (and the model) frees everything at once, without the garbage collector."""
    import gc
    import weakref

    model = checkpoint.random_model(CONFIGS["A"], device="cpu", dtype=torch.float32)
    step = ne.DecodeGraph(model, model.new_cache(1, 16))
    for size in (None, "40x16"):
        assert len(list(generate(model, [1, 2, 3], 4, size=size, cache=step, stop_tokens=()))) == 4
    refs = [weakref.ref(x) for x in (step, step.cache, model, model.nested("40x16"))]
    gc.disable()
    try:
        del step, model
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------------
# the peer implementation: transformers' NemotronHForCausalLM on the same weights

def to_transformers(model: Model, size: str | None, time_step_min: float = 1e-30):
    """transformers' NemotronHForCausalLM with the dequantised weights and config of `size`."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    sized = model.nested(size)
    hf_config = checkpoint.config_json(sized.config)
    # transformers 5 clamps dt at time_step_min (0.001 in the real config) in its chunked prefill
    # path only, and ignores time_step_limit; mamba_ssm, vLLM, mlx-lm and the model's own remote
    # code use time_step_limit, (0, inf). Take that floor out here, unless a test sets one.
    hf_config["time_step_min"] = time_step_min
    # A forward pass needs no cache, and transformers 5.25's fails when layer 0 keeps no state (a
    # MoE or MLP layer: its DummyLayer has no get_seq_length). generate() below asks for one.
    hf_config["use_cache"] = False
    hf = NemotronHForCausalLM(NemotronHConfig(**hf_config)).eval()
    state = {}
    linears = {n: m for n, m in sized.named_modules() if isinstance(m, ne.Linear)}
    for name, t in sized.named_parameters():
        t = t.float()
        owner = name.rpartition(".")[0]
        if owner in linears and linears[owner].weight_scale is not None:
            scale = linears[owner].weight_scale
            t = t * (scale[:, None, None] if t.dim() == 3 else scale)
        hf_name = name.replace("backbone.", "model.", 1)
        if ".experts." in hf_name and "shared" not in hf_name:
            # transformers' stacked experts are bare Parameters
            hf_name = hf_name.removesuffix(".weight")
        state[hf_name] = t.contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.mark.parametrize("key", MODEL_KEYS, ids=KEY_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_transformers(models, key, size):
    model = models[key]
    hf = to_transformers(model, size)
    t = tokens(2, 21, seed=2)
    with torch.no_grad():
        ref = hf(t).logits
    torch.testing.assert_close(model(t, size=size), ref, rtol=1e-4, atol=1e-4)
    # Identical greedy generations: transformers with its own hybrid cache where its cache works
    # (layer 0 keeps a state, see to_transformers), else recomputing the sequence at every token.
    prompt = tokens(1, 13, seed=3)
    prompt[0, 5] = 0  # id 0 as well (the pad id below)
    with torch.no_grad():
        # all ones: from pad_token_id alone, transformers would mask any 0 in the prompt
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                             do_sample=False, eos_token_id=2, pad_token_id=0,
                             use_cache=model.config.layers_block_type[0] in ("mamba", "attention"))
    ours = [tok.id for tok in generate(model, prompt[0], 12, size=size, stop_tokens=(2,))]
    assert ours == hf_out[0, 13:].tolist()


def with_time_step_limit(model: Model, limit: tuple[float, float]) -> Model:
    """A copy of `model` (its full size) whose config clamps dt to `limit`."""
    clamped = copy.deepcopy(model)
    clamped._nested = {}
    clamped.config.time_step_limit = limit  # the one config object every module of the copy holds
    return clamped


def test_time_step_limit_clamps_dt(models):
    """config.time_step_limit clamps dt = softplus(dt + dt_bias), in prefill and in decode. A floor
    gives transformers' prefill with that floor (its time_step_min); a ceiling of 0 stops every
    Mamba state, which leaves each Mamba layer's y = D x: out_proj(norm(D x * silu(z)))."""
    model = models[("A", False)]
    t = tokens(2, 21, seed=21)
    floor = 0.05  # above many of the random checkpoint's dt (its softplus(dt_bias) is 1e-3..1e-1)
    floored = with_time_step_limit(model, (floor, math.inf))
    with torch.no_grad():
        ours, plain = floored(t), model(t)
        ref = to_transformers(floored, None, time_step_min=floor)(t).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, plain, rtol=1e-2, atol=1e-2)  # the floor did something

    stopped = with_time_step_limit(model, (0.0, 0.0))
    c = stopped.config
    cache = stopped.new_cache(2, 21)
    calls = {}  # Mamba mixer -> (what it got, what it gave) per call

    def record(mixer, args, out):
        calls.setdefault(mixer, []).append((args[0], out))
    hooks = [layer.mixer.register_forward_hook(record) for layer in stopped.backbone.layers
             if isinstance(layer.mixer, ne.Mamba2Mixer)]
    with torch.no_grad():
        stopped(t[:, :19], cache)  # prefill
        stopped(t[:, 19:20], cache)  # then two decode steps
        stopped(t[:, 20:], cache)
        for mixer, got in calls.items():
            u, out = (torch.cat(tensors, 1) for tensors in zip(*got))  # all 21 positions
            z, xBC, _ = mixer.in_proj(u).split([c.mamba_inner, c.conv_dim, c.mamba_num_heads], -1)
            conv = mixer.conv1d
            x = ne.causal_conv(xBC, None, conv.weight, conv.bias)[..., :c.mamba_inner]
            y = (x.unflatten(-1, (c.mamba_num_heads, -1)) * mixer.D[:, None]).flatten(-2)
            expected = mixer.out_proj(ne.rms_norm(y, mixer.norm.weight, mixer.norm.eps,
                                                  groups=c.n_groups, gate=z))
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()
    assert len(calls) == c.layers_block_type.count("mamba")
    for kind, state in zip(cache.kinds, cache.layers):  # and every SSM state stayed zero
        if kind == "mamba":
            assert not state[1].any()


def random_config(seed: int) -> tuple[Config, str | None]:
    """A random small config (every layer kind, GQA, SSM groups, group-limited routing, any conv
    width, a dense MLP of any width) and a random nested size, within what transformers runs: an
    attention layer, >= 2 experts per routing group, widths in multiples of 4 (its grouped_mm)."""
    import random
    rng = random.Random(seed)
    heads, groups, experts = rng.choice([2, 4, 6]), rng.choice([1, 2, 4]), rng.choice([4, 8, 16])
    n_group = rng.choice([g for g in (1, 2, 4) if experts // g >= 2])
    topk_group = rng.randint(1, n_group)
    pattern = "".join(rng.choice("MME*-") for _ in range(rng.randint(2, 6)))
    config = Config(
        vocab_size=rng.choice([50, 97]), hidden_size=rng.choice([16, 24, 40, 48]),
        layers_block_type=ne.layer_pattern(pattern if "*" in pattern else pattern + "*"),
        num_attention_heads=heads, num_key_value_heads=rng.choice([k for k in (1, 2, 3, 6)
                                                                  if heads % k == 0]),
        head_dim=rng.choice([4, 8, 12, 20]), mamba_num_heads=groups * rng.choice([1, 2, 3]),
        mamba_head_dim=rng.choice([2, 4, 6, 8]), ssm_state_size=rng.choice([4, 8, 16]),
        n_groups=groups, chunk_size=rng.choice([4, 8, 16]), n_routed_experts=experts,
        num_experts_per_tok=min(rng.randint(1, 6), topk_group * experts // n_group),
        n_group=n_group, topk_group=topk_group, moe_intermediate_size=rng.choice([8, 16, 24]),
        intermediate_size=rng.choice([8, 24]),
        moe_shared_expert_intermediate_size=rng.choice([8, 40]),
        use_conv_bias=rng.random() < 0.5, conv_kernel=rng.choice([2, 3, 4]),
        routed_scaling_factor=rng.choice([1.0, 2.5]), norm_topk_prob=rng.random() < 0.7,
        max_position_embeddings=64)
    d, f = (4 * rng.randint(1, w // 4) for w in (config.hidden_size, config.moe_intermediate_size))
    return config, rng.choice([None, f"{d}x{f}"])


@pytest.mark.parametrize("seed", range(24))
def test_random_configs_match_transformers(seed):
    """Beyond the two fixed configs: random ones, with FP8 or BF16 weights, at a random size; a
    prompt prefilled in two pieces and then decoded gives the logits of one forward pass."""
    config, size = random_config(seed)
    model = checkpoint.random_model(config, device="cpu", dtype=torch.float32, fp8=seed % 2 == 0,
                                    seed=seed)
    hf = to_transformers(model, size)
    t = tokens(2, 5 + seed, seed=seed, vocab=config.vocab_size)  # 5 to 28 tokens
    with torch.no_grad():
        ref = hf(t).logits
    torch.testing.assert_close(model(t, size=size), ref, rtol=1e-4, atol=1e-4)
    cache, cut = model.new_cache(2, 64), 1 + seed % 4
    pieces = [model(t[:, :cut], cache, size)] + [model(t[:, i:i + 1], cache, size)
                                                 for i in range(cut, t.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, 1), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# nested sizes are views

@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("size", SIZES[1:])
def test_views_equal_the_size_loaded_alone(models, checkpoints, size, fp8):
    model = models[("A", fp8)]
    d, f = ne.parse_size(size, model.config)
    views = model.nested(size)
    assert model.nested(size) is views  # built once per size
    storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    view_params = list(views.parameters())
    assert all(p.untyped_storage().data_ptr() in storage for p in view_params)  # no copies
    # fewer bytes read
    assert sum(p.numel() for p in view_params) < sum(p.numel() for p in model.parameters())
    assert views.backbone.layers[1].mixer.experts.up_proj.weight.shape == (8, f, d)

    # The same size loaded alone: only its prefixes are read, into contiguous tensors of its own.
    alone = Model.from_pretrained(checkpoints[("A", fp8)], device="cpu", dtype=torch.float32,
                                  verbose=False, size=size)
    assert alone.config == model.config.sliced(d, f)
    view_state, alone_state = views.state_dict(), alone.state_dict()
    assert view_state.keys() == alone_state.keys()
    for name, t in alone_state.items():
        assert t.is_contiguous() and t.dtype == view_state[name].dtype, name
        assert torch.equal(t.float(), view_state[name].float()), name
    t = tokens(2, 19, seed=4)
    torch.testing.assert_close(model(t, size=size), alone(t), rtol=1e-5, atol=1e-5)
    # the sizes nested in it are the full model's again
    torch.testing.assert_close(model(t, size=SIZES[2]), alone(t, size=SIZES[2]), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------------------------------
# generation and the size switch

def greedy(model, prompt, n, size, cache=None):
    """Plain greedy decoding by hand: prefill, then one token at a time (the last one is not
    fed)."""
    cache = cache or model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache, size)[0, -1]
    out = [int(logits.argmax())]
    while len(out) < n:
        out.append(int(model(torch.tensor([[out[-1]]]), cache, size)[0, -1].argmax()))
    return out, cache


def test_generate_greedy_matches_manual_decoding(models):
    model = models[("A", True)]
    prompt = tokens(1, 10, seed=5)[0].tolist()
    expected, _ = greedy(model, prompt, 8, "40x16")
    stream = list(generate(model, prompt, 8, size="40x16", stop_tokens=()))
    assert [t.id for t in stream] == expected and all(t.size == "40x16" for t in stream)


def test_transplant_keeps_the_caches(models):
    model = models[("A", True)]
    prompt = tokens(1, 10, seed=6)[0].tolist()
    cache = model.new_cache(1, 30)
    stream = list(generate(model, prompt, 9, size="32x8", stop_tokens=(), cache=cache,
                           switch=Switch(None, after=4, mode="transplant")))
    assert [t.size for t in stream] == ["32x8"] * 4 + [None] * 5
    assert cache.length == len(prompt) + 8  # the one cache went on through the switch
    # By hand: the small size fills the cache, then the full size continues from that same cache.
    small, by_hand = greedy(model, prompt, 4, "32x8", model.new_cache(1, 30))
    first_logits = model(torch.tensor([[small[-1]]]), copy.deepcopy(by_hand), None)[0, -1]
    # (greedy's prefill of one token = a decode step)
    rest, _ = greedy(model, [small[-1]], 5, None, by_hand)
    assert int(first_logits.argmax()) == rest[0]
    assert [t.id for t in stream] == small + rest
    # ... which is not what the full size computes from scratch: the transplanted states are the
    # small model's.
    scratch = model(torch.tensor([prompt + small]))[0, -1]
    assert not torch.allclose(first_logits, scratch, atol=1e-3)


def test_reprefill_equals_new_size_from_scratch(models):
    model = models[("B", True)]
    prompt = tokens(1, 10, seed=7)[0].tolist()
    stream = list(generate(model, prompt, 9, size="32x8", stop_tokens=(),
                           switch=Switch("40x16", after=4, mode="reprefill")))
    thought = [t.id for t in stream[:4]]
    assert thought == greedy(model, prompt, 4, "32x8")[0]
    answer, _ = greedy(model, prompt + thought, 5, "40x16")
    assert [t.id for t in stream[4:]] == answer and all(t.size == "40x16" for t in stream[4:])


def test_reprefill_to_the_same_size_rebuilds_nothing(models, monkeypatch):
    """A reprefill switch whose new size is the old one under another name (a budget in chat.py
    with one size) goes on decoding: no second prefill, the tokens of no switch at all."""
    model = models[("B", True)]
    prompt = tokens(1, 10, seed=7)[0].tolist()
    plain, _ = greedy(model, prompt, 9, None)
    prefills = []
    real_prefill = ne.prefill

    def counted_prefill(model, ids, *args):
        prefills.append(ids.shape[1])
        return real_prefill(model, ids, *args)
    monkeypatch.setattr(ne, "prefill", counted_prefill)
    d, f = ne.parse_size(None, model.config)
    stream = list(generate(model, prompt, 9, size=None, stop_tokens=(),
                           switch=Switch(f"{d}X{f}", after=4, mode="reprefill")))
    assert prefills == [len(prompt)]
    assert [t.id for t in stream] == plain
    prefills.clear()  # the switch that changes size still rebuilds
    list(generate(model, prompt, 9, size=None, stop_tokens=(),
                  switch=Switch("40x16", after=4, mode="reprefill")))
    assert prefills == [len(prompt), len(prompt) + 4]


def test_switch_on_token_and_budget(models):
    model = models[("A", False)]
    prompt = tokens(1, 10, seed=8)[0].tolist()
    free, _ = greedy(model, prompt, 8, "32x8")
    # on_token: switch right after the token appears (here: the third token the small size writes).
    marker = free[2]
    stream = list(generate(model, prompt, 8, size="32x8", stop_tokens=(),
                           switch=Switch(None, on_token=marker)))
    first = free.index(marker)
    assert [t.size for t in stream] == ["32x8"] * (first + 1) + [None] * (7 - first)
    # budget: after 3 tokens the closing token is forced, then the size changes.
    closer = next(t for t in range(97) if t not in free[:3])
    stream = list(generate(model, prompt, 8, size="32x8", stop_tokens=(),
                           switch=Switch(None, on_token=closer, after=3)))
    assert [t.id for t in stream][:4] == free[:3] + [closer]
    assert [t.size for t in stream] == ["32x8"] * 4 + [None] * 4
    # stop tokens end the stream and are yielded
    stream = list(generate(model, prompt, 8, size="32x8", stop_tokens=(free[1],)))
    assert [t.id for t in stream] == free[:free.index(free[1]) + 1]


def test_sampling():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0])
    g = lambda s: torch.Generator().manual_seed(s)
    assert int(ne.sample(logits)) == 3  # greedy
    assert all(int(ne.sample(logits, 1.0, top_k=1, generator=g(s))) == 3 for s in range(20))
    assert all(int(ne.sample(logits, 1.0, top_p=0.1, generator=g(s))) == 3 for s in range(20))
    draws = [int(ne.sample(logits, 1.0, top_k=2, generator=g(s))) for s in range(400)]
    assert set(draws) == {2, 3}
    assert abs(draws.count(3) / 400 - 1 / (1 + math.exp(-1))) < 0.08  # p(3) = e^3 / (e^2 + e^3)
    # top_p 0.9: the tokens 3, 2, 1 (0.64 + 0.24 + 0.09 = 0.97 reaches 0.9 only with 1)
    draws = {int(ne.sample(logits, 1.0, top_p=0.9, generator=g(s))) for s in range(300)}
    assert draws == {1, 2, 3}
    # seeded generation is reproducible, and differs between seeds
    seeded = [int(ne.sample(logits * 0.1, 1.0, generator=g(s))) for s in range(30)]
    assert seeded == [int(ne.sample(logits * 0.1, 1.0, generator=g(s))) for s in range(30)]
    assert len(set(seeded)) > 1


def test_seeded_generation_is_reproducible(models):
    model = models[("A", True)]
    prompt = tokens(1, 6, seed=9)[0].tolist()
    run = lambda seed: [t.id for t in generate(model, prompt, 10, temperature=1.0, top_p=0.95,
                                               seed=seed, stop_tokens=())]
    assert run(1) == run(1) and run(1) != run(2)


def test_generate_continues_a_cache(models):
    """A chat turn: the cache holds the earlier prompt; only the new tokens are prefilled."""
    model = models[("A", True)]
    prompt = tokens(1, 20, seed=10)[0].tolist()
    cache = model.new_cache(1, 40)
    model(torch.tensor([prompt[:12]]), cache)
    continued = [t.id for t in generate(model, prompt, 6, cache=cache, stop_tokens=())]
    assert continued == [t.id for t in generate(model, prompt, 6, stop_tokens=())]


def test_generate_continues_its_own_cache_only_from_a_prefix(models, monkeypatch):
    """A cache that generate() wrote last is continued when the new prompt extends what it holds
    (only the new tokens are prefilled), and starts over when it does not."""
    model = models[("A", True)]
    prompt, other = tokens(2, 12, seed=13).tolist()
    fresh = lambda ids: [t.id for t in generate(model, ids, 4, stop_tokens=())]
    cache, prefilled, real = model.new_cache(1, 40), [], ne.prefill
    monkeypatch.setattr(ne, "prefill", lambda m, ids, *args: prefilled.append(ids.shape[1])
                        or real(m, ids, *args))
    first = [t.id for t in generate(model, prompt, 4, cache=cache, stop_tokens=())]
    extended = prompt + first + [5]
    assert [t.id for t in generate(model, extended, 4, cache=cache, stop_tokens=())] == \
        fresh(extended)
    assert prefilled[:2] == [12, 2]  # the 4th token and the new one: the cache held the rest
    assert [t.id for t in generate(model, other + extended, 4, cache=cache,
                                   stop_tokens=())] == fresh(other + extended)
    assert prefilled[3] == len(other + extended)  # it started over


def test_ctrl_c_stops_the_generation(models, monkeypatch):
    model = models[("A", True)]
    prompt = tokens(1, 6, seed=11)[0].tolist()
    cache = model.new_cache(1, 30)
    calls = {"n": 0}
    real_forward = ne.Attention.forward

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:  # two attention layers: inside the fourth model call
            raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(ne.Attention, "forward", interrupted)
    stream = list(generate(model, prompt, 10, cache=cache, stop_tokens=()))  # no exception escapes
    assert len(stream) == 3
    monkeypatch.setattr(ne.Attention, "forward", real_forward)
    with pytest.raises(NanoElasticError, match="interrupted"):
        model(torch.tensor([[1]]), cache)
    with pytest.raises(NanoElasticError, match="interrupted"):  # a copy would pass it on unmarked
        cache.snapshot()
    # generate() itself rebuilds an interrupted cache from the prompt
    again = [t.id for t in generate(model, prompt, 5, cache=cache, stop_tokens=())]
    assert again == [t.id for t in generate(model, prompt, 5, stop_tokens=())]


def test_a_cache_serves_one_generation_at_a_time(models):
    model = models[("A", True)]
    prompt = tokens(1, 12, seed=12)[0].tolist()
    cache = model.new_cache(1, 40)
    first = generate(model, prompt, 8, cache=cache, stop_tokens=())
    alone = [t.id for t in generate(model, prompt, 8, stop_tokens=())]
    assert [next(first).id, next(first).id] == alone[:2]
    list(generate(model, prompt[:5], 3, cache=cache, stop_tokens=()))  # the cache, taken over
    with pytest.raises(NanoElasticError, match="a cache serves one generate"):
        next(first)  # instead of going on from another generation's state


def test_snapshot_restore_checks_before_it_writes(models):
    model = models[("A", True)]
    full = model.new_cache(1, 20)
    model(tokens(1, 12), full)
    saved = full.snapshot()
    for cache in (model.new_cache(1, 10), model.new_cache(2, 20),  # too short; a batch of 2
                  models[("B", True)].new_cache(1, 20)):  # another model's layers
        with pytest.raises(NanoElasticError, match="this snapshot is not of this cache"):
            cache.restore(saved)
        assert cache.length == 0 and not any(t.any() for s in cache.held(20) for t in s)
    again = model.new_cache(1, 20)
    again.restore(saved)
    assert again.length == 12 and all(
        torch.equal(a, b) for s, t in zip(again.held(12), full.held(12)) for a, b in zip(s, t))


def test_a_cache_runs_only_with_a_model_it_fits(models):
    model = models[("A", True)]
    bf16 = checkpoint.random_model(CONFIGS["A"], device="cpu", dtype=torch.bfloat16)
    for cache in (bf16.new_cache(1, 8), models[("B", True)].new_cache(1, 8)):
        with pytest.raises(NanoElasticError, match="this cache is not of this model"):
            model(tokens(1, 4), cache)
    with pytest.raises(NanoElasticError, match="cache must be a Cache .* a size goes as size="):
        model(tokens(1, 4), "40x16")  # the size given where the cache goes
    cache = model.new_cache(1, 8)
    model.nested("40x16")(tokens(1, 4), cache)  # every size fits the cache of its full model
    assert cache.length == 4
    other = models[("A", False)]
    step = ne.DecodeGraph(other, other.new_cache(1, 30))
    with pytest.raises(NanoElasticError, match="a DecodeGraph of another model"):
        generate(model, [1, 2, 3], 2, cache=step)


def test_generate_checks_its_arguments_when_called(models):
    """Each bad argument is one NanoElasticError from generate() itself, not from the first next()
    (or from deep inside torch)."""
    model = models[("A", True)]
    cases = [(dict(stop_tokens=2), "stop_tokens must be token ids, got 2"),
             (dict(stop_tokens=1.5), "stop_tokens must be token ids, got 1.5"),
             (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
             (dict(max_new_tokens=None), "max_new_tokens must be an integer >= 0, got None"),
             (dict(seed=1.5), r"seed must be an integer in 0..9223372036854775807, got 1.5"),
             (dict(seed=2**63), r"seed must be an integer in 0..9223372036854775807, got 9"),
             (dict(prompt=[1, 2**70]), "token id out of range"),
             (dict(prompt=[1, 97]), r"token id out of range: 1..97 not in 0..96"),
             (dict(switch="40x16"), "switch must be a Switch, got a str"),
             (dict(switch=Switch(None, on_token=500, after=1)),
              r"Switch on_token 500 is not a token id: the vocabulary is 0..96"),
             (dict(cache=5), "cache must be a Cache"), (dict(prompt=[]), "empty prompt")]
    for kwargs, message in cases:
        args = dict(prompt=[1, 2, 3], max_new_tokens=3) | kwargs
        with pytest.raises(NanoElasticError, match=message):
            generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args)
    for bad in ([[1, 2]], torch.tensor([1, 2])):
        with pytest.raises(NanoElasticError, match=r"integer tensor of shape \[batch, seq_len\]"):
            ne.prefill(model, bad, model.new_cache(1, 8))


def test_a_tiny_temperature_samples_like_greedy():
    logits = torch.tensor([0.0, 10.0, 20.0, 30.0])  # / 1e-38 would overflow: inf, then NaN
    for temperature in (1e-38, 1e-39, 1e-45):
        assert int(ne.sample(logits, temperature, generator=torch.Generator().manual_seed(0))) == 3
    with pytest.raises(NanoElasticError, match=r"one position's logits \[V\], got \[1, 4\]"):
        ne.sample(logits[None])


def test_nested_sizes_follow_the_full_models_tensors(models):
    """A nested size is views of the tensors the full model holds now: after load_state_dict with
    assign=True (new tensors) and in a deepcopy; converting a nested tree itself is refused (its
    copies would be what the full model runs at that size)."""
    model = checkpoint.random_model(CONFIGS["A"], device="cpu", dtype=torch.float32, seed=0)
    other = checkpoint.random_model(CONFIGS["A"], device="cpu", dtype=torch.float32, seed=1)
    x = tokens(1, 6)
    model.nested("40x16")
    model.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(model(x, size="40x16"), other(x, size="40x16"))
    twin = copy.deepcopy(model)
    full = dict(twin.named_parameters())
    assert all(p.untyped_storage().data_ptr() == full[name].untyped_storage().data_ptr()
               for name, p in twin.nested("40x16").named_parameters())
    with pytest.raises(NanoElasticError, match=r"cannot move or convert model.nested\(size\)"):
        model.nested("40x16").double()
    with pytest.raises(NanoElasticError, match="cannot load a state dict into model.nested"):
        model.nested("40x16").load_state_dict(other.nested("40x16").state_dict())
    model.bfloat16()  # the full model converts, and its sizes are views of the new tensors
    assert (model.nested("40x16").lm_head.weight.untyped_storage().data_ptr()
            == model.lm_head.weight.untyped_storage().data_ptr())
    assert model(x, size="40x16").isfinite().all()


def test_a_nested_config_describes_its_views():
    """model.nested(size).config (what slice.py writes) builds tensors of exactly the views'
    shapes, also for a dense MLP narrower than the expert FFN (it keeps its width under f)."""
    config = small_config("M-E*", intermediate_size=16)
    model = checkpoint.random_model(config, device="cpu", dtype=torch.float32, seed=0)
    for size, width in [("40x20", 16), ("32x8", 8), (None, 16)]:
        views = model.nested(size)
        assert views.config.intermediate_size == width
        with torch.device("meta"):
            built = Model(views.config)
        assert ({n: p.shape for n, p in built.named_parameters()}
                == {n: p.shape for n, p in views.named_parameters()})


# --------------------------------------------------------------------------------------------------
# clear errors

def test_bad_input_errors(models, checkpoints, tmp_path):
    model = models[("A", True)]
    cases = [
        (lambda: model(tokens(1, 4), size="XL"), "unknown size 'XL'"),
        (lambda: model(tokens(1, 4), size="23B"), "does not fit"),
        (lambda: model(torch.tensor([[0, 97]])), "token id out of range"),
        (lambda: model(torch.tensor([0, 1])), r"shape \[batch, seq_len\]"),
        (lambda: model(tokens(1, 5), model.new_cache(1, 4)), "cache overflow"),
        (lambda: model(tokens(2, 2), model.new_cache(1, 4)), "batch size"),
        (lambda: list(generate(model, [], 4)), "empty prompt"),
        (lambda: list(generate(model, list(range(64)), 4)), "prompt too long"),
        (lambda: list(generate(model, [1, 2], 80)), "prompt too long"),
        (lambda: list(generate(model, [1, 2], 4, switch=Switch("12B", after=1))), "does not fit"),
        (lambda: Switch(None, after=1, mode="swap"), "unknown switch mode"),
        (lambda: Model.from_pretrained(tmp_path / "nowhere"), "checkpoint folder not found"),
        (lambda: Model.from_pretrained(checkpoints[("A", True)], dtype=torch.float64),
         "dtype torch.float64: the compute dtype is torch.bfloat16"),
        (lambda: Model.from_pretrained(checkpoints[("A", True)], dtype="bfloat16"),
         "dtype 'bfloat16': the compute dtype is torch.bfloat16"),
        (lambda: Model.from_pretrained(checkpoints[("A", True)], size="12B"),
         r"size 12B = hidden 1920 x expert FFN 960 does not fit in this model \(48x24\)"),
        (lambda: Model.from_pretrained(checkpoints[("A", True)], size="40x16")(
            tokens(1, 4), size="48x24"), r"does not fit in this model \(40x16\)"),
    ]
    for call, message in cases:
        with pytest.raises(NanoElasticError, match=message):
            call()


def broken_copy(src: Path, dst: Path, edit=None, drop_file=None) -> Path:
    """A copy of checkpoint src with tensors changed by edit(dict) or a file removed."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if drop_file:
        (dst / drop_file).unlink()
    if edit:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            tensors = load_file(dst / shard)
            edit(tensors)
            save_file(tensors, dst / shard)
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
            index["weight_map"].update({k: shard for k in tensors})
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_bad_checkpoint_errors(checkpoints, tmp_path):
    src = checkpoints[("A", True)]
    expert = "backbone.layers.1.mixer.experts.3.up_proj.weight"

    def reshape(t):
        if "backbone.layers.0.mixer.in_proj.weight" in t:
            t["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(
                5, 5, dtype=torch.float8_e4m3fn)

    def drop(t):
        t.pop(expert, None)

    def extra(t):
        if expert in t:
            t["backbone.layers.1.mixer.experts.8.up_proj.weight"] = t[expert].clone()

    def unscaled(t):
        t.pop(expert.replace("weight", "weight_scale"), None)

    cases = [
        (dict(drop_file="config.json"), "missing config"),
        (dict(drop_file="model-00002-of-00003.safetensors"), "missing shard"),
        (dict(edit=reshape), r"wrong shape for backbone.layers.0.mixer.in_proj.weight: \[5, 5\], "
                             r"expected \[136, 48\]"),
        (dict(edit=drop), f"missing tensor in checkpoint: {expert}"),
        (dict(edit=extra),
         "unexpected tensor in checkpoint: backbone.layers.1.mixer.experts.8.up_proj.weight"),
        (dict(edit=unscaled), "some experts have a weight_scale and some do not"),
    ]
    for i, (how, message) in enumerate(cases):
        with pytest.raises(NanoElasticError, match=message):
            Model.from_pretrained(broken_copy(src, tmp_path / str(i), **how), device="cpu",
                                  verbose=False)


def test_writer_is_atomic(tmp_path):
    path = checkpoint.write_random_checkpoint(tmp_path / "ck", CONFIGS["A"], shards=2)
    with pytest.raises(NanoElasticError, match="already exists"):
        checkpoint.write_random_checkpoint(path, CONFIGS["A"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind


def test_demo_runs():
    out = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), "--max-new-tokens", "20",
                          "--switch-after", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "192x96: 8 tokens" in out.stdout and "256x128: 12 tokens" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), "--size", "99B"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "nanoelastic.py: error: unknown size '99B': use 30B (= 256x128), 23B (= 192x96), "
        "12B (= 128x64), or HIDDENxFFN up to 256x128")  # the demo's stand-ins are named
    one = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), "--max-new-tokens", "9",
                          "--switch-after", "8"], capture_output=True, text=True, timeout=300)
    assert "192x96: 8 tokens, " in one.stdout and "(includes the prefill)" in one.stdout
    assert (one.stdout.strip().splitlines()[-1].startswith("256x128: 1 token, ")
            and "prefill" not in one.stdout.splitlines()[-1])
    # --load 23B: the demo's 192x96 alone, no switch; its tokens are those of the 192x96 view
    alone = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), "--max-new-tokens", "8",
                            "--load", "23B"], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and "loaded random-fp8 at 192x96: " in alone.stderr, alone.stderr
    def token_line(out):  # the demo prints its token ids as [id][id]...
        return next(line for line in out.splitlines() if line.startswith("["))
    assert token_line(one.stdout).startswith(token_line(alone.stdout))
    assert alone.stdout.strip().splitlines()[-1].startswith("192x96: 8 tokens, ")


def test_readme_python_example_runs(tmp_path):
    """README's Python example, run on the demo checkpoint with the changes the README names (its
    path, device="cpu", the demo's sizes; fewer tokens to keep the test short)."""
    import chat

    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    ckpt = chat.write_demo_checkpoint(tmp_path / "demo-ckpt")
    for real, small in [('"checkpoints/elastic-fp8"', repr(str(ckpt))),
                        ('"23B"', '"192x96"'), ('"30B"', '"256x128"'),
                        ("from_pretrained(ckpt)", "from_pretrained(ckpt, device='cpu')"),
                        ("2048", "24"), ("1024", "8")]:
        assert real in code
        code = code.replace(real, small)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (scope["logits"].shape[-1] == chat.demo_config().vocab_size
            and scope["t"].size in ("192x96", "256x128"))


def test_from_random_is_the_random_checkpoint_without_the_disk(checkpoints):
    """checkpoint.random_model (what bench.py builds the full-size model with) holds exactly the
    tensors that write_random_checkpoint + from_pretrained give for the same seed, in the same
    dtypes and places."""
    loaded = ne.Model.from_pretrained(checkpoints[("A", True)], device="cpu", dtype=torch.float32,
                                      verbose=False)
    made = checkpoint.random_model(CONFIGS["A"], device="cpu", dtype=torch.float32, fp8=True,
                                   seed=len("A") + True)
    tensors = lambda m: dict(m.named_parameters()) | dict(m.named_buffers())
    a, b = tensors(loaded), tensors(made)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].dtype == b[name].dtype
                and torch.equal(a[name].float(), b[name].float())), name


def test_repo_is_self_contained():
    """Nothing in the repo reads or cites a file outside it (a sibling folder, a spec a user cannot
    open)."""
    import re

    files = ([p for p in ROOT.iterdir() if p.suffix in (".py", ".md", ".txt", ".json")]
             + [ROOT / ".ci" / "run"])
    for path in files:
        text = path.read_text()
        spec = "SP" + "EC"  # spelled apart so that this test does not find itself
        assert "../" + "shared" not in text and not re.search(rf"\b{spec}\b", text), path.name
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal of Triton kernels")
def test_triton_kernels_on_cpu_without_the_interpreter_is_one_line():
    env = ({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
           | {"NANOELASTIC_KERNELS": "triton"})
    run = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "nanoelastic.py: error: NANOELASTIC_KERNELS=triton on the CPU needs TRITON_INTERPRET=1")


def test_readme_first_screen_and_demo_commands(tmp_path):
    """README: set-up, then the demo, then the test command (as CI runs it); the Slicing example for
    the demo checkpoint runs as written."""
    import re

    readme = (ROOT / "README.md").read_text()
    order = [readme.index(s) for s in (
        "## Set up", "python -m venv .venv",
        "pip install torch --index-url https://download.pytorch.org/whl/cpu",
        "pip install -r requirements.txt", "python nanoelastic.py",
        'pip install pytest "transformers>=5" jinja2 matplotlib && python -m pytest -q')]
    assert order == sorted(order) and order[-1] < readme.index("## Files")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S)
                 if "write_demo_checkpoint" in b)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for line in block.strip().splitlines():
        line = (line.replace("python slice.py", f"{sys.executable} {ROOT / 'slice.py'}")
                    .replace("python -c", f"{sys.executable} -c"))
        run = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0, (line, run.stderr[-1000:])
    assert json.loads((tmp_path / "demo-192x96" / "config.json").read_text())["hidden_size"] == 192


def test_python_api_validates_like_the_cli():
    """Each bad argument of the Python API is one NanoElasticError that names it; prompts may be a
    list, a 1-D tensor or a [1, T] tensor."""
    model = checkpoint.random_model(ne.DEMO_CONFIG, device="cpu", dtype=torch.float32)
    prompt = [5, 6, 7]
    run = lambda **kw: list(ne.generate(model, kw.pop("prompt", prompt), 3, **kw))
    bad = [(dict(temperature=-1), "temperature must be >= 0"),
           (dict(temperature=1, top_p=0), "top_p must be in (0, 1]"),
           (dict(top_p=2), "top_p must be in (0, 1]"),
           (dict(top_k=-1), "top_k (0 = no limit) must be an integer >= 0, got -1"),
           (dict(prefill_chunk=0), "prefill_chunk must be an integer >= 1, got 0"),
           (dict(prompt=torch.zeros(2, 3, dtype=torch.long)), "of shape [T] or [1, T]"),
           (dict(prompt=[]), "empty prompt")]
    for kwargs, message in bad:
        with pytest.raises(ne.NanoElasticError, match=re.escape(message)):
            run(**kwargs)
    for kwargs, message in [(dict(after=-1), r"after \(new tokens\) must be an integer >= 1"),
                            (dict(after=0), r"after \(new tokens\) must be an integer >= 1"),
                            (dict(after=1.5), r"after \(new tokens\) must be an integer"),
                            (dict(after="3"), r"after \(new tokens\) must be an integer"),
                            (dict(on_token=-2, after=0), r"on_token \(a token id\) must be an "
                                                         r"integer >= 0, got -2"),
                            (dict(on_token="x"), r"on_token \(a token id\) must be an integer")]:
        with pytest.raises(ne.NanoElasticError, match=message):
            ne.Switch("256x128", **kwargs)
    assert ne.Switch("256x128", on_token=0, after=0).after == 0  # on_token 0 forced at once
    for args, name in [((0, 10), "batch_size"), ((1, 0), "max_len"), ((1, 8.5), "max_len"),
                       (("1", 8), "batch_size")]:
        with pytest.raises(ne.NanoElasticError, match=f"new_cache's {name} must be an integer"):
            model.new_cache(*args)
    with pytest.raises(ne.NanoElasticError, match="need at least one token per row"):
        model(torch.zeros(1, 0, dtype=torch.long))
    for chunk in (0, 1.5):
        with pytest.raises(ne.NanoElasticError, match="prefill's chunk must be an integer >= 1"):
            ne.prefill(model, torch.tensor([prompt]), model.new_cache(1, 8), chunk=chunk)
    if not torch.cuda.is_available():
        with pytest.raises(ne.NanoElasticError, match="no CUDA GPU here"):
            checkpoint.random_model(ne.DEMO_CONFIG, device="cuda")
    expected = run()
    assert (run(prompt=torch.tensor(prompt)) == expected
            and run(prompt=torch.tensor([prompt])) == expected)
    assert ne.parse_size("12b", ne.Config()) == ne.parse_size("12B", ne.Config()) == (1920, 960)
    assert ne.parse_size("192X96", ne.DEMO_CONFIG) == (192, 96)


def test_docstrings_and_nested_repr():
    for obj in [ne.Model, ne.Config, ne.Cache, ne.Switch, ne.Token, ne.generate, ne.sample,
                ne.Model.new_cache, ne.Model.forward, ne.prefill, ne.DecodeGraph, ne.Model.nested,
                ne.Model.from_pretrained]:
        assert (obj.__doc__ and "nn.Module" not in obj.__doc__
                and "Base class" not in obj.__doc__), obj
    model = checkpoint.random_model(ne.DEMO_CONFIG, device="cpu", dtype=torch.float32)
    text = repr(model.nested("128x64"))
    assert ("size 128x64" in text and "Embedding(512, 128)" in text
            and "Linear(in=128, out=64, experts=16" in text)
    assert "256" not in text.split("(norm)")[1].split("\n")[0] and "size 256x128" in repr(model)


# --------------------------------------------------------------------------------------------------
# audit fixes: each a test that failed before

def test_cli_bad_device_or_usage_is_one_line():
    for args, message in [(["--device", "foo"], "unknown device 'foo': use cpu or cuda"),
                          (["--device", "meta"], "cannot run on the meta device: use cpu or cuda"),
                          (["--device", "mps"], "cannot run on the mps device: use cpu or cuda"),
                          (["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int "
                                                        "value: 'abc' (see --help)")]:
        run = subprocess.run([sys.executable, str(ROOT / "nanoelastic.py"), *args],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines() == [f"nanoelastic.py: error: {message}"]
        assert "demo:" not in run.stdout  # refused before the demo writes its checkpoint


def test_a_cuda_device_that_is_not_there_is_one_error(monkeypatch):
    """cuda:N past the GPUs torch sees fails in resolve_device, before anything loads (as torch
    would later, with a traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checkpoint.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(NanoElasticError, match=r"device cuda:2: torch sees 2 CUDA GPU\(s\), "
                                               r"cuda:0 to cuda:1$"):
        checkpoint.resolve_device("cuda:2")


def test_cli_bad_tokenizer_or_size_is_one_line_before_the_model_loads(checkpoints, tmp_path,
                                                                       monkeypatch):
    import tokenizers

    ckpt = broken_copy(checkpoints[("A", True)], tmp_path / "ck")
    (ckpt / "tokenizer.json").write_text('{"version": "1.0" "model": {}}')
    loaded = []
    monkeypatch.setattr(ne, "signals_unwind", lambda: None)
    monkeypatch.setattr(ne.Model, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as exit_:
        ne.cli(["--ckpt", str(ckpt), "--device", "cpu"])
    assert exit_.value.code.startswith(
        f"nanoelastic.py: error: {ckpt / 'tokenizer.json'}: expected")
    # sizes that do not fit (the --load size, or the checkpoint) are refused before the load too
    import chat
    good = chat.write_demo_checkpoint(tmp_path / "demo")  # with a tokenizer
    for args, message in [(["--load", "192x96", "--size", "256x128"], "size 256x128 = hidden "
                           "256 x expert FFN 128 does not fit in this model (192x96)"),
                          (["--switch-to", "99B"], "unknown size '99B'")]:
        with pytest.raises(SystemExit) as exit_:
            ne.cli(["--ckpt", str(good), "--device", "cpu", *args])
        assert exit_.value.code.startswith(f"nanoelastic.py: error: {message}"), exit_.value.code
    # unreadable (as root, chmod cannot make it so): the tokenizers library's own error
    class Denied:
        @staticmethod
        def from_file(path):
            raise Exception("Permission denied (os error 13)")
    monkeypatch.setattr(tokenizers, "Tokenizer", Denied)
    with pytest.raises(SystemExit) as exit_:
        ne.cli(["--ckpt", str(ckpt), "--device", "cpu"])
    assert exit_.value.code == (
        f"nanoelastic.py: error: {ckpt / 'tokenizer.json'}: Permission denied (os error 13)")
    with pytest.raises(SystemExit) as exit_:
        ne.cli(["--ckpt", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert exit_.value.code == (
        f"nanoelastic.py: error: checkpoint folder not found: {tmp_path / 'nowhere'}")
    assert loaded == []


def test_cli_ctrl_c_exits_130_and_sigterm_143():
    import signal
    import time

    for sig, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
        proc = subprocess.Popen([sys.executable, str(ROOT / "nanoelastic.py"),
                                 "--max-new-tokens", "3000", "--switch-after", "2000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().startswith(b"demo:")
        assert proc.stdout.read(1) == b"["  # generating
        time.sleep(0.2)  # inside generate(), where the time goes
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code and b"Traceback" not in err, err


@pytest.mark.parametrize("script", ["nanoelastic.py", "chat.py", "bench.py", "slice.py"])
def test_ctrl_c_while_a_script_imports_torch_exits_130_quietly(script):
    """The first seconds of every script go to importing torch: Ctrl-C there ends it, no traceback
    (and --help shows that it never got further)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / script), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)  # the interpreter is up; torch takes a second or more
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, b"", b"")


def test_generate_refuses_bad_argument_types_and_non_finite_values(models):
    model = models[("A", True)]
    bad = [(dict(top_k=2.5), r"top_k \(0 = no limit\) must be an integer"),
           (dict(temperature="1"), "temperature must be a finite number"),
           (dict(prompt="abc"), "prompt must be token ids"),
           (dict(prompt=[1.5, 2]), "prompt must be token ids"),
           (dict(prompt=[True, False]), "prompt must be token ids"),  # bools are not token ids
           (dict(prompt=torch.tensor([True, False])), "prompt must be token ids"),
           (dict(prompt=torch.tensor([1, 2], dtype=torch.uint8)), "prompt must be token ids"),
           (dict(temperature=math.inf), "temperature must be a finite number"),
           (dict(temperature=1, top_p=math.nan), "top_p must be a finite number"),
           (dict(temperature=1, top_p=math.inf), "top_p must be a finite number")]
    for kwargs, message in bad:
        with pytest.raises(NanoElasticError, match=message):
            list(generate(model, kwargs.pop("prompt", [1, 2, 3]), 3, **kwargs))
    with pytest.raises(NanoElasticError, match=r"top_k \(0 = no limit\) must be an integer"):
        ne.sample(torch.zeros(8), 1.0, 1.0, 2.5)


@pytest.mark.parametrize("error,code", [
    (NanoElasticError("bad size"), "demo.py: error: bad size"),
    (OSError(28, "No space left on device"), "demo.py: error: [Errno 28] No space left on device"),
    ("safetensors", "demo.py: error: corrupt shard"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nMore."),
     "demo.py: error: CUDA out of memory. Tried to allocate 2.00 GiB."),
    (KeyboardInterrupt(), 130), (ne.Terminated(), 143), (None, 3)])
def test_run_cli_ends_every_way_with_one_line_or_a_code(monkeypatch, error, code):
    """Every command line ends through run_cli: bad input, an OS error or a shard corrupt beyond its
    header (SafetensorError) is one line; Ctrl-C and SIGTERM are 130 and 143; main's int is kept."""
    from safetensors import SafetensorError

    monkeypatch.setattr(ne, "signals_unwind", lambda: None)

    def main():
        if error is None:
            return 3
        raise SafetensorError("corrupt shard") if error == "safetensors" else error
    with pytest.raises(SystemExit) as exit_:
        ne.run_cli("demo.py", main)
    assert exit_.value.code == code


def test_run_cli_after_sigterm_exits_143_whatever_the_exception(monkeypatch):
    """SIGTERM's exception, raised inside C code (torch parsing a shape that Triton's interpreter
    gives as objects with __index__), can come out as another: it is still the signal's 143."""
    monkeypatch.setattr(ne, "signals_unwind", lambda: None)
    monkeypatch.setattr(ne.Terminated, "received", True)

    def main():
        raise TypeError("expected a sequence of integers or a single integer, got '(64, 64)'")
    with pytest.raises(SystemExit) as exit_:
        ne.run_cli("demo.py", main)
    assert exit_.value.code == 143



def test_run_cli_prints_what_stdout_cannot_encode_as_a_replacement():
    """A path that is not UTF-8 (Python holds its bytes as surrogates) printed to a strict UTF-8
    stdout: '?' in its place, not a UnicodeEncodeError at the end of a long run."""
    code = ("import nanoelastic as ne; "
            "ne.run_cli('demo.py', lambda: print('wrote /tmp/out\\udcff'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0 and proc.stdout == b"wrote /tmp/out?\n", proc.stderr

def test_no_cuda_error_fits_the_api_and_the_cli():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(NanoElasticError) as error:
        checkpoint.resolve_device("cuda")
    assert "--device" not in str(error.value) and "use the cpu device" in str(error.value)


def test_cli_stops_at_the_checkpoints_eos_and_takes_the_demos_stand_in_sizes(
        checkpoints, tmp_path, monkeypatch, capsys):
    """The stop ids are generation_config.json's eos_token_id, else config.json's (checked):
    from_pretrained keeps them as model.stop_tokens, generate()'s default; the demo takes 30B /
    23B / 12B for its own three sizes."""
    import shutil
    folder = shutil.copytree(checkpoints[("A", True)], tmp_path / "ckpt")
    config = ne.Config.from_file(folder / "config.json")
    (folder / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    assert checkpoint.stop_tokens(folder, config) == (5, 7)
    model = ne.Model.from_pretrained(folder, device="cpu", dtype=torch.float32, verbose=False)
    assert model.stop_tokens == (5, 7) and ne.Model(config).stop_tokens == (config.eos_token_id,)
    free = [t.id for t in ne.generate(model, [1, 2, 3], 8, stop_tokens=())]
    model.stop_tokens = (free[2],)
    assert ([t.id for t in ne.generate(model, [1, 2, 3], 8)]
            == free[:free.index(free[2]) + 1])
    (folder / "generation_config.json").unlink()
    assert checkpoint.stop_tokens(folder, config) == (config.eos_token_id,)
    for bad, message in [('{"eos_token_id": [5, 97]}', r"eos_token_id \[5, 97\] is not below"),
                         ('{"eos_token_id": "2"}', "eos_token_id must be int or list of int")]:
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(NanoElasticError, match=message):
            checkpoint.stop_tokens(folder, config)
    seen = {}
    real = ne.generate

    def spy(model, *args, **kwargs):
        seen.update(kwargs, stops=model.stop_tokens)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(ne, "generate", spy)
    ne.main(["--size", "12b", "--switch-to", " 30B", "--switch-after", "2",
             "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "stop_tokens" not in seen and seen["stops"] == (ne.DEMO_CONFIG.eos_token_id,)
    assert "128x64: 2 tokens" in out and "256x128: 2 tokens" in out


def test_decode_step_takes_one_token_per_row(models):
    model = models[("A", True)]
    step = ne.DecodeGraph(model, model.new_cache(1, 16))
    ne.prefill(model, torch.tensor([[1, 2, 3]]), step.cache)
    for bad in (torch.tensor([[1, 2]]), torch.tensor([1]), [[1]], torch.tensor([[1.0]])):
        with pytest.raises(NanoElasticError, match=r"token ids \(int64 or int32\) of shape "
                                                   r"\[batch, 1\]"):
            step(bad)
    assert step.cache.length == 3
    assert (step(torch.tensor([[4]])).shape == (1, model.config.vocab_size)
            and step.cache.length == 4)
