"""Monitor figures against naive per-parameter autograd references, and what it leaves on the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import Monitor
from gradscope.errors import ExperimentError
from gradscope.collect.sample import SAMPLE_MIN

from models import MLP, mse, regression_batches


def naive_layer_figures(model: nn.Module):
    """Per owning module: grad norm, max|g|, mean and weight norm, the slow obvious way."""
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad.reshape(-1) for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            g = torch.cat(grads).double()
            w = torch.cat([p.detach().reshape(-1) for p in module.parameters(recurse=False)]).double()
            out[name] = (g.norm().item(), g.abs().max().item(), g.mean().item(), w.norm().item())
    return out


def train(monitor_kwargs, steps=5, model=None, batches=None, device="cpu", dtype=torch.float32, lr=0.05):
    torch.manual_seed(0)
    model = (model or MLP(width=300, d_in=300)).to(device, dtype)
    batches = batches or regression_batches(d_in=300)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = Monitor(model, **monitor_kwargs)
    references, grads, weights = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model, [t.to(device, dtype) for t in batches()])
        loss.backward()
        references.append(naive_layer_figures(model))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        monitor.observe(loss)
        opt.step()
    weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, monitor.profile(), references, grads, weights


def assert_matches_reference(profile, refs, histogram_every=4):
    """Every step's norms, maxima and weights; the mean on the steps whose histogram is counted (every
    ``histogram_every``-th, where the sums are read), and on no other."""
    names = [profile.layers[i].name for i in profile.active]
    for step, ref in enumerate(refs):
        for k, name in enumerate(names):
            norm, gmax, mean, wnorm = ref[name]
            assert profile.series["grad_norm"][step][k] == pytest.approx(norm, rel=1e-5)
            assert profile.series["grad_abs_max"][step][k] == pytest.approx(gmax, rel=1e-6)
            if step % histogram_every == 0:
                # summed in float32: a mean that cancels to ~0 is exact to float32's rounding of the elements
                assert profile.series["grad_mean"][step][k] == pytest.approx(mean, rel=1e-3, abs=1e-9 + 1e-6 * gmax)
            else:
                assert np.isnan(profile.series["grad_mean"][step][k])
            assert profile.series["weight_norm"][step][k] == pytest.approx(wnorm, rel=1e-5)
            assert profile.series["grad_to_weight"][step][k] == pytest.approx(norm / wnorm, rel=1e-5)


@pytest.mark.parametrize("sample", [1, 4])
def test_layer_figures_match_naive_reference(sample):
    _, profile, refs, _, _ = train({"histogram_sample": sample, "update_every": 1})
    assert_matches_reference(profile, refs)
    _, profile, refs, _, _ = train({"histogram_sample": sample, "update_every": 1, "histogram_every": 1})
    assert_matches_reference(profile, refs, histogram_every=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_held_in_low_precision_gets_exact_figures(dtype):
    """Parameters and gradients in bf16 or fp16 (no float32 master copy): the figures are the reference's,
    computed in float64 from the same low-precision gradients."""
    _, profile, refs, _, _ = train({"update_every": 1}, dtype=dtype)
    assert_matches_reference(profile, refs)


def test_global_norm_and_exact_cosine_match_reference():
    _, profile, _, grads, _ = train({"histogram_sample": 1})
    for step, g in enumerate(grads):
        assert profile.series["global_norm"][step] == pytest.approx(g.norm().item(), rel=1e-5)
        if step:
            cos = (g @ grads[step - 1] / (g.norm() * grads[step - 1].norm())).item()
            assert profile.series["cosine"][step] == pytest.approx(cos, abs=1e-5)


def test_sampled_cosine_is_close_to_exact():
    _, profile, _, grads, _ = train({"histogram_sample": 4})
    assert any(n >= 65536 for n in (p.numel() for p in MLP(width=300, d_in=300).parameters()))
    for step in range(1, len(grads)):
        g, h = grads[step], grads[step - 1]
        assert profile.series["cosine"][step] == pytest.approx((g @ h / (g.norm() * h.norm())).item(), abs=0.05)


@pytest.mark.parametrize("every", [1, 2])
def test_update_ratio_is_the_weight_change_over_the_weight(every):
    model, profile, _, _, weights = train({"update_every": every}, steps=6)
    names = [profile.layers[i].name for i in profile.active]
    ratios = profile.series["update_ratio"]
    for step in range(6):
        if (step + 1) % every:  # the weights are copied on the step before every every-th
            assert np.isnan(ratios[step]).all()
            continue
        for k, name in enumerate(names):
            keys = [n for n in weights[0] if n.rsplit(".", 1)[0] == name]
            before = torch.cat([weights[step][n].reshape(-1) for n in keys]).double()
            after = torch.cat([weights[step + 1][n].reshape(-1) for n in keys]).double()
            assert ratios[step][k] == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-4)


def test_histogram_totals_every_element_and_scales_samples():
    _, profile, _, _, _ = train({"histogram_sample": 4}, steps=3)
    assert profile.histograms.sum(axis=1) == pytest.approx(profile.elements_total, rel=1e-9)


def test_nonfinite_counted_and_first_layer_named_in_backward_order():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    monitor = Monitor(model)
    x = torch.randn(3, 4)
    h = model[0](x)
    h = model[1](h)
    # sqrt at zero in the middle layer's output: inf flows back into layers 1 and 0, not into layer 2
    out = model[2](h) + torch.sqrt((h - h.detach()).abs()).sum()
    out.sum().backward()
    monitor.observe()
    profile = monitor.profile()
    assert profile.first_nonfinite == (0, "1")
    assert profile.nonfinite_total[1] > 0 and profile.nonfinite_total[2] == 0
    assert profile.nonfinite_total[1] == (~torch.isfinite(model[1].weight.grad)).sum() + \
        (~torch.isfinite(model[1].bias.grad)).sum()


def test_unused_and_frozen_parameters_are_reported_not_crashed():
    model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 4), "frozen": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    monitor = Monitor(model)
    for _ in range(2):
        model.zero_grad()
        model["used"](model["frozen"](torch.randn(2, 4))).sum().backward()
        monitor.observe()
    profile = monitor.profile()
    by_name = {profile.layers[i].name: k for k, i in enumerate(profile.active)}
    assert profile.grad_present_steps[by_name["unused"]] == 0
    assert profile.grad_present_steps[by_name["used"]] == 2
    assert "frozen" not in by_name
    assert next(l for l in profile.layers if l.name == "frozen").frozen_numel == 20


def test_model_is_left_as_found():
    torch.manual_seed(0)
    model = MLP()
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    monitor = Monitor(model)
    hooked = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    mse(model, regression_batches()()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    monitor.observe()
    monitor.close()
    assert hooked == len(list(model.parameters()))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and torch.equal(p.grad, grads[n])
        assert p.requires_grad == flags[n]


def test_memory_is_bounded_in_steps():
    model = nn.Linear(4, 1)
    monitor = Monitor(model, history=8)
    for _ in range(100):
        model.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        monitor.observe()
    profile = monitor.profile()
    assert profile.steps == 100
    assert len(profile.series_steps) <= 9 and profile.histograms.shape == (1, 2048)


def test_model_without_trainable_parameters_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ExperimentError, match="no trainable parameters"):
        Monitor(model)


def test_nonfinite_count_is_exact_in_sampled_and_whole_parameters_of_one_layer():
    """A layer whose weight is sampled (90,000 elements) and whose bias sits whole in the sample."""
    layer = nn.Linear(300, 300)
    monitor = Monitor(layer, histogram_sample=4)
    layer(torch.randn(2, 300)).sum().backward()
    flat = layer.weight.grad.view(-1)
    flat[[1, 5_000, 40_000, 89_999]] = float("nan")  # blocks the sample reads and blocks it skips
    flat[[2_048, 70_000]] = float("inf")
    layer.bias.grad[[0, 299]] = -float("inf")
    monitor.observe()
    profile = monitor.profile()
    assert profile.nonfinite_total.tolist() == [8]
    assert profile.series["nonfinite"][0].tolist() == [8]
    assert np.isnan(profile.series["grad_abs_max"][0][0])


def _twin_run(flush_every, steps=40, device="cpu"):
    """A run observed by a Monitor with this flush_every (the same data, weights and optimizer each time)."""
    torch.manual_seed(0)
    model = MLP(width=300, d_in=300).to(device)
    batches = regression_batches(d_in=300)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, flush_every=flush_every)
    for step in range(steps):
        opt.zero_grad()
        loss = mse(model, [t.to(device) for t in batches()])
        loss.backward()
        if step == 25:  # a non-finite step, counted on the device (and not taken, as a GradScaler would),
            model.hidden[1].weight.grad[0, :3] = float("nan")  # in a sampled weight and a bias held whole,
            model.hidden[1].bias.grad[:2] = float("inf")  # on a step whose histogram is not counted (25 % 4)
        monitor.observe(loss)
        if step != 25:
            opt.step()
    return monitor.profile()


def assert_bit_identical(every, batched):
    assert every.steps == batched.steps == 40
    for name, values in every.series.items():
        assert np.array_equal(values, batched.series[name], equal_nan=True), name
    assert np.array_equal(every.histograms, batched.histograms)
    assert np.array_equal(every.nonfinite_total, batched.nonfinite_total) and every.nonfinite_total.sum() == 5
    assert every.first_nonfinite == batched.first_nonfinite == (25, "hidden.1")
    assert every.global_spike_z == batched.global_spike_z


def test_figures_are_bit_identical_whether_flushed_every_step_or_every_16():
    assert_bit_identical(_twin_run(1), _twin_run(16))


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (each one a sync on an accelerator)."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("every", [1, 3])
def test_no_host_read_on_a_step_that_does_not_flush(every):
    """On the meta device, the path an accelerator takes: any read of a value would raise, or be counted.
    With ``every``, the steps between observed ones read nothing either."""
    torch.manual_seed(0)
    model = MLP(width=300, d_in=300).to("meta")  # sampled and whole parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, flush_every=8, every=every)
    reads = []
    for _ in range(7 * every - (every - 1)):
        opt.zero_grad()
        loss = model(torch.randn(16, 300, device="meta")).pow(2).mean()
        loss.backward()
        with _HostReads() as counter:
            result = monitor.observe(loss)
        reads.append(counter.count)
        opt.step()
    assert reads == [0] * len(reads) and result.step == 6 * every and monitor.steps == 7
    for _ in range(every - 1):
        monitor.observe(loss)
    with _HostReads() as counter, pytest.raises(NotImplementedError, match="meta"):
        monitor.observe(loss)  # the 8th observed step flushes: the one copy to the host, which meta cannot make
    assert counter.count == 1


def test_reading_an_observation_flushes_every_waiting_step():
    torch.manual_seed(0)
    model = MLP()
    batches = regression_batches()
    monitor = Monitor(model)  # flush_every=16: nothing reaches the host on its own in three steps
    seen = []
    for _ in range(3):
        model.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
        seen.append((monitor.observe(loss), norm, loss.item()))
    first, norm, loss = seen[0]
    assert first["step"] == 0 and "not yet on the host" in repr(first)
    assert first["global_norm"] == pytest.approx(norm, rel=1e-5) and first["loss"] == pytest.approx(loss)
    assert all(o["global_norm"] == pytest.approx(n, rel=1e-5) and "not yet" not in repr(o) for o, n, _ in seen)
    assert dict(seen[2][0])["step"] == 2


@pytest.mark.parametrize("step", [0, 1])
def test_whole_parameters_count_inf_and_nan_exactly_with_or_without_the_histogram(step):
    """Step 0 counts its |g| histogram (the counts come from its inf/NaN bins); step 1 does not."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    monitor = Monitor(model)  # histogram_every=4
    for k in range(2):
        model.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        if k == step:
            model[0].weight.grad[0, :3] = float("nan")
            model[0].bias.grad[5] = -float("inf")
        monitor.observe()
    profile = monitor.profile()
    assert profile.nonfinite_total.tolist() == [4, 0]
    assert profile.series["nonfinite"][step].tolist() == [4, 0] and profile.series["nonfinite"][1 - step].sum() == 0
    assert profile.first_nonfinite == (step, "0")


