"""float64: every op runs on its plain torch path in float64 (a float64 model trains through them) and
agrees with the float64 reference to rounding; forcing the Triton path with float64 is a clear error."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops, reference
from mae_fast.testing import randn, random_ids

F64 = torch.float64


def _cases():
    N, L, K, D = 2, 16, 5, 8
    ids_keep, ids_restore = random_ids(N, L, K)
    x, pos, pre = randn(N, L, D, dtype=F64), randn(1, L, D, dtype=F64, seed=1), randn(1, 1, D, dtype=F64, seed=2)
    y, mt, dpos = randn(N, 1 + K, D, dtype=F64, seed=3), randn(1, 1, D, dtype=F64, seed=4), \
        randn(1, 1 + L, D, dtype=F64, seed=5)
    imgs = randn(N, 3, 16, 16, dtype=F64, seed=6)
    pred, mask = randn(N, L, 48, dtype=F64, seed=7), (torch.rand(N, L, generator=torch.Generator().manual_seed(8)) < .5)
    w, b, br = randn(D, dtype=F64, seed=9), randn(D, dtype=F64, seed=10), randn(N, L, D, dtype=F64, seed=11)
    qkv_w, qkv_b = randn(3 * D, D, dtype=F64, seed=12), randn(3 * D, dtype=F64, seed=13)

    def attention_ref(x, w, b):
        q, k, v = F.linear(x, w, b).reshape(N, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, D)

    mask = mask.double()
    mask[:, 0] = 1
    return {
        "gather_tokens": (lambda: ops.gather_tokens(x, ids_keep, pos, pre),
                          lambda: reference.gather_visible(x, ids_keep, pos, pre)),
        "unshuffle_tokens": (lambda: ops.unshuffle_tokens(y, ids_restore, mt, dpos),
                             lambda: reference.decoder_input(y, ids_restore, mt, dpos)),
        "gather_patches": (lambda: ops.gather_patches(imgs, ids_keep, 4),
                           lambda: reference.visible_patches(imgs, ids_keep, 4)),
        "norm_pix_loss": (lambda: ops.norm_pix_loss(pred, imgs, mask, 4),
                          lambda: reference.patch_loss(imgs, pred, mask, 4, norm_pix_loss=True)),
        "add_layer_norm": (lambda: ops.add_layer_norm(x, w, b, 1e-6, branch=br)[0],
                           lambda: F.layer_norm(x + br, (D,), w, b, 1e-6)),
        "bias_gelu": (lambda: ops.bias_gelu(x, b), lambda: F.gelu(x + b)),
        "residual_add": (lambda: ops.residual_add(x, br, b), lambda: x + br + b),
        "linear": (lambda: ops.linear(x, qkv_w, qkv_b), lambda: F.linear(x, qkv_w, qkv_b)),
        "self_attention": (lambda: ops.self_attention(x, qkv_w, qkv_b, 2), lambda: attention_ref(x, qkv_w, qkv_b)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_float64_runs_on_the_torch_path(name):
    fast, ref = _cases()[name]
    out = fast()
    assert out.dtype == F64
    torch.testing.assert_close(out, ref(), rtol=1e-12, atol=1e-12)


def test_float64_on_the_triton_path_is_an_error():
    with ops.path("triton"), pytest.raises(RuntimeError, match="no float64 version"):
        ops.gather_tokens(randn(2, 4, 8, dtype=F64), torch.zeros(2, 1, dtype=torch.long))
