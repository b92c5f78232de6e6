"""teacher.kind=diffusers: the coefficient rules against exact denoisers, and the adapter on real, tiny diffusers
UNets (built from config: no download) against diffusers' own schedulers."""

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import ROOT, TINY_UNET
from sid.config import load_config
from sid.data import load_images
from sid.errors import SidError
from sid.precond import FlowRule, Preconditioned
from sid.teachers import build_teacher
from sid.teachers.analytic import GaussianMixture
from sid.teachers.diffusers import denoiser_from_spec
from sid.teachers.diffusers.files import ASSETS, hub_unreachable
from sid.teachers.diffusers.rules import DiscreteVPRule
from sid.teachers.diffusers.unet import load_denoiser

GMM = GaussianMixture([0.2, 0.5, 0.3], torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)),
                      [0.3, 0.5, 0.8])


def alphas_cumprod(schedule="linear"):
    from diffusers import DDPMScheduler

    if schedule == "scaled_linear":
        return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    return DDPMScheduler(beta_schedule=schedule).alphas_cumprod


class ExactVPNet(nn.Module):
    """What a perfect diffusers VP network outputs, built from the exact denoiser by inverting §1.3."""

    def __init__(self, precond: DiscreteVPRule):
        super().__init__()
        self.rule = precond

    def forward(self, x_vp, t, labels=None):
        sigma = self.rule.t_to_sigma(t).view(-1, 1, 1, 1)
        alpha, beta = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
        x = x_vp / alpha                                        # EDM-space input
        x0 = GMM(x, sigma.flatten())
        eps = (x - x0) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - beta * x0, "sample": x0}[self.rule.prediction_type]


