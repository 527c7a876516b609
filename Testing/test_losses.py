"""Tests of AnatomyDTLib.losses: soft skeleton, soft Dice, soft clDice, overlap, ATL, Eq. 3 objective."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import line_nd

from AnatomyDTLib.errors import InputError, ParameterError
from AnatomyDTLib.losses import (
    AnatomyDTObjective,
    anatomy_topology_loss,
    cldice_loss_classes,
    overlap_loss,
    soft_cldice_loss,
    soft_dice_loss,
    soft_skeleton,
    squared_param_norm,
)
from AnatomyDTLib.metrics import cldice, dice


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def t(mask):
    """Binary numpy mask -> float tensor with a batch axis."""
    return torch.tensor(np.asarray(mask), dtype=torch.float32)[None]


def random_tubes(rng, shape, width, n=3):
    """n random straight vessels of odd ``width`` (cross-element dilation), kept 8 voxels off the border."""
    mask = np.zeros(shape, bool)
    for _ in range(n):
        a = rng.integers(8, np.array(shape) - 8)
        b = rng.integers(8, np.array(shape) - 8)
        mask[line_nd(a, b, endpoint=True)] = True
    if width > 1:
        mask = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(len(shape), 1),
                                       iterations=(width - 1) // 2)
    return mask


def cut(mask, half_gap=4):
    """Remove a slab across the middle of axis 0 (cuts every vessel crossing it)."""
    out = mask.copy()
    mid = mask.shape[0] // 2
    out[mid - half_gap:mid + half_gap] = False
    return out


def extra_branch(mask):
    """Add a spurious straight vessel across the image."""
    out = mask.copy()
    a = np.full(mask.ndim, 8)
    b = np.array(mask.shape) - 9
    a[0], b[0] = mask.shape[0] - 9, 8
    out[line_nd(a, b, endpoint=True)] = True
    return out


def one_hot(labels, k):
    """(B, *S) integer labels -> (B, K, *S) float one-hot."""
    return torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()


def soft_field(b, k, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, k, *spatial, generator=g), dim=1)


# ----------------------------------------------------------------------------------------------
# soft skeleton
# ----------------------------------------------------------------------------------------------

def test_soft_skeleton_of_binary_is_binary_subset():
    rng = np.random.default_rng(0)
    g = random_tubes(rng, (24, 24, 24), 3)
    x = t(g)[None]
    s = soft_skeleton(x, iters=5)
    assert s.shape == x.shape
    assert torch.all((s == 0) | (s == 1))
    assert torch.all(s <= x)
    assert 0 < s.sum() < x.sum()


def test_soft_skeleton_needs_iters_beyond_half_width():
    # A 7-row bar has half-width 3: the centre row is only reached after 3 erosions.
    bar = torch.zeros(1, 1, 32, 48)
    bar[0, 0, 10:17, 6:42] = 1
    assert soft_skeleton(bar, iters=2).sum() == 0
    skel = soft_skeleton(bar, iters=3)
    rows = torch.nonzero(skel[0, 0].sum(1)).flatten().tolist()
    assert rows == [13]
    assert torch.equal(soft_skeleton(bar, iters=10), skel)


# ----------------------------------------------------------------------------------------------
# soft Dice
# ----------------------------------------------------------------------------------------------

def test_soft_dice_zero_on_identical_one_hot():
    labels = torch.randint(0, 4, (2, 9, 10, 11), generator=torch.Generator().manual_seed(1))
    q = one_hot(labels, 4)
    assert soft_dice_loss(q, q).item() <= 1e-6
    assert soft_dice_loss(q, q, reduction="sum").item() <= 4e-6


def test_soft_dice_equals_one_minus_metric_on_binary():
    g = torch.Generator().manual_seed(2)
    pl = torch.randint(0, 3, (1, 20, 24), generator=g)
    ql = torch.randint(0, 3, (1, 20, 24), generator=g)
    ql[0, :5] = 0  # make the classes unequal in size
    p, q = one_hot(pl, 3), one_hot(ql, 3)
    per = []
    for k in range(3):
        metric = dice(pl[0] == k, ql[0] == k)
        loss = soft_dice_loss(p, q, classes=[k]).item()
        assert loss == pytest.approx(1 - metric, abs=1e-5)
        per.append(1 - metric)
    assert soft_dice_loss(p, q).item() == pytest.approx(np.mean(per), abs=1e-5)
    assert soft_dice_loss(p, q, classes=[0, 2], reduction="sum").item() == pytest.approx(per[0] + per[2], abs=1e-5)
    # a class absent from both fields scores 0, like the metric's "both empty -> Dice 1"
    p4, q4 = one_hot(pl, 4), one_hot(ql, 4)
    assert soft_dice_loss(p4, q4, classes=[3]).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_input_errors():
    p = soft_field(1, 3, (8, 8))
    with pytest.raises(InputError, match="different shapes"):
        soft_dice_loss(p, p[:, :2])
    with pytest.raises(InputError, match="outside the channel range"):
        soft_dice_loss(p, p, classes=[3])
    with pytest.raises(InputError, match=r"\(B, K, H, W\)"):
        soft_dice_loss(p[0], p[0])


# ----------------------------------------------------------------------------------------------
# soft clDice
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, width", [((64, 64), 1), ((64, 64), 3), ((32, 32, 32), 1), ((32, 32, 32), 3)])
def test_soft_cldice_zero_on_identical_and_rises_when_cut(shape, width):
    g = random_tubes(np.random.default_rng(3), shape, width)
    x = t(g)
    assert soft_cldice_loss(x, x).item() <= 1e-6
    assert soft_cldice_loss(x[:, None], x[:, None]).item() <= 1e-6  # (B, 1, *S) layout
    c = t(cut(g))
    assert soft_cldice_loss(c, x).item() > 0.05


# Soft vs hard clDice on binary masks of thin vessels. The soft skeleton is a morphological
# skeleton (opening residues), the hard one a topology-preserving thinning (skimage), so the
# skeleton voxels differ slightly (end points, junctions, diagonal staircases). For the
# topology-relevant perturbations tested here (a cut vessel, a spurious branch, a 1-voxel shift
# of 1-voxel vessels) we measured |soft - (1 - hard)| over 30 random images per setting:
#   2D widths 1/3: max 0.079, mean 0.003-0.013;  3D widths 1/3: max 0.086, mean 0.006-0.023
# (and on the 4 images per setting used below: 2D max 0.037, 3D max 0.094, mean <= 0.036).
# Tolerances: max 0.10 (2D) / 0.12 (3D) per case, and mean <= 0.05.
# Not covered: thickening a vessel or shifting a thick one, where the two skeletons disagree by
# up to ~0.12 in 2D and ~0.33 in 3D, because thinning keeps end branches that reach outside the
# thinner mask while the soft skeleton does not.
@pytest.mark.parametrize("shape, width, tol", [((64, 64), 1, 0.10), ((64, 64), 3, 0.10),
                                               ((32, 32, 32), 1, 0.12), ((32, 32, 32), 3, 0.12)])
def test_soft_cldice_agrees_with_hard_cldice_on_thin_structures(shape, width, tol):
    rng = np.random.default_rng(10 + width + len(shape))
    diffs, hards = [], []
    for _ in range(4):
        g = random_tubes(rng, shape, width)
        preds = [cut(g), extra_branch(g)]
        if width == 1:
            preds.append(np.roll(g, 1, axis=1))
        for p in preds:
            hard = 1.0 - cldice(p, g)
            soft = soft_cldice_loss(t(p), t(g)).item()
            diffs.append(abs(soft - hard))
            hards.append(hard)
    assert max(hards) > 0.1  # the cases are not trivially perfect
    assert max(diffs) <= tol, max(diffs)
    assert np.mean(diffs) <= 0.05, np.mean(diffs)


def test_soft_cldice_gradient_flows():
    g = random_tubes(np.random.default_rng(4), (48, 48), 3)
    q = t(g)
    logits = (torch.from_numpy(ndimage.gaussian_filter(g.astype(np.float32), 1.5))[None] * 6 - 2).requires_grad_()
    p = torch.sigmoid(logits)
    loss = soft_cldice_loss(p, q)
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(loss) and 0 < loss.item() < 1
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_cldice_loss_classes_sums_per_class_losses():
    labels = torch.zeros(2, 40, 40, dtype=torch.long)
    labels[:, 5:8, 4:36] = 1
    labels[:, 10:34, 20:23] = 2
    q = one_hot(labels, 3)
    p = torch.softmax(4 * q + 0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(5)), 1)
    each = [soft_cldice_loss(p[:, k], q[:, k], iters=5).item() for k in (1, 2)]
    total = cldice_loss_classes(p, q, [1, 2], iters=5)
    assert total.item() == pytest.approx(sum(each), rel=1e-5)
    assert cldice_loss_classes(p, q, [1, 2], iters=5, reduction="mean").item() == pytest.approx(sum(each) / 2, rel=1e-5)
    assert cldice_loss_classes(p, q, [], iters=5).item() == 0.0


def test_soft_cldice_input_errors():
    x = torch.zeros(1, 2, 8, 8)
    with pytest.raises(InputError, match="one class channel"):
        soft_cldice_loss(x, x, spatial_dims=2)
    with pytest.raises(InputError, match="different shapes"):
        soft_cldice_loss(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ParameterError, match="iters"):
        soft_cldice_loss(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), iters=-1)


# ----------------------------------------------------------------------------------------------
# overlap loss
# ----------------------------------------------------------------------------------------------

def test_overlap_zero_for_disjoint_one_hot():
    labels = torch.randint(0, 5, (2, 6, 7, 8), generator=torch.Generator().manual_seed(6))
    assert overlap_loss(one_hot(labels, 5)).item() == 0.0


def test_overlap_positive_for_soft_fields():
    assert overlap_loss(soft_field(2, 4, (10, 10))).item() > 0.01


def test_overlap_hand_computed():
    p = torch.zeros(2, 3, 1, 2)
    p[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.0])  # pairs: 0.25
    p[0, :, 0, 1] = torch.tensor([0.2, 0.3, 0.5])  # pairs: 0.06 + 0.10 + 0.15 = 0.31
    p[1, 0] = 1.0                                  # one-hot: 0
    # E_x over (batch, voxels) = (0.25 + 0.31 + 0 + 0) / 4 = 0.14; times 2 / (K (K - 1)) = 1/3
    assert overlap_loss(p).item() == pytest.approx(0.14 / 3, rel=1e-6)
    assert overlap_loss(p[:1]).item() == pytest.approx(0.28 / 3, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# ATL and the Eq. 3 objective
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def fields():
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 4:28, 4:8] = 1
    labels[:, 20:23, 8:30] = 2
    labels[:, 10:16, 14:20] = 3
    q = one_hot(labels, 4)
    p = torch.softmax(3 * q + torch.randn(q.shape, generator=torch.Generator().manual_seed(7)), 1)
    return p, q


def test_atl_components_add_up(fields):
    p, q = fields
    cl = cldice_loss_classes(p, q, [1, 2], iters=4)
    ov = overlap_loss(p)
    atl = anatomy_topology_loss(p, q, [1, 2], lambda_1=0.7, lambda_2=2.5, iters=4)
    assert atl.item() == pytest.approx(0.7 * cl.item() + 2.5 * ov.item(), rel=1e-6)
    assert anatomy_topology_loss(p, q, [1, 2], lambda_1=0.0, lambda_2=2.5, iters=4).item() == pytest.approx(2.5 * ov.item())
    assert anatomy_topology_loss(p, q, [1, 2], lambda_1=0.7, lambda_2=0.0, iters=4).item() == pytest.approx(0.7 * cl.item())
    with pytest.raises(ParameterError, match="lambda_1"):
        anatomy_topology_loss(p, q, [1], lambda_1=-1.0)


def test_objective_components_add_up_and_backprop(fields):
    p, q = fields
    model = torch.nn.Linear(3, 2)
    obj = AnatomyDTObjective(seg_classes=[1, 2, 3], cl_classes=[1, 2], lambda_topo=0.5, lambda_1=1.5,
                             lambda_2=3.0, lambda_reg=1e-2, iters=4)
    logits = torch.log(p).requires_grad_()
    total, comp = obj(torch.softmax(logits, 1), q, model=model)
    assert set(comp) == {"seg", "cldice", "overlap", "atl", "reg", "total"}
    assert comp["seg"] == pytest.approx(soft_dice_loss(p, q, classes=[1, 2, 3], reduction="sum").item(), rel=1e-5)
    assert comp["cldice"] == pytest.approx(cldice_loss_classes(p, q, [1, 2], iters=4).item(), rel=1e-5)
    assert comp["overlap"] == pytest.approx(overlap_loss(p).item(), rel=1e-5)
    assert comp["atl"] == pytest.approx(1.5 * comp["cldice"] + 3.0 * comp["overlap"], rel=1e-6)
    hand_reg = sum(float((w.detach() ** 2).sum()) for w in model.parameters())
    assert comp["reg"] == pytest.approx(hand_reg, rel=1e-6)
    assert squared_param_norm(model).item() == pytest.approx(hand_reg, rel=1e-6)
    assert comp["total"] == pytest.approx(comp["seg"] + 0.5 * comp["atl"] + 1e-2 * comp["reg"], rel=1e-6)
    assert total.item() == pytest.approx(comp["total"], rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert model.weight.grad is not None
    assert torch.allclose(model.weight.grad, 2e-2 * model.weight.detach())


def test_objective_zero_lambdas_switch_terms_off(fields):
    p, q = fields
    model = torch.nn.Linear(3, 2)
    dice_only = soft_dice_loss(p, q, reduction="sum").item()
    total, comp = AnatomyDTObjective(cl_classes=[1, 2], lambda_topo=0.0, lambda_reg=0.0, iters=4)(p, q, model=model)
    assert total.item() == pytest.approx(dice_only, rel=1e-6)
    assert comp["cldice"] == comp["overlap"] == comp["atl"] == comp["reg"] == 0.0
    total, comp = AnatomyDTObjective(cl_classes=[1, 2], lambda_1=0.0, lambda_2=1.0, iters=4)(p, q)
    assert comp["cldice"] == 0.0
    assert total.item() == pytest.approx(dice_only + overlap_loss(p).item(), rel=1e-6)
    with pytest.raises(ParameterError, match="lambda_topo"):
        AnatomyDTObjective(lambda_topo=-0.1)


def test_objective_3d_identical_one_hot_is_zero():
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    labels[:, 3:13, 7:9, 7:9] = 1
    labels[:, 4:8, 2:6, 10:14] = 2
    q = one_hot(labels, 3)
    total, comp = AnatomyDTObjective(cl_classes=[1], iters=3)(q, q)
    assert comp["overlap"] == 0.0
    assert comp["cldice"] <= 1e-6
    assert total.item() <= 1e-5
