"""SlideModule, tasks and schedules without a Trainer: shapes, chunked evaluation, gradients, EMA."""

from __future__ import annotations

import math

import pytest
import torch

from e2e_wsi.evaluation.report import prediction_columns
from e2e_wsi.models.aggregators import ABMIL, ABMILX, MeanPool
from e2e_wsi.models.encoders import ResNetEncoder
from e2e_wsi.models.module import SlideModule
from e2e_wsi.models.optim import WarmupCosineLR, apply_lr_mult, encoder_param_groups
from e2e_wsi.models.tasks import (
    ClassificationTask,
    CoxSurvivalTask,
    DiscreteSurvivalTask,
    GradingTask,
)


def _module(task=None, aggregator=ABMILX, **kwargs) -> SlideModule:
    torch.manual_seed(0)
    return SlideModule(
        task=task or ClassificationTask(num_classes=3),
        encoder=ResNetEncoder(arch="resnet18", weights="none"),
        aggregator=aggregator,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        **kwargs,
    )


def _bags(b: int = 2, n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def test_forward_shapes_and_attention_rows() -> None:
    model = _module().eval()
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        out = model(_bags(), mask)
    assert out["outputs"].shape == (2, 3) and out["slide"].shape == (2, 256)
    assert out["attention"].shape == (2, 8, 6)
    assert torch.all(out["attention"][1, :, 4:] == 0)  # padding gets no attention
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 8), atol=1e-5, rtol=0)


