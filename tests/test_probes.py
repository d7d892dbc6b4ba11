"""Probes: the central contract (probing changes nothing in training), and each metric against a
closed form or an independent computation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.probes import (ICS, ActivationStats, GradientFlow, HessianTopEig, Landscape, Monitor,
                          plot, simulate_optimizer_step)


class Nested(nn.Module):
    def __init__(self, bn_a, bn_b):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(10, 8), bn_a(8), nn.ReLU(inplace=True), nn.Dropout(0.3))
        self.body = nn.ModuleDict({"fc": nn.Linear(8, 8), "bn": bn_b(8), "act": nn.Sigmoid()})
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.body["act"](self.body["bn"](self.body["fc"](h))))


def _train(probes, steps=9, every=2, bn=(bnlab.BatchNorm1d, nn.BatchNorm1d)):
    torch.manual_seed(0)
    model = Nested(*bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    monitor = Monitor(model, loss_fn, opt, probes=probes, every=every,
                      probe_batch=torch.randn(32, 10, generator=torch.Generator().manual_seed(9)))
    torch.manual_seed(5)                                   # dropout draws from here
    for step in range(steps):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        monitor.observe(step, x, y)
        opt.step()
    return model, opt, monitor, torch.rand(4)


def _all_probes():
    return [GradientFlow(), ActivationStats(), ActivationStats(source="probe", every=3), ICS(),
            Landscape(keep_curve=True), HessianTopEig(iters=4)]


@pytest.mark.parametrize("bn", [(bnlab.BatchNorm1d, nn.BatchNorm1d), (nn.BatchNorm1d, bnlab.BatchNorm1d)])
def test_probing_changes_nothing_in_training(bn):
    """Parameters, buffers, optimizer state and the training RNG stream are bit-identical."""
    plain_model, plain_opt, _, plain_rng = _train([], bn=bn)
    model, opt, monitor, rng = _train(_all_probes(), bn=bn)
    for (k, a), (_, b) in zip(plain_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(plain_opt.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
    assert torch.equal(plain_rng, rng)
    probes_seen = {r["probe"] for r in monitor.records}
    assert probes_seen == {"gradient_flow", "activation_stats", "ics", "landscape", "hessian_top_eig"}


def test_hooks_exist_only_on_measured_steps():
    model, opt, monitor, _ = _train([GradientFlow(), ActivationStats()], steps=3, every=5)
    counts = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert counts == 0                                      # step 3 is not due: nothing armed
    monitor2 = Monitor(model, nn.CrossEntropyLoss(), opt, probes=[GradientFlow(), ActivationStats()], every=5)
    armed = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert armed > 0                                        # step 0 is due: armed for its forward
    monitor2.close()


def test_ics_on_a_two_layer_linear_net_by_hand():
    """f = W2 W1 x, L = ½‖f − t‖² / n, SGD with momentum and weight decay (a second step so the
    momentum buffer is non-zero)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    loss_fn = lambda out, y: 0.5 * ((out - y) ** 2).sum() / len(y)
    lr, mu, wd = 0.05, 0.9, 0.01
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    loss_fn(net(x), t).backward()
    opt.step()
    opt.zero_grad()
    loss_fn(net(x), t).backward()
    monitor = Monitor(net, loss_fn, opt, probes=[ICS()], every=1)
    rows = {(r["layer"], r["metric"]): r["value"] for r in monitor.observe(0, x, t)}

    W1, W2 = net[0].weight.detach(), net[1].weight.detach()
    def grads(W1, W2):
        h = x @ W1.t()
        r = (h @ W2.t() - t) / len(t)
        return (r @ W2).t() @ x, r.t() @ h                 # dL/dW1, dL/dW2
    G1, G2 = grads(W1, W2)
    buf1 = opt.state[net[0].weight]["momentum_buffer"]
    W1_next = W1 - lr * (mu * buf1 + G1 + wd * W1)           # torch's SGD: buf ← μ·buf + (g + wd·w)
    _, G2p = grads(W1_next, W2)
    assert rows[("0", "ics_l2")] == pytest.approx(0.0, abs=1e-14)   # no layer before layer 1
    assert rows[("0", "ics_cos")] == pytest.approx(1.0, abs=1e-12)
    assert rows[("1", "ics_l2")] == pytest.approx((G2 - G2p).norm().item(), rel=1e-10)
    cos = (G2 * G2p).sum() / (G2.norm() * G2p.norm())
    assert rows[("1", "ics_cos")] == pytest.approx(cos.item(), rel=1e-10)


