"""TransNeXt-Tiny + UPerHead: sliding-window ops and attention against direct loops, official
key names, weights, the card's parameter groups (shapes, size, weights errors, trainer step:
tests/test_model_contract.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from medplan.architectures import build_model, count_parameters, model_deviations, model_parameter_groups
from medplan.architectures.transnext import (
    AggregatedAttention,
    Attention,
    TransNeXt,
    local_av,
    local_padding_mask,
    local_qk_rpb,
    relative_position_cpb,
    swattention_available,
)
from medplan.errors import MedplanError
from model_fixtures import full_size

TINY = {"embed_dims": [16, 32, 64, 128], "num_heads": [1, 2, 4, 8], "depths": [1, 1, 2, 1], "decoder_channels": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _taps(window):
    half = window // 2
    return [(ki - half, kj - half) for ki in range(window) for kj in range(window)]


# ------------------------------------------------------------------ sliding-window ops
def _slow_qk_rpb(q, k, rpb, height, width, window):
    """Loop over batch, head, pixel and tap (the swattention kernel's definition)."""
    b_, h_, n_, _ = q.shape
    out = torch.full((b_, h_, n_, window * window), float("-inf"), dtype=q.dtype)
    for b in range(b_):
        for h in range(h_):
            for i in range(height):
                for j in range(width):
                    for z, (di, dj) in enumerate(_taps(window)):
                        ni, nj = i + di, j + dj
                        if 0 <= ni < height and 0 <= nj < width:
                            out[b, h, i * width + j, z] = q[b, h, i * width + j] @ k[b, h, ni * width + nj] + rpb[h, z]
    return out


def _slow_av(attn, v, height, width, window):
    b_, h_, n_, d = v.shape
    out = torch.zeros(b_, h_, n_, d, dtype=v.dtype)
    for b in range(b_):
        for h in range(h_):
            for i in range(height):
                for j in range(width):
                    for z, (di, dj) in enumerate(_taps(window)):
                        ni, nj = i + di, j + dj
                        if 0 <= ni < height and 0 <= nj < width:
                            out[b, h, i * width + j] += attn[b, h, i * width + j, z] * v[b, h, ni * width + nj]
    return out


@pytest.mark.parametrize("height,width,window", [(4, 5, 3), (3, 2, 3), (5, 4, 5)])
def test_local_ops_match_direct_loops(height, width, window):
    g = torch.Generator().manual_seed(0)
    n = height * width
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, window * window, generator=g, dtype=torch.float64)
    attn = torch.randn(2, 3, n, window * window, generator=g, dtype=torch.float64)
    got = local_qk_rpb(q, k, rpb, height, width, window, core="pytorch")
    want = _slow_qk_rpb(q, k, rpb, height, width, window)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(want).any()
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-12)
    # the mask given by the caller and the one computed inside agree
    mask = local_padding_mask(height, width, window)
    assert torch.equal(local_qk_rpb(q, k, rpb, height, width, window, mask, core="pytorch"), got)
    assert mask.shape == (n, window * window) and mask.sum() == torch.isinf(want[0, 0]).sum()
    out = local_av(attn, v, height, width, window, core="pytorch")
    assert torch.allclose(out, _slow_av(attn, v, height, width, window), atol=1e-12)


def test_local_av_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    attn = torch.randn(1, 2, 12, 9, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_av(a, b, 3, 4, 3, core="pytorch"), (attn, v))
    # qk: finite taps only (the masked ones are constant -inf)
    q = torch.randn(1, 2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = local_padding_mask(3, 4, 3)
    assert torch.autograd.gradcheck(lambda a, b, c: local_qk_rpb(a, b, c, 3, 4, 3, core="pytorch")[..., ~mask],
                                    (q, k, rpb))


def test_unknown_core_is_rejected():
    x = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="core"):
        local_av(torch.zeros(1, 1, 4, 9), x, 2, 2, 3, core="triton")
    if not swattention_available():
        with pytest.raises(RuntimeError, match="swattention"):
            local_av(torch.zeros(1, 1, 4, 9), x, 2, 2, 3, core="cuda")
    with pytest.raises(MedplanError, match="local_attention"):
        build_model("transnext_t", 3, 2, local_attention="fast", **TINY)


