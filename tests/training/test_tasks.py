"""Losses against hand-computed values; what each task trains and freezes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.training.toy_tasks import PairData, contrastive_task
from tulip_pipelines.training.datasets import window_tokens
from tulip_pipelines.training.tasks import (
    ContrastiveTask,
    DistillTask,
    clip_loss,
    distill_loss,
    teacher_text_embedding,
)


def test_distill_task_trains_only_student_text_tower(tiny):
    teacher, student = tiny
    task = DistillTask(student.model, teacher.model, "cosine")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("student.") for n in trainable)
    assert not any("visual" in n or "token_embedding" in n or "logit_scale" in n for n in trainable)
    assert "student.transformer.resblocks.0.attn.in_proj_weight" in trainable
    assert {"student.ln_final.weight", "student.text_projection"} <= trainable
    assert not any(n.startswith("teacher") for n, _ in task.named_parameters())  # not checkpointed
    tokens = teacher.tokenizer(["a red circle. a blue square."])
    out = task(
        {"teacher_long": tokens, "long": student.tokenizer(["a red circle. a blue square."])}
    )
    assert 0 < out["loss"].item() <= 2  # no position information yet: not the teacher's output
    assert -1 <= out["cosine"].item() <= 1


def test_windows_overlap_and_target_is_their_mean(tiny):
    teacher, student = tiny
    text = " ".join(f"word{i}" for i in range(60))  # 170 BPE tokens: windows at 0, 55, 110
    windows, mask = window_tokens(
        [text, "short text"], teacher.tokenizer, overlap=20, max_windows=8
    )
    assert windows.shape == (2, 8, 77)
    ids = teacher.tokenizer.encode(text)
    assert len(ids) == 170 and mask[0].tolist() == [True] * 3 + [False] * 5
    assert windows[0, 1, 1:21].tolist() == ids[55:75]  # second window starts 55 tokens later
    assert windows[0, 0, 56:76].tolist() == windows[0, 1, 1:21].tolist()  # 20 shared tokens
    assert mask[1].sum().item() == 1
    target = teacher_text_embedding(teacher.model, {"windows": windows, "window_mask": mask},
                                    "windows")
    with torch.no_grad():
        expected = teacher.model.encode_text(windows[0][mask[0]]).mean(0)
    assert torch.allclose(target[0], expected, atol=1e-5)


def test_contrastive_task_freezes_what_it_is_told(tiny):
    teacher, _ = tiny
    task = ContrastiveTask(teacher.model, 0.8, 0.2, train_towers=["text"])
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert not any("visual" in n or "logit_scale" in n for n in trainable)
    assert "model.token_embedding.weight" in trainable
    batch = {
        "image": torch.randn(4, 3, 48, 48),
        "long": teacher.tokenizer(["a"] * 4),
        "short": teacher.tokenizer(["b"] * 4),
    }
    out = task(batch)
    assert out["loss"].item() == pytest.approx(
        0.8 * out["loss_long"].item() + 0.2 * out["loss_short"].item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="train_towers"):
        ContrastiveTask(teacher.model, train_towers=["wheels"])
    for p in teacher.model.parameters():
        p.requires_grad_(True)




# --- task losses computed by hand from the batch ------------------------------------------------

LONG_CAPTIONS = [
    "a red circle above a blue square. the square is striped and the circle is plain.",
    "a green triangle beside a yellow star. the star is small and the triangle is large.",
    "two purple squares on a grey background. both squares have a dotted fill.",
    "an orange circle inside a black square. the circle touches every side.",
]
SHORT_CAPTIONS = ["a red circle", "a green triangle", "two purple squares", "an orange circle"]


def _fresh(tiny):
    """Copies of the tiny teacher and student (the tasks change requires_grad in place)."""
    teacher, student = tiny
    return copy.deepcopy(teacher), copy.deepcopy(student)


def _with_gradient(model, prefixes: tuple[str, ...]) -> list[str]:
    """Names of ``model``'s parameters starting with one of ``prefixes`` that got a gradient."""
    return [n for n, p in model.named_parameters() if n.startswith(prefixes) and p.grad is not None]