def test_chunked_evaluation_equals_one_pass() -> None:
    """Eval encodes `eval_chunk_size` patches at a time; the result must not depend on the chunk size."""
    images = _bags(1, 10)
    small, big = _module(eval_chunk_size=3).eval(), _module(eval_chunk_size=100).eval()
    with torch.no_grad():
        a, b = small(images)["outputs"], big(images)["outputs"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_uint8_is_normalised_like_float_input() -> None:
    """uint8 RGB is normalised with ImageNet statistics inside the module; float input is taken as is."""
    from e2e_wsi.data.transforms import normalize_images

    model = _module().eval()
    images = _bags(1, 4)
    with torch.no_grad():
        a = model(images)["outputs"]
        b = model(normalize_images(images))["outputs"]
    torch.testing.assert_close(a, b)


def test_training_step_reaches_every_part() -> None:
    model = _module().train()
    batch = {"images": _bags(), "mask": torch.ones(2, 6, dtype=torch.bool), "target": torch.tensor([0, 2])}
    loss = model.task.loss(model.loss_fn, model(batch["images"], batch["mask"])["outputs"], batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, part in (("encoder", model.encoder), ("aggregator", model.aggregator), ("head", model.head)):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


@pytest.mark.parametrize("aggregator", [ABMILX, ABMIL, MeanPool])
def test_any_aggregator_plugs_in(aggregator) -> None:
    model = _module(aggregator=aggregator).eval()
    with torch.no_grad():
        out = model(_bags(1, 5))
    assert out["outputs"].shape == (1, 3) and out["attention"].shape[-1] == 5


def test_ema_weights_are_used_for_evaluation() -> None:
    model = _module(ema_decay=0.5)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = {"images": _bags(), "mask": None, "target": torch.tensor([1, 2])}
    for _ in range(2):
        opt.zero_grad()
        model.task.loss(model.loss_fn, model(batch["images"])["outputs"], batch).backward()
        opt.step()
        model.on_train_batch_end(None, batch, 0)
    ema_head = model.ema.module[2]
    live, ema = model.head.fc.weight, ema_head.fc.weight
    assert not torch.allclose(live, ema)  # the average lags behind the live weights
    model.eval()
    assert model._parts()[2] is ema_head
    model.train()
    assert model._parts()[2] is model.head


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        _module(ema_decay=1.5)
    with pytest.raises(ValueError, match="eval_chunk_size"):
        _module(eval_chunk_size=0)
    with pytest.raises(ValueError, match="class_weights"):
        ClassificationTask(num_classes=2, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationTask(num_classes=1)


def test_task_predictions_and_columns() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    cls = ClassificationTask(num_classes=3)
    cols = prediction_columns({k: v.numpy() for k, v in cls.predict(logits).items()})
    assert cols["pred"] == [0, 1] and math.isclose(
        sum(cols[f"prob_{k}"][0] for k in range(3)), 1.0, abs_tol=1e-6
    )
    assert GradingTask(num_classes=6).kind == "grading" and GradingTask().monitor == "val/loss"
    assert (GradingTask.monitor_mode, CoxSurvivalTask.monitor) == ("min", "val/c_index")
    surv = DiscreteSurvivalTask(num_bins=3)
    # Higher hazards in every bin -> lower survival -> higher risk.
    risk = surv.predict(torch.tensor([[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]]))["risk"]
    assert risk[1] > risk[0]
    assert list(prediction_columns({"risk": risk.numpy()})) == ["risk"]
    cox = CoxSurvivalTask()
    # What the data side must produce: classes, survival bins, or nothing (Cox needs no bins).
    assert (cls.num_targets, surv.num_targets, cox.num_targets) == (3, 3, None)
    assert cox.predict(torch.tensor([[0.3], [-1.0]]))["risk"].tolist() == pytest.approx([0.3, -1.0])


def test_survival_task_losses_run() -> None:
    batch = {
        "target": torch.tensor([0, 2, 1]),
        "time": torch.tensor([1.0, 5.0, 3.0]),
        "event": torch.tensor([1.0, 0.0, 1.0]),
    }
    for task in (DiscreteSurvivalTask(num_bins=3), CoxSurvivalTask()):
        head = task.build_head(16)
        out = head(torch.randn(3, 16))
        loss = task.loss(task.build_loss(), out, batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        metrics = task.metrics()
        task.update_metrics(metrics, out.detach(), batch)
        assert 0.0 <= float(metrics.compute()["c_index"]) <= 1.0


def test_encoder_learning_rate_multiplier() -> None:
    model = _module(encoder_lr_mult=0.1)
    groups = encoder_param_groups(model.encoder, [model.aggregator, model.head], 0.1)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    apply_lr_mult(opt)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"encoder": pytest.approx(1e-4), "mil": pytest.approx(1e-3)}


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.0)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # linear warm-up over 10 steps
    assert lrs[10] == pytest.approx(1.0)  # peak right after warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then monotone decay
    assert lrs[55] == pytest.approx(0.5, abs=0.02)  # half-way through the cosine
    with pytest.raises(ValueError):
        WarmupCosineLR(opt, total_steps=0)


def test_epoch_cosine_matches_timm_with_warmup_prefix_false() -> None:
    from e2e_wsi.models.optim import EpochCosineLR

    timm_scheduler = pytest.importorskip("timm.scheduler")
    p = torch.nn.Parameter(torch.zeros(1))
    ours_opt, timm_opt = torch.optim.AdamW([p], lr=8e-5), torch.optim.AdamW([p], lr=8e-5)
    ours = EpochCosineLR(ours_opt, 0, warmup_epochs=10, warmup_lr_ratio=1e-6 / 8e-5, min_lr_ratio=1e-7 / 8e-5)
    ours.set_epochs(75)
    # The official call (train_utils.py:95), stepped with the epoch number after every epoch.
    ref, _ = timm_scheduler.create_scheduler_v2(
        timm_opt, sched="cosine", num_epochs=75, warmup_lr=1e-6, warmup_epochs=10, min_lr=1e-7
    )
    for epoch in range(75):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(timm_opt.param_groups[0]["lr"], rel=1e-9)
        ours_opt.step()
        ours.step()
        ref.step(epoch + 1)
    ours2 = EpochCosineLR(torch.optim.AdamW([p], lr=1.0), 0, warmup_epochs=10)
    ours2.set_epochs(75)
    assert ours2._factor(10) == pytest.approx(
        0.00125 + (1 - 0.00125) * 0.5 * (1 + math.cos(math.pi * 10 / 75))
    )
    assert ours2._factor(10) < 0.96  # no restart at 1.0 after the warm-up (warmup_prefix=False)


def test_input_contract_travels_with_checkpoints_and_reverses_channels() -> None:
    torch.manual_seed(0)
    model = SlideModule(encoder=ResNetEncoder("resnet18", channels_last=False), ema_decay=0.9).eval()
    x = torch.randint(0, 256, (1, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        rgb_of_reversed = model(x.flip(2))["outputs"]
        rgb = model(x)["outputs"]
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["e2e_wsi_input"] == {"channel_order": "rgb", "eval_resize": False}
    ckpt["e2e_wsi_input"] = {"channel_order": "bgr", "eval_resize": True}
    model.on_load_checkpoint(ckpt)  # the checkpoint's contract wins over the config's
    assert model.channel_order == "bgr" and model.eval_resize
    assert model.ema.module[0].channel_order == "bgr"  # the EMA copy evaluates, so it must follow
    with torch.no_grad():
        bgr = model(x)["outputs"]
    torch.testing.assert_close(bgr, rgb_of_reversed)  # BGR model on x == RGB model on reversed x
    assert not torch.allclose(bgr, rgb)
