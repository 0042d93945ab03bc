"""Tests for vitssl_core.losses: InfoNCE against the article's worked example and hand analysis,
MoCo v3's loss, DINO's cross-entropy, bf16 autocast, and the two-process gathered loss."""

import math
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F

from vitssl_core.losses import dino_cross_entropy, info_nce, info_nce_article, moco_infonce, sharpen


# --------------------------------------------------------------------------- helpers
def cos(a, b):
    """Cosine similarity of two Python sequences, by hand."""
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def brute_info_nce(z1, z2, t, symmetric=True, reduction="mean"):
    """The NT-Xent definition, one anchor at a time, in float64."""
    B = z1.shape[0]
    views = torch.cat([z1, z2]).double()  # view i and view i + B are one image
    anchors = range(2 * B) if symmetric else range(B)
    terms = []
    for i in anchors:
        pos = (i + B) % (2 * B)
        s = [F.cosine_similarity(views[i], views[k], dim=0) / t for k in range(2 * B)]
        denom = sum(torch.exp(s[k]) for k in range(2 * B) if k != i)
        terms.append(-torch.log(torch.exp(s[pos]) / denom))
    total = sum(terms)
    return total / len(terms) if reduction == "mean" else total


# --------------------------------------------------------------------------- InfoNCE
def test_article_two_sample_example_by_hand():
    # Section 4.1.2: samples x1, x2 with views z_1^1, z_1^2, z_2^1, z_2^2; the vectors are not unit
    # length, so the loss's own normalisation is exercised.
    z11, z12, z21, z22 = (2.0, 0.0, 1.0), (1.0, 0.5, 0.5), (0.0, 3.0, -1.0), (0.5, 2.0, 0.0)
    t = 0.5
    e = lambda a, b: math.exp(cos(a, b) / t)  # noqa: E731
    term1 = -math.log(e(z11, z12) / (e(z11, z12) + e(z11, z21) + e(z11, z22)))
    term2 = -math.log(e(z21, z22) / (e(z21, z11) + e(z21, z12) + e(z21, z22)))
    expected = term1 + term2
    z1, z2 = torch.tensor([z11, z21]), torch.tensor([z12, z22])
    assert info_nce(z1, z2, t, symmetric=False, reduction="sum").item() == pytest.approx(expected, abs=1e-6)
    assert info_nce_article(z1, z2, t).item() == pytest.approx(expected, abs=1e-6)
    # The symmetric form adds the second views as anchors and averages over all four.
    term3 = -math.log(e(z12, z11) / (e(z12, z11) + e(z12, z21) + e(z12, z22)))
    term4 = -math.log(e(z22, z21) / (e(z22, z11) + e(z22, z12) + e(z22, z21)))
    sym = (term1 + term2 + term3 + term4) / 4
    assert info_nce(z1, z2, t).item() == pytest.approx(sym, abs=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_identical_orthogonal_views_give_the_analytic_value(t):
    N = 5
    z = torch.eye(N, 8)  # every image a different axis: negatives orthogonal, positives identical
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * N - 2) * math.exp(0.0)))
    assert info_nce(z, z.clone(), t).item() == pytest.approx(expected, abs=1e-5)
    # Moving the views apart from each other can only raise the loss.
    torch.manual_seed(0)
    for _ in range(5):
        noisy = z + 0.3 * torch.randn_like(z)
        assert info_nce(z, noisy, t).item() > expected


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_identical_antipodal_views_are_the_global_minimum_for_two_images(t):
    # Two images: positives at cosine 1 and both negatives at -1 is the best any configuration can do.
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    minimum = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(-1 / t)))
    assert info_nce(z1, z1.clone(), t).item() == pytest.approx(minimum, abs=1e-5)
    torch.manual_seed(0)
    losses = torch.stack([info_nce(torch.randn(2, 3), torch.randn(2, 3), t) for _ in range(50)])
    assert losses.min().item() >= minimum - 1e-6


def test_random_high_dimensional_views_give_log_2n_minus_1():
    torch.manual_seed(0)
    N, D = 32, 4096  # cosines of random vectors ~ N(0, 1/D): every logit ~ 0
    loss = info_nce(torch.randn(N, D), torch.randn(N, D), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(2 * N - 1), abs=0.01)
    loss = info_nce(torch.randn(N, D), torch.randn(N, D), temperature=0.1)  # logits ~ N(0, 0.016^2 / 0.01)
    assert loss.item() == pytest.approx(math.log(2 * N - 1), abs=0.05)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vectorised_matches_brute_force_loop(symmetric, reduction):
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    got = info_nce(z1, z2, 0.3, reduction=reduction, symmetric=symmetric)
    want = brute_info_nce(z1, z2, 0.3, symmetric, reduction)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_mean_is_sum_over_the_2n_anchors():
    torch.manual_seed(2)
    z1, z2 = torch.randn(7, 4), torch.randn(7, 4)
    assert info_nce(z1, z2, reduction="mean").item() == pytest.approx(
        info_nce(z1, z2, reduction="sum").item() / 14, rel=1e-6
    )


def test_small_temperature_is_finite():
    torch.manual_seed(3)
    z1 = torch.randn(8, 16, requires_grad=True)
    loss = info_nce(z1, torch.randn(8, 16), temperature=1e-3)  # logits up to 1000: exp would overflow
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


