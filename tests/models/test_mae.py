"""The fast MaskedAutoencoderViT against the reference, patch_model, HF patching, compile, DDP."""
import os
import subprocess
import sys
import pytest
import torch

import mae_fast.models as M
import mae_fast.reference as R
from mae_fast import ops
from mae_fast.patching import patch_model
from mae_fast.testing import assert_same_mae_step, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    # base-like: the base layout shrunk (patch 16, 4x4 grid)
    "base_like": dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
    "p14": dict(img_size=56, patch_size=14, embed_dim=36, depth=1, num_heads=3,
                decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2),
    "p8_nonsquare": dict(img_size=(24, 40), patch_size=8, embed_dim=40, depth=1, num_heads=2,
                         decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, in_chans=2),
    # a 3x3 grid: ratio 0.9 keeps int(9 * 0.1) = 0 patches
    "grid3": dict(img_size=24, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
}


def _pair(name, norm_pix=True, seed=0):
    torch.manual_seed(seed)
    ref = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=norm_pix, **CONFIGS[name])
    fast = M.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=norm_pix, **CONFIGS[name])
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _inputs(model, N=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    C, (H, W) = model.patch_embed.in_chans, model.patch_embed.img_size
    return torch.randn(N, C, H, W, generator=gen), torch.rand(N, model.patch_embed.num_patches, generator=gen)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,ratio,norm_pix", [
    ("base_like", 0.75, True), ("base_like", 0.5, False), ("p14", 0.9, True), ("p8_nonsquare", 0.75, False),
    ("p8_nonsquare", 0.5, True),
])
def test_parity_fp32(name, ratio, norm_pix):
    ref, fast = _pair(name, norm_pix)
    imgs, noise = _inputs(ref)
    assert_same_mae_step(ref, fast, imgs, ratio, noise)


def test_forward_train_same_loss_and_grads():
    ref, fast = _pair("base_like")
    imgs, noise = _inputs(ref)
    loss_full = fast(imgs, 0.75, noise)[0]
    loss_full.backward()
    g_full = {k: v.clone() for k, v in _grads(fast).items()}
    fast.zero_grad()
    loss_train = fast.forward_train(imgs, 0.75, noise)
    loss_train.backward()
    assert abs(loss_train.item() - loss_full.item()) <= 1e-6 * loss_full.item()
    for k, g in _grads(fast).items():
        assert rel_err(g, g_full[k]) < 1e-5, k


def _autocast_errors(model, exact, imgs, noise, device_type, train=False):
    """Relative errors against the float64 model of one bf16-autocast step: loss, pred, every gradient."""
    model.zero_grad()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        if train:
            loss, pred = model.forward_train(imgs, 0.75, noise), None
        else:
            loss, pred, _ = model(imgs, 0.75, noise)
    loss.backward()
    errs = {"loss": rel_err(loss, exact["loss"])}
    if pred is not None:
        errs["pred"] = rel_err(pred, exact["pred"])
    errs.update({n: rel_err(p.grad, exact[n]) for n, p in model.named_parameters() if p.grad is not None})
    return errs


