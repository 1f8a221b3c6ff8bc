"""QuantizationCallback on a user LightningModule: learning on real images for every method,
logged figures, weight decay by precision, mixed-precision target, resume, clear errors."""

import math

import pytest
import torch
from lightning import pytorch as pl
from lit_helpers import LitCNN, cifar_tensors, loaders
from lit_helpers import quiet_trainer as trainer

from qtrainer import LSQQuantizer, QuantizedLayer, named_quantizers
from qtrainer.callback import QuantizationCallback
from qtrainer.recipes import RecipeError


@pytest.fixture(scope="module")
def data():
    return cifar_tensors("train", 400), cifar_tensors("test", 100)


def fit(recipe, data, epochs=3, overrides=None, module=None, **kw):
    pl.seed_everything(0)
    over = {"phases.epochs": epochs, "optimizer.lr": 0.05, "lr_schedule.warmup_epochs": 0}
    over.update(overrides or {})
    cb = QuantizationCallback(recipe, overrides=over)
    module = module or LitCNN()
    t = trainer(epochs, [cb], **kw)
    t.fit(module, *loaders(*data))
    return t, cb, module


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lsq-4bit", "tempering-4bit", "nipq-4bit"])
def test_each_method_learns_real_images_and_logs(recipe, data):
    over = {"phases.hard_epochs": 1, "phases.bn_reestimation_batches": 4} if "nipq" in recipe else {}
    t, cb, module = fit(recipe, data, epochs=4, overrides=over)
    m = t.callback_metrics
    assert m["val_acc"] > 0.30  # chance is 0.10
    assert m["qat/avg_weight_bits"] == pytest.approx(
        sum((4 if not r.position else (4 if "nipq" in recipe else 8)) * r.weight_numel for r in cb.report)
        / sum(r.weight_numel for r in cb.report), rel=1e-6)
    for key in ("qat/avg_act_bits", "qat/size_mb", "qat/gbops", "qat/phase_hard"):
        assert key in m
    assert m["qat/gbops"] > 0 and m["qat/size_mb"] > 0
    names = [n for n, _ in named_quantizers(module)]
    assert f"qat_bits/{names[0]}" in m and f"qat_step/{names[-1]}" in m
    if recipe.startswith("tempering"):
        total = cb.total_steps
        assert m["qat/lambda"] == pytest.approx(math.exp(-5 * (total - 1) / total), rel=1e-6)
    if recipe.startswith("nipq"):
        assert m["qat/phase_hard"] == 1.0 and cb.phase == "hard"
        assert all(q.hard for _, q in named_quantizers(module))


def test_weight_decay_per_group_follows_precision(data):
    small = (torch.utils.data.Subset(data[0], range(256)), torch.utils.data.Subset(data[1], range(100)))
    t, cb, module = fit("lsq-2bit", small, epochs=1, overrides={"optimizer.policy": "replace"})
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    base = cb.recipe.weight_decay.base
    assert groups["weights_2bit"]["weight_decay"] == pytest.approx(base * 0.25)
    assert groups["weights_8bit"]["weight_decay"] == pytest.approx(base)
    assert groups["quantizers"]["weight_decay"] == 0.0
    q_params = {id(p) for _, q in named_quantizers(module) for p in q.parameters()}
    assert {id(p) for p in groups["quantizers"]["params"]} == q_params
    two_bit = {id(m.weight) for m in module.modules() if isinstance(m, QuantizedLayer)
               and m.weight_quantizer.bits == 2}
    assert {id(p) for p in groups["weights_2bit"]["params"]} == two_bit
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    # the whole model is optimized exactly once
    all_ids = [id(p) for g in t.optimizers[0].param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in module.parameters())