def test_contrastive_task_loss_is_weighted_long_and_short_clip_loss(tiny):
    teacher, _ = _fresh(tiny)
    model = teacher.model
    torch.manual_seed(5)
    batch = {
        "image": torch.randn(4, 3, 48, 48),
        "long": teacher.tokenizer(LONG_CAPTIONS),
        "short": teacher.tokenizer(SHORT_CAPTIONS),
    }
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        long = model.encode_text(batch["long"], normalize=True)
        short = model.encode_text(batch["short"], normalize=True)
        scale = model.logit_scale.exp()
        assert scale < 100  # the task caps the scale at 100, as CLIP does; not reached here
        loss_long, loss_short = clip_loss(image, long, scale), clip_loss(image, short, scale)
    expected = 0.8 * loss_long + 0.2 * loss_short
    swapped = 0.8 * loss_short + 0.2 * loss_long
    assert abs(expected - swapped) > 1e-3  # the batch tells the two captions apart

    task = ContrastiveTask(model, long_weight=0.8, short_weight=0.2, train_towers=["text"])
    out = task(batch)
    assert out["loss_long"].item() == pytest.approx(loss_long.item(), rel=1e-6)
    assert out["loss_short"].item() == pytest.approx(loss_short.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert _with_gradient(model, ("visual.", "logit_scale")) == []
    assert grads["token_embedding.weight"] is not None
    assert grads["transformer.resblocks.0.attn.in_proj_weight"].abs().sum() > 0


def test_contrastive_task_without_short_weight_reads_only_the_long_caption(tiny):
    teacher, _ = _fresh(tiny)
    model = teacher.model
    torch.manual_seed(6)
    batch = {"image": torch.randn(4, 3, 48, 48), "long": teacher.tokenizer(LONG_CAPTIONS),
             "short": teacher.tokenizer(SHORT_CAPTIONS)}
    with torch.no_grad():
        expected = clip_loss(model.encode_image(batch["image"], normalize=True),
                             model.encode_text(batch["long"], normalize=True),
                             model.logit_scale.exp())
    out = ContrastiveTask(model, long_weight=1.0, short_weight=0.0)(batch)
    assert "loss_short" not in out
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["cosine", "mse", "l2"])
def test_distill_task_loss_and_where_gradients_go(tiny, loss_type):
    teacher, student = _fresh(tiny)
    batch = {"teacher_long": teacher.tokenizer(LONG_CAPTIONS),
             "long": student.tokenizer(LONG_CAPTIONS)}
    with torch.no_grad():
        target = teacher.model.encode_text(batch["teacher_long"]).float()
        expected = distill_loss(student.model.encode_text(batch["teacher_long"]).float(), target,
                                loss_type)
    assert expected.item() > 1e-3  # the student (no positions yet) differs from the teacher

    task = DistillTask(student.model, teacher.model, loss_type)
    out = task(batch)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    out["loss"].backward()
    assert _with_gradient(teacher.model, ("",)) == []
    assert _with_gradient(student.model, ("token_embedding.", "visual.", "logit_scale")) == []
    grads = {n: p.grad for n, p in student.model.named_parameters()}
    assert grads["transformer.resblocks.0.attn.in_proj_weight"].abs().sum() > 0
    assert grads["text_projection"].abs().sum() > 0


