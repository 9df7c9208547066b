"""The probe trains every layer's sweep, and the layers' concatenation, in one pass: each set ends
exactly where it would alone, so batching them changes the time, not the numbers."""

import numpy as np
import pytest
import torch

from vitpipe.downstream.probe import ProbeSettings, linear_probe, probe_sets, train_heads

SETTINGS = ProbeSettings(lrs=(0.03, 1.0), weight_decays=(0.0, 1e-3), epochs=3, batch_size=32)


def layers(n=300, dim=8, count=3, classes=4, seed=0):
    """``count`` feature sets of one width, each separating the classes to a different degree."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    sets = [(rng.normal(size=(classes, dim)) * (1 + i))[labels] + rng.normal(size=(n, dim)) * 2 for i in range(count)]
    return [s.astype(np.float32) for s in sets], labels


def test_sets_trained_together_equal_each_alone():
    sets, y = layers()
    lrs, wds = [0.03, 1.0, 0.3], [0.0, 1e-3, 1e-4]
    together = train_heads(sets, y, 4, lrs, wds, epochs=3, batch_size=32, seed=7, joined=True)
    for index, features in enumerate(sets):
        alone = train_heads(features, y, 4, lrs, wds, epochs=3, batch_size=32, seed=7)
        for head in range(len(lrs)):
            assert torch.allclose(together.head(head, index)[0], alone.head(head)[0], atol=1e-5)
            assert torch.allclose(together.head(head, index)[1], alone.head(head)[1], atol=1e-5)
    concatenated = train_heads(np.concatenate(sets, axis=1), y, 4, lrs, wds, epochs=3, batch_size=32, seed=7)
    for head in range(len(lrs)):  # the joined set is the probe of the concatenated features
        assert torch.allclose(together.head(head, len(sets))[0], concatenated.head(head)[0], atol=1e-5)
        assert torch.allclose(together.head(head, len(sets))[1], concatenated.head(head)[1], atol=1e-5)
    with torch.no_grad():  # and so are its logits, through the shared BatchNorm
        x = torch.from_numpy(np.stack(sets, axis=1))
        assert torch.allclose(together(x)[len(sets)], concatenated(x.flatten(1))[0], atol=1e-4)


def test_probe_sets_report_what_single_probes_report():
    sets, y = layers(n=400, seed=1)
    train, test = [s[:300] for s in sets], [s[300:] for s in sets]
    found = probe_sets(train, y[:300], test, y[300:], SETTINGS, joined=True)
    alone = [linear_probe(a, y[:300], b, y[300:], SETTINGS) for a, b in zip(train, test)]
    alone.append(linear_probe(np.concatenate(train, axis=1), y[:300], np.concatenate(test, axis=1), y[300:], SETTINGS))
    assert len(found) == len(sets) + 1
    for got, want in zip(found, alone):
        assert (got.lr, got.weight_decay) == (want.lr, want.weight_decay)
        assert got.top1 == pytest.approx(want.top1, abs=1e-9) and got.val_top1 == pytest.approx(want.val_top1, abs=1e-9)
    assert found[2].top1 > found[0].top1  # the sets really differ: nothing was shared by mistake


def test_eval_probes_layers_of_other_widths_apart():
    """A pixel-like set of another width is probed on its own; the concatenation still covers all."""
    from types import SimpleNamespace

    from vitpipe.downstream.evaluate import _probe_layers

    sets, y = layers(n=400, seed=2)
    wide = np.concatenate([sets[0], sets[1]], axis=1)
    named = {"block0": sets[0], "block1": sets[1], "wide": wide}
    split = [SimpleNamespace(features={k: v[:300] for k, v in named.items()}, labels=y[:300]),
             SimpleNamespace(features={k: v[300:] for k, v in named.items()}, labels=y[300:])]
    found = _probe_layers(["block0", "block1", "wide"], *split, SETTINGS, concat=True)
    assert list(found) == ["block0", "block1", "wide", "block0+block1+wide"]
    alone = linear_probe(wide[:300], y[:300], wide[300:], y[300:], SETTINGS)
    assert found["wide"].top1 == pytest.approx(alone.top1, abs=1e-9)


def torch_loss(logits, labels):
    """The sweep's loss by torch: every head's mean cross-entropy, summed over heads ([B, H, C])."""
    return sum(torch.nn.functional.cross_entropy(logits[:, h], labels) for h in range(logits.shape[1]))


def test_cross_entropy_gradient_matches_torch_and_is_never_subnormal():
    """The sweep's gradient is torch's cross-entropy's, but a very sure head's holds zeros where
    torch's holds subnormal floats (which slowed every step of a real probe 3-5x on x86)."""
    from vitpipe.downstream.probe import _cross_entropy_grad

    labels = torch.tensor([0, 1, 2, 3])
    mild = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = torch.autograd.grad(torch_loss(mild, labels), mild)[0]
    assert torch.allclose(_cross_entropy_grad(mild.detach(), labels), expected, atol=1e-7)
    sure = (torch.arange(10.0) * 10.0).repeat(4, 2, 1).requires_grad_()  # classes 0-3 are 60-90 below the top
    grad_torch = torch.autograd.grad(torch_loss(sure, labels), sure)[0]
    grad_ours = _cross_entropy_grad(sure.detach(), labels)
    subnormal = lambda g: ((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).sum().item()  # noqa: E731
    assert subnormal(grad_torch) > 0, "the case no longer makes subnormals: the test checks nothing"
    assert subnormal(grad_ours) == 0
    assert torch.allclose(grad_ours, grad_torch, atol=1e-20)


@pytest.mark.parametrize("joined", [False, True])
def test_written_out_head_gradients_equal_autograd(joined):
    """LinearHeads.grads (what each SGD step applies) against autograd through the forward."""
    from vitpipe.downstream.probe import LinearHeads, _cross_entropy_grad

    gen = torch.Generator().manual_seed(3)
    heads = LinearHeads(dim=6, classes=5, count=4, sets=3, joined=joined)
    with torch.no_grad():
        heads.weights.normal_(generator=gen)
        heads.biases.normal_(generator=gen)
    features, labels = torch.randn(16, 3, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    normed = heads.normalise(features)
    logits = heads.logits(normed)
    loss = torch_loss(logits.flatten(1, 2), labels)
    expected = torch.autograd.grad(loss, [heads.weights, heads.biases])
    with torch.no_grad():
        ours = heads.grads(normed, _cross_entropy_grad(logits.flatten(1, 2), labels).view_as(logits))
    for got, want in zip(ours, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