def test_keep_policy_keeps_user_optimizer_and_regroups(data):
    small = (torch.utils.data.Subset(data[0], range(256)), torch.utils.data.Subset(data[1], range(100)))
    t, cb, module = fit("lsq-3bit", small, epochs=1)  # optimizer.policy auto: keep here
    opt = t.optimizers[0]
    groups = {g.get("name", "user"): g for g in opt.param_groups}
    assert list(groups) == ["user", "qtrainer/quantizers/0", "qtrainer/weights_3bit/0"]
    # the user's SGD(lr 0.05, momentum 0.9, weight_decay 5e-4), its decay halved for 3 bits
    assert groups["qtrainer/weights_3bit/0"]["weight_decay"] == pytest.approx(5e-4 * 0.5)
    assert groups["user"]["weight_decay"] == 5e-4 and groups["qtrainer/quantizers/0"]["weight_decay"] == 0
    assert all(g["lr"] == 0.05 and g["momentum"] == 0.9 for g in opt.param_groups)  # SGD: factor 1
    assert t.lr_scheduler_configs == []


def test_initialization_from_first_batch_matches_formula(data):
    x0 = next(iter(loaders(*data)[0]))[0]
    pl.seed_everything(0)
    cb = QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 1})
    module = LitCNN()
    t = trainer(1, [cb], limit_train_batches=1, limit_val_batches=0)
    init = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            init["first_site"] = pl_module.net.features[0].input_quantizer.step.item()
            init["w"] = pl_module.net.features[3].weight_quantizer.step.item()
            init["w_ref"] = (2 * pl_module.net.features[3].weight.abs().mean() / math.sqrt(7)).item()

    t.callbacks.append(Spy())
    t.fit(module, loaders(*data)[0])
    assert init["first_site"] == pytest.approx((2 * x0.abs().mean() / math.sqrt(127)).item(), rel=1e-5)
    assert init["w"] == pytest.approx(init["w_ref"], rel=1e-6)


@pytest.mark.slow
def test_nipq_mixed_precision_reaches_average_bit_target(data):
    t, cb, module = fit("nipq-mp-4bit", data, epochs=3,
                        overrides={"mixed_precision.w_scale": 300.0, "mixed_precision.a_scale": 300.0,
                                   "phases.hard_epochs": 1, "phases.bn_reestimation_batches": 2})
    m = t.callback_metrics
    layers = [m_ for m_ in module.modules() if isinstance(m_, QuantizedLayer)]
    w_bits = [(m_.weight_quantizer.bits, m_.weight.numel()) for m_ in layers]
    avg = sum(b * n for b, n in w_bits) / sum(n for _, n in w_bits)
    assert m["qat/avg_weight_bits"] == pytest.approx(avg)
    # the loss acts on each layer's rounded bit-width (STE), so the average lands on the
    # lattice of integer bits next to the target: within one layer's share of one bit
    for key, sizes in (("qat/avg_weight_bits", [m_.weight.numel() for m_ in layers]),
                       ("qat/avg_act_bits", [m_.act_numel for m_ in layers])):
        assert abs(m[key] - 4.0) <= max(0.25, max(sizes) / sum(sizes)), key
    assert "qat/resource_loss" in m
    assert all(not q.learn_bits for _, q in named_quantizers(module))  # frozen in the hard phase


def test_resume_equals_uninterrupted(tmp_path, data):
    small = (torch.utils.data.Subset(data[0], range(512)), torch.utils.data.Subset(data[1], range(100)))
    over = {"phases.epochs": 3, "optimizer.lr": 0.05}

    def run(epochs_ckpt_dir, ckpt_path=None):
        pl.seed_everything(0)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=epochs_ckpt_dir, save_top_k=-1, every_n_epochs=1,
                                            filename="{epoch}")
        module = LitCNN()
        t = trainer(3, [QuantizationCallback("tempering-4bit", overrides=over), ckpt],
                    enable_checkpointing=True)
        t.fit(module, *loaders(*small), ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6


def test_checkpoint_from_other_recipe_is_refused_unless_allowed(tmp_path, data):
    small = (torch.utils.data.Subset(data[0], range(128)), torch.utils.data.Subset(data[1], range(50)))
    pl.seed_everything(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    t = trainer(1, [QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 1}), ckpt],
                enable_checkpointing=True)
    t.fit(LitCNN(), *loaders(*small))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["qtrainer"]["recipe_hash"] == QuantizationCallback(
        "lsq-4bit", overrides={"phases.epochs": 1}).recipe.content_hash()
    other = QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 2, "method.grad_scale": "none"})
    t2 = trainer(2, [other])
    with pytest.raises(RecipeError, match="allow_recipe_change"):
        t2.fit(LitCNN(), *loaders(*small), ckpt_path=tmp_path / "last.ckpt")
    ok = QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 2, "method.grad_scale": "none"},
                              allow_recipe_change=True)
    t3 = trainer(2, [ok])
    t3.fit(LitCNN(), *loaders(*small), ckpt_path=tmp_path / "last.ckpt")
    assert t3.current_epoch == 2


