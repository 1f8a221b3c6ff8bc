"""What QuantizationCallback changes in a user's training and what it leaves alone (issue #11),
on modules written as users write them (tests/user_modules.py): any Trainer length, the user's
optimizers and schedulers kept (Adam + StepLR, two optimizers, manual optimization,
ReduceLROnPlateau, every torch scheduler), inputs of any arity, clear errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from lightning import pytorch as pl
from lightning.pytorch.utilities.types import LRSchedulerConfig
from lit_helpers import cifar_tensors, loaders
from user_modules import GAN, AdamStepLR, ManualAdam, PlateauSGD, TokenClassifier, token_loaders

import qtrainer
from qtrainer import QuantizedLayer, named_quantizers
from qtrainer.callback import QuantizationCallback
from qtrainer.callback.user_optimizers import keep_user_optimizers
from qtrainer.forward import ForwardError
from qtrainer.recipes import describe_length, get_recipe, load_recipe, scale_epochs


@pytest.fixture(scope="module")
def data():
    """160 CIFAR-10 training images (5 batches of 32) and 50 validation images."""
    return cifar_tensors("train", 16), cifar_tensors("test", 5)


@pytest.fixture
def qlog():
    """The lines logged on the ``qtrainer`` logger during the test."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    logging.getLogger("qtrainer").addHandler(handler)
    yield lines
    logging.getLogger("qtrainer").removeHandler(handler)


def trainer(callbacks, **kw):
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                      **kw)


def quantizer_ids(module) -> set[int]:
    return {id(p) for _, q in named_quantizers(module) for p in q.parameters()}


def group(opt, name):
    return next(g for g in opt.param_groups if g.get("name") == name)


# ----------------------------------------------------------------------------- Trainer length


def test_readme_one_liner_runs_on_a_two_epoch_trainer(data, qlog):
    pl.seed_everything(0)
    module = AdamStepLR()
    cb = QuantizationCallback(recipe="nipq-4bit")
    t = trainer([cb], max_epochs=2)
    t.fit(module, *loaders(*data, batch_size=32))
    assert t.current_epoch == 2
    p = cb.recipe.phases
    assert (p.epochs, p.hard_epochs, cb.recipe.lr_schedule.warmup_epochs) == (2, 1, 0)
    assert cb.phase == "hard" and all(q.hard for _, q in named_quantizers(module))
    assert cb.total_steps == 2 * 5
    assert qlog[0] == "qtrainer: nipq-4bit: 43 epochs scaled to 2: 1 noise + 1 hard (keep)"
    assert qlog[1].startswith("qtrainer: kept Adam (lr 0.05) + StepLR; ")


def test_the_length_follows_max_steps_and_strict_keeps_the_recipe(data, qlog):
    pl.seed_everything(0)
    cb = QuantizationCallback("tempering-4bit")
    t = trainer([cb], max_epochs=-1, max_steps=7, limit_val_batches=0)
    t.fit(AdamStepLR(), loaders(*data, batch_size=32)[0])
    assert t.global_step == 7 and cb.recipe.phases.epochs == 2 and cb.total_steps == 7
    assert qlog[0] == "qtrainer: tempering-4bit: 90 epochs scaled to 2 (keep)"
    # the noise decays over the 7 steps the Trainer runs: lambda_0 exp(-k t / T) at t = 6
    assert cb.current_lambda == pytest.approx(math.exp(-5.0 * 6 / 7), rel=1e-12)
    strict = QuantizationCallback("tempering-4bit", overrides={"phases.epochs": 1}, fit="strict")
    with pytest.warns(UserWarning, match="the schedules end at epoch 1"):
        trainer([strict], max_epochs=2, limit_val_batches=0).fit(
            AdamStepLR(), loaders(*data, batch_size=32)[0])
    assert strict.recipe.phases.epochs == 1 and strict.total_steps == 5
    assert load_recipe("nipq-4bit", overrides={"phases.fit": "strict"}).phases.fit == "strict"


