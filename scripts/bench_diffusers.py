"""diffusers' side of the CPU benchmarks: the same stages and sizes as `cargo bench --bench stages`, in the
same tab-separated format (stage, size, mode, median_ms, runs), or one whole `gen` with --gen.

    python scripts/bench_diffusers.py --model DIR --sizes 224,512 --runs 3
    python scripts/bench_diffusers.py --model DIR --gen --width 192 --height 192 --steps 4 --seed 42 --mode entropy --out x.png
    python scripts/bench_diffusers.py --model DIR --unet-only --sizes 256,512   # any family: one guided UNet step
    python scripts/bench_diffusers.py --model DIR --hires-step --sizes 1024     # default/entropy/hidiffusion/deepshrink
    python scripts/bench_diffusers.py --model DIR --sampler-steps --sizes 256 --steps 20   # each scheduler's own cost
    python scripts/bench_diffusers.py --model DIR --gen --sampler dpmpp_2m --schedule karras --steps 20 ...

Uses the environment of scripts/requirements.txt. fp32 on CPU, torch's default thread count (all cores),
the entropy mode through make_fixtures.py's attention processor (the same one the fixtures were made with).
"""

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from make_fixtures import load_pipeline, set_attention_mode  # noqa: E402
from fixture_samplers import SAMPLERS, SCHEDULES  # noqa: E402  (sdscale's words -> diffusers' classes)


def time_ms(fn, runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def report(stage, size, mode, ms, runs):
    print(f"{stage}\t{size}\t{mode}\t{ms:.2f}\t{runs}", flush=True)


@torch.no_grad()
def unet_only(args):
    """One guided UNet step (batch 2) of any family's UNet, on random text embeddings of its width: the
    UNet alone is loaded, so SD 1.x, SD 2.x and LDM-256 folders all work."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet", use_safetensors=True).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    width = unet.config.cross_attention_dim
    embeddings = torch.randn((2, 77, width), generator=torch.Generator("cpu").manual_seed(3))
    for size in args.sizes:
        latent = size // 8
        sample = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(1))
        batch = torch.cat([sample, sample])
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            # SDXL: the pooled text embedding and the six micro-conditioning numbers, as the pipeline passes.
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn((2, pooled)), "time_ids": time_ids}
        ms = time_ms(lambda: unet(batch, 981, encoder_hidden_states=embeddings, **extra), args.runs)
        report("unet_step_cfg", f"{size}x{size}", "default", ms, args.runs)


class FirstUNetCallDone(Exception):
    pass


@torch.no_grad()
def hires_step(args):
    """One guided UNet step for default, entropy, hidiffusion and deepshrink, as tests/full_size.rs's
    `full_size_hires_step_at_1024` times sdscale's: the first call of a 50-step DDIM run (t = 981), where
    HiDiffusion's RAU-Net and windows act and Deep Shrink (t > 600) shrinks. Each mode gets a fresh pipeline
    set up as scripts/fixture_hires.py sets it up for its references; the pipeline runs until its first UNet
    call ends, and that call alone is timed (text encoding left out). One run each: at 1024² a call takes
    minutes, so warm-up is noise."""
    from fixture_hires import import_hidiffusion, import_kohya

    _, hd = import_hidiffusion()
    kohya = import_kohya(Path(__file__).resolve().parent.parent)
    for size in args.sizes:
        for mode in ("default", "entropy", "hidiffusion", "deepshrink"):
            pipe = load_pipeline(str(args.model))  # a str: HiDiffusion searches name_or_path with `in`
            set_attention_mode(pipe.unet, pipe.vae, "entropy" if mode == "entropy" else "default")
            if mode == "hidiffusion":
                hd.apply_hidiffusion(pipe)
            elif mode == "deepshrink":
                high_res_fix = [{"timestep": 600, "scale_factor": 0.5, "block_num": 1}]
                pipe.unet = kohya.UNet2DConditionModelHighResFix.from_unet(pipe.unet, high_res_fix=high_res_fix).eval()
            started = []

            def before(*_):
                started.append(time.perf_counter())

            def after(*_):
                report("unet_step_cfg", f"{size}x{size}", mode, (time.perf_counter() - started[0]) * 1e3, 1)
                raise FirstUNetCallDone

            pipe.unet.register_forward_pre_hook(before)
            pipe.unet.register_forward_hook(after)
            torch.manual_seed(42)
            try:
                pipe("a corgi on a beach", height=size, width=size, num_inference_steps=50, guidance_scale=7.5,
                     generator=torch.Generator("cpu").manual_seed(42))
            except FirstUNetCallDone:
                pass
            del pipe


def make_scheduler(model: str, sampler: str, schedule: str | None):
    """Class.from_config(the model's own scheduler_config.json, **overrides), as sdscale builds its
    samplers (not from the pipeline's DDIM, whose config already has DDIM's defaults filled in)."""
    import diffusers

    config = diffusers.DDIMScheduler.load_config(Path(model) / "scheduler")
    name, extra = SAMPLERS[sampler]
    return getattr(diffusers, name).from_config(config, **extra, **SCHEDULES[schedule])


@torch.no_grad()
def sampler_steps(args):
    """Each scheduler's own cost per UNet call (scale_model_input + step, the UNet replaced by a fixed
    tensor), on one image's latents: what a sampler adds to a denoising step."""
    for size in args.sizes:
        latent = size // 8
        for sampler in SAMPLERS:
            for schedule in [None, "karras"] if sampler in ("dpmpp_2m", "euler") else [None]:
                scheduler = make_scheduler(args.model, sampler, schedule)
                generator = torch.Generator("cpu").manual_seed(1)
                sample = torch.randn((1, 4, latent, latent), generator=generator)
                output = torch.randn((1, 4, latent, latent), generator=generator) * 0.1

                # The pipeline's prepare_extra_step_kwargs: a generator only where step() takes one.
                takes_generator = "generator" in inspect.signature(scheduler.step).parameters
                extra = {"generator": generator} if takes_generator else {}

                def run():
                    scheduler.set_timesteps(args.steps)
                    x = sample * scheduler.init_noise_sigma
                    for t in scheduler.timesteps:
                        x_in = scheduler.scale_model_input(x, t)
                        x = scheduler.step(output + 0 * x_in, t, x, **extra).prev_sample

                ms = time_ms(run, args.runs)
                scheduler.set_timesteps(args.steps)
                per_call = ms / len(scheduler.timesteps)
                label = sampler + (f"_{schedule}" if schedule else "")
                report("sampler_call", f"{size}x{size}", label, per_call, args.runs)


@torch.no_grad()
def stages(args):
    start = time.perf_counter()
    pipe = load_pipeline(Path(args.model))
    report("load", "-", "-", (time.perf_counter() - start) * 1e3, 1)
    prompt = "a corgi on a beach, golden hour, highly detailed photograph"
    report("tokenizer_x100", "-", "-", time_ms(lambda: [pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True) for _ in range(100)], args.runs), args.runs)

    def encode():
        return pipe.encode_prompt(prompt, "cpu", 1, True, "")

    report("text_encoder_b2", "-", "-", time_ms(encode, args.runs), args.runs)
    cond, uncond = encode()
    embeddings = torch.cat([uncond, cond])
    factor = pipe.vae_scale_factor
    for size in args.sizes:
        latent = size // factor
        sample = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(1))
        batch = torch.cat([sample, sample])
        for mode in ("default", "entropy"):
            set_attention_mode(pipe.unet, pipe.vae, mode)
            ms = time_ms(lambda: pipe.unet(batch, 981, encoder_hidden_states=embeddings), args.runs)
            report("unet_step_cfg", f"{size}x{size}", mode, ms, args.runs)
        set_attention_mode(pipe.unet, pipe.vae, "default")
        latents = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(2))

        def decode():
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            pipe.image_processor.postprocess(image, output_type="pil")

        report("vae_decode", f"{size}x{size}", "-", time_ms(decode, args.runs), args.runs)