def test_simulated_step_equals_the_real_optimizer_and_leaves_it_untouched():
    torch.manual_seed(0)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
                 lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)):
        net = nn.Linear(3, 2)
        opt = make(net.parameters())
        for _ in range(2):
            opt.zero_grad()
            net(torch.randn(4, 3)).pow(2).sum().backward()
            opt.step()
        opt.zero_grad()
        net(torch.randn(4, 3)).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        state_before = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                        for k, v in opt.state_dict()["state"].items()}
        predicted = simulate_optimizer_step(opt, net, grads)
        for k, v in opt.state_dict()["state"].items():
            for kk, vv in v.items():
                assert torch.equal(torch.as_tensor(vv), torch.as_tensor(state_before[k][kk]))
        opt.step()
        for n, p in net.named_parameters():
            torch.testing.assert_close(predicted[n], p.detach(), atol=0, rtol=0)


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw (the input is ignored): β = λ_max(A) exactly."""

    def __init__(self, eigs):
        super().__init__()
        self.A = torch.diag(torch.tensor(eigs, dtype=torch.float64))
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    def forward(self, x):
        return self.w


def test_landscape_on_a_quadratic_with_known_beta():
    model = Quadratic([4.0, 1.0, 0.25])
    loss_fn = lambda w, y: 0.5 * w @ model.A @ w
    etas = [0.05, 0.1, 0.2]
    monitor = Monitor(model, loss_fn, probes=[Landscape(etas=etas)], every=1)
    rows = {r["metric"]: r["value"] for r in monitor.observe(0, torch.zeros(1), None)}
    w, A = model.w.detach(), model.A
    g = A @ w
    losses = [0.5 * (w - e * g) @ A @ (w - e * g) for e in etas]
    assert rows["loss"] == pytest.approx((0.5 * w @ A @ w).item())
    assert rows["loss_min"] == pytest.approx(min(losses).item())
    assert rows["loss_max"] == pytest.approx(max(losses).item())
    assert rows["grad_pred"] == pytest.approx(max(e * (A @ g).norm().item() for e in etas))
    beta = ((A @ g).norm() / g.norm()).item()
    assert rows["beta_smooth"] == pytest.approx(beta) and beta <= 4.0


def test_hessian_top_eigenvalue_of_a_known_hessian():
    model = Quadratic([4.0, 1.0, 0.25])
    loss_fn = lambda w, y: 0.5 * w @ model.A @ w
    probe = HessianTopEig(iters=200, tol=1e-12)
    monitor = Monitor(model, loss_fn, probes=[probe], every=1)
    rows = {r["metric"]: r["value"] for r in monitor.observe(0, None, None)}
    assert rows["top_eig"] == pytest.approx(4.0, rel=1e-6)
    warm = {r["metric"]: r["value"] for r in monitor.observe(1, None, None)}
    assert warm["power_iters"] <= 3                      # warm start from the previous vector


def test_hessian_through_batchnorm_matches_double_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bnlab.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    rows = {r["metric"]: r["value"] for r in
            Monitor(model, loss_fn, probes=[HessianTopEig(iters=500, tol=1e-13)], every=1).observe(0, x, y)}
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(v):
        chunks, i = [], 0
        for p in params:
            chunks.append(v[i:i + p.numel()].view_as(p))
            i += p.numel()
        names = [n for n, _ in model.named_parameters()]
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return loss_fn(torch.func.functional_call(model, {**dict(zip(names, chunks)), **buffers}, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    eigs = torch.linalg.eigvalsh(H)
    top = eigs[eigs.abs().argmax()].item()
    assert rows["top_eig"] == pytest.approx(top, rel=1e-5)


def test_percentiles_match_numpy_and_saturation_thresholds():
    model = nn.Sequential(nn.Identity(), nn.Tanh())
    x = torch.randn(4000, 5, generator=torch.Generator().manual_seed(3)) * 1.5
    probe = ActivationStats(source="probe", percentiles=(5, 15, 50, 85, 97.5))
    monitor = Monitor(model, lambda o, y: o.sum(), probes=[probe], every=1, probe_batch=x)
    rows = {r["metric"]: r["value"] for r in monitor.observe(0, x, None)}
    for p in (5, 15, 50, 85, 97.5):
        assert rows[f"p{p:g}"] == pytest.approx(float(np.percentile(x.numpy(), p)), rel=1e-5, abs=1e-6)
    assert rows["saturated"] == pytest.approx((x.abs() > math.atanh(0.9)).float().mean().item())
    assert rows["std"] == pytest.approx(x.std().item(), rel=1e-5)


def test_preactivation_gradient_std_matches_retain_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    loss_fn = nn.MSELoss()
    x, y = torch.randn(7, 6), torch.randn(7, 2)
    monitor = Monitor(model, loss_fn, probes=[GradientFlow()], every=1)
    out = model(x)                                          # the armed training forward
    loss_fn(out, y).backward()
    rows = {(r["layer"], r["metric"]): r["value"] for r in monitor.observe(0, x, y)}
    # independent: recompute with retain_grad on the layer outputs (no in-place op)
    model2 = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    model2.load_state_dict(model.state_dict())
    z1 = model2[0](x)
    z1.retain_grad()
    z2 = model2[2](model2[1](z1))
    z2.retain_grad()
    loss_fn(z2, y).backward()
    assert rows[("0", "preact_grad_std")] == pytest.approx(z1.grad.std().item(), rel=1e-6)
    assert rows[("2", "preact_grad_std")] == pytest.approx(z2.grad.std().item(), rel=1e-6)
    assert rows[("0", "grad_norm")] == pytest.approx(model[0].weight.grad.norm().item())
    assert rows[("*", "first_last_grad_ratio")] == pytest.approx(
        model[0].weight.grad.norm().item() / model[2].weight.grad.norm().item())


def test_eval_mode_is_labelled_and_differs():
    model, opt, _, _ = _train([], steps=3)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    m = Monitor(model, nn.CrossEntropyLoss(), opt, probes=[Landscape(), Landscape(mode="eval")], every=1)
    rows = m.observe(0, x, y)
    modes = {r["mode"] for r in rows}
    assert modes == {"train", "eval"}
    train_loss = [r["value"] for r in rows if r["metric"] == "loss" and r["mode"] == "train"][0]
    eval_loss = [r["value"] for r in rows if r["metric"] == "loss" and r["mode"] == "eval"][0]
    assert train_loss != eval_loss


def test_costs_are_reported():
    _, _, monitor, _ = _train([ICS(), Landscape(points=3), GradientFlow()], steps=3, every=1)
    costs = monitor.costs()
    n_layers = 3
    assert costs["ics"]["backward_per_measurement"] == 1 + n_layers
    assert costs["landscape"]["forward_per_measurement"] == 1 + 3
    assert costs["gradient_flow"]["forward_per_measurement"] == 0


def test_outputs_and_plots(tmp_path):
    _, _, monitor, _ = _train(_all_probes(), steps=5, every=2)
    monitor.to_csv(tmp_path / "r.csv")
    monitor.to_json(tmp_path / "r.json")
    assert (tmp_path / "r.csv").read_text().startswith("step,layer,metric,value,probe,mode\n")
    for kind in ("percentiles", "gradients", "ics", "landscape", "hessian"):
        plot(monitor.records, kind, tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_ics_needs_the_optimizer():
    with pytest.raises(ValueError, match="needs the optimizer"):
        Monitor(nn.Linear(2, 2), nn.MSELoss(), probes=[ICS()])


def test_probing_a_model_with_its_own_noise_generator_changes_nothing():
    """Noise layers keep their stream's position outside the buffers: probes must restore it too."""
    def run(probes):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), bnlab.NoisyBatchNorm1d(5, noise_seed=4), nn.Tanh(), nn.Linear(5, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = Monitor(model, nn.CrossEntropyLoss(), opt, probes=probes, every=1)
        g = torch.Generator().manual_seed(0)
        for step in range(4):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)
            nn.CrossEntropyLoss()(model(x), y).backward()
            mon.observe(step, x, y)
            opt.step()
            opt.zero_grad()
        return model
    a, b = run([]), run([ICS(), Landscape(points=2), ActivationStats(source="probe", probe_batch=torch.randn(8, 6))])
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(v, dict):                          # extra state: the noise stream's (seed, step)
            assert v == w and v["noise_step"] == 4, k
        else:
            assert torch.equal(v, w), k