def test_clear_errors(data):
    small = (torch.utils.data.Subset(data[0], range(64)), torch.utils.data.Subset(data[1], range(50)))
    with pytest.raises(RecipeError, match=r"phases.epochs=90 .*max_epochs=2.*'strict'"):
        trainer(2, [QuantizationCallback("lsq-4bit", fit="strict")]).fit(LitCNN(), *loaders(*small))
    cb = QuantizationCallback("lsq-4bit", overrides={"optimizer.policy": "replace"})
    with pytest.raises(RecipeError, match="manual optimization"):
        trainer(1, [cb]).fit(LitCNN(n_optimizers=2), *loaders(*small))
    with pytest.raises(ValueError, match="fit='exact' is not allowed; allowed: auto, strict"):
        QuantizationCallback("lsq-4bit", fit="exact")

    class NoLayers(LitCNN):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(3072))

    with pytest.raises(RecipeError, match="nothing to quantize"):
        trainer(1, [QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 1})]).fit(
            NoLayers(), *loaders(*small))
    with pytest.raises(RecipeError, match="did you mean 'nipq-4bit'"):
        QuantizationCallback("nipq-4bits")


def test_setup_is_idempotent_across_fit_validate_test(data):
    small = (torch.utils.data.Subset(data[0], range(128)), torch.utils.data.Subset(data[1], range(50)))
    t, cb, module = fit("lsq-4bit", small, epochs=1)
    layers = [m for m in module.modules() if isinstance(m, QuantizedLayer)]
    params = sum(p.numel() for p in module.parameters())
    t.validate(module, loaders(*small)[1], verbose=False)
    t.test(module, loaders(*small)[1], verbose=False)
    assert [m for m in module.modules() if isinstance(m, QuantizedLayer)] == layers
    assert sum(p.numel() for p in module.parameters()) == params
    assert isinstance(layers[0].input_quantizer, LSQQuantizer)


def test_accumulation_and_bf16_with_mixed_precision_loss(data):
    small = (torch.utils.data.Subset(data[0], range(256)), torch.utils.data.Subset(data[1], range(50)))
    t, cb, module = fit("nipq-mp-3bit", small, epochs=2, accumulate_grad_batches=2,
                        precision="bf16-mixed",
                        overrides={"phases.hard_epochs": 1, "phases.bn_reestimation_batches": 1,
                                   "mixed_precision.w_scale": 50.0})
    assert t.global_step == 2  # 2 batches per epoch, accumulate 2 -> 1 step per epoch
    theta = [q.theta_b for _, q in named_quantizers(module)]
    assert any(p.item() != 0.0 for p in theta)  # the resource loss moved the bits
    assert torch.isfinite(torch.stack([p for _, q in named_quantizers(module) for p in q.parameters()])).all()


def test_lightning_cli_adds_the_callback(data):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(LitCNN, run=False, save_config_callback=None, args=[
        "--trainer.callbacks+=qtrainer.QuantizationCallback",
        "--trainer.callbacks.recipe=lsq-3bit",
        "--trainer.callbacks.overrides={phases.epochs: 1}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--model.width=8"])
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationCallback)]
    assert len(cbs) == 1 and cbs[0].recipe.bits.weight == 3 and cbs[0].recipe.phases.epochs == 1
    cli.trainer.fit(cli.model, *loaders(*data))
    bits = sorted({m.weight_quantizer.bits for m in cli.model.modules() if isinstance(m, QuantizedLayer)})
    assert bits == [3, 8]