def test_distill_task_with_windows_compares_the_whole_caption_with_the_windows_mean(tiny):
    teacher, student = _fresh(tiny)
    text = " ".join(f"word{i}" for i in range(60))  # 170 tokens: 3 windows of the teacher
    texts = [text, "short text"]
    windows, mask = window_tokens(texts, teacher.tokenizer, overlap=20, max_windows=8)
    batch = {"windows": windows, "window_mask": mask, "long": student.tokenizer(texts),
             "teacher_long": teacher.tokenizer(texts)}
    with torch.no_grad():
        target = torch.stack([teacher.model.encode_text(windows[b][mask[b]]).float().mean(0)
                              for b in range(2)])
        expected = distill_loss(student.model.encode_text(batch["long"]).float(), target)
        truncated = distill_loss(student.model.encode_text(batch["teacher_long"]).float(), target)
    assert abs(expected - truncated) > 1e-4  # reading all 170 tokens differs from the first 77

    out = DistillTask(student.model, teacher.model, "cosine", teacher_input="windows")(batch)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_authors_loss_by_hand():
    torch.manual_seed(0)
    task = contrastive_task(label_smoothing=0.1, short_image_components=2, max_logit_scale=None)
    task.long_weight = task.short_weight = 1.0
    with torch.no_grad():
        task.model.logit_scale.fill_(4.6052)
    task.eval()
    batch = PairData(6)[:]  # a dict of stacked tensors
    out = task(batch)
    with torch.no_grad():
        image = task.model.encode_image(batch["image"], normalize=True)
        long = task.model.encode_text(batch["long"], normalize=True)
        short = task.model.encode_text(batch["short"], normalize=True)
        centred = image - image.mean(0)
        basis = torch.linalg.svd(centred, full_matrices=False)[2][:2].T
        image_short = centred @ basis @ basis.T + image.mean(0)
        scale = torch.tensor(4.6052).exp()
        labels = torch.arange(6)

        def loss(a, b):
            logits = scale * a @ b.T
            return (F.cross_entropy(logits, labels, label_smoothing=0.1)
                    + F.cross_entropy(logits.T, labels, label_smoothing=0.1)) / 2

        expected_long, expected_short = loss(image, long), loss(image_short, short)
    assert out["loss_long"].item() == pytest.approx(expected_long.item(), abs=1e-5)
    assert out["loss_short"].item() == pytest.approx(expected_short.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((expected_long + expected_short).item(), abs=1e-5)
    # the short loss really uses the primary components: with the plain features it differs
    assert abs(loss(image, short).item() - expected_short.item()) > 1e-4


def test_the_default_loss_is_tulips_and_the_temperature_bound_open_clips(tiny):
    """TULIP's stage 2: 0.8 x long + 0.2 x short; open_clip's clamp of the logit_scale parameter
    to [0, ln 100] (temperature at most 100), both ends; ``None`` (Long-CLIP): no clamp."""
    teacher, _ = _fresh(tiny)
    model = teacher.model
    task = ContrastiveTask(model)
    assert (task.long_weight, task.short_weight, task.label_smoothing) == (0.8, 0.2, 0.0)
    assert task.global_batch and task.short_image_components is None
    [(param, (low, high))] = task.parameter_bounds().items()
    assert param is model.logit_scale
    assert low == 0.0
    assert high == pytest.approx(4.605170185988092, abs=1e-12)  # ln 100
    [(_, (low, high))] = ContrastiveTask(model, max_logit_scale=50.0).parameter_bounds().items()
    assert (low, high) == (0.0, pytest.approx(3.912023005428146, abs=1e-12))  # ln 50
    assert ContrastiveTask(model, max_logit_scale=None).parameter_bounds() == {}
    # a frozen temperature is not clamped (it does not move)
    assert ContrastiveTask(model, train_towers=["text"]).parameter_bounds() == {}


def test_the_loss_weights_are_at_least_zero_and_not_both_zero(tiny):
    teacher, _ = _fresh(tiny)
    for weights in ((0.0, 1.0), (1.0, 0.0)):
        ContrastiveTask(teacher.model, *weights)
    for weights in ((-1e-9, 1.0), (1.0, -1e-9), (0.0, 0.0)):
        with pytest.raises(ValueError, match="loss weights"):
            ContrastiveTask(teacher.model, *weights)