def test_histogram_every_counts_the_histogram_and_zeros_on_those_steps_only():
    model, batches = MLP(), regression_batches()
    monitor = Monitor(model, histogram_every=3)
    for _ in range(7):
        model.zero_grad()
        mse(model, batches()).backward()
        monitor.observe()
    profile = monitor.profile()
    numel = np.array([profile.layers[i].trainable_numel for i in profile.active])
    assert profile.elements_total == pytest.approx(numel * 3)  # steps 0, 3 and 6
    assert profile.histograms.sum(axis=1) == pytest.approx(profile.elements_total)
    counted = ~np.isnan(profile.series["zero_fraction"]).all(axis=1)
    assert counted.tolist() == [True, False, False, True, False, False, True]


def test_runs_of_many_equal_parameters_match_naive_reference():
    """Eighty-odd parameters of one length are reduced as one 2-D view per step (see RUN_MIN), beside
    large ones read off their gradients and small ones of lengths of their own: every figure is the
    reference's."""
    from gradscope.collect.sample import RUN_MIN
    model = nn.Sequential(nn.Linear(300, 32), *[nn.LayerNorm(32) for _ in range(40)], nn.Linear(32, 1))
    lengths = [p.numel() for p in model.parameters()]
    assert lengths.count(32) >= RUN_MIN and max(lengths) < (1 << 16)
    _, profile, refs, _, _ = train({"update_every": 1}, model=model, lr=1e-3)
    assert_matches_reference(profile, refs)
    big = nn.Sequential(nn.Linear(300, 256), nn.Tanh(), nn.Linear(256, 64), *[nn.LayerNorm(64) for _ in range(33)],
                        nn.Linear(64, 1))  # a large weight (76,800 elements, sampled) beside a run of 67
    _, profile, refs, _, _ = train({"update_every": 1, "histogram_every": 1}, model=big, lr=1e-3)
    assert_matches_reference(profile, refs, histogram_every=1)