def load_any_pipeline(model: str):
    """make_fixtures.py's SD pipeline, or for an SDXL folder StableDiffusionXLPipeline as its references
    load it (no watermark; DDIM, sdscale's default sampler, from the folder's scheduler config)."""
    index = json.loads((Path(model) / "model_index.json").read_text())
    if index["_class_name"] != "StableDiffusionXLPipeline":
        return load_pipeline(Path(model))
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32, use_safetensors=True,
                                                     add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def gen(args):
    start = time.perf_counter()
    pipe = load_any_pipeline(args.model)
    if args.sampler:
        pipe.scheduler = make_scheduler(args.model, args.sampler, args.schedule)
    if args.device != "cpu" or args.dtype != "f32":
        pipe = pipe.to(args.device, {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    set_attention_mode(pipe.unet, pipe.vae, args.mode)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    loaded = time.perf_counter()

    first_step = []

    def on_step_end(_pipe, _index, _timestep, kwargs):
        if not first_step:
            sync()
            first_step.append(time.perf_counter())
        return kwargs

    def generate():
        return pipe(
            args.prompt,
            callback_on_step_end=on_step_end,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator("cpu").manual_seed(args.seed),
        ).images[0]

    image = generate()
    sync()
    generated = time.perf_counter()
    # --repeat N: the same image N more times in this process, once kernels and caches are warm.
    warm = []
    for _ in range(args.repeat):
        start_warm = time.perf_counter()
        generate()
        sync()
        warm.append(time.perf_counter() - start_warm)
    image.save(args.out)
    # Parseable lines on stdout for scripts; the human one on stderr.
    print(f"generate_seconds\t{generated - loaded:.3f}")
    # From the start of loading to the end of the first denoising step (weights ready, prompt encoded).
    print(f"load_to_first_step_seconds\t{first_step[0] - start:.3f}")
    if warm:
        print(f"warm_seconds\t{sorted(warm)[len(warm) // 2]:.3f}")
    print(f"diffusers: load {loaded - start:.2f} s, generate {generated - loaded:.2f} s, warm {warm}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[192])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen", action="store_true", help="run one whole pipeline instead of the stages")
    parser.add_argument("--unet-only", action="store_true", help="only the guided UNet step, for any family's folder")
    parser.add_argument("--hires-step", action="store_true", help="one guided UNet step of each hires mode (SD 2.x folder)")
    parser.add_argument("--sampler-steps", action="store_true", help="each scheduler's cost per UNet call, UNet left out")
    parser.add_argument("--sampler", choices=list(SAMPLERS), help="--gen: the scheduler (default: the pipeline's DDIM)")
    parser.add_argument("--schedule", choices=["karras", "exponential"], help="--gen: the sigma schedule")
    parser.add_argument("--prompt", default="a corgi on a beach")
    parser.add_argument("--negative-prompt", default=None, help="not given: None (SDXL: zeros, as sdscale)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", default="default", choices=["default", "entropy"])
    parser.add_argument("--out", default="diffusers.png")
    parser.add_argument("--repeat", type=int, default=0, help="--gen: time N more generations after the first (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (--gen only)")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="--gen only (f16 on the CPU is slow but works)")
    args = parser.parse_args()
    if args.gen:
        gen(args)
    elif args.unet_only:
        unet_only(args)
    elif args.hires_step:
        hires_step(args)
    elif args.sampler_steps:
        sampler_steps(args)
    else:
        stages(args)


if __name__ == "__main__":
    main()