SIGMAS = torch.tensor([0.03, 0.1, 0.5, 1.0, 2.5, 7.0, 14.0], dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_vp_adapters_recover_the_exact_denoiser(prediction_type, schedule):
    precond = DiscreteVPRule(alphas_cumprod(schedule), prediction_type)
    denoiser = Preconditioned(ExactVPNet(precond), precond)
    x0 = GMM.sample(len(SIGMAS), torch.Generator().manual_seed(1))
    x = x0 + SIGMAS.view(-1, 1, 1, 1) * torch.randn(x0.shape, dtype=torch.float64)
    torch.testing.assert_close(denoiser(x, SIGMAS), GMM(x, SIGMAS), rtol=1e-9, atol=1e-9)


def test_sigma_timestep_round_trips():
    precond = DiscreteVPRule(alphas_cumprod("scaled_linear"), "epsilon")
    assert abs(float(precond.t_to_sigma(torch.tensor(625.0))) - 2.5017) < 1e-4   # SiD-LSG's init_timestep
    assert abs(float(precond.t_to_sigma(torch.tensor(20.0))) - 0.138) < 1e-3
    t = torch.linspace(0, 999, 1234, dtype=torch.float64)
    torch.testing.assert_close(precond.sigma_to_t(precond.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    k = torch.arange(1000, dtype=torch.float64)
    sigma_k = precond.t_to_sigma(k)
    ac = alphas_cumprod("scaled_linear").double()
    torch.testing.assert_close(sigma_k, ((1 - ac) / ac).sqrt())                     # σ_k = sqrt((1-ā)/ā)
    assert (sigma_k.diff() > 0).all()


def test_guidance_is_linear_in_every_parameterisation():
    """CFG on ε, converted to x0, equals CFG on x0 (D is affine in the network output at fixed x, σ)."""
    precond = DiscreteVPRule(alphas_cumprod(), "epsilon")
    sigma = torch.full((4,), 1.3, dtype=torch.float64)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    e_u, e_c = torch.randn_like(x), torch.randn_like(x)
    c = precond(sigma.view(-1, 1, 1, 1))
    d = lambda eps: c.c_skip * x + c.c_out * eps                                    # noqa: E731
    torch.testing.assert_close(d(e_u + 3.0 * (e_c - e_u)), d(e_u) + 3.0 * (d(e_c) - d(e_u)))


# Real diffusers networks (tiny, random, built from config: no download) ---------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "edm", "flow"])
def test_diffusers_unet_meets_the_contract(prediction_type):
    denoiser, spec = load_denoiser(None, TINY_UNET, prediction_type, 0.5)
    x = torch.randn(3, 1, 8, 8)
    out = denoiser(x, torch.tensor([0.01, 1.0, 50.0]))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
    assert json.loads(json.dumps(spec)) == spec                                    # JSON-able
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert denoiser(x, 1.0).dtype == torch.float32                             # float32 at the boundary


def test_class_conditional_unets_take_one_hot_labels():
    from diffusers import UNet2DConditionModel

    cond = {**TINY_UNET, "num_class_embeds": 10}
    denoiser, _ = load_denoiser(None, cond, "edm", 0.5)
    assert denoiser.label_dim == 10
    x, labels = torch.randn(2, 1, 8, 8), nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    a, b = denoiser(x, 1.0, labels), denoiser(x, 1.0, labels.flip(0))
    assert not torch.allclose(a, b)                                                # labels are used

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=8, num_class_embeds=10,
    )
    from sid.teachers.diffusers.unet import denoiser_from_unet

    denoiser = denoiser_from_unet(unet, "epsilon", None, 0.5)
    assert denoiser(x, torch.tensor([0.5, 3.0]), labels).shape == x.shape


def test_local_folder_round_trip_reads_the_scheduler(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**TINY_UNET)
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(
        tmp_path / "scheduler")
    denoiser, spec = load_denoiser(str(tmp_path), None, None, 0.5)
    assert spec["prediction_type"] == "v_prediction"
    ac = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    assert abs(denoiser.sigma_max - float(((1 - ac[-1]) / ac[-1]).sqrt())) < 1e-6
    x = torch.randn(2, 1, 8, 8)
    direct = denoiser.net.unet(x / (1 + 4.0) ** 0.5, denoiser.rule.sigma_to_t(torch.full((2,), 2.0)))[0]
    expected = x / 5.0 - 2.0 * direct / 5.0**0.5                                    # §1.3 VP-v row
    torch.testing.assert_close(denoiser(x, 2.0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["epsilon", "v_prediction"])
def test_edm_scheduler_folders_match_diffusers_own_preconditioning(tmp_path, output):
    """An EDM-scheduler folder (e.g. a v-prediction EDM model with sigma_data 1) is the denoiser diffusers defines."""
    from diffusers import EDMEulerScheduler, UNet2DModel

    unet = UNet2DModel(**TINY_UNET)
    unet.save_pretrained(tmp_path / "unet")
    scheduler = EDMEulerScheduler(sigma_data=1.0, prediction_type=output)
    scheduler.save_pretrained(tmp_path / "scheduler")
    denoiser, spec = load_denoiser(str(tmp_path), None, None, 0.5)
    assert spec["prediction_type"] == "edm" and denoiser.sigma_data == 1.0
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0]).view(-1, 1, 1, 1)
    with torch.no_grad():
        raw = unet(scheduler.precondition_inputs(x, sigma), scheduler.precondition_noise(sigma.flatten())).sample
        torch.testing.assert_close(denoiser(x, sigma.flatten()), scheduler.precondition_outputs(x, raw, sigma),
                                   rtol=1e-5, atol=1e-5)
        rebuilt = denoiser_from_spec(spec)                                         # exported generators keep it
        rebuilt.load_state_dict(denoiser.state_dict())
        torch.testing.assert_close(rebuilt(x, sigma.flatten()), denoiser(x, sigma.flatten()))


def test_flow_matching_folders_follow_diffusers_flow_schedulers(tmp_path):
    """A folder with a flow-matching scheduler loads as flow (velocity) prediction: at a step of diffusers' own
    (shifted) schedule, D of the noised sample in EDM units is x_t - t v̂, with the network fed that timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet = UNet2DModel(**TINY_UNET)
    unet.save_pretrained(tmp_path / "unet")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.save_pretrained(tmp_path / "scheduler")
    denoiser, spec = load_denoiser(str(tmp_path), None, None, 0.5)
    assert spec["prediction_type"] == "flow"
    scheduler.set_timesteps(10)
    timestep, t = scheduler.timesteps[3], scheduler.sigmas[3]
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    x_t = scheduler.scale_noise(x0, timestep.expand(2), noise)                     # diffusers' forward process
    with torch.no_grad():
        expected = x_t - t * unet(x_t, timestep).sample
        torch.testing.assert_close(denoiser(x_t / (1 - t), t / (1 - t)), expected, rtol=1e-5, atol=1e-5)
        rebuilt = denoiser_from_spec(spec)                                         # exported generators keep it
        rebuilt.load_state_dict(denoiser.state_dict())
        torch.testing.assert_close(rebuilt(x_t, 2.0), denoiser(x_t, 2.0))


@pytest.mark.slow
def test_a_flow_matching_teacher_distils_end_to_end(tiny_unet_overrides, tmp_path):
    from sid.config import load_config
    from sid.generator import load_generator
    from sid.trainer import train

    overrides = [o.replace("prediction_type=edm", "prediction_type=flow") for o in tiny_unet_overrides]
    run = train(load_config([], overrides + ["train.tracker=none"]))
    assert isinstance(run.teacher.denoiser.rule, FlowRule) and run.nimg == 32
    generator = load_generator(tmp_path / "run" / "generator")
    torch.testing.assert_close(generator.sample_seeds(range(4)), run.ema.model.sample_seeds(range(4)))


def test_a_teacher_with_non_finite_weights_is_refused(tmp_path):
    from diffusers import UNet2DModel

    from sid.config import load_config

    unet = UNet2DModel(**TINY_UNET)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    unet.save_pretrained(tmp_path / "unet")
    cfg = load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={tmp_path}",
                           "teacher.diffusers.prediction_type=edm"])
    with pytest.raises(SidError, match=r"weights hold NaN or inf \(1 of \d+ tensors, e.g. net.unet.conv_in.weight\)"):
        build_teacher(cfg.teacher)


def test_missing_or_broken_teacher_paths_say_what_to_do(tmp_path):
    with pytest.raises(SidError, match="does not exist"):
        load_denoiser(str(tmp_path / "nope"), None, None, 0.5)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SidError, match="not valid JSON"):
        load_denoiser(str(tmp_path), None, None, 0.5)
    with pytest.raises(SidError, match="prediction_type"):
        load_denoiser(None, TINY_UNET, "x0", 0.5)


def test_a_cached_hub_model_loads_from_the_cache_first(tmp_path, monkeypatch):
    """A hub id whose files are all in the Hugging Face cache loads from there without asking the hub (offline,
    the hub client retries for half a minute before it falls back to the cache); otherwise the hub is asked where
    it answers, and where it does not (found once), the cache's UNet alone is taken or the miss is one line."""
    import socket

    import huggingface_hub
    from diffusers import EDMEulerScheduler, UNet2DModel

    import sid.teachers.diffusers.unet as adapter

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--owner--tiny"
    UNet2DModel(**TINY_UNET).save_pretrained(repo / "snapshots" / revision / "unet")
    EDMEulerScheduler().save_pretrained(repo / "snapshots" / revision / "scheduler")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)      # a hub request fails at once
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    passes, fetch = [], adapter._fetch_hub

    def recorded(repo_id, revision, local_files_only):
        passes.append(local_files_only)
        return fetch(repo_id, revision, local_files_only)

    monkeypatch.setattr(adapter, "_fetch_hub", recorded)
    hub_unreachable.cache_clear()

    denoiser, spec = load_denoiser("owner/tiny", None, None, 0.5)
    assert passes == [True] and spec["prediction_type"] == "edm"                # the cached scheduler was read
    passes.clear()
    assert load_denoiser(f"owner/tiny@{revision}", None, None, 0.5)[1] == spec and passes == [True]
    with pytest.raises(SidError, match="'owner/tiny@v2' is neither a local folder nor a reachable hub model"):
        load_denoiser("owner/tiny@v2", None, None, 0.5)               # a revision the cache lacks
    passes.clear()
    shutil.rmtree(repo / "snapshots" / revision / "scheduler")                     # the UNet alone: the hub is
    passes.clear()                                                                 # offline, so take it as it is
    denoiser, spec = load_denoiser("owner/tiny", None, None, 0.5)
    assert passes == [True] and spec["prediction_type"] == "epsilon"
    passes.clear()
    with pytest.raises(SidError, match="neither a local folder nor a reachable hub model: not in the Hugging Face "
                                       "cache, and the hub cannot be reached \\(offline mode"):
        load_denoiser("owner/other", None, None, 0.5)
    assert passes == [True]
    def answering(repo_id, revision, local_files_only):                          # a hub that answers: asked
        passes.append(local_files_only)
        if not local_files_only:
            raise OSError("owner/other does not appear to have a file named model_index.json")
        return fetch(repo_id, revision, local_files_only)

    monkeypatch.setattr(adapter, "hub_unreachable", lambda: None)
    monkeypatch.setattr(adapter, "_fetch_hub", answering)
    with pytest.raises(SidError, match="neither a local folder nor a reachable hub model"):
        load_denoiser("owner/other", None, None, 0.5)
    assert passes == [True, True, False]


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    from diffusers import UNet2DModel

    def offline(*args, **kwargs):                    # what the hub client raises without a connection
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    from diffusers.configuration_utils import ConfigMixin

    monkeypatch.setattr(UNet2DModel, "from_pretrained", offline)
    monkeypatch.setattr(ConfigMixin, "load_config", classmethod(offline))      # the index and scheduler configs
    with pytest.raises(SidError, match="neither a local folder nor a reachable hub model"):
        load_denoiser("nobody/no-such-model", None, None, 0.5)