def top_level_ops(call) -> int:
    """The aten ops one call issues that no other aten op called: on a GPU, each is a launch."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


@pytest.mark.parametrize("model", [
    lambda: nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)),
    lambda: nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(16, 16), nn.LayerNorm(16))], nn.Linear(16, 1)),
], ids=["mlp-with-large-tensors", "401-small-tensors"])
def test_a_step_without_histogram_issues_a_handful_of_ops_whatever_the_tensor_count(model):
    """The per-step path is a fixed set of batched ops: the count does not grow with the tensors (401
    small ones cost what 6 do), only with the large ones' strided sample views and, on a CPU, their
    aminmax (one each)."""
    torch.manual_seed(0)
    model = model()
    monitor = Monitor(model)
    nn.functional.mse_loss(model(torch.randn(8, model[0].in_features)), torch.randn(8, 1).expand(8, model[-1].out_features)).backward()
    for _ in range(4):
        monitor.observe()
    counts = [top_level_ops(monitor.observe) for _ in range(16)]  # steps 4..19: histogram on every 4th
    plain = [c for k, c in enumerate(counts) if k % 4]
    # On a CPU each large gradient's max |g| is its own aminmax (no full-size |g| temporary), and four
    # ops join them: the only part that grows, with the large tensors alone.
    large = sum(p.numel() >= SAMPLE_MIN for p in model.parameters())
    assert max(plain) <= 20 + (large + 4 if large else 0), counts
    assert max(counts) > max(plain)  # the histogram step does more: the cadence is on


def test_every_n_observes_every_nth_step_with_the_meaning_of_every_figure_kept():
    """``every=3``: the series holds steps 0, 3, 6, ...; at each, the norms and maxima are the reference's,
    the cosine is with the step just before (exact at histogram_sample=1), the update ratio is that
    step's own update, and the loss is that step's; the steps between are not in the report."""
    torch.manual_seed(0)
    model = MLP(width=64, d_in=300)
    batches = regression_batches(d_in=300)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, every=3, update_every=1, histogram_sample=1, histogram_every=1)
    refs, grads, weights, losses = [], [], [], []
    for step in range(13):
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        refs.append(naive_layer_figures(model))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        weights.append([p.detach().clone().double() for p in model.parameters()])
        out = monitor.observe()
        assert out.step == step and (out["measured"] == 1.0) == (step % 3 == 0)
        opt.step()
        monitor.note_loss(loss)  # seen after the step, as Lightning's loop does
        losses.append(loss.item())
    weights.append([p.detach().clone().double() for p in model.parameters()])
    profile = monitor.profile()
    observed = list(range(0, 13, 3))
    assert profile.steps == len(observed) and profile.series_steps.tolist() == observed
    assert "every 3 optimizer steps" in profile.measurement
    names = [profile.layers[i].name for i in profile.active]
    for row, step in enumerate(observed):
        for k, name in enumerate(names):
            norm, gmax, mean, _ = refs[step][name]
            assert profile.series["grad_norm"][row][k] == pytest.approx(norm, rel=1e-5)
            assert profile.series["grad_abs_max"][row][k] == pytest.approx(gmax, rel=1e-6)
            assert profile.series["grad_mean"][row][k] == pytest.approx(mean, rel=1e-3, abs=1e-9 + 1e-6 * gmax)
        g = grads[step]
        assert profile.series["global_norm"][row] == pytest.approx(g.norm().item(), rel=1e-5)
        if step:
            h = grads[step - 1]
            assert profile.series["cosine"][row] == pytest.approx((g @ h / (g.norm() * h.norm())).item(), abs=1e-5)
        assert profile.series["loss"][row] == pytest.approx(losses[step], rel=1e-6)
        update = torch.cat([(a - b).reshape(-1) for a, b in zip(weights[step + 1], weights[step])]).norm()
        # the MLP is one layer per Linear: check the whole model's update through each layer's ratio
        ratios = profile.series["update_ratio"][row]
        assert np.all(np.isfinite(ratios))
        per_layer = []
        for name in names:
            module = dict(model.named_modules())[name]
            idx = [i for i, p in enumerate(model.parameters()) if any(p is q for q in module.parameters())]
            du = torch.cat([(weights[step + 1][i] - weights[step][i]).reshape(-1) for i in idx]).norm()
            w = torch.cat([weights[step][i].reshape(-1) for i in idx]).norm()
            per_layer.append((du / w).item())
        assert ratios == pytest.approx(per_layer, rel=1e-4)
        assert update > 0


def test_a_step_between_observed_ones_issues_no_op():
    """``every=4``: a step that is neither just after an observed one (which reads its update) nor just
    before one (which copies its sample) returns at once."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    monitor = Monitor(model, every=4, update_every=1)
    nn.functional.mse_loss(model(torch.randn(8, 64)), torch.randn(8, 1)).backward()
    counts = [top_level_ops(monitor.observe) for _ in range(8)]
    assert counts[2] == counts[6] == 0 and min(counts[1], counts[3], counts[5], counts[7]) > 0, counts
    assert monitor.steps == 2


