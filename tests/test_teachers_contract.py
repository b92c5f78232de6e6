"""One contract for every teacher adapter, through its one face (``sid.teachers.build_teacher``): what the trainer
relies on of any teacher. A new adapter (or a new family of one) joins by one line in ``CASES``.

Checked per case: the denoiser contract (the σ range and σ_data, one output per input of the same shape, float32
at the boundary under bf16 autocast, finite, labels used when it takes them), the ``Teacher`` bundle (shape,
frozen teacher, trainable students that start as the teacher or, for analytic teachers, close to it), and the
exported spec (JSON, and rebuilding the students' architecture exactly).
"""

import json

import pytest
import torch

from conftest import TINY_UNET, assert_float32_close, bf16_attention
from sid.config import load_config
from sid.guidance import part
from sid.teachers import build_teacher, denoiser_from_spec

UNET = json.dumps(TINY_UNET).replace(" ", "")
CLASS_UNET = json.dumps({**TINY_UNET, "num_class_embeds": 3}).replace(" ", "")


def diffusers(prediction_type, unet=UNET):
    return lambda request: ["teacher.kind=diffusers", f"teacher.diffusers.unet_config={unet}",
                            f"teacher.diffusers.prediction_type={prediction_type}"]


def edm_pickle(kind, label_dim=0):
    def overrides(request):
        from edm_pickles import write_snapshot

        networks, path = request.getfixturevalue("edm_side"), request.getfixturevalue("tmp_path") / "net.pkl"
        write_snapshot(path, getattr(networks, kind)(8, 1, label_dim=label_dim))
        return ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={path}"]
    return overrides


def python(label_dim=0):
    return lambda request: ["teacher.kind=python", "teacher.python.factory=tests.custom_teacher:build",
                            "teacher.python.shape=[1,8,8]", f"teacher.python.kwargs.label_dim={label_dim}"]


def pipeline(name, *extra):
    """A tiny latent pipeline folder of that family (tests/tiny_pipelines.py), built once per session."""
    return lambda request: ["teacher.kind=diffusers",
                            f"teacher.diffusers.path={request.getfixturevalue('tiny_pipeline')(name)}", *extra]


def analytic(shape):
    return lambda request: [f"teacher.analytic.shape={shape}", "teacher.analytic.modes=3",
                            "teacher.analytic.student_fit_steps=300", "teacher.analytic.student_width=64"]


# id -> config overrides of a teacher of that kind (tiny, random, built here: no download)
CASES = {
    "analytic-2d": analytic("[2]"),
    "analytic-image": analytic("[1,4,4]"),
    "diffusers-epsilon": diffusers("epsilon"),
    "diffusers-v": diffusers("v_prediction"),
    "diffusers-x0": diffusers("sample"),
    "diffusers-edm": diffusers("edm"),
    "diffusers-flow": diffusers("flow"),
    "diffusers-classes": diffusers("edm", CLASS_UNET),
    "edm_pickle-vp": edm_pickle("VPPrecond", label_dim=3),
    "edm_pickle-ve": edm_pickle("VEPrecond"),
    "edm_pickle-edm": edm_pickle("EDMPrecond"),
    "python": python(),
    "python-classes": python(label_dim=3),
    **{f"diffusers-{name}": pipeline(name) for name in ("sd", "sdxl", "sd3", "pixart", "sana", "dit")},
    "diffusers-flux": pipeline("flux", "teacher.diffusers.resolution=16", "teacher.diffusers.max_sequence_length=16"),
}


BUILT = {}                                  # each case's teacher, built once: the tests read it, students are copies


@pytest.fixture(params=list(CASES))
def teacher(request):
    if request.param not in BUILT:
        torch.manual_seed(0)
        BUILT[request.param] = build_teacher(load_config([], CASES[request.param](request)).teacher, trust_code=True)
    return BUILT[request.param]


def inputs(teacher, n=4):
    """Noisy samples at σ from 0.01 to 40 (of the teacher's own distribution where it has exact samples), and
    their conditions: one-hot labels, or encoded prompts for a text-to-image teacher."""
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.01, 0.5, 2.5, 40.0])[:n]
    x0 = teacher.sample(n, g) if teacher.exact_samples else torch.zeros(n, *teacher.shape)
    x = x0 + torch.randn(n, *teacher.shape, generator=g) * (1 + sigma.view(-1, *[1] * len(teacher.shape)))
    if teacher.text_to_image:
        return x, sigma, teacher.encode(["a cat", "a red dog", "", "an old car"][:n])
    labels = torch.eye(teacher.label_dim)[torch.arange(n) % teacher.label_dim] if teacher.label_dim else None
    return x, sigma, labels


def test_the_denoiser_meets_the_contract(teacher):
    d = teacher.denoiser
    assert 0 < d.sigma_min < d.sigma_max and d.sigma_data > 0 and teacher.label_dim >= 0
    x, sigma, labels = inputs(teacher)
    with torch.no_grad():
        out = d(x, sigma, labels)
        assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
        with torch.autocast("cpu", dtype=torch.bfloat16), bf16_attention():
            assert d(x, sigma, labels).dtype == torch.float32                      # float32 at the boundary
        # a sample's output is its own, whatever the batch (whose size changes the kernels' order of summation)
        assert_float32_close(d(x, 2.5, labels)[:1], d(x[:1], torch.tensor([2.5]), part(labels, slice(1))))
        if labels is not None:                                                      # a scalar σ is every sample's
            assert not torch.allclose(out, d(x, sigma, part(labels, [1, 2, 3, 0])))  # conditions are used


def test_the_bundle_holds_a_frozen_teacher_and_trainable_students_that_start_as_it(teacher):
    assert not teacher.denoiser.training and not any(p.requires_grad for p in teacher.denoiser.parameters())
    student = teacher.make_student()
    assert student.training and all(p.requires_grad for p in student.parameters())
    x, sigma, labels = inputs(teacher)
    with torch.no_grad():
        target, start = teacher.denoiser(x, sigma, labels), student.eval()(x, sigma, labels)
    if teacher.spec["kind"] == "analytic":                                     # an MLP fitted to the exact one
        assert (start - target).pow(2).mean() < 0.1 * target.pow(2).mean()
    else:
        torch.testing.assert_close(start, target)
    if teacher.exact_samples:
        assert teacher.sample(5, torch.Generator().manual_seed(0)).shape == (5, *teacher.shape)


def test_the_spec_rebuilds_the_students_architecture(teacher):
    spec = teacher.spec
    assert json.loads(json.dumps(spec)) == spec
    student = teacher.make_student().eval()
    rebuilt = denoiser_from_spec(spec, trust_code=True)
    rebuilt.load_state_dict(student.state_dict())                                # strict: the same architecture
    x, sigma, labels = inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, sigma, labels), student(x, sigma, labels))


def test_activation_checkpointing_changes_no_gradient(teacher):
    """``perf.grad_checkpointing`` as the family does it: the same input gradient, recomputed in backward."""
    student = teacher.make_student().eval()
    x, sigma, labels = inputs(teacher)
    x.requires_grad_(True)
    (plain,) = torch.autograd.grad(student(x, sigma, labels).square().sum(), x)
    teacher.checkpoint_activations(student)
    (recomputed,) = torch.autograd.grad(student(x, sigma, labels).square().sum(), x)
    torch.testing.assert_close(recomputed, plain)