def test_scaling_keeps_the_recipe_consistent_and_says_what_ran():
    nipq = get_recipe("nipq-4bit")
    ten = scale_epochs(nipq, 10)
    assert describe_length(nipq, ten) == "nipq-4bit: 43 epochs scaled to 10: 9 noise + 1 hard, warm-up 1"
    assert describe_length(nipq, nipq, warmup=False) == \
        "nipq-4bit: 43 epochs as the recipe states: 40 noise + 3 hard"
    lsq = get_recipe("lsq-4bit")
    assert describe_length(lsq, scale_epochs(lsq, 5)) == "lsq-4bit: 90 epochs scaled to 5, warm-up 0"


# ----------------------------------------------------------------------------- optimizers


def test_adam_and_steplr_are_kept_with_the_quantizers_in_their_own_group(data, qlog):
    pl.seed_everything(0)
    module = AdamStepLR(lr=0.05)
    t = trainer([QuantizationCallback("lsq-4bit")], max_epochs=2)
    t.fit(module, *loaders(*data, batch_size=32))
    opt = t.optimizers[0]
    assert type(opt) is torch.optim.Adam
    assert [type(c.scheduler) for c in t.lr_scheduler_configs] == [torch.optim.lr_scheduler.StepLR]
    user, quant = opt.param_groups[0], group(opt, "qtrainer/quantizers/0")
    assert len(opt.param_groups) == 2  # lsq-4bit scales no weight decay (4- and 8-bit: x1)
    assert user["lr"] == pytest.approx(0.05 * 0.5 ** 2, rel=1e-12)  # the user's StepLR, twice
    # Adam moves a parameter by about lr per step: the step sizes get 0.01 x the weights' lr
    assert quant["lr"] == pytest.approx(0.01 * user["lr"], rel=1e-12)
    assert quant["weight_decay"] == 0.0 and quant["betas"] == user["betas"]
    assert {id(p) for p in quant["params"]} == quantizer_ids(module)
    assert not {id(p) for p in user["params"]} & quantizer_ids(module)
    assert len(user["params"]) + len(quant["params"]) == len(list(module.parameters()))
    steps = torch.cat([q.step_size.detach().reshape(-1) for _, q in named_quantizers(module)])
    assert bool((steps > 0).all())
    assert all(int(opt.state[p]["step"]) == 10 for p in quant["params"])  # trained every step
    assert "lr 0.0005 (0.01 x the weights' 0.05)" in qlog[1]


def test_a_gan_keeps_its_two_optimizers_each_with_its_layers_quantizers(data):
    pl.seed_everything(0)
    module = GAN()
    cb = QuantizationCallback("lsq-8bit", input_fn=lambda batch: torch.randn(8, module.latent))
    t = trainer([cb], max_epochs=2, limit_val_batches=0)
    t.fit(module, loaders(*data, batch_size=32)[0])
    og, od = t.optimizers
    assert t.global_step == 2 * 2 * 5  # two optimizer steps per batch
    assert (og.param_groups[0]["lr"], od.param_groups[0]["lr"]) == (2e-4, 1e-4)
    for opt, part in ((og, module.G), (od, module.D)):
        quant = group(opt, "qtrainer/quantizers/0")
        assert {id(p) for p in quant["params"]} == quantizer_ids(part)
        assert quant["lr"] == pytest.approx(0.01 * opt.param_groups[0]["lr"], rel=1e-12)
    # the generator's quantizers started from forward(z); the discriminator's, which forward
    # does not reach, from their first input in training_step
    assert all(q._ready for _, q in named_quantizers(module))
    steps = torch.cat([q.step_size.detach().reshape(-1) for _, q in named_quantizers(module)])
    assert bool(torch.isfinite(steps).all() and (steps > 0).all())


def test_a_gan_without_input_fn_gets_an_error_naming_layer_shapes_and_input_fn(data):
    t = trainer([QuantizationCallback("lsq-8bit")], max_epochs=1, limit_val_batches=0)
    with pytest.raises(ForwardError) as err:
        t.fit(GAN(), loaders(*data, batch_size=32)[0])
    text = str(err.value)
    assert "failed in module 'G.0' (Linear), which got (float32[8, 3, 32, 32])" in text
    assert "input_fn=batch_input applied to the first fit batch" in text
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own shape error


