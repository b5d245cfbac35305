"""Every parameter of every training stage reaches what the stage builds: the task, the model, the
data and the engine's parameters carry the values asked for (each set away from its default).
A parameter added to a stage without a check here fails ``test_every_parameter_is_checked``."""

import dataclasses

import pandas as pd
import pytest
import torch

from tests.image_helpers import write_images
from tulip_pipelines.models import build_student, create_teacher
from tulip_pipelines.models.longclip import KeptPositionsCLIP
from tulip_pipelines.training.datasets import SHORT_CAPTIONS
from tulip_pipelines.training.job import TrainParams
from tulip_pipelines.training.stages import STAGES, StageInputs
from tulip_pipelines.training.stages.distill import embeddings_request
from tulip_pipelines.training.teacher_embeddings import (
    TeacherTextEmbeddings,
    TeacherTextEmbeddingsRequest,
    compute_teacher_text_embeddings,
    write_part,
)

# the engine's parameters, all away from their defaults (what every stage's `train` block gives)
TRAIN = {"max_steps": 7, "batch_size": 3, "lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.05,
         "betas": [0.8, 0.9], "eps": 1e-7, "min_lr_ratio": 0.1, "decay_biases_and_norms": True,
         "schedule_steps": 70, "seed": 5, "num_workers": 1, "log_every": 3, "val_every": 4,
         "checkpoint_every": 5, "keep_checkpoints": 3, "resume": False,
         "max_bad_fraction": 0.01, "precision": "amp_bf16"}
