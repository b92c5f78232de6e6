"""Exports as their family's stock diffusers pipeline (sid/teachers/diffusers/stock.py): a one-step generator of a
Stable Diffusion, SDXL, SD3 or FLUX teacher is written as that pipeline's own folder, which diffusers loads and runs
in a process that never imports sid, and whose documented call gives the generator's images.

Tolerance: the stock call and sid compute the same thing in float32 through different code (Euler's x + (0 − σ)·d
against sid's x0, σ_k computed in float32 against float64 rounded): images in [0, 1] agree to 1e-5, the issue's
bound, where a wrong timestep, σ, noise or prompt encoding moves them by 1e-3 or more.
"""

import json
import subprocess
import sys

import pytest
import torch
from tiny_pipelines import teacher_of

from sid.config import load_config
from sid.generator import OneStepGenerator, export_generator, load_generator
from sid.teachers import build_teacher
from sid.teachers.diffusers.export import written_form
from sid.teachers.diffusers.latent import export_codec

pytestmark = pytest.mark.slow
PROMPTS, SEEDS = ["a cat", "a red dog"], [0, 1]
STOCK_RUN = """
import json, sys, torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
results = {}
for folder, call in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    auto = AutoPipelineForText2Image.from_pretrained(folder)
    generators = [torch.Generator().manual_seed(s) for s in %s]
    images = pipe(%s, generator=generators, output_type="pt", **call).images
    results[folder] = {"images": images, "class": type(pipe).__name__, "auto": type(auto).__name__}
results["sid imported"] = any(m == "sid" or m.startswith("sid.") for m in sys.modules)
torch.save(results, sys.argv[2])
""" % (SEEDS, PROMPTS)


def export_student(teacher, folder, sigma_init):
    """A generator (the teacher's copy, its weights moved so that it is not the teacher) exported as a run does."""
    student = teacher.make_student()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    generator = OneStepGenerator(student, teacher.shape, sigma_init).eval()
    export_generator(generator, teacher.spec, folder, extra={"nimg": 0, "lam": 1.2}, components=teacher.components())
    return folder


def sid_images(folder):
    """The export's images for PROMPTS at SEEDS as sid draws them, in [0, 1] as diffusers' "pt" output is."""
    generator, codec = load_generator(folder), export_codec(folder)
    with torch.no_grad():
        x = generator.sample_seeds(SEEDS, cond=codec.encode(PROMPTS))
        return (codec.decode(x) / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def stock_exports(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    exports = {}
    sd = teacher_of(tiny_pipeline("sd"))
    table = sd.timestep_sigmas()
    exports["sd, timestep 625"] = export_student(sd, root / "sd625", float(table[625]))
    exports["sd, σ 2.5"] = export_student(sd, root / "sd25", 2.5)
    exports["sd v-prediction"] = export_student(teacher_of(tiny_pipeline("sd-v")), root / "sdv",
                                                float(teacher_of(tiny_pipeline("sd-v")).timestep_sigmas()[500]))
    sdxl = teacher_of(tiny_pipeline("sdxl"))
    exports["sdxl"] = export_student(sdxl, root / "sdxl", float(sdxl.timestep_sigmas()[625]))
    exports["sd3"] = export_student(teacher_of(tiny_pipeline("sd3")), root / "sd3", float("inf"))
    flux = build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={tiny_pipeline('flux')}",
                                          "teacher.diffusers.resolution=16"]).teacher)       # not its pipeline's size
    exports["flux"] = export_student(flux, root / "flux", float("inf"))
    pixart = teacher_of(tiny_pipeline("pixart"))
    exports["pixart-α"] = export_student(pixart, root / "pixart", float(pixart.timestep_sigmas()[625]))
    exports["pixart-Σ, σ 2.5"] = export_student(teacher_of(tiny_pipeline("pixart-sigma")), root / "pixart-sigma", 2.5)
    exports["sana"] = export_student(teacher_of(tiny_pipeline("sana")), root / "sana", float("inf"))
    forms = {name: written_form(folder, json.loads((folder / "generator.json").read_text()))
             for name, folder in exports.items()}
    jobs = [(str(exports[name]), form.call) for name, form in forms.items()]
    out = root / "stock.pt"
    done = subprocess.run([sys.executable, "-c", STOCK_RUN, json.dumps(jobs), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return exports, forms, torch.load(out)


def test_each_family_exports_its_stock_pipeline_which_reproduces_the_generator(stock_exports):
    exports, forms, results = stock_exports
    assert results["sid imported"] is False
    expected = {"sd, timestep 625": "StableDiffusionPipeline", "sd, σ 2.5": "StableDiffusionPipeline",
                "sd v-prediction": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "pixart-α": "PixArtAlphaPipeline",
                "pixart-Σ, σ 2.5": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
    for name, folder in exports.items():
        run = results[str(folder)]
        assert run["class"] == expected[name] and run["auto"] == expected[name], name
        ours = sid_images(folder)
        print(f"{name}: {run['class']}, max |stock − sid| = {float((run['images'] - ours).abs().max()):.1e}")
        torch.testing.assert_close(run["images"], ours, rtol=0, atol=1e-5, msg=name)


def test_the_plain_one_step_call_is_exact_and_the_card_says_the_call(stock_exports):
    """On a teacher's timestep (and at t = 1 for flows) the call is the plain one: one step, no guidance. Between
    two timesteps it passes the step as ``sigmas``; the model card shows the call either way."""
    exports, forms, _ = stock_exports
    assert forms["sd, timestep 625"].call == {"num_inference_steps": 1, "guidance_scale": 1.0}
    assert forms["sd3"].call == {"num_inference_steps": 1, "guidance_scale": 1.0}
    assert forms["flux"].call == {"num_inference_steps": 1, "guidance_scale": 1.0, "height": 16, "width": 16}
    assert forms["sd, σ 2.5"].call == {"sigmas": [2.5, 0.0], "guidance_scale": 1.0} and not forms["sd, σ 2.5"].plain
    for name, folder in exports.items():
        card = (folder / "README.md").read_text()
        assert forms[name].call_text() in card and "DiffusionPipeline.from_pretrained" in card, name
    index = json.loads((exports["sd, timestep 625"] / "model_index.json").read_text())
    scheduler = json.loads((exports["sd, timestep 625"] / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert scheduler["num_train_timesteps"] == 626 and scheduler["timestep_spacing"] == "trailing"


def test_sid_reads_a_stock_export_alone_and_refuses_a_plain_pipeline(stock_exports, tiny_pipeline, tmp_path):
    """Without generator.safetensors, load_generator reads the stock folder with sid's generator.json beside it
    (the same images), as SiDPipeline.from_pretrained does; a stock pipeline folder without it is a teacher, and one
    line says so."""
    from sid.errors import SidError
    from sid.teachers.diffusers import SiDPipeline

    exports, _, _ = stock_exports
    folder = exports["sd, σ 2.5"]
    images = sid_images(folder)
    weights = folder / "generator.safetensors"
    weights.rename(tmp_path / "kept.safetensors")
    try:
        torch.testing.assert_close(sid_images(folder), images, rtol=0, atol=1e-6)
    finally:
        (tmp_path / "kept.safetensors").rename(weights)
    with pytest.raises(SidError, match="without sid's generator.json beside it"):
        load_generator(tiny_pipeline("sd"))
    z, _ = load_generator(folder).inputs_for_seeds(SEEDS)
    piped = SiDPipeline.from_pretrained(folder)(PROMPTS, latents=z, output_type="pt").images
    torch.testing.assert_close(piped, images, rtol=0, atol=1e-5)                   # "pt": [0, 1], as diffusers
