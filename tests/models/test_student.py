"""The TULIP student (models/clip.py: RopeCLIP, build_student): every teacher weight copied,
end-of-text pooling, 248 tokens with the end token kept, no shorter context than the teacher."""


import open_clip
import pytest
import torch

from tests.models.conftest import LONG
from tulip_pipelines.models import (
    build_student,
    create_teacher,
)


def test_student_copies_every_teacher_weight():
    """Every teacher weight reaches the student under the same name (the position embedding
    excepted), on a teacher with no zero anywhere: a weight left at its initial value (biases
    start at zero) or taken from the wrong layer shows."""
    torch.manual_seed(3)
    teacher = create_teacher("TULIP-Tiny")
    with torch.no_grad():
        for param in teacher.model.parameters():
            param.copy_(torch.rand_like(param) + 0.5)  # in [0.5, 1.5): all distinct from zero
    t = teacher.model.state_dict()
    assert all(bool((v != 0).all()) for v in t.values())
    student = build_student(teacher, context_length=248)
    s = student.model.state_dict()
    assert set(s) == set(t) - {"positional_embedding"}
    assert any(".attn.in_proj_bias" in k for k in s) and any(".out_proj.bias" in k for k in s)
    for key in s:
        assert torch.equal(s[key], t[key]), key
    # copies, not shared tensors: training the student leaves the teacher alone
    assert student.model.visual is not teacher.model.visual
    assert all(s[k].data_ptr() != t[k].data_ptr() for k in s)


def test_eot_pooling_ignores_tokens_after_eot(student):
    tok = student.tokenizer(["a red circle"])
    eot = int(tok.argmax())
    changed = tok.clone()
    changed[0, eot + 1 : eot + 5] = 123  # padding after EOT; causal attention cannot see it
    with torch.no_grad():
        assert torch.allclose(
            student.model.encode_text(tok), student.model.encode_text(changed), atol=1e-6
        )
        # and the pooled token is the EOT: truncating right after it changes nothing
        assert torch.allclose(
            student.model.encode_text(tok), student.model.encode_text(tok[:, : eot + 1]), atol=1e-5
        )


def test_truncation_at_248_keeps_eot(student):
    tok = student.tokenizer([LONG])
    assert tok.shape == (1, 248)
    assert int(tok[0, -1]) == open_clip.tokenizer.SimpleTokenizer().eot_token_id


def test_student_shorter_than_teacher_is_refused(teacher):
    with pytest.raises(ValueError, match="shorter than the teacher's 77"):
        build_student(teacher, context_length=64)