@pytest.mark.skipif(not swattention_available(), reason="needs CUDA and the compiled swattention extension")
def test_cuda_kernels_match_pytorch():
    g = torch.Generator().manual_seed(2)
    height, width = 9, 11
    q, k, v = (torch.randn(2, 3, height * width, 16, generator=g).cuda() for _ in range(3))
    rpb = torch.randn(3, 9, generator=g).cuda()
    weights = torch.randn(2, 3, height * width, 9, generator=g).cuda()
    outs, grads = [], []
    for core in ("cuda", "pytorch"):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, rpb, weights, v)]
        a = local_qk_rpb(*inputs[:3], height, width, 3, core=core)
        o = local_av(inputs[3], inputs[4], height, width, 3, core=core)
        (a.masked_fill(torch.isinf(a), 0).square().sum() + o.square().sum()).backward()
        outs.append((a.detach(), o.detach()))
        grads.append([t.grad for t in inputs])
    assert torch.equal(torch.isinf(outs[0][0]), torch.isinf(outs[1][0]))
    fin = torch.isfinite(outs[1][0])
    assert torch.allclose(outs[0][0][fin], outs[1][0][fin], atol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ position tables
def _direct_cpb(query_size, key_size, pretrain_size):
    """The reference's construction: all query/key pairs, rows deduplicated in 2-D."""
    qh = torch.arange(query_size[0], dtype=torch.float32)
    qw = torch.arange(query_size[1], dtype=torch.float32)
    kh = F.adaptive_avg_pool1d(qh[None], key_size[0])[0]
    kw = F.adaptive_avg_pool1d(qw[None], key_size[1])[0]
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))
    rel = torch.stack([(qh[:, None] - kh[None]) / (pretrain_size[0] - 1) * 8,
                       (qw[:, None] - kw[None]) / (pretrain_size[1] - 1) * 8], dim=-1).view(-1, 2)
    table, index = torch.unique(rel, return_inverse=True, dim=0)
    return index, torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


@pytest.mark.parametrize("query,key,pretrain", [((8, 8), (1, 1), (56, 56)), ((7, 10), (3, 2), (28, 28)),
                                                ((4, 5), (4, 5), (7, 7))])
def test_position_tables_match_the_reference_construction(query, key, pretrain):
    index, table = relative_position_cpb(query, key, pretrain)
    ref_index, ref_table = _direct_cpb(query, key, pretrain)
    assert index.shape == ref_index.shape == (query[0] * query[1] * key[0] * key[1],)
    assert len(table) == len(ref_table)  # the same distinct offsets
    assert torch.allclose(table[index], ref_table[ref_index], atol=1e-6)  # the same coordinates per pair


def test_stage_geometry_scales_by_the_number_of_keys_each_query_sees():
    bb = TransNeXt(3, embed_dims=[8, 16, 32, 64], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1])
    index, table, scale, mask = bb.stage_geometry(0, 10, 12, torch.device("cpu"))  # stride 4, pooled by 8: 1x1
    assert scale.shape == (120, 1) and mask.shape == (120, 9)
    assert scale[0, 0] == pytest.approx(math.log(4 + 1))  # corner: 4 window taps + 1 pooled key
    assert scale[13, 0] == pytest.approx(math.log(9 + 1))  # interior pixel (1, 1)
    assert scale[5, 0] == pytest.approx(math.log(6 + 1))  # top edge
    assert index.shape == (120,) and table.shape[1] == 2
    ref_index, ref_table = _direct_cpb((10, 12), (1, 1), (56, 56))  # pretrain 224 / 4
    assert torch.allclose(table[index], ref_table[ref_index], atol=1e-6)
    index, table, scale, mask = bb.stage_geometry(3, 3, 4, torch.device("cpu"))  # last stage: full attention
    assert mask is None and scale.ndim == 0 and float(scale) == pytest.approx(math.log(12))
    assert index.shape == (144,)
    assert bb.stage_geometry(3, 3, 4, torch.device("cpu"))[0] is index  # cached per size