# Denoising error allowed, as a fraction of min(σ², the mean image's error): an untrained network of the same
# architecture scores 1.3, 1.3, 3.1, 3.4 (tests/data, seed 0); at σ = 10 the input says little and ~0.9 is the best.
MAX_DENOISING_ERROR = {0.1: 0.5, 0.5: 0.25, 2.0: 0.5, 10.0: 1.0}


def test_unknown_builtin_teacher_lists_the_shipped_ones():
    with pytest.raises(SidError, match="no built-in teacher 'nope'; the package ships: fmnist"):
        load_denoiser("builtin:nope", None, None, 0.5)


def test_shipped_fmnist_teacher_fits_its_budget_and_denoises_real_images():
    """The demo teacher: at most 10 MB, an EDM denoiser of 1×32×32 images, and on 64 Fashion-MNIST test images
    (tests/data) it removes most of the noise at every level a sampler visits."""
    assert sum(f.stat().st_size for f in (ASSETS / "fmnist").rglob("*") if f.is_file()) <= 10 * 2**20
    denoiser, spec = load_denoiser("builtin:fmnist", None, None, 0.5)
    assert spec["prediction_type"] == "edm" and spec["unet_config"]["sample_size"] == 32
    x0 = load_images(str(ROOT / "tests/data/fmnist-test-64.npz")).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for sigma in (0.1, 0.5, 2.0, 10.0):
            mse = (denoiser(x0 + sigma * noise, sigma) - x0).pow(2).mean()
            blind = (x0 - x0.mean(0)).pow(2).mean()        # the best guess that ignores its input: the mean image
            assert mse < MAX_DENOISING_ERROR[sigma] * min(sigma**2, blind), (sigma, float(mse))