def test_manual_optimization_keeps_adam_and_its_hand_stepped_schedule(data):
    pl.seed_everything(0)
    module = ManualAdam(lr=0.01)
    t = trainer([QuantizationCallback("nipq-4bit")], max_epochs=2, limit_val_batches=0)
    t.fit(module, loaders(*data, batch_size=32)[0])
    opt = t.optimizers[0]
    assert type(opt) is torch.optim.Adam and t.global_step == 10
    cosine = 0.01 * (1 + math.cos(math.pi * 2 / 4)) / 2  # CosineAnnealingLR(T_max=4), 2 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine, rel=1e-9)
    quant = group(opt, "qtrainer/quantizers/0")  # NIPQ: factor 1 (alpha, bits are O(1))
    assert quant["lr"] == pytest.approx(cosine, rel=1e-9)
    assert all(q.hard for _, q in named_quantizers(module))


def test_reduce_lr_on_plateau_reduces_every_group_alike(data):
    pl.seed_everything(0)
    module = PlateauSGD()
    t = trainer([QuantizationCallback("lsq-2bit")], max_epochs=3)
    t.fit(module, *loaders(*data, batch_size=32))
    opt = t.optimizers[0]
    names = [g.get("name", "user") for g in opt.param_groups]
    # the quantizer parameters sat in the user's 1-D group; they join the group of their
    # layer's weight (group 0) instead
    assert names == ["user", "user", "qtrainer/quantizers/0", "qtrainer/weights_2bit/0"]
    assert not {id(p) for g in opt.param_groups[:2] for p in g["params"]} & quantizer_ids(module)
    plateau = t.lr_scheduler_configs[0].scheduler
    assert len(plateau.min_lrs) == 4
    assert all(g["lr"] == pytest.approx(0.1 * 0.5 ** 2, rel=1e-12) for g in opt.param_groups)
    two_bit = group(opt, "qtrainer/weights_2bit/0")
    assert two_bit["weight_decay"] == pytest.approx(5e-4 * 0.25)  # the user's decay x 0.25
    assert {id(p) for p in two_bit["params"]} == {
        id(m.weight) for m in module.modules() if isinstance(m, QuantizedLayer)
        and m.qreport.weight_bits == 2}
    assert group(opt, "qtrainer/quantizers/0")["weight_decay"] == 0.0


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 0.9 ** s, lambda s: 1 / (1 + s)]),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, [0.1, 0.01], total_steps=12),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, [0.01, 0.001], [0.1, 0.01], 3),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, 8)], milestones=[3]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_torch_scheduler_drives_the_added_groups_in_step(name):
    """Two user groups with different lrs, the quantizer groups added after the scheduler was
    built: at every step each quantizer group's lr is the factor times its origin's, and the
    scheduler's state round-trips into an identically regrouped copy (what resume needs)."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                    torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 4 * 4, 5))
        qtrainer.prepare(model, "lsq-2bit", example_input=torch.randn(2, 3, 8, 8))
        convs = [model[0].weight, model[2].weight]
        rest = [p for p in model.parameters() if all(p is not c for c in convs)]
        momentum = {"momentum": 0.9} if name in ("OneCycleLR", "CyclicLR") else {}
        opt = torch.optim.SGD([{"params": convs, "lr": 0.1, "weight_decay": 1e-3},
                               {"params": rest, "lr": 0.01}], **momentum)
        sched = SCHEDULERS[name](opt)
        config = LRSchedulerConfig(sched, monitor="loss" if name == "ReduceLROnPlateau" else None)
        recipe = load_recipe("lsq-2bit", overrides={"optimizer.quantizer_lr_factor": 0.25})
        keep_user_optimizers(recipe, model, [opt], [config])
        return model, opt, sched

    model, opt, sched = build()
    names = [g.get("name") for g in opt.param_groups]
    # the convs' quantizers next to group 0, the 2-bit middle conv's decayed weight, the
    # linear layer's quantizers next to group 1, at 0.25 x their weights' lr
    assert names[2:] == ["qtrainer/quantizers/0", "qtrainer/weights_2bit/0", "qtrainer/quantizers/1"]
    assert opt.param_groups[3]["weight_decay"] == pytest.approx(1e-3 * 0.25)
    origin = {2: (0, 0.25), 3: (0, 1.0), 4: (1, 0.25)}
    for step in range(10):
        for i, (j, f) in origin.items():
            assert opt.param_groups[i]["lr"] == pytest.approx(f * opt.param_groups[j]["lr"],
                                                              rel=1e-12), (step, i)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
    _, opt2, sched2 = build()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_replace_is_an_explicit_choice_and_says_what_it_replaced(data, qlog):
    pl.seed_everything(0)
    cb = QuantizationCallback("lsq-4bit", overrides={"optimizer.policy": "replace"})
    t = trainer([cb], max_epochs=1, limit_val_batches=0)
    t.fit(AdamStepLR(lr=0.05), loaders(*data, batch_size=32)[0])
    assert type(t.optimizers[0]) is torch.optim.SGD and t.optimizers[0].defaults["lr"] == 0.01
    assert [type(c.scheduler).__name__ for c in t.lr_scheduler_configs] == ["LambdaLR"]
    assert qlog[1] == ("qtrainer: replaced Adam (lr 0.05) + StepLR by the recipe's SGD (lr 0.01); "
                       "LR schedule cosine over 5 steps")


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("style", ["tuple", "mapping"])
def test_a_two_argument_transformer_forward_is_quantized_and_trained(style):
    pl.seed_everything(0)
    train, val = token_loaders()
    module = TokenClassifier()
    fn = (lambda b: (b[0], b[1])) if style == "tuple" else (lambda b: {"ids": b[0], "mask": b[1]})
    cb = QuantizationCallback("lsq-4bit", input_fn=fn)
    t = trainer([cb], max_epochs=2)
    t.fit(module, train, val)
    layers = {r.name: r for r in cb.report}
    assert set(layers) == {f"encoder.layers.{i}.{name}" for i in (0, 1) for name in (
        "self_attn", "self_attn.out_proj", "linear1", "linear2")} | {"emb", "head"}
    assert layers["emb"].position == "first" and layers["head"].position == "last"
    # the trace reached the encoder's linear layers (torch's fused fast path was off)
    assert layers["encoder.layers.0.linear1"].act_numel == 12 * 16
    assert layers["encoder.layers.1.linear2"].act_numel == 12 * 32
    assert all(q._ready for _, q in named_quantizers(module))
    enc = module.encoder
    assert enc.use_nested_tensor is False and all(lay.activation_relu_or_gelu == 0 for lay in enc.layers)
    ids, mask, _ = next(iter(val))
    module.eval()
    with torch.no_grad():
        quantized = module(ids, mask)
        qtrainer.set_quantizers(module, enabled=False)
        plain = module(ids, mask)
        qtrainer.set_quantizers(module, enabled=True)
    assert not torch.equal(quantized, plain)  # in eval the quantized layers do run


def test_a_two_argument_forward_without_input_fn_names_the_forward_and_input_fn():
    train, _ = token_loaders()
    t = trainer([QuantizationCallback("lsq-4bit")], max_epochs=1, limit_val_batches=0)
    with pytest.raises(ForwardError) as err:
        t.fit(TokenClassifier(), train)
    text = str(err.value)
    assert "failed in TokenClassifier.forward itself: TypeError" in text and "mask" in text
    assert "the model was called with (int64[8, 12])" in text
    assert "input_fn=batch_input" in text and "a tuple: positional, a mapping: keyword" in text


def test_a_layer_whose_weight_is_in_no_optimizer_is_named_and_its_quantizers_still_train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    qtrainer.prepare(model, "lsq-4bit", example_input=torch.randn(2, 3, 8, 8))
    model[3].weight.requires_grad_(False)  # a frozen head the user leaves out of the optimizer
    opt = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    with pytest.warns(UserWarning, match=r"layers 3: their weight is in no optimizer; their "
                                         r"quantizer parameters join SGD \(optimizer 0\), group 0"):
        keep_user_optimizers(get_recipe("lsq-4bit"), model, [opt], [])
    assert {id(p) for p in group(opt, "qtrainer/quantizers/0")["params"]} == quantizer_ids(model)
    assert opt.param_groups[0]["params"] == [model[0].weight, model[0].bias]