def test_a_report_keeps_nothing_the_monitor_writes_on():
    """report() reads the store through views (no copy of the whole history): what the report keeps
    (the layers' and the model's series) is copied, so steps observed after it change nothing in it."""
    torch.manual_seed(0)
    model = MLP()
    batches = regression_batches()
    monitor = Monitor(model, history=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            loss = mse(model, batches())
            loss.backward()
            monitor.observe(loss)
            opt.step()
    steps(8)
    report = monitor.report()
    kept = [layer.norm_series.copy() for layer in report.statistics.layers] + [report.statistics.model.global_norm.copy()]
    steps(20)  # thins and overwrites the store in place
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in
               zip(kept, [layer.norm_series for layer in report.statistics.layers] + [report.statistics.model.global_norm]))


def test_take_apart_names_the_corrupted_sample_in_a_plain_loop_and_the_report_keeps_it():
    """A Monitor in a user's own loop: at the step whose spike score is high, take_apart names the one
    sample whose target is 10000x, and the report's JSON lists it under spikes."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = regression_batches()
    monitor = gradscope.Monitor(model, optimizer=optimizer)
    taken, last = [], None
    for step in range(30):
        x, y = batches()
        if step == 20:
            y = y.clone()
            y[3] *= 10000
        optimizer.zero_grad()
        loss = mse(model, (x, y))
        loss.backward()
        out = monitor.observe(loss)
        if out["spike_z"] >= 6:
            taken.append(monitor.take_apart(out, (x, y), mse, previous=last))
        optimizer.step()
        last = (x, y)
    assert [t.step for t in taken] == [20]
    assert taken[0].samples[0].index == 3 and taken[0].samples[0].share > 0.9
    doc = monitor.report().to_dict()
    assert doc["spikes"][0]["step"] == 20 and doc["spikes"][0]["samples"][0]["index"] == 3
    assert doc["cause"]["kind"] == "data"


def test_a_step_whose_gradient_is_all_zero_after_a_nonzero_one_is_recorded_not_raised():
    """The cosine with the step before has no direction to compare where a gradient is all zero (a loss
    scaled to nothing, a batch that touches no weight): it is NaN, and observe() does not raise."""
    torch.manual_seed(0)
    model = MLP()
    batches = regression_batches()
    monitor = Monitor(model)
    for scale in (1.0, 0.0, 1.0):
        model.zero_grad()
        loss = scale * mse(model, batches())
        loss.backward()
        out = monitor.observe(loss)
        assert out["global_norm"] == 0.0 if scale == 0 else out["global_norm"] > 0
    assert np.isnan(monitor.report().statistics.model.cosine[1:]).all()


def test_the_options_are_one_validated_object_and_the_short_form_is_the_same():
    """``Monitor(model, MonitorOptions(...))`` and ``Monitor(model, **same)`` are one Monitor; a bad value
    or an unknown name fails at once, and the constructor takes at most 8 parameters besides self."""
    import inspect
    from gradscope import MonitorOptions
    assert len(inspect.signature(Monitor.__init__).parameters) - 1 <= 8
    model = MLP(width=16, d_in=8)
    long = Monitor(model, MonitorOptions(every=3, update_every=2, flush_every=5))
    short = Monitor(model, every=3, update_every=2, flush_every=5)
    over = Monitor(model, MonitorOptions(every=7, update_every=2), every=3, flush_every=5)  # the keywords win
    for m in (long, short, over):
        assert (m.every, m.update_every, m.flush_every, m.histogram_every) == (3, 2, 5, 4)
    with pytest.raises(ExperimentError, match="every must be a whole number of at least 1"):
        Monitor(model, every=0)
    with pytest.raises(ExperimentError, match="nonfinite_window"):
        MonitorOptions(nonfinite_window=-1)
    with pytest.raises(TypeError, match="'evry'"):
        Monitor(model, evry=2)
    with pytest.raises(ExperimentError, match="options must be a MonitorOptions"):
        Monitor(model, {"every": 2})