def test_students_start_as_the_teacher():
    from sid.config import load_config

    cfg = load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(TINY_UNET)}"])
    teacher = build_teacher(cfg.teacher)
    student = teacher.make_student()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(student(x, 1.0), teacher.denoiser(x, 1.0))
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.denoiser.parameters())
    assert teacher.shape == (1, 8, 8)


# Teachers a diffusers user has: never silently wrong ---------------------------------------------------------

def pipeline_folder(root, index, unet_class="UNet2DModel", scheduler=None):
    from diffusers import UNet2DConditionModel, UNet2DModel

    config = {**TINY_UNET, "cross_attention_dim": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]} if unet_class != "UNet2DModel" else TINY_UNET
    if unet_class:
        (UNet2DModel if unet_class == "UNet2DModel" else UNet2DConditionModel)(**config).save_pretrained(root / "unet")
    if scheduler is not None:
        scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("index, unet_class, message", [
    ({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"]},
     "UNet2DConditionModel", "a StableDiffusionPipeline with vae, text_encoder: a latent or text-conditioned"),
    ({"_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"], "unet": ["diffusers", "UNet2DModel"]},
     "UNet2DModel", "a LDMPipeline with vqvae"),
    ({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"]}, None, "a DiTPipeline with vae, transformer"),
    ({"_class_name": "ScoreSdeVePipeline", "unet": ["diffusers", "UNet2DModel"]}, "UNet2DModel",
     "a ScoreSdeVePipeline .* scaled score"),
])
def test_pipelines_this_adapter_would_distil_wrongly_are_refused(tmp_path, index, unet_class, message):
    pipeline_folder(tmp_path, index, unet_class)
    with pytest.raises(SidError, match=f"{message}.*supported: UNet2DModel"):
        load_denoiser(str(tmp_path), None, None, 0.5)


def test_a_ve_score_sde_scheduler_is_refused(tmp_path):
    from diffusers import ScoreSdeVeScheduler

    pipeline_folder(tmp_path, {"_class_name": "DDPMPipeline"}, scheduler=ScoreSdeVeScheduler())
    with pytest.raises(SidError, match="ScoreSdeVeScheduler .*VE score-SDE"):
        load_denoiser(str(tmp_path), None, None, 0.5)


def test_a_zero_terminal_snr_schedule_has_a_finite_increasing_sigma(tmp_path):
    """ā_999 = 0 (σ = ∞): the last σ extrapolated in ln σ, above diffusers' largest (its Euler clips ā to 2^-24,
    which makes σ_999 smaller than σ_998), every other σ as diffusers has it, the map to timesteps monotone."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    pipeline_folder(tmp_path, {"_class_name": "DDPMPipeline"}, scheduler=scheduler)
    teacher = build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={tmp_path}"]).teacher)
    rule = teacher.denoiser.rule
    euler = EulerDiscreteScheduler.from_config(scheduler.config)
    ours = rule.log_sigmas.exp()
    torch.testing.assert_close(ours[:-1], euler.sigmas.flip(0)[1:-1].double(), rtol=1e-5, atol=0)
    assert (rule.log_sigmas.diff() > 0).all() and float(euler.sigmas.max()) < teacher.denoiser.sigma_max < 1e5
    t = rule.sigma_to_t(torch.tensor([teacher.denoiser.sigma_max], dtype=torch.float64))
    assert float(t) == pytest.approx(999.0)
    x = torch.randn(2, 1, 8, 8)
    assert teacher.denoiser(x, teacher.denoiser.sigma_max).isfinite().all()


def test_a_hub_id_loads_the_class_its_config_names(tmp_path, monkeypatch):
    import huggingface_hub
    from diffusers import EDMEulerScheduler, UNet2DConditionModel

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--owner--cond" / "snapshots" / revision
    UNet2DConditionModel(**{**TINY_UNET, "num_class_embeds": 3, "cross_attention_dim": 8}).save_pretrained(
        snapshot / "unet")
    EDMEulerScheduler().save_pretrained(snapshot / "scheduler")
    (tmp_path / "models--owner--cond" / "refs").mkdir()
    (tmp_path / "models--owner--cond" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    denoiser, spec = load_denoiser("owner/cond", None, None, 0.5)
    assert spec["class_name"] == "UNet2DConditionModel" and denoiser.label_dim == 3


# Exports in diffusers' own form ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["edm", "epsilon", "flow"])
def test_the_export_loads_as_a_diffusers_pipeline(tiny_unet_overrides, tmp_path, prediction_type):
    """The export folder is a diffusers pipeline: for an EDM teacher stock diffusers (UNet2DModel and a one-step
    EDMEulerScheduler) reproduces the generator, as the model card shows; for every teacher SiDPipeline does."""
    from diffusers import EDMEulerScheduler, UNet2DModel

    from sid import SiDPipeline
    from sid.generator import load_generator
    from sid.trainer import train

    overrides = [o.replace("prediction_type=edm", f"prediction_type={prediction_type}") for o in tiny_unet_overrides]
    train(load_config([], overrides + ["train.tracker=none"]))
    folder = tmp_path / "run" / "generator"
    reference = load_generator(folder)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(z)
        if prediction_type == "edm":
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
            scheduler = EDMEulerScheduler.from_pretrained(folder, subfolder="scheduler")
            scheduler.set_timesteps(1)
            t, x = scheduler.timesteps[0], z * scheduler.sigmas[0]
            stock = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).pred_original_sample
            torch.testing.assert_close(stock, expected, rtol=1e-5, atol=1e-5)
        pipeline = SiDPipeline.from_pretrained(folder)
        torch.manual_seed(0)
        images = pipeline(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
        torch.manual_seed(0)
        from diffusers.utils.torch_utils import randn_tensor

        z = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(images, (reference(z) / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)  # [0, 1]
        assert len(pipeline(batch_size=2).images) == 2                                # PIL images
    card = (folder / "README.md").read_text()
    assert "library_name: diffusers" in card and "λ = 1.2" in card and "after 32 generator images" in card
    assert ("start from unscaled noise z" in card) == (prediction_type != "edm")    # why no stock pipeline
    # the diffusers form alone loads as a generator too, and its index cannot name other code
    alone = tmp_path / "diffusers-form"
    alone.mkdir()
    for name in ("unet", "scheduler", "model_index.json"):
        (shutil.copytree if (folder / name).is_dir() else shutil.copy)(folder / name, alone / name)
    torch.testing.assert_close(load_generator(alone).sample_seeds(range(3)), reference.sample_seeds(range(3)))
    index = json.loads((alone / "model_index.json").read_text())
    (alone / "model_index.json").write_text(json.dumps({**index, "scheduler": ["os", "system"]}))
    with pytest.raises(SidError, match="is a diffusers folder, but not a sid export"):
        load_generator(alone)
    assert ("EDMEulerScheduler.from_pretrained" in card) == (prediction_type == "edm")
