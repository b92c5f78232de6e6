"""A generator as a LoRA on its teacher (sid/teachers/diffusers/exchange.py, `sid export-lora`), loaded by stock
diffusers: a LoRA student's adapter exactly, its α honoured; a full student's difference as its truncated SVD, the
error what Eckart–Young says it is.

Tolerances: fused weights W + (α/r) B A against sid's merged W in float32 differ by the rounding of one product and
sum, ~1e-7 relative (bound 1e-6); an SVD of a float32 difference that is rank 2 up to float32 rounding of the
weights (|W| ~ 0.1, ulp ~1e-8, ‖Δ‖ ~ the weights') recovers it to ~1e-6 relative (bound 1e-5).
"""

import copy
import math
import subprocess
import sys

import diffusers
import pytest
import torch
from safetensors import safe_open
from tiny_pipelines import save_tiny_sd

from sid.cli import main as sid_main
from sid.config import load_config
from sid.errors import SidError
from sid.generator import load_generator
from sid.teachers.diffusers.exchange import LORA_FILE, apply_lora, extract_lora, layers, lora_pipeline, write_lora

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


LORA_RUN = """
import sys, torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline
teacher, lora, export, single = sys.argv[1:5]
pipe = DiffusionPipeline.from_pretrained(teacher)
pipe.load_lora_weights(lora)
pipe.scheduler = EulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
call = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt")
seeded = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]
lora_images = pipe(["a cat", "a red dog"], generator=seeded(), **call).images
images = DiffusionPipeline.from_pretrained(export)(["a cat", "a red dog"], generator=seeded(), **call).images
single = StableDiffusionPipeline.from_single_file(single, config=export, safety_checker=None, local_files_only=True)
single_images = single(["a cat", "a red dog"], generator=seeded(), **call).images
assert not any(m == "sid" or m.startswith("sid.") for m in sys.modules)
print(float((lora_images - images).abs().max()), float((single_images - images).abs().max()))
"""