def _exact_step(ref, imgs, noise):
    exact_model = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=ref.norm_pix_loss, **CONFIGS["base_like"])
    exact_model.load_state_dict(ref.state_dict())
    exact_model = exact_model.double().to(imgs.device)
    loss, pred, _ = exact_model(imgs.double(), 0.75, noise)
    loss.backward()
    return {"loss": loss, "pred": pred, **{n: p.grad for n, p in exact_model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("backend", ["auto", "mae_fast"])
@pytest.mark.parametrize("train", [False, True])
def test_parity_bf16_autocast(train, backend):
    """bf16 autocast, on the fused ops' torch path: loss, pred and every parameter's gradient of the fast model
    are within twice the reference's own autocast error against the float64 model (+ 1e-4), with SDPA's
    attention or mae_fast's."""
    import mae_fast.nn as mnn

    ref, fast = _pair("base_like")
    imgs, noise = _inputs(ref)
    exact = _exact_step(ref, imgs, noise)
    with ops.path("torch"), mnn.attn_backend(backend):
        errs_fast = _autocast_errors(fast, exact, imgs, noise, "cpu", train)
    errs_ref = _autocast_errors(ref, exact, imgs, noise, "cpu")
    for k, e in errs_fast.items():
        assert e <= 2 * errs_ref[k] + 1e-4, (k, e, errs_ref[k])


@pytest.mark.parametrize("train", [False, True])
def test_fast_model_on_the_kernels_equals_its_torch_path(train, triton_path):
    """The whole fast model with every fused op on its Triton kernels (the interpreter on a CPU), mae_fast's
    attention (qkv_attention) and MLP (GEMM epilogues) included, against the same model on the ops' torch path:
    loss and every gradient, fp32 (bf16 on the kernels: tests/ops, where the interpreter's truncating casts are
    allowed for)."""
    import mae_fast.nn as mnn

    _, fast = _pair("base_like")
    imgs, noise = _inputs(fast)
    results = []
    for path in ("triton", "torch"):
        fast.zero_grad()
        with ops.path(path), mnn.attn_backend("mae_fast"):
            loss = fast.forward_train(imgs, 0.75, noise) if train else fast(imgs, 0.75, noise)[0]
            loss.backward()
        results.append({"loss": loss.detach(), **{k: g.clone() for k, g in _grads(fast).items()}})
    assert {"qkv_attention_fwd_kernel", "mlp_fc1_kernel"} <= set(triton_path), sorted(triton_path)
    for k in results[1]:
        assert rel_err(results[0][k], results[1][k]) < 1e-5, k


def test_mask_ratio_zero_is_the_plain_autoencoder_loss(torch_path):
    """Ratio 0: the reference divides by zero (NaN); mae_fast averages over every patch."""
    ref, fast = _pair("base_like")
    imgs, noise = _inputs(ref)
    l_ref, p_ref, m_ref = ref(imgs, 0.0, noise)
    assert torch.isnan(l_ref)  # documents the reference's behaviour
    l_fast, p_fast, m_fast = fast(imgs, 0.0, noise)
    assert torch.equal(m_fast, torch.zeros_like(m_fast))
    expected = R.patch_loss(imgs, p_ref, torch.ones_like(m_ref), 16, norm_pix_loss=True)
    assert abs(l_fast.item() - expected.item()) <= 1e-5 * expected.item()
    assert fast.forward_train(imgs, 0.0, noise).item() == pytest.approx(l_fast.item(), rel=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_ratio_that_keeps_no_patch_like_the_reference(norm_pix, torch_path):
    """K = 0 (3x3 grid, ratio 0.9): the encoder sees the cls token alone, the decoder only mask tokens; the
    same mask, pred, loss and gradients as the official model, and forward_train gives the same loss."""
    ref, fast = _pair("grid3", norm_pix)
    imgs, noise = _inputs(ref)
    latent = fast.forward_encoder(imgs, 0.9, noise)[0]
    assert latent.shape == (3, 1, 32)
    g_ref = assert_same_mae_step(ref, fast, imgs, 0.9, noise)
    fast.zero_grad()
    loss = fast.forward_train(imgs, 0.9, noise)
    loss.backward()
    assert abs(loss.item() - ref(imgs, 0.9, noise)[0].item()) <= 1e-5 * loss.item()
    for k, g in _grads(fast).items():
        assert rel_err(g, g_ref[k]) < 1e-4, k


def test_mask_ratio_as_numpy_or_tensor(torch_path):
    """The official model takes any real number for mask_ratio (numpy scalars, 0-d tensors): so does this one."""
    np = pytest.importorskip("numpy")
    ref, fast = _pair("base_like")
    imgs, noise = _inputs(ref)
    want = fast(imgs, 0.75, noise)[0].item()
    for ratio in (np.float32(0.75), np.float64(0.75), torch.tensor(0.75)):
        assert fast(imgs, ratio, noise)[0].item() == want
        assert fast.forward_train(imgs, ratio, noise).item() == pytest.approx(want, rel=1e-6)
        assert ref(imgs, ratio, noise)[0].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(TypeError, match="mask_ratio must be a real number"):
        fast(imgs, "0.75", noise)


@pytest.mark.filterwarnings("ignore:var.*degrees of freedom:UserWarning")
def test_empty_batch_like_the_reference(torch_path):
    """N = 0: empty pred and mask and a NaN loss (0 / 0), as the official model; backward gives zero gradients."""
    ref, fast = _pair("base_like")
    imgs, noise = _inputs(ref, N=0)
    l_ref, p_ref, m_ref = ref(imgs, 0.75, noise)
    l_fast, p_fast, m_fast = fast(imgs, 0.75, noise)
    assert torch.isnan(l_ref) and torch.isnan(l_fast)
    assert p_fast.shape == p_ref.shape == (0, 16, 768) and m_fast.shape == m_ref.shape == (0, 16)
    l_fast.backward()
    assert all(not g.any() for g in _grads(fast).values())
    assert torch.isnan(fast.forward_train(imgs, 0.75, noise))


def test_convergence_30_adamw_steps(monkeypatch):
    """Same init, same batches and masks: loss curves agree within 1e-4 (relative) and final weights
    within 1e-3 (absolute; lr 1e-3 x 30 steps can move a weight by 0.03, so an error in any gradient
    shows far above it, while Adam's normalised steps amplify float rounding to ~3e-4).

    Runs the ops' torch path (the Triton kernels' forward and backward are covered by the parity
    tests above; 30 steps under the interpreter would cost a minute of CI).
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref, fast = _pair("p8_nonsquare", norm_pix=True, seed=3)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05) for m in (ref, fast)]
    gen = torch.Generator().manual_seed(4)
    curves = ([], [])
    for step in range(30):
        imgs = torch.randn(4, 2, 24, 40, generator=gen)
        noise = torch.rand(4, 15, generator=gen)
        for i, (model, opt) in enumerate(zip((ref, fast), opts)):
            loss = model(imgs, 0.75, noise)[0] if i == 0 else model.forward_train(imgs, 0.75, noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[i].append(loss.item())
    assert curves[0][-1] < curves[0][0]  # it learns
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-4 * abs(a)
    for (k, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
        assert (a - b).abs().max() <= 1e-3, k


def test_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True), forward and backward, matches eager (torch path of the ops)."""
    code = r"""
import torch, mae_fast.models as M, mae_fast.reference as R
torch.manual_seed(0)
m = M.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                           decoder_depth=1, decoder_num_heads=2, norm_layer=R._LN, norm_pix_loss=True)
imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
loss = m(imgs, 0.75, noise)[0]; loss.backward()
g = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}; m.zero_grad()
cm = torch.compile(m, fullgraph=True)
loss_c = cm(imgs, 0.75, noise)[0]; loss_c.backward()
torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
for k, p in m.named_parameters():
    if p.grad is not None:
        torch.testing.assert_close(p.grad, g[k], rtol=1e-4, atol=1e-6)
m.zero_grad()
ct = torch.compile(m.forward_train, fullgraph=True)
torch.testing.assert_close(ct(imgs, 0.75, noise), loss, rtol=1e-5, atol=1e-6)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-4000:]


# ----------------------------------------------------------------------------- layout and loading
@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14"])
def test_factories_match_reference_layout(name):
    with torch.device("meta"):
        ref, fast = R.create_model(name), M.create_model(name)
    assert [(k, v.shape) for k, v in fast.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert not fast.pos_embed.requires_grad and not fast.decoder_pos_embed.requires_grad


def test_same_initialisation_as_reference():
    torch.manual_seed(0)
    ref = R.mae_vit_tiny_patch8()
    torch.manual_seed(0)
    fast = M.mae_vit_tiny_patch8()
    for (k, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_pretrained_encoder():
    ref, fast = _pair("base_like")
    encoder_only = {k: v for k, v in ref.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    target = M.MaskedAutoencoderViT(norm_layer=R._LN, **CONFIGS["base_like"])
    left = M.load_pretrained_encoder(target, {"model": encoder_only})
    assert "decoder_pred.weight" in left and "mask_token" in left and "cls_token" not in left
    assert torch.equal(target.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="missing"):
        M.load_pretrained_encoder(target, {k: v for k, v in encoder_only.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="unexpected"):
        M.load_pretrained_encoder(target, {**encoder_only, "head.weight": torch.zeros(1)})


def test_bad_inputs():
    _, fast = _pair("base_like")
    imgs, noise = _inputs(fast)
    with pytest.raises(ValueError, match="mask_ratio"):
        fast(imgs, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        fast(imgs, -0.1)
    with pytest.raises(ValueError, match="mask_ratio"):
        fast.forward_train(imgs, float("nan"))
    with pytest.raises(ValueError, match=r"imgs must have shape \[N, 3, 64, 64\]"):
        fast(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"imgs must have shape"):
        fast(torch.randn(2, 1, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        fast(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="noise"):
        fast(imgs, 0.75, torch.rand(3, 5))
    bad = imgs.clone()
    bad[1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="imgs contains NaN or inf"):
        fast(bad)
    bad[1, 2, 5, 7] = float("inf")
    with pytest.raises(ValueError, match="imgs contains NaN or inf"):
        fast.forward_train(bad, 0.75)
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("mae_vit_giant")


# ----------------------------------------------------------------------------- patch_model
def test_patch_model_on_reference():
    torch.manual_seed(0)
    model = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=True, **CONFIGS["p14"])
    imgs, noise = _inputs(model)
    loss, pred, mask = model(imgs, 0.75, noise)
    params_before = list(model.parameters())
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert patch_model(model) is model
    assert isinstance(model, R.MaskedAutoencoderViT)  # still the user's class (a subclass of it)
    assert type(model.blocks[0]).__module__ == "mae_fast.nn.block"
    assert all(a is b for a, b in zip(params_before, model.parameters()))  # the same Parameter objects
    assert list(model.state_dict()) == list(sd_before)
    loss2, pred2, mask2 = model(imgs, 0.75, noise)
    assert torch.equal(mask2, mask) and rel_err(pred2, pred) < 1e-5
    assert abs(loss2.item() - loss.item()) <= 1e-5 * loss.item()
    loss2.backward()
    opt.step()  # the optimizer built before the patch trains the patched model
    assert not torch.equal(model.cls_token, sd_before["cls_token"])
    assert patch_model(model) is model  # idempotent


def test_patch_model_timm_style_vit_and_errors():
    class TinyViT(torch.nn.Module):  # a timm-style ViT (not an MAE): only its blocks are swapped
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*[R.Block(32, 2, qkv_bias=True, norm_layer=R._LN) for _ in range(2)])
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.blocks(x).mean(1))

    torch.manual_seed(0)
    vit = TinyViT()
    x = torch.randn(3, 11, 32)
    before = vit(x)
    patch_model(vit, attn_backend="math")
    assert all(type(b).__module__ == "mae_fast.nn.block" and b.attn.attn_backend == "math" for b in vit.blocks)
    torch.testing.assert_close(vit(x), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no timm-style Block"):
        patch_model(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_model("model")


# ----------------------------------------------------------------------------- HF
def test_hf_patch_and_convert():
    transformers = pytest.importorskip("transformers")
    from mae_fast.integrations import huggingface as H

    for norm_pix in (True, False):
        ref, _ = _pair("p14", norm_pix)
        hf = transformers.ViTMAEForPreTraining(H.vit_mae_config(ref, mask_ratio=0.75))
        hf.load_state_dict(H.to_hf_state_dict(ref.state_dict(), hf.state_dict().keys()))
        imgs, noise = _inputs(ref)
        plain = hf(pixel_values=imgs, noise=noise)
        converted = H.fast_model_from_hf(hf)
        loss_c, pred_c, mask_c = converted(imgs, 0.75, noise)
        assert H.patch_vit_mae(hf) is hf
        patched = hf(pixel_values=imgs, noise=noise)
        for out_loss, out_pred, out_mask in ((patched.loss, patched.logits, patched.mask), (loss_c, pred_c, mask_c)):
            assert torch.equal(out_mask, plain.mask)
            assert rel_err(out_pred, plain.logits) < 1e-5
            assert abs(out_loss.item() - plain.loss.item()) <= 1e-5 * plain.loss.item()
        assert torch.equal(patched.ids_restore, plain.ids_restore)
        patched.loss.backward()
        assert hf.vit.embeddings.cls_token.grad is not None
    with pytest.raises(TypeError, match="ViTMAEForPreTraining"):
        H.patch_vit_mae(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- DDP
def test_ddp_two_processes_match_one(tmp_path):
    """Two gloo processes, each on half the batch, train to the same weights as one on the whole batch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MAE_FAST_DDP_OUT"] = str(tmp_path)
    env["OMP_NUM_THREADS"] = "1"  # one core per process
    # --standalone: a free rendezvous port per run (a fixed port hangs when two runs overlap)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "ddp_worker.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)  # ~20 s when healthy
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    single = subprocess.run([sys.executable, os.path.join(HERE, "ddp_worker.py"), "--single"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    one = torch.load(tmp_path / "single.pt")
    assert list(ddp["final"]) == list(one["final"])
    for k, v in one["final"].items():
        assert (ddp["final"][k] - v).abs().max() <= 1e-5, k
    moved = [k for k, v in one["final"].items() if not torch.equal(v, one["init"][k])]
    assert "blocks.0.attn.qkv.weight" in moved  # it trained


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name,ratio", [("base_like", 0.75), ("p14", 0.9), ("p8_nonsquare", 0.5)])
def test_cuda_parity(name, ratio):
    ref, fast = _pair(name)
    ref, fast = ref.cuda(), fast.cuda()
    imgs, noise = (t.cuda() for t in _inputs(ref))
    l_ref, p_ref, m_ref = ref(imgs, ratio, noise)
    l_fast, p_fast, m_fast = fast(imgs, ratio, noise)
    assert torch.equal(m_fast, m_ref) and rel_err(p_fast, p_ref) < 1e-5
    assert abs(l_fast.item() - l_ref.item()) <= 1e-5 * abs(l_ref.item())


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True])
def test_cuda_parity_bf16_autocast(train):
    """The fused blocks and ops on CUDA under bf16 autocast: every error within twice the reference's."""
    ref, fast = _pair("base_like")
    ref, fast = ref.cuda(), fast.cuda()
    imgs, noise = (t.cuda() for t in _inputs(ref))
    exact = _exact_step(ref, imgs, noise)
    errs_fast = _autocast_errors(fast, exact, imgs, noise, "cuda", train)
    errs_ref = _autocast_errors(ref, exact, imgs, noise, "cuda")
    for k, e in errs_fast.items():
        assert e <= 2 * errs_ref[k] + 1e-4, (k, e, errs_ref[k])


@pytest.mark.gpu
def test_cuda_compile_fullgraph_with_triton_visible():
    ref, fast = _pair("base_like")
    fast = fast.cuda()
    imgs, noise = (t.cuda() for t in _inputs(ref))
    eager = fast.forward_train(imgs, 0.75, noise)
    compiled = torch.compile(fast.forward_train, fullgraph=True)(imgs, 0.75, noise)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    compiled.backward()


@pytest.mark.gpu
def test_cuda_timm_parity():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    from mae_fast.nn import Block

    blk = timm.models.vision_transformer.Block(64, 4, qkv_bias=True, init_values=1e-2).cuda()

    mine = Block(64, 4, qkv_bias=True, init_values=1e-2).cuda()
    mine.load_state_dict(blk.state_dict(), strict=True)
    x = torch.randn(3, 50, 64, device="cuda")
    torch.testing.assert_close(mine(x), blk(x), rtol=1e-4, atol=1e-5)


def test_every_config_has_a_named_factory():
    """Each config name is a function of mae_fast.models (written out, so a search finds its definition)."""
    from mae_fast import configs, models

    for name in configs.NAMES:
        assert getattr(models, name) is models.MODELS[name] and getattr(models, name).__name__ == name