# ------------------------------------------------------------------ attention modules
def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_aggregated_attention_matches_a_per_pixel_loop():
    torch.manual_seed(0)
    height, width, dim, heads, sr, pretrain = 4, 5, 8, 2, 2, 7
    m = AggregatedAttention(dim, heads, window_size=3, sr_ratio=sr, core="pytorch").double().eval()
    _randomise(m, 1)
    with torch.no_grad():
        m.norm.weight.add_(1.0)
    x = torch.randn(2, height * width, dim, dtype=torch.float64)
    ph, pw = height // sr, width // sr
    index, table = relative_position_cpb((height, width), (ph, pw), (pretrain, pretrain))
    mask = local_padding_mask(height, width, 3)
    scale = torch.log((~mask).sum(-1, keepdim=True).double() + ph * pw)
    got = m(x, height, width, index, table.double(), scale, mask)

    hd = dim // heads
    pooled = F.adaptive_avg_pool2d(m.act(m.sr(x.transpose(1, 2).reshape(2, dim, height, width))), (ph, pw))
    kv_pool = m.kv(m.norm(pooled.flatten(2).transpose(1, 2)))
    k_pool, v_pool = kv_pool[..., :dim], kv_pool[..., dim:]
    kv = m.kv(x)
    qx = m.q(x)
    axis_kh = F.adaptive_avg_pool1d(torch.arange(height, dtype=torch.float64)[None], ph)[0]
    axis_kw = F.adaptive_avg_pool1d(torch.arange(width, dtype=torch.float64)[None], pw)[0]

    def cpb(dy, dx):
        c = torch.tensor([dy, dx], dtype=torch.float64) / (pretrain - 1) * 8
        c = torch.sign(c) * torch.log2(c.abs() + 1) / math.log2(8)
        return m.cpb_fc2(torch.relu(m.cpb_fc1(c)))

    want = torch.zeros(2, height * width, dim, dtype=torch.float64)
    with torch.no_grad():
        for b in range(2):
            for i in range(height):
                for j in range(width):
                    n = i * width + j
                    taps = [(z, (i + di) * width + j + dj) for z, (di, dj) in enumerate(_taps(3))
                            if 0 <= i + di < height and 0 <= j + dj < width]
                    for h in range(heads):
                        sl = slice(h * hd, (h + 1) * hd)
                        qn = F.normalize(qx[b, n, sl], dim=0)
                        qs = (qn + m.query_embedding[h, 0]) * F.softplus(m.temperature[h, 0, 0]) * \
                            math.log(len(taps) + ph * pw)
                        logits = [qs @ F.normalize(kv[b, t, :dim][sl], dim=0) + m.relative_pos_bias_local[h, z]
                                  for z, t in taps]
                        logits += [qs @ F.normalize(k_pool[b, p, sl], dim=0)
                                   + cpb(i - axis_kh[p // pw], j - axis_kw[p % pw])[h] for p in range(ph * pw)]
                        w = torch.softmax(torch.stack(logits), 0)
                        out = torch.zeros(hd, dtype=torch.float64)
                        for (z, t), wt in zip(taps, w[:len(taps)]):
                            dyn = qn @ m.learnable_tokens[h, :, z] + m.learnable_bias[h, 0, z]
                            out += (wt + dyn) * kv[b, t, dim:][sl]
                        for p, wt in enumerate(w[len(taps):]):
                            out += wt * v_pool[b, p, sl]
                        want[b, n, sl] = out
        want = m.proj(want)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_last_stage_attention_matches_a_dense_loop():
    torch.manual_seed(0)
    height, width, dim, heads, pretrain = 3, 2, 6, 2, 7
    m = Attention(dim, heads).double().eval()
    _randomise(m, 2)
    x = torch.randn(1, height * width, dim, dtype=torch.float64)
    index, table = relative_position_cpb((height, width), (height, width), (pretrain, pretrain))
    n = height * width
    got = m(x, height, width, index, table.double(), torch.log(torch.tensor(float(n), dtype=torch.float64)))
    hd = dim // heads
    qkv = m.qkv(x)[0]
    want = torch.zeros(n, dim, dtype=torch.float64)
    with torch.no_grad():
        for h in range(heads):
            q, k, v = (qkv[:, c * dim + h * hd: c * dim + (h + 1) * hd] for c in range(3))
            for a in range(n):
                qs = (F.normalize(q[a], dim=0) + m.query_embedding[h, 0]) * F.softplus(m.temperature[h, 0, 0]) * \
                    math.log(n)
                logits = []
                for c in range(n):
                    rel = torch.tensor([a // width - c // width, a % width - c % width], dtype=torch.float64)
                    rel = rel / (pretrain - 1) * 8
                    rel = torch.sign(rel) * torch.log2(rel.abs() + 1) / math.log2(8)
                    logits.append(qs @ F.normalize(k[c], dim=0) + m.cpb_fc2(torch.relu(m.cpb_fc1(rel)))[h])
                want[a, h * hd:(h + 1) * hd] = torch.softmax(torch.stack(logits), 0) @ v
        want = m.proj(want)
    assert torch.allclose(got[0], want, atol=1e-10)


# ------------------------------------------------------------------ model
def test_attention_parameters_learn_and_size_tables_are_rebuilt_per_size():
    torch.manual_seed(0)
    model = build_model("transnext_t", 1, 1, pretrained=False, **TINY)
    model(torch.randn(2, 1, 64, 64)).square().mean().backward()
    bb = model.backbone
    for p in (bb.block1[0].attn.learnable_tokens, bb.block1[0].attn.cpb_fc1.weight,
              bb.block2[0].attn.relative_pos_bias_local, bb.block4[0].attn.query_embedding):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # tables are rebuilt per size and cached: a fresh model agrees after sizes changed
        model(torch.randn(1, 1, 37, 50))
        x = torch.randn(1, 1, 48, 32)
        fresh = build_model("transnext_t", 1, 1, pretrained=False, **TINY).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.allclose(model(x), fresh(x), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build_model("transnext_t", 3, 2, pretrained=False, with_cp=with_cp, drop_path_rate=0.0, **TINY)
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append(model.backbone.block2[0].attn.kv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_full_size_config_matches_the_paper():
    model = full_size("transnext_t")
    # the TransNeXt paper's 28.2M for Tiny includes the 576 -> 1000 classifier
    assert abs((count_parameters(model.backbone)["total"] + 577_000) / 1e6 - 28.2) < 0.1
    bb = model.backbone
    assert [len(getattr(bb, f"block{i}")) for i in range(1, 5)] == [2, 2, 15, 2]
    assert bb.out_channels == [72, 144, 288, 576] and bb.sr_ratios == [8, 4, 2, 1]
    assert [getattr(bb, f"block{i}")[0].attn.num_heads for i in range(1, 5)] == [3, 6, 12, 24]
    assert isinstance(bb.block3[0].attn, AggregatedAttention) and isinstance(bb.block4[0].attn, Attention)
    assert bb.block4[1].drop_path.drop_prob == pytest.approx(0.4)  # linear 0 -> 0.4 (segmentation backbone)
    assert bb.block1[0].mlp.fc1.out_features == 2 * int(2 * 72 * 8 / 3)
    assert bb.block1[0].norm1.eps == 1e-6 and bb.patch_embed1.norm.eps == 1e-5
    assert bb.patch_embed1.proj.kernel_size == (7, 7) and bb.patch_embed1.proj.stride == (4, 4)
    assert model.decode_head.channels == 512


def _official_names(depths=(2, 2, 15, 2), dims=(72, 144, 288, 576), heads=(3, 6, 12, 24), ratios=(8, 8, 4, 4),
                    in_chans=3):
    """Key -> shape of the reference TransNeXt (without its classifier), from its module structure."""
    keys = {}
    for s in range(4):
        c, h, d = dims[s], heads[s], dims[s] // heads[s]
        k, cin = (7, in_chans) if s == 0 else (3, dims[s - 1])
        keys[f"patch_embed{s + 1}.proj.weight"] = (c, cin, k, k)
        keys[f"patch_embed{s + 1}.proj.bias"] = (c,)
        keys.update({f"patch_embed{s + 1}.norm.weight": (c,), f"patch_embed{s + 1}.norm.bias": (c,),
                     f"norm{s + 1}.weight": (c,), f"norm{s + 1}.bias": (c,)})
        hidden = int(2 * c * ratios[s] / 3)
        for j in range(depths[s]):
            p = f"block{s + 1}.{j}."
            keys.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,),
                         p + "norm2.bias": (c,), p + "mlp.fc1.weight": (2 * hidden, c),
                         p + "mlp.fc1.bias": (2 * hidden,),
                         p + "mlp.dwconv.dwconv.weight": (hidden, 1, 3, 3), p + "mlp.dwconv.dwconv.bias": (hidden,),
                         p + "mlp.fc2.weight": (c, hidden), p + "mlp.fc2.bias": (c,),
                         p + "attn.temperature": (h, 1, 1), p + "attn.query_embedding": (h, 1, d),
                         p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                         p + "attn.cpb_fc1.weight": (512, 2), p + "attn.cpb_fc1.bias": (512,),
                         p + "attn.cpb_fc2.weight": (h, 512), p + "attn.cpb_fc2.bias": (h,)})
            if s < 3:
                keys.update({p + "attn.q.weight": (c, c), p + "attn.q.bias": (c,), p + "attn.kv.weight": (2 * c, c),
                             p + "attn.kv.bias": (2 * c,), p + "attn.sr.weight": (c, c, 1, 1), p + "attn.sr.bias": (c,),
                             p + "attn.norm.weight": (c,), p + "attn.norm.bias": (c,),
                             p + "attn.relative_pos_bias_local": (h, 9), p + "attn.learnable_tokens": (h, d, 9),
                             p + "attn.learnable_bias": (h, 1, 9)})
            else:
                keys.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,)})
    return keys


def test_backbone_keys_are_the_official_names():
    with torch.device("meta"):
        state = TransNeXt(3).state_dict()
    want = _official_names()
    assert {k: tuple(v.shape) for k, v in state.items()} == want  # no buffers, no extra tensors


# ------------------------------------------------------------------ weights
def _official_checkpoint(path):
    """An ImageNet-style file: the official backbone keys + the classifier, under 'model'."""
    torch.manual_seed(3)
    cfg = {k: TINY[k] for k in ("embed_dims", "num_heads", "depths")}
    src = TransNeXt(3, **cfg)
    state = dict(src.state_dict())
    assert set(state) == set(_official_names(cfg["depths"], cfg["embed_dims"], cfg["num_heads"]))
    for p in state.values():
        p.normal_()  # distinguishable from any initialisation
    state["head.weight"] = torch.randn(1000, TINY["embed_dims"][-1])
    state["head.bias"] = torch.randn(1000)
    torch.save({"model": state}, path)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_loads_an_official_style_checkpoint_with_gray_stem(tmp_path, monkeypatch):
    want = _official_checkpoint(tmp_path / "transnext_tiny_224_1k.pth")
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    model = build_model("transnext_t", 1, 2, pretrained=True, **TINY)
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["n_loaded"] == len(want) and sorted(report["unexpected"]) == ["head.bias", "head.weight"]
    got = model.backbone.state_dict()
    assert torch.allclose(got["patch_embed1.proj.weight"], want["patch_embed1.proj.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], want[k]) for k in want if k != "patch_embed1.proj.weight")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


# ------------------------------------------------------------------ parameter groups (model card)
def test_card_exempts_the_authors_keys_from_weight_decay():
    from medplan.trainers import Trainer, get_trainer

    assert get_trainer("transnext_t") is Trainer  # the groups are a model card fact
    model = build_model("transnext_t", 3, 2, pretrained=False, **TINY)
    decay, no_decay = model_parameter_groups("transnext_t", model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay  # the plan's value for the rest
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    exempt = {names[id(p)] for p in no_decay["params"]}
    kept = {names[id(p)] for p in decay["params"]}
    assert {"backbone.block1.0.attn.query_embedding", "backbone.block1.0.attn.relative_pos_bias_local",
            "backbone.block1.0.attn.cpb_fc1.weight", "backbone.block4.0.attn.temperature",
            "backbone.block1.0.norm1.weight", "backbone.patch_embed1.norm.bias", "backbone.norm4.weight",
            "backbone.block2.0.attn.norm.weight"} <= exempt
    # as in mmcv's custom_keys: biases, the dynamic local bias and the head's BatchNorm keep weight decay
    assert {"backbone.block1.0.attn.learnable_tokens", "backbone.block1.0.attn.learnable_bias",
            "backbone.block1.0.attn.q.bias", "decode_head.bottleneck.bn.weight"} <= kept
    assert any("custom_keys, decay_mult=0" in d for d in model_deviations("transnext_t"))