def fused_unet(teacher_folder, lora_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher_folder, safety_checker=None)
    pipe.load_lora_weights(lora_folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.unet


def assert_same_weights(a, b, rtol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() <= rtol * max(y.abs().max(), 1e-3), name


def test_a_lora_students_adapter_loads_in_stock_diffusers_with_its_alpha(tmp_path, capsys):
    """A LoRA generator (rank 2, α 4: scale 2) trained on a tiny SD teacher, `sid export-lora` of its run:
    ``load_lora_weights`` + ``fuse_lora`` on the teacher's own pipeline give the export's UNet."""
    from sid.trainer import train

    teacher = save_tiny_sd(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red dog\n")
    train(load_config([], [
        "teacher.kind=diffusers", f"teacher.diffusers.path={teacher}", f"conditions.prompts={prompts}",
        "optim.batch=2", "optim.batch_gpu=2", "train.total_nimg=4", "train.log_every_nimg=4",
        "train.sample_every_nimg=4", "train.ckpt_every_nimg=4", "train.num_samples=2",
        f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none", "generator.t_init=625",
        "lora.generator=true", "lora.fake_score=true", "lora.rank=2", "lora.alpha=4", "lora.save_adapter=true",
        "optim.g_lr=1e-2", "optim.fake_lr=1e-2"]))
    assert sid_main(["export-lora", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "LoRA of rank 2 (exact)" in printed
    lora = tmp_path / "run" / "generator" / "lora"
    assert (lora / LORA_FILE).is_file() and "α 4" in (lora / "README.md").read_text()
    export = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "generator", subfolder="unet")
    student = fused_unet(teacher, lora)
    teacher_unet = diffusers.UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    assert max((a - b).abs().max() for a, b in zip(export.parameters(), teacher_unet.parameters())) > 1e-4
    assert_same_weights(student, export, 1e-6)
    relative = float(printed.split("differ from the generator's by ")[1].split(" ")[0])
    assert relative < 1e-5                                       # the LoRA generator's samples are the export's
    # the single-file checkpoint, beside the export, with the call in its metadata
    assert sid_main(["export-single-file", str(tmp_path / "run")]) == 0
    single = tmp_path / "run" / "run-generator.safetensors"
    assert str(single) in capsys.readouterr().out
    with safe_open(str(single), "pt") as f:
        assert "num_inference_steps=1" in f.metadata()["sid_sampling"]
    # in a process without sid: the teacher's pipeline with the LoRA (the card's call) and the single file (read by
    # from_single_file with the export's configs) draw the export's images
    export_folder = tmp_path / "run" / "generator"
    done = subprocess.run([sys.executable, "-c", LORA_RUN, str(teacher), str(lora), str(export_folder), str(single)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    by_lora, by_single_file = map(float, done.stdout.split()[-2:])
    assert by_lora < 1e-5 and by_single_file == 0                # images in [0, 1]; the single file: the same weights
    # an --out that holds other files (here the export itself) is refused in one line, and nothing is touched
    export_files = sorted(p.name for p in export_folder.iterdir())
    weights = export_folder / "generator.safetensors"
    for command in (["export-lora", str(tmp_path / "run"), "--out", str(export_folder)],
                    ["export-single-file", str(tmp_path / "run"), "--out", str(weights)]):
        assert sid_main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "--out" in err
    assert sorted(p.name for p in export_folder.iterdir()) == export_files
    assert load_generator(export_folder) is not None                  # its weights are intact
    # decomposed again at its own rank, the merged student's difference is that LoRA (rank ≤ 2 by construction)
    assert sid_main(["export-lora", str(tmp_path / "run"), "--rank", "2", "--out", str(tmp_path / "svd")]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("SVD error ")[1].split(" ")[0]) < 1e-5
    assert_same_weights(fused_unet(teacher, tmp_path / "svd"), export, 1e-5)


@pytest.fixture(scope="module")
def sd_unets(tmp_path_factory):
    """A tiny SD UNet and a student of it: every Linear and Conv2d weight moved by a rank-2 ΔW of the weights'
    size, and one bias moved (which no LoRA carries)."""
    folder = save_tiny_sd(tmp_path_factory.mktemp("sd"))
    teacher = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    student, deltas = copy.deepcopy(teacher), {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers(student).items():
            out, rest = layer.weight.shape[0], layer.weight[0].numel()
            u, v = torch.randn(out, 2, generator=g), torch.randn(2, rest, generator=g)
            delta = (u @ v).reshape(layer.weight.shape) * layer.weight.std() / math.sqrt(2)
            layer.weight += delta
            deltas[name] = delta
        student.conv_in.bias += 0.1
    return folder, teacher, student, deltas


def test_a_rank_r_difference_is_recovered_and_a_bias_is_reported(sd_unets, tmp_path):
    folder, teacher, student, _ = sd_unets
    state, config, report = extract_lora(student, teacher, rank=2)
    assert report["svd_error"] < 1e-5 and report["worst_layer"] < 1e-5
    assert report["not_carried"] == ["conv_in.bias"] and report["not_carried_share"] > 0
    assert config["r"] == config["lora_alpha"] == 2 and set(config["target_modules"]) == set(layers(student))
    rebuilt = apply_lora(copy.deepcopy(teacher), state, config)
    for name, layer in layers(rebuilt).items():
        torch.testing.assert_close(layer.weight, layers(student)[name].weight, rtol=1e-5, atol=1e-6)
    write_lora(tmp_path / "lora", *lora_pipeline("StableDiffusionPipeline"), state, config, "card")
    for name, layer in layers(fused_unet(folder, tmp_path / "lora")).items():
        torch.testing.assert_close(layer.weight, layers(rebuilt)[name].weight, rtol=1e-6, atol=1e-7)


def test_a_truncated_svd_loses_what_eckart_young_says(sd_unets):
    """At rank 1 the error is the second singular values' share of ‖ΔW‖, from each layer's ΔW computed here."""
    _, teacher, student, _ = sd_unets
    _, _, report = extract_lora(student, teacher, rank=1)
    lost = total = worst = 0.0
    for name, layer in layers(student).items():
        s = torch.linalg.svdvals((layer.weight.double() - layers(teacher)[name].weight.double()).detach().flatten(1))
        lost, total = lost + float(s[1:].square().sum()), total + float(s.square().sum())
        worst = max(worst, float(s[1:].norm() / s.norm()))
    assert math.isclose(report["svd_error"], math.sqrt(lost / total), rel_tol=1e-9)
    assert math.isclose(report["worst_layer"], worst, rel_tol=1e-9) and report["svd_error"] > 0.1


def test_what_has_no_lora_or_single_file_form_is_one_line(tmp_path, capsys):
    with pytest.raises(SidError, match="no LoRA form"):
        lora_pipeline(None)
    with pytest.raises(SidError, match="no LoRA form"):
        lora_pipeline("PixArtAlphaPipeline")
    assert sid_main(["export-lora", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no generator.json" in err
    assert sid_main(["export-single-file", str(tmp_path)]) == 2
    assert "no generator.json" in capsys.readouterr().err
    teacher = diffusers.UNet2DConditionModel.from_pretrained(save_tiny_sd(tmp_path / "sd"), subfolder="unet")
    with pytest.raises(SidError, match="equal the teacher's"):
        extract_lora(teacher, teacher, rank=4)


def test_a_single_file_of_sd_15s_shape_reads_back_exactly(tmp_path):
    """A UNet and VAE shaped as SD 1.5's (two layers per block, a last down block without attention, a mid block,
    VAE attention), scaled down: ``from_single_file`` of the written file gives every weight back exactly."""
    from tiny_pipelines import tiny_clip_encoder, tiny_tokenizer

    from sid.teachers.diffusers.single_file import write_single_file

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        norm_num_groups=4)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4,
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=tiny_clip_encoder(),
                                             tokenizer=tiny_tokenizer(tmp_path / "tok"),
                                             scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    networks = {"unet": unet, "vae": vae, "text_encoder": pipe.text_encoder}
    written = write_single_file("StableDiffusionPipeline", networks,
                                tmp_path / "m.safetensors")
    back = diffusers.StableDiffusionPipeline.from_single_file(str(written), config=str(tmp_path / "pipe"),
                                                              safety_checker=None, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_the_single_file_has_sd_15s_own_layout():
    """SD 1.5's published UNet and VAE (built on the meta device from the shipped configs) written under the names
    and shapes an original SD 1.5 checkpoint has, which ComfyUI and A1111 load by module path: upsamplers after the
    attention where a block has one, downsamplers as ``op``, VAE attention as 1×1 convolutions, ``nin_shortcut``."""
    import json

    from sid.teachers.diffusers.published import ARCHITECTURES
    from sid.teachers.diffusers.single_file import unet_to_ldm, vae_to_ldm

    shipped = ARCHITECTURES / "stable-diffusion-v1-5--stable-diffusion-v1-5.json"
    configs = {k: v[1] for k, v in json.loads(shipped.read_text())["components"].items()}      # [class, config]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    keys = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    shapes = {k: tuple(v.shape) for k, v in keys.items()}
    unet_keys = {"output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),   # diffusers' test for SD 1.x
                 "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                 "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                 "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "input_blocks.3.0.op.weight": (320, 320, 3, 3),
                 "input_blocks.9.0.op.weight": (1280, 1280, 3, 3), "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                 "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
                 "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3), "time_embed.2.weight": (1280, 1280),
                 "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1), "out.2.weight": (4, 320, 3, 3)}
    vae_keys = {"encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3), "encoder.down.0.downsample.conv.weight":
                (128, 128, 3, 3), "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3), "post_quant_conv.weight": (4, 4, 1, 1)}
    expected = {**{f"model.diffusion_model.{k}": v for k, v in unet_keys.items()},
                **{f"first_stage_model.{k}": v for k, v in vae_keys.items()}}
    assert {k: shapes.get(k) for k in expected} == expected
    assert len(keys) == len(unet.state_dict()) + len(vae.state_dict())             # one name for each tensor


def test_an_sdxl_single_file_reads_back_exactly(tmp_path):
    """SDXL: both text encoders (the second in OpenCLIP's names, q, k, v stacked) and the UNet's added embedding;
    ``StableDiffusionXLPipeline.from_single_file`` gives every weight back exactly. (The two encoders differ in
    width, as SDXL's do: readers tell them apart by their shapes.)"""
    from tiny_pipelines import tiny_clip_encoder, tiny_tokenizer, tiny_vae

    from sid.teachers.diffusers.single_file import write_single_file

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",
        "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        attention_head_dim=4, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 32)
    networks = {"unet": unet, "vae": tiny_vae(), "text_encoder": tiny_clip_encoder(seed=1),
                "text_encoder_2": tiny_clip_encoder(projection=True, hidden=32, seed=2)}
    diffusers.StableDiffusionXLPipeline(**networks, scheduler=diffusers.EulerDiscreteScheduler(),
                                        tokenizer=tiny_tokenizer(tmp_path / "v1"),
                                        tokenizer_2=tiny_tokenizer(tmp_path / "v2")).save_pretrained(tmp_path / "xl")
    written = write_single_file("StableDiffusionXLPipeline", networks, tmp_path / "xl.safetensors")
    with safe_open(str(written), "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    back = diffusers.StableDiffusionXLPipeline.from_single_file(str(written), config=str(tmp_path / "xl"),
                                                                local_files_only=True)
    for name, network in networks.items():
        ours, theirs = network.state_dict(), getattr(back, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_the_sdxl_single_file_has_sdxls_own_layout():
    """SDXL base's published UNet and second text encoder (meta device, shipped configs) under the names and shapes
    of the original SDXL checkpoint: the added embedding as ``label_emb``, the 10-deep middle transformer, the
    upsampler after the attention, OpenCLIP's ``resblocks`` with q, k, v stacked and the projection transposed."""
    import json

    import transformers

    from sid.teachers.diffusers.published import ARCHITECTURES
    from sid.teachers.diffusers.single_file import open_clip_to_ldm, unet_to_ldm

    shipped = ARCHITECTURES / "stabilityai--stable-diffusion-xl-base-1.0.json"
    configs = {k: v[1] for k, v in json.loads(shipped.read_text())["components"].items()}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
        encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**configs["text_encoder_2"]))
    keys = {**unet_to_ldm(unet.state_dict(), unet.config),
            **open_clip_to_ldm(encoder.state_dict(), "conditioner.embedders.1.model.")}
    shapes = {k: tuple(v.shape) for k, v in keys.items()}
    expected = {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
                "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
                "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                "conditioner.embedders.1.model.text_projection": (1280, 1280),
                "conditioner.embedders.1.model.positional_embedding": (77, 1280),
                "conditioner.embedders.1.model.ln_final.weight": (1280,)}
    assert {k: shapes.get(k) for k in expected} == expected
    assert len(keys) == len(unet.state_dict()) + len(encoder.state_dict()) - 4 * 32   # q, k, v (weight, bias): one each
