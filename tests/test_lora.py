"""LoRA students (sid/lora.py): the fake score and the generator as peft adapters over the frozen teacher's own
weights, on a tiny diffusers UNet with attention."""

import json

import pytest
import torch

from conftest import TINY_UNET, assert_float32_close, assert_resumed_exactly
from sid.config import load_config
from sid.errors import SidError

peft = pytest.importorskip("peft")

ATTENTION_UNET = {**TINY_UNET, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}


def lora_overrides(run_dir, total, *extra):
    return ["teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(ATTENTION_UNET).replace(' ', '')}",
            "teacher.diffusers.prediction_type=edm", "optim.batch=4", "optim.batch_gpu=2", f"train.total_nimg={total}",
            "train.log_every_nimg=8", "train.sample_every_nimg=16", "train.ckpt_every_nimg=8", "train.num_samples=4",
            f"train.run_dir={run_dir}", "train.progress=false", "train.tracker=none", "optim.g_lr=1e-3",
            "optim.fake_lr=1e-3", "ema.halflife_nimg=8", "lora.fake_score=true", "lora.generator=true", "lora.rank=4",
            "lora.alpha=8", *extra]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """16 images straight, and 8 + a resume to 16, with LoRA fake score and generator (the adapter also saved)."""
    from sid.trainer import train

    root = tmp_path_factory.mktemp("lora")
    whole = train(load_config([], lora_overrides(root / "whole", 16, "lora.save_adapter=true")))
    train(load_config([], lora_overrides(root / "split", 8)))
    resumed = train(load_config([], lora_overrides(root / "split", 16)), resume="auto")
    return root, whole, resumed


@pytest.mark.slow
def test_lora_students_train_adapters_over_the_teachers_untouched_weights(lora_runs):
    """The students' base weights are the teacher's tensors and stay bit-identical to a freshly built teacher; the
    adapters (B starts at 0) trained; the optimisers hold adapters only, and so do the training states."""
    from sid.checkpoint import list_training_states, load_training_state
    from sid.teachers import build_teacher

    root, whole, _ = lora_runs
    teacher = whole.teacher.denoiser
    torch.manual_seed(0)                                                     # as the trainer builds it (train.seed)
    fresh = build_teacher(load_config([], lora_overrides(root / "x", 16)).teacher).denoiser
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), teacher.state_dict().values()))
    to_q = whole.generator.denoiser.net.unet.down_blocks[1].attentions[0].to_q
    assert to_q.base_layer.weight is whole.teacher.denoiser.net.unet.down_blocks[1].attentions[0].to_q.weight
    assert to_q.lora_B["default"].weight.abs().sum() > 0                      # it trained (from zero)
    adapters = sum(p.numel() for n, p in whole.generator.named_parameters() if "lora_" in n)
    assert sum(p.numel() for g in whole.opt_g.param_groups for p in g["params"]) == adapters
    assert sum(p.numel() for g in whole.opt_fake.param_groups for p in g["params"]) == adapters
    state = load_training_state(list_training_states(root / "whole")[-1])
    for name in ("generator", "fake_score", "ema"):
        assert state[name] and all("lora_" in key for key in state[name]), name


@pytest.mark.slow
def test_lora_runs_resume_exactly_and_export_base_plus_adapter(lora_runs):
    """A resumed LoRA run ends bit-identical; the exported generator is the EMA's merged network, W + (α/r) B A by
    hand, with the EMA LoRA generator's outputs; the adapter alone (peft format) rebuilds it on the teacher."""
    from safetensors.torch import load_file

    from sid.generator import load_generator

    root, whole, resumed = lora_runs
    assert_resumed_exactly(whole, resumed)

    exported = load_generator(root / "whole" / "generator")
    z = torch.randn(3, *whole.generator.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_float32_close(exported(z), whole.ema.model(z))        # merged W + BA against W x + B A x
    layer = whole.ema.model.denoiser.net.unet.down_blocks[1].attentions[0].to_v
    by_hand = layer.base_layer.weight + (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(exported.denoiser.net.unet.down_blocks[1].attentions[0].to_v.weight, by_hand)

    adapter = root / "whole" / "generator" / "adapter"
    config = peft.LoraConfig(**{k: v for k, v in json.loads((adapter / "adapter_config.json").read_text()).items()
                                if k in ("r", "lora_alpha", "target_modules")})
    rebuilt = whole.teacher.make_student().eval()
    peft.inject_adapter_in_model(config, rebuilt.net.unet)
    peft.set_peft_model_state_dict(rebuilt.net.unet, load_file(adapter / "adapter_model.safetensors"))
    sigma = torch.full((3,), whole.generator.sigma_init)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(sigma[:, None, None, None] * z, sigma), whole.ema.model(z))


def test_lora_targets_that_match_no_module_and_an_analytic_teacher_are_one_line(tmp_path):
    from sid.trainer import train

    with pytest.raises(SidError, match=r"lora.targets=\['qkv'\] match no module of the teacher's network; its linear "
                                       r"and convolution layers are named .*to_q"):
        train(load_config([], lora_overrides(tmp_path / "run", 8, "lora.targets=[qkv]")))
    assert not (tmp_path / "run" / "generator").exists()
    with pytest.raises(SidError, match="an analytic teacher's students are MLPs fitted to it"):
        load_config(["toy_2d"], ["lora.generator=true"])


@pytest.mark.slow
def test_a_state_resumed_with_other_students_is_one_line(lora_runs):
    """A LoRA run's state resumed with full students (or the other way) does not fit: one line, the state kept."""
    from sid.checkpoint import list_training_states
    from sid.trainer import train

    root, _, _ = lora_runs
    states = list_training_states(root / "split")
    cfg = load_config([], lora_overrides(root / "split", 24, "lora.fake_score=false", "lora.generator=false"))
    with pytest.raises(SidError, match="does not fit this config's networks .*resume with the settings it was saved "
                                       "with"):
        train(cfg, resume="auto")
    assert list_training_states(root / "split") == states