# fields every stage has, checked once for all (run_dir, processes, launcher: how it runs)
# every stage's; registered_model_name reaches the Model Registry (tests/test_tracking.py)
# checked for every stage (StageParams): test_common_parameters_are_checked, test_multinode.py
COMMON = {"train", "run_dir", "num_processes", "launcher", "registered_model_name", "num_nodes",
          "master_addr", "master_port", "hostfile", "node_timeout_s"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    frame = write_images(root, 12)
    frame["caption"] = [f"A shape number {i}. It is red. Then blue. " * 3 for i in range(12)]
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    distilled = build_student(teacher, 248)
    with torch.no_grad():
        distilled.model.text_projection.mul_(2.0)  # not the teacher's
    shuffled = pd.DataFrame({"id": list(frame["id"]) * 2,
                             "caption": [f"variant {i}" for i in range(24)]})
    return StageInputs({"teacher": teacher, "distilled": distilled},
                       {"train": frame.iloc[4:], "val": frame.iloc[:4], "shuffled": shuffled},
                       str(root))


@pytest.fixture(scope="module")
def cached(inputs, tmp_path_factory):
    """The inputs with the teacher text embeddings distill's defaults ask for."""
    folder = tmp_path_factory.mktemp("cache")
    params = STAGES["distill"].params_cls.from_params({"train": TRAIN})
    request = embeddings_request(params, inputs.models["teacher"], inputs.frames)
    for part in compute_teacher_text_embeddings(request, {}):
        write_part(part, folder)
    return dataclasses.replace(inputs,
                               teacher_text_embeddings=TeacherTextEmbeddings(folder))


def _build(stage, inputs, **values):
    params = STAGES[stage].params_cls.from_params({"train": TRAIN, **values})
    return params, STAGES[stage].build(params, inputs)


def _text_trains(task) -> tuple[bool, bool]:
    grads = {name: p.requires_grad for name, p in task.named_parameters()}
    text = any(v for k, v in grads.items() if "transformer.resblocks" in k and "visual" not in k)
    image = any(v for k, v in grads.items() if k.startswith("model.visual."))
    return text, image


# stage -> parameter -> (value away from the default, check of the built job)
CHECKS = {
    "teacher": {
        "model_name": ("TULIP-Tiny", lambda job, _: job.model.spec.model_name == "TULIP-Tiny"),
        "caption_source": ("original", lambda job, _: job.train_dataset.variants is None),
        "long_weight": (0.7, lambda job, _: job.task.long_weight == 0.7),
        "short_weight": (0.3, lambda job, _: job.task.short_weight == 0.3
                         and job.collate_fn.short_tokenizer is not None),
    },
    "distill": {
        "context_length": (200, lambda job, _: job.model.spec.context_length == 200
                           and job.model.model.context_length == 200),
        "rope_theta": (500.0, lambda job, _: job.model.model.rotary.theta == 500.0
                       and job.model.spec.rope_theta == 500.0),
        "activation": ("gelu", lambda job, _: job.model.spec.activation == "gelu" and all(
            isinstance(b.mlp.gelu, torch.nn.GELU)
            for b in job.model.model.transformer.resblocks)),
        "loss_type": ("mse", lambda job, _: job.task.loss_type == "mse"),
        "teacher_input": ("windows", lambda job, _: job.task.teacher_input == "windows"
                          and job.collate_fn.windows > 0),
        "window_overlap": (11, lambda job, _: job.collate_fn.overlap == 11),
        "max_windows": (3, lambda job, _: job.collate_fn.windows == 3),
        "rows": ("long", lambda job, inputs: len(job.train_dataset) == len(inputs.frames["train"])),
        "teacher_embeddings": ("live", lambda job, _: job.task.teacher is not None),
        # these two shape the cache the node writes, not the training job
        "embedding_dtype": ("float32", lambda _, request: request.dtype == "float32"),
        "embedding_batch_size": (17, lambda _, request: request.batch_size == 17),
        "embedding_device": ("cpu", lambda _, request: request.device == "cpu"),
        "embedding_autocast": ("fp16", lambda _, request: request.autocast == "fp16"),
        "embedding_processes": (3, lambda _, request: len(request.workers()) == 3),
    },
    "expand": {
        "long_weight": (0.6, lambda job, _: job.task.long_weight == 0.6),
        "short_weight": (0.4, lambda job, _: job.task.short_weight == 0.4),
        "short_caption": ("longclip", lambda job, _:
                          job.train_dataset.short_caption is SHORT_CAPTIONS["longclip"]),
        "train_towers": (["text"], lambda job, _: _text_trains(job.task) == (True, False)),
        "label_smoothing": (0.1, lambda job, _: job.task.label_smoothing == 0.1),
        "short_image_components": (4, lambda job, _: job.task.short_image_components == 4),
        "max_logit_scale": (50.0, lambda job, _: job.task.max_logit_scale == 50.0),
        "contrastive_batch": ("micro", lambda job, _: job.task.global_batch is False),
        "train_augment": ("random_resized_crop", lambda job, _: "RandomResizedCrop" in repr(
            job.train_dataset.preprocess) and "RandomResizedCrop" not in repr(
            job.val_dataset.preprocess)),
        "context_length": (300, lambda job, _: job.model.spec.context_length == 300),
        "ntk_scale": (2.0, lambda job, _: job.model.spec.rope_theta != 10000.0),
        "text_projection": ("distilled", lambda job, inputs: torch.equal(
            job.model.model.text_projection, inputs.models["distilled"].model.text_projection)),
    },
}
CHECKS["longclip_authors"] = {
    **{k: v for k, v in CHECKS["expand"].items()
       if k not in ("context_length", "ntk_scale", "text_projection")},
    "context_length": (200, lambda job, _: job.model.model.positional_embedding.shape[0] == 200),
    "keep": (10, lambda job, _: job.model.model.keep_positions == 10),
    "freeze_kept": (False, lambda job, _: not isinstance(job.model.model, KeptPositionsCLIP)),
    "init_logit_scale": (2.5, lambda job, _: float(job.model.model.logit_scale) == 2.5),
}
CHECKS["longclip_equal_budget"] = CHECKS["longclip_authors"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_parameter_is_checked(stage):
    fields = {f.name for f in dataclasses.fields(STAGES[stage].params_cls)} - COMMON
    assert fields == set(CHECKS[stage])


def test_each_stage_registers_its_model_under_its_own_name():
    train = {"train": {"batch_size": 4, "lr": 1e-3, "max_steps": 1}}
    names = {stage: STAGES[stage].params_cls(**train).registered_model_name for stage in STAGES}
    assert names == {"teacher": "tulip-teacher", "distill": "tulip-distilled",
                     "expand": "tulip-expanded", "longclip_authors": "longclip-authors",
                     "longclip_equal_budget": "longclip-equal-budget"}
    expand = STAGES["expand"].params_cls
    assert expand(**train, registered_model_name=None).registered_model_name is None
    with pytest.raises(ValueError, match="registered_model_name"):
        expand(**train, registered_model_name="tulip/expanded")


CASES = [(stage, name) for stage in sorted(CHECKS) for name in sorted(CHECKS[stage])]


@pytest.mark.parametrize(("stage", "name"), CASES)
def test_a_parameter_reaches_what_the_stage_builds(stage, name, inputs, cached):
    value, check = CHECKS[stage][name]
    extra = {"teacher_input": "windows"} if name in ("window_overlap", "max_windows") else {}
    if stage == "distill" and name != "teacher_embeddings":
        extra["teacher_embeddings"] = "live"  # builds without a cache (the cache's own: below)
    if name == "ntk_scale":
        extra["context_length"] = 300  # NTK scaling applies when the context grows
    params, job = _build(stage, inputs, **{**extra, name: value})
    if name.startswith("embedding_"):
        request = embeddings_request(dataclasses.replace(params, teacher_embeddings="cached"),
                                     inputs.models["teacher"], inputs.frames)
        assert isinstance(request, TeacherTextEmbeddingsRequest) and check(job, request)
    else:
        assert check(job, inputs), f"{stage}.{name}={value!r} did not reach the built job"
    # and the default does not already pass the check (else the check proves nothing)
    if not name.startswith("embedding_") and name != "model_name":
        _, default_job = _build(stage, cached if stage == "distill" else inputs, **extra)
        assert not check(default_job, inputs), f"{stage}.{name}: the check passes by default"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_train_block_reaches_the_engine_parameters(stage, inputs):
    params, job = _build(stage, inputs, **({"teacher_embeddings": "live"}
                                          if stage == "distill" else {}))
    assert job.params == TrainParams.for_stage(TRAIN, stage, params.stage_run_dir)
    for key, value in TRAIN.items():
        got = getattr(job.params, key)
        assert (list(got) if key == "betas" else got) == value, key


@pytest.mark.parametrize("values, message", [
    (dict(num_nodes=2, launcher="srun"), "not inside a SLURM allocation"),
    (dict(num_nodes=2), "nothing starts the other nodes"),
    (dict(node_rank=1), "node_rank"),  # the launcher knows each node's rank
    (dict(node_timeout_s=0), "node_timeout_s"),
    (dict(hostfile="hosts", launcher="torchrun"), "hostfile"),
    (dict(launcher="mpirun"), "launcher"),
])
def test_node_parameters_are_checked_before_any_work(values, message, monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=message):
        STAGES["expand"].params_cls.from_params({"train": TRAIN, **values})


# stage -> field -> (values at the bound, accepted; one step past it, rejected)
CONTRASTIVE_BOUNDS = {
    "long_weight": ([0.0], [-1e-9]),  # >= 0 (the other weight stays positive)
    "short_weight": ([0.0], [-1e-9]),
    "label_smoothing": ([0.0, 1.0], [-1e-9, 1.0 + 1e-9]),
    "short_image_components": ([1, None], [0]),
    "max_logit_scale": ([1e-9, None], [0.0, -1.0]),  # > 0, or no clamp
}
STAGE_BOUNDS = {
    "expand": {**CONTRASTIVE_BOUNDS, "context_length": ([2, None], [1]),
               "ntk_scale": ([1e-9, None], [0.0])},
    "longclip_authors": {**CONTRASTIVE_BOUNDS, "context_length": ([2], [1]), "keep": ([0], [-1])},
    "distill": {"embedding_batch_size": ([1], [0]), "embedding_processes": ([1, None], [0]),
                "context_length": ([2], [1]), "rope_theta": ([1.0 + 1e-9], [1.0]),
                "window_overlap": ([0], [-1]), "max_windows": ([1], [0])},
}
STAGE_BOUNDS["longclip_equal_budget"] = STAGE_BOUNDS["longclip_authors"]
# the demo teacher's loss weights, checked before it trains (not only when its task is built)
STAGE_BOUNDS["teacher"] = {"long_weight": ([0.0], [-1e-9]), "short_weight": ([0.0], [-1e-9])}
for _stage in STAGES:  # every stage's own process and node settings
    STAGE_BOUNDS.setdefault(_stage, {}).update(
        {"num_processes": ([1], [0]), "node_timeout_s": ([1e-9], [0.0, -1.0])})
BOUND_CASES = [(stage, name) for stage in sorted(STAGE_BOUNDS)
               for name in sorted(STAGE_BOUNDS[stage])]


@pytest.mark.parametrize(("stage", "name"), BOUND_CASES)
def test_each_stage_bound_accepts_its_edge_and_rejects_one_step_past(stage, name, monkeypatch):
    from tests.bounds import assert_bounds

    for key in ("SLURM_NNODES", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    accepted, rejected = STAGE_BOUNDS[stage][name]

    def make(**values):
        if stage == "teacher" and name == "long_weight":
            values["short_weight"] = 1.0  # its default is 0: long_weight 0 alone is no loss
        return STAGES[stage].params_cls.from_params({"train": TRAIN, **values})

    assert_bounds(make, name, accepted, rejected)


@pytest.mark.parametrize("stage", ["expand", "longclip_authors", "teacher"])
def test_both_loss_weights_at_zero_are_rejected(stage):
    with pytest.raises(ValueError, match="must not both be 0"):
        STAGES[stage].params_cls.from_params({"train": TRAIN, "long_weight": 0.0,
                                              "short_weight": 0.0})


def test_the_student_may_read_as_many_tokens_as_its_teacher_but_not_fewer():
    import open_clip

    # ViT-L-14's text context from open_clip's own config (CLIP's 77)
    context = open_clip.get_model_config("ViT-L-14")["text_cfg"]["context_length"]
    assert context == 77
    teacher = {"teacher": {"model_name": "ViT-L-14"}}
    distill = STAGES["distill"].params_cls
    distill.from_params({"train": TRAIN, "context_length": 77}).check_with(teacher)
    with pytest.raises(ValueError, match="shorter than the teacher's 77"):
        distill.from_params({"train": TRAIN, "context_length": 76}).check_with(teacher)


def test_the_defaults_are_the_papers():
    """TULIP: 248 tokens, RoPE base 10000, loss 0.8 long + 0.2 short, open_clip's temperature
    clamp at 100, the teacher's text projection at stage 2; Long-CLIP: 248 tokens, the first 20
    positions kept (frozen); the demo teacher trains on the long caption only."""
    distill = STAGES["distill"].params_cls(train=TRAIN)
    assert (distill.context_length, distill.rope_theta, distill.loss_type) == (248, 10000.0,
                                                                               "cosine")
    assert (distill.teacher_input, distill.window_overlap, distill.max_windows) == ("tokens",
                                                                                    20, 5)
    expand = STAGES["expand"].params_cls(train=TRAIN)
    assert (expand.long_weight, expand.short_weight, expand.max_logit_scale) == (0.8, 0.2, 100.0)
    assert (expand.text_projection, expand.label_smoothing) == ("teacher", 0.0)
    assert (expand.context_length, expand.ntk_scale) == (None, None)  # the student's own
    for stage in ("longclip_authors", "longclip_equal_budget"):
        recipe = STAGES[stage].params_cls(train=TRAIN)
        assert (recipe.context_length, recipe.keep, recipe.freeze_kept) == (248, 20, True)
    from tulip_pipelines.training.stages.longclip import LongclipParams

    scheme = LongclipParams()
    assert (scheme.context_length, scheme.keep, scheme.freeze_kept) == (248, 20, True)
    teacher = STAGES["teacher"].params_cls(train=TRAIN)
    assert (teacher.long_weight, teacher.short_weight) == (1.0, 0.0)


def _fingerprint(stage, inputs, **values):
    params = STAGES[stage].params_cls.from_params({"train": TRAIN, **values})
    return params.fingerprint_fields()


# fields that say where and how a stage runs, not what it learns: a resumed run may change them
LAYOUT_FIELDS = {"run_dir": "elsewhere", "num_processes": 2, "launcher": "torchrun",
                 "node_timeout_s": 17.0, "registered_model_name": "another-name"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_fingerprint_covers_what_it_learns_and_not_where_it_runs(stage, inputs):
    """Every stage parameter checked above (``CHECKS``: each changes the built job) changes the
    stage's fingerprint fields, except what only shapes the embeddings cache (the cache has its
    own key); the layout and the registered name leave them equal."""
    base = _fingerprint(stage, inputs)
    for name, (value, _) in CHECKS[stage].items():
        if name in ("embedding_batch_size", "embedding_device", "embedding_processes"):
            continue  # how the cache is computed, not its values (nor the weights)
        value = "ViT-B-16" if name == "model_name" else value  # CHECKS' is the default
        assert _fingerprint(stage, inputs, **{name: value}) != base, f"{stage}.{name}"
    for name, value in LAYOUT_FIELDS.items():
        assert _fingerprint(stage, inputs, **{name: value}) == base, f"{stage}.{name}"


def test_a_stage_jobs_fingerprint_inputs_name_its_models_data_and_images(inputs):
    """stage_job's fingerprint inputs: the model, the input models, the first and last training
    ids and their count, and which images (not the folder they are in)."""
    params, job = _build("expand", inputs)
    fingerprint_inputs = job.fingerprint_inputs
    train = inputs.frames["train"]
    assert fingerprint_inputs["train_ids"] == [str(train["id"].iloc[0]), str(train["id"].iloc[-1]),
                                        len(train)]
    assert fingerprint_inputs["model"] == dataclasses.asdict(job.model.spec)
    assert fingerprint_inputs["inputs"] == {k: dataclasses.asdict(b.spec)
                                            for k, b in inputs.models.items()}
    assert "root" not in fingerprint_inputs["images"]
    assert "folder" not in fingerprint_inputs["images"]
    assert fingerprint_inputs["params"] == params.fingerprint_fields()
    # another training set (one record fewer) gives another fingerprint
    fewer = dataclasses.replace(inputs, frames={**inputs.frames,
                                                "train": inputs.frames["train"].iloc[:-1]})
    _, job_fewer = _build("expand", fewer)
    assert job_fewer.fingerprint_inputs["train_ids"] != fingerprint_inputs["train_ids"]
