"""TDA-MIL's selection against a selection that marks whole positive bags (issue #8):
``selection_source`` (default ``projected``), ``selection_mil`` (default ``soft``) and the options
``selection_sparsity_weight``, ``"pre_last"``, ``"instance"`` and ``"max"``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdamil.models import TDAMIL, create_model, model_config_from_dict

IN_DIM, DIM, HEADS = 12, 16, 4


def _model(**fields) -> TDAMIL:
    torch.manual_seed(0)
    cfg = {"name": "tdamil", "dim": DIM, "depth": 2, "num_heads": HEADS, **fields}
    return create_model(cfg, in_dim=IN_DIM, num_classes=2).double()


def _bag(seed: int = 0, n: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randn(1, n, IN_DIM, generator=g, dtype=torch.double)


@pytest.mark.parametrize("fields", [{"selection_sparsity_weight": 0.5}, {"selection_mil": "instance"},
                                    {"selection_mil": "max"}])
def test_loss_only_options_leave_the_forward_pass_unchanged(fields):
    X = _bag()
    ref, other = _model().eval(), _model(**fields).eval()
    with torch.no_grad():
        a, b = ref(X), other(X)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_projected_source_scores_each_patch_on_its_own_token():
    model = _model(selection_source="projected").eval()
    X = _bag()
    with torch.no_grad():
        trace = model.forward_trace(X)
        expected = F.cosine_similarity(trace.tokens[:, 1:], model.task_token.view(1, 1, -1), dim=-1).clamp(0, 1)
        torch.testing.assert_close(trace.scores, expected)
        # x_TD still rescales the bottom-up tokens (paper's step I output), only the score moved.
        s = torch.cat([torch.zeros(1, 1, dtype=X.dtype), trace.scores], dim=1)
        x_td = model.decoder((s.unsqueeze(-1) * trace.x_bu) @ model.channel_matrix.t())
        x_td[:, 0] = 0
        torch.testing.assert_close(trace.x_td, x_td)
        # A patch's score does not depend on the other patches of the bag; with x_BU it does.
        Y = X.clone()
        Y[0, 1:] += 3.0
        assert torch.equal(model.forward_trace(Y).cosine[0, 0], trace.cosine[0, 0])
        mixed = _model(selection_source="bottom_up").eval()
        assert not torch.equal(mixed.forward_trace(Y).cosine[0, 0], mixed.forward_trace(X).cosine[0, 0])


def test_pre_last_source_scores_the_input_of_the_last_bottom_up_block():
    model = _model(selection_source="pre_last").eval()
    X = _bag()
    with torch.no_grad():
        trace = model.forward_trace(X)
        expected = F.cosine_similarity(model.blocks[0](trace.tokens)[:, 1:], model.task_token.view(1, 1, -1), dim=-1)
        torch.testing.assert_close(trace.cosine, expected)


def test_data_init_uses_the_scored_tokens():
    model = _model(task_init="data", proj_init="random").train()
    X = _bag()
    model(X)
    with torch.no_grad():
        tokens, _ = model.embed(X, None)
    # the direction of the mean projected patch token, at the norm of the random init (Adam's steps
    # are ~lr per coordinate, so a small T turns as fast as the rest of the model)
    random_norm = float(_model(selection_source="projected").task_token.detach().norm())  # same seed, untrained
    torch.testing.assert_close(model.task_token.detach(), F.normalize(tokens[0, 1:].mean(0), dim=0) * random_norm)


def test_centred_projection_and_signed_t_start_half_of_the_first_bag_selected():
    """proj_init="data": the first training bag's projected patch tokens have zero mean afterwards
    (only the projection's bias moves); task_init="signed": T keeps its random direction and norm,
    only its sign is chosen, so that at least half of that bag's patches start selected."""
    fields = dict(task_init="signed", proj_init="data")
    fresh = _model(**fields)
    model = _model(**fields).train()
    X = _bag(n=41)
    out = model(X)
    with torch.no_grad():
        tokens, _ = model.embed(X, None)
    torch.testing.assert_close(tokens[0, 1:].mean(0), torch.zeros(DIM, dtype=torch.double), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.proj.weight, fresh.proj.weight)
    t, t0 = model.task_token.detach(), fresh.task_token.detach()
    assert torch.equal(t, t0) or torch.equal(t, -t0)
    flips = 0
    for seed in range(10):  # over seeds some random T would select a minority: those are turned round
        torch.manual_seed(seed)
        m = create_model({"name": "tdamil", "dim": DIM, "depth": 2, "num_heads": HEADS, **fields}, IN_DIM, 2).double()
        t0 = m.task_token.detach().clone()
        out = m.train()(X)
        flips += int(torch.equal(m.task_token.detach(), -t0))
        assert float((out.scores > 0).double().mean()) >= 0.5
    assert 1 <= flips <= 9


def test_sparsity_term_adds_mean_score_and_its_gradient_lowers_the_scores():
    X, y = _bag(), torch.tensor([1])
    base, sparse = _model().train(), _model(selection_sparsity_weight=0.5).train()
    out_b, out_s = base(X), sparse(X)
    diff = sparse.auxiliary_loss(out_s, y) - base.auxiliary_loss(out_b, y)
    torch.testing.assert_close(diff, 0.5 * out_s.scores.mean().float())
    only = _model(selection_loss_weight=0.0, selection_sparsity_weight=1.0).train()
    out = only(X)
    before = float(out.scores.detach().mean())
    only.auxiliary_loss(out, y).backward()
    with torch.no_grad():
        only.task_token.sub_(0.05 * only.task_token.grad / only.task_token.grad.norm())
    assert float(only(X).scores.detach().mean()) < before


def test_instance_objective_pushes_every_patch_of_negative_bags_down_and_positive_bags_up():
    model = _model(selection_mil="instance").train()
    cfg = model.cfg
    for label, sign in ((0, 1.0), (1, -1.0)):
        out = model(_bag(label))
        out.selection_cosine.retain_grad()
        loss = model.auxiliary_loss(out, torch.tensor([label]))
        loss.backward()
        grad = out.selection_cosine.grad[0]
        assert bool((sign * grad > 0).all()), grad  # every patch: down for negative, up for positive
        z = cfg.selection_temperature * (out.selection_cosine.detach()[0] - cfg.selection_margin)
        if label == 0:  # mean BCE of every patch against 0
            torch.testing.assert_close(loss.detach(), F.softplus(z).mean().float())
        else:  # log-mean-exp pooled logit against 1: the top patch gets the largest push
            pooled = torch.logsumexp(z, 0) - torch.log(torch.tensor(float(z.numel()), dtype=z.dtype))
            torch.testing.assert_close(loss.detach(), F.softplus(-pooled).float())
            assert int(grad.abs().argmax()) == int(z.argmax())


@pytest.mark.parametrize("fields", [{"selection_mil": "instance", "selection_sparsity_weight": 0.3}, {}])
def test_selection_objective_ignores_padding(fields):
    model = _model(**fields).eval()  # the "instance" option and the default (soft pooling)
    X = _bag(0, n=6)
    padded = torch.cat([X, torch.zeros(1, 3, IN_DIM, dtype=X.dtype)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    for label in (0, 1):
        y = torch.tensor([label])
        torch.testing.assert_close(model.auxiliary_loss(model(padded, mask), y), model.auxiliary_loss(model(X), y))


def test_new_selection_options_are_validated():
    from tdamil.config import ConfigError

    for bad in ({"selection_source": "raw"}, {"selection_sparsity_weight": -0.1}, {"selection_mil": "mean"}):
        with pytest.raises(ConfigError):
            model_config_from_dict({"name": "tdamil", **bad})


def test_soft_pooling_gives_every_patch_a_share_of_the_selection_gradient():
    """The default objective: BCE on the log-mean-exp of the patch logits, so (unlike "max") every
    patch of a bag is pushed, the higher ones more (padding: test_selection_objective_ignores_padding)."""
    for mil, all_patches in (("soft", True), ("max", False)):
        model = _model(selection_mil=mil).train()
        cfg = model.cfg
        out = model(_bag(0))  # a negative bag (at the data init every cosine is high: a large loss)
        out.selection_cosine.retain_grad()
        loss = model.auxiliary_loss(out, torch.tensor([0]))
        loss.backward()
        grad = out.selection_cosine.grad[0]
        z = cfg.selection_temperature * (out.selection_cosine.detach()[0] - cfg.selection_margin)
        if all_patches:
            pooled = torch.logsumexp(z, 0) - torch.log(torch.tensor(float(z.numel()), dtype=z.dtype))
            torch.testing.assert_close(loss.detach(), F.softplus(pooled).float())
            assert bool((grad > 0).all())  # every cosine of the negative bag is pushed down
            assert int(grad.abs().argmax()) == int(z.argmax())  # the highest the most
        else:
            assert int((grad != 0).sum()) == 1


# ----------------------------------------------------------------------------- task_init "contrast"
def _planted_bags(n_bags: int = 12, n: int = 15, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Bags with a shared offset; every odd bag holds one evidence patch (index 0) along a planted direction."""
    g = torch.Generator().manual_seed(seed)
    signal = 3.0 * F.normalize(torch.randn(IN_DIM, generator=g, dtype=torch.double), dim=0) * IN_DIM**0.5
    bags = []
    for i in range(n_bags):
        x = 2.0 + torch.randn(n, IN_DIM, generator=g, dtype=torch.double)
        if i % 2:
            x[0] += signal
        bags.append((x, i % 2))
    return bags


def test_contrast_init_points_t_from_negative_to_positive_bags_on_centred_tokens():
    fields = dict(task_init="contrast", proj_init="data")
    fresh, model = _model(**fields), _model(**fields).train()
    bags = _planted_bags(n_bags=40)
    assert model.awaits_labelled_init and model.task_token_ready.tolist() == [0.0]
    assert model.init_from_bags(iter(bags)) == {"bags": 40, "positive": 20}
    assert model.training and not model.awaits_labelled_init and model.task_token_ready.tolist() == [1.0]
    with torch.no_grad():
        means = {y: torch.stack([model.embed(x[None], None)[0][0, 1:].mean(0) for x, l in bags if l == y]).mean(0) for y in (0, 1)}
    # T: the direction from the negative to the positive bags' mean token, at the random init's norm
    expected = F.normalize(means[1] - means[0], dim=0) * fresh.task_token.detach().norm()
    torch.testing.assert_close(model.task_token.detach(), expected)
    # centred: the bags' mean tokens average to 0; only the projection's bias moved
    torch.testing.assert_close((means[0] + means[1]) / 2, torch.zeros(DIM, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.proj.weight, fresh.proj.weight)
    # before any training step the evidence is each positive bag's top patch and is selected
    model.eval()
    with torch.no_grad():
        for x, y in bags:
            if y:
                scores = model(x[None]).scores[0]
                assert int(scores.argmax()) == 0 and float(scores[0]) > 0.3
    assert model.init_from_bags(iter(bags)) == {"bags": 0, "positive": 0}  # once only


def test_contrast_init_reads_at_most_task_init_bags_and_with_one_class_chooses_the_sign():
    model = _model(task_init="contrast", proj_init="data", task_init_bags=4).train()
    consumed = []

    def stream():
        for x, y in _planted_bags():
            consumed.append(y)
            yield x, 0  # one class only
    t0 = model.task_token.detach().clone()
    assert model.init_from_bags(stream()) == {"bags": 4, "positive": 0}
    assert len(consumed) == 4
    t = model.task_token.detach()
    assert torch.equal(t, t0) or torch.equal(t, -t0)  # as task_init "signed"
    first = _planted_bags()[0][0]
    with torch.no_grad():
        assert float((model.eval()(first[None]).scores > 0).double().mean()) >= 0.5


@pytest.mark.slow
def test_training_engine_starts_a_contrast_model_before_its_first_step():
    from tdamil.data.bags import InMemoryBagDataset
    from tdamil.train.engine import TrainConfig, make_optimizer, train_one_epoch

    bags = _planted_bags()
    ds = InMemoryBagDataset([x.float() for x, _ in bags], [y for _, y in bags], [f"s{i}" for i in range(len(bags))], num_classes=2)
    torch.manual_seed(0)
    model = create_model({"name": "tdamil", "dim": DIM, "depth": 2, "num_heads": HEADS, "task_init": "contrast", "proj_init": "data"}, IN_DIM, 2)
    events: list[str] = []
    init, forward = model.init_from_bags, model.forward

    def spy_init(stream):
        events.append("init")
        return init(stream)

    def spy_forward(*args, **kwargs):
        events.append("ready" if model.task_token_ready.tolist() == [1.0] else "not ready")
        return forward(*args, **kwargs)

    model.init_from_bags, model.forward = spy_init, spy_forward
    cfg = TrainConfig(epochs=2, progress=False, device="cpu")
    opt = make_optimizer(model, cfg)
    for epoch in range(2):
        train_one_epoch(model, ds, opt, cfg, epoch=epoch)
    # once, before the first training step, after which every forward pass sees a started T
    assert events == ["init"] + ["ready"] * (2 * len(ds))