def test_gradient_flows_to_both_views():
    torch.manual_seed(4)
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    info_nce(z1, z2).backward()
    for g in (z1.grad, z2.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_bf16_autocast_runs_in_float32_and_matches():
    torch.manual_seed(5)
    proj = torch.nn.Linear(32, 16)
    x1, x2 = torch.randn(16, 32), torch.randn(16, 32)
    ref = info_nce(proj(x1), proj(x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = proj(x1), proj(x2)
        assert z1.dtype == torch.bfloat16  # the inputs really are bf16
        loss = info_nce(z1, z2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    assert torch.isfinite(proj.weight.grad).all()


def test_info_nce_input_errors():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least 2"):
        info_nce(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same shape"):
        info_nce(z, torch.randn(4, 5))
    with pytest.raises(ValueError, match="2 dims"):
        info_nce(torch.randn(4, 3, 2), torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="temperature=0"):
        info_nce(z, z, temperature=0)
    with pytest.raises(ValueError, match="temperature=-0.1"):
        info_nce(z, z, temperature=-0.1)
    with pytest.raises(ValueError, match="reduction='none'"):
        info_nce(z, z, reduction="none")
    with pytest.raises(TypeError, match="z1 must be a torch.Tensor"):
        info_nce([[1.0, 2.0]], z)


# --------------------------------------------------------------------------- MoCo v3
def test_moco_infonce_matches_a_loop_and_scales_by_2tau():
    torch.manual_seed(6)
    q, k, t = torch.randn(5, 8), torch.randn(5, 8), 0.2
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    terms = []
    for i in range(5):
        logits = [qn[i] @ kn[j] / t for j in range(5)]
        terms.append(-torch.log(torch.exp(logits[i]) / sum(torch.exp(x) for x in logits)))
    want = 2 * t * sum(terms) / 5
    assert moco_infonce(q, k, t).item() == pytest.approx(want.item(), abs=1e-5)


def test_moco_infonce_errors_and_gradient():
    q = torch.randn(4, 8, requires_grad=True)
    moco_infonce(q, torch.randn(4, 8)).backward()
    assert q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        moco_infonce(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="temperature"):
        moco_infonce(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)


# --------------------------------------------------------------------------- DINO pieces
def test_sharpen_is_a_centred_tempered_softmax():
    logits, center = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.0, 1.0]])
    p = sharpen(logits, center, 0.5)
    z = [(1.0 - 0.5) / 0.5, 2.0 / 0.5, (3.0 - 1.0) / 0.5]
    want = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    assert p[0].tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="center"):
        sharpen(logits, torch.zeros(1, 4), 0.5)


def test_dino_cross_entropy_matches_a_loop():
    torch.manual_seed(7)
    B, K, V = 3, 6, 4
    student = [torch.randn(B, K) for _ in range(V)]
    teacher = [F.softmax(torch.randn(B, K) / 0.04, dim=-1) for _ in range(2)]
    total, n = 0.0, 0
    for i in range(2):
        for v in range(V):
            if v == i:
                continue
            for b in range(B):
                logq = F.log_softmax(student[v][b].double() / 0.1, dim=-1)
                total += -(teacher[i][b].double() * logq).sum().item() / B
            n += 1
    assert n == 2 * (V - 1)
    assert dino_cross_entropy(student, teacher, 0.1).item() == pytest.approx(total / n, abs=1e-5)
    with pytest.raises(ValueError, match="every view"):
        dino_cross_entropy(student[:-1] + [torch.randn(B, K + 1)], teacher)
    with pytest.raises(ValueError, match="student_temp"):
        dino_cross_entropy(student, teacher, 0.0)


# --------------------------------------------------------------------------- two processes
def _worker(rank, store, out):
    """One rank of a 2-process gloo group: half of a fixed batch, losses and gradients saved."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        z1, z2, k = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 5)  # the same full batch on both ranks
        part = slice(4 * rank, 4 * rank + 4)
        a, b = z1[part].clone().requires_grad_(), z2[part].clone().requires_grad_()
        loss = info_nce(a, b, 0.3)
        loss.backward()
        moco = moco_infonce(z1[part], k[part], 0.2)
        torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad, "moco": moco.detach()}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_one_big_batch(tmp_path):
    # fork, not spawn: the children inherit the imported torch instead of importing it again.
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(r, str(tmp_path / "store"), str(tmp_path / f"{r}.pt"))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    z1 = torch.randn(8, 5).requires_grad_()
    z2 = torch.randn(8, 5).requires_grad_()
    k = torch.randn(8, 5)
    full = info_nce(z1, z2, 0.3)
    full.backward()
    # Each rank averages its own anchors against all 16 views: the mean of the ranks is the full loss.
    assert (res[0]["loss"] + res[1]["loss"]).item() / 2 == pytest.approx(full.item(), abs=1e-6)
    assert (res[0]["moco"] + res[1]["moco"]).item() / 2 == pytest.approx(moco_infonce(z1, k, 0.2).item(), abs=1e-6)
    # The gather's backward sums every rank's gradient; DDP then averages over the 2 ranks.
    for r in range(2):
        part = slice(4 * r, 4 * r + 4)
        torch.testing.assert_close(res[r]["ga"], 2 * z1.grad[part], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res[r]["gb"], 2 * z2.grad[part], atol=1e-6, rtol=1e-5)
