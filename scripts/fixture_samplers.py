"""diffusers 0.42.1 references for the samplers of issue 20, for `make_fixtures.py --only samplers`
(`samplers-schedulers`: parts 1 and 3 only; `samplers-images`: part 2 only).

Everything lands in tests/fixtures/reference/samplers/; nothing else is touched.

 1. schedulers.json + schedulers.safetensors: scheduler-level trajectories, no UNet. Each case builds
    `Class.from_config(model_scheduler_config, **overrides)` exactly as a diffusers user swaps a
    pipeline's scheduler (the model config being the `.config` of the scheduler the model folder loads
    as, i.e. `<its _class_name>.from_pretrained(folder)`), then runs a fixed toy "model"
        g = torch.Generator("cpu").manual_seed(7); x = randn((1,4,8,8), generator=g) * init_noise_sigma
        for t in timesteps: x_in = scale_model_input(x, t); out = 0.5 * x_in + 0.001 * t (float32)
                            x = step(out, t, x, generator=g [, eta=0 for DDIM]).prev_sample
    Tensor keys: f"{name}/x0" (start), f"{name}/in{k}" (model input of call k), f"{name}/step{k}" (x after
    step call k). One step() call per model call, so Heun (2N-1 calls) and PNDM (N+1) have more
    entries than steps. Base configs: the tiny SD 2.1-base fixture's 2022 PNDM file, tiny-sd21v's
    (DDIM, v_prediction), and SDXL base 1.0's / SDXL-Turbo's Hub files, written under configs/.
 2. images.json + PNGs + latents.safetensors: whole StableDiffusionPipeline (and panorama) runs on the
    committed tiny-sd fixture with each sampler; see IMAGE_CASES / make_images.
 3. facts.json: the facts a port must reproduce, printed from the scheduler objects (SD 2.1 config).

The trajectories run in float32 like the pipeline; the thread count is pinned by make_fixtures.py (2).

Image cases (part 2): PNGs are the 2-thread run; each case is rendered again with 1 thread and the
difference is stored as `thread_spread` (PNDM parity is judged against it). `unet_calls` counts UNet
forward calls (a CFG batch of 2 is one call). Batches of 2 use one generator per image, as sdscale does.

What StableDiffusionPanoramaPipeline (diffusers 0.42.1) does with a sampler's state, i.e. what the md_*
references pin down:
  * one scheduler object; before each view's step `scheduler.__dict__.update(views_scheduler_status[j])`,
    after it `views_scheduler_status[j] = copy.deepcopy(scheduler.__dict__)`: every view keeps its own
    step index, multistep history (DPM-Solver model_outputs / lower_order_nums, PNDM ets / counter /
    cur_sample, UniPC ...) across steps.
  * the list starts as `[deepcopy(initial __dict__)] * n_views`: in the first step every view restores
    from ONE shared dict, and list attributes that step() mutates in place (DPM-Solver's model_outputs
    shift) leak the previous view's entry into the next view's history. For solver_order 2 that entry is
    shifted out before it is ever used, so no output depends on it (checked once by hand: a DPM-Solver
    subclass that copies model_outputs before each step gives bit-identical md_dpmpp_2m latents); PNDM
    replaces `ets` by a new list.
  * ancestral / SDE noise is drawn from the ONE generator per view, in view order, with the view crop's
    shape (after the initial latents).
  * the views here are the `--only multidiffusion` rules: "original" (the paper's get_views, 15 crops of
    varied size at 256x128) and "diffusers" (one view at this size, checked equal to the plain pipeline).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

import diffusers
from fixture_sdxl import SCHEDULER as SDXL_BASE_SCHEDULER  # scripts/, beside this file

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "uni_pc": ("UniPCMultistepScheduler", {}),
}
SCHEDULES = {None: {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
SPACINGS = (None, "leading", "linspace", "trailing")

# SDXL base 1.0 and SDXL-Turbo scheduler/scheduler_config.json, as the Hub files have them (written by
# diffusers' to_json_string: sorted keys, indent 2, trailing newline). From memory of the Hub files,
# cross-checked against copies of them quoted in public code (Fooocus' SCHEDULER_EULERA_CONFIG_JSON
# for Turbo; several SDXL training scripts for base 1.0); not downloaded (no Hub access here).
HUB_CONFIGS = {
    # The same file fixture_sdxl.py writes into tiny-sdxl/scheduler/ (one definition of it).
    "sdxl-base-1.0": SDXL_BASE_SCHEDULER,
    "sdxl-turbo": {
        "_class_name": "EulerAncestralDiscreteScheduler",
        "_diffusers_version": "0.24.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    },
}


def out_dir(mf) -> Path:
    return mf.REF_DIR / "samplers"


def base_configs(mf) -> dict[str, Path]:
    """Base name -> scheduler folder (holding scheduler_config.json), writing the two Hub files first."""
    cfg_dir = out_dir(mf) / "configs"
    for name, cfg in HUB_CONFIGS.items():
        path = cfg_dir / name / "scheduler_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "sd21": mf.FIXTURES / "tiny-sd" / "scheduler",
        "sd21v": mf.FIXTURES / "tiny-sd21v" / "scheduler",
        "sdxl": cfg_dir / "sdxl-base-1.0",
        "sdxl_turbo": cfg_dir / "sdxl-turbo",
    }


class CaptureLogs(logging.Handler):
    """Collects diffusers' log warnings (e.g. 'config attributes ... will be ignored')."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger("diffusers")
        self.old_level = self.logger.level
        self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def model_scheduler(folder: Path):
    """The scheduler object a pipeline loads from the model folder (its own _class_name)."""
    raw = json.loads((folder / "scheduler_config.json").read_text())
    cls = getattr(diffusers, raw["_class_name"])
    sched = cls.from_pretrained(folder)
    # the raw dict route gives the same object config (checked here once per base)
    via_dict = cls.from_config(raw)
    assert dict(via_dict.config) == {k: v for k, v in sched.config.items() if k != "_name_or_path"} or \
        dict(via_dict.config) == dict(sched.config), (folder, dict(via_dict.config), dict(sched.config))
    return sched


def overrides_for(sampler: str, schedule, spacing) -> tuple[str, dict]:
    cls_name, extra = SAMPLERS[sampler]
    ov = {**extra, **SCHEDULES[schedule]}
    if spacing:
        ov["timestep_spacing"] = spacing
    return cls_name, ov


def build(model_sched, sampler: str, schedule, spacing):
    """Class.from_config(model config, **overrides); `model` = the model's own class, no overrides
    (schedule/spacing still applied as overrides when given). Returns (scheduler, class name,
    overrides, log messages)."""
    if sampler == "model":
        cls_name = type(model_sched).__name__
        ov = {**SCHEDULES[schedule], **({"timestep_spacing": spacing} if spacing else {})}
    else:
        cls_name, ov = overrides_for(sampler, schedule, spacing)
    cls = getattr(diffusers, cls_name)
    with CaptureLogs() as logs:
        sched = cls.from_config(model_sched.config, **ov)
    ignored = [k for k in ov if k not in sched.config]
    return sched, cls_name, ov, logs.messages, ignored


def jsonable(v):
    """Plain JSON values; non-finite floats (DPM-Solver's lambda_min_clipped = -inf) become the strings
    "inf" / "-inf" / "nan", since strict JSON (serde_json) has no literal for them."""
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        # _use_default_values comes from a set: sorted, so that reruns are byte-identical
        return {k: jsonable(sorted(x) if k == "_use_default_values" else x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def write_strict(mf, path: Path, obj) -> None:
    json.dumps(obj, allow_nan=False)  # raises on inf/nan: the Rust side reads strict JSON
    mf.write_json(path, obj)


def f64list(t: torch.Tensor) -> list[float]:
    return t.detach().to(torch.float64).flatten().tolist()


def install_probes(sched, log: dict):
    """Wraps instance methods to record what step() used: LMS coefficients, DPM-Solver update order."""
    if hasattr(sched, "get_lms_coefficient"):
        orig = sched.get_lms_coefficient

        def lms_coef(order, t, current_order):
            c = orig(order, t, current_order)
            log.setdefault("lms", []).append((int(t), int(order), int(current_order), float(c)))
            return c

        sched.get_lms_coefficient = lms_coef
    for meth, order in (("dpm_solver_first_order_update", 1), ("multistep_dpm_solver_second_order_update", 2),
                        ("multistep_dpm_solver_third_order_update", 3)):
        if hasattr(sched, meth):
            orig_m = getattr(sched, meth)

            def wrapped(*a, _orig=orig_m, _order=order, **k):
                log.setdefault("orders", []).append(_order)
                return _orig(*a, **k)

            setattr(sched, meth, wrapped)


def run_trajectory(sched, sampler_cls: str, steps: int, tensors: dict, name: str) -> dict:
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(7)
    init = sched.init_noise_sigma
    x = torch.randn((1, 4, 8, 8), generator=g) * init
    tensors[f"{name}/x0"] = x.clone()
    rec: dict = {
        "init_noise_sigma": float(init),
        "init_noise_sigma_type": type(init).__name__ if not isinstance(init, torch.Tensor) else f"tensor {init.dtype}",
        "timesteps": f64list(sched.timesteps),
        "timesteps_dtype": str(sched.timesteps.dtype),
        "num_inference_steps_attr": getattr(sched, "num_inference_steps", None),
    }
    if isinstance(getattr(sched, "sigmas", None), torch.Tensor):
        rec["sigmas"] = f64list(sched.sigmas)
        rec["sigmas_dtype"] = str(sched.sigmas.dtype)
    probes: dict = {}
    install_probes(sched, probes)
    sig = inspect.signature(sched.step).parameters
    calls, per_call = [], []
    for k, t in enumerate(sched.timesteps):
        info = {"t": float(t)}
        if hasattr(sched, "state_in_first_order"):
            info["heun_first_order_call"] = bool(sched.state_in_first_order)
        x_in = sched.scale_model_input(x, t)
        tensors[f"{name}/in{k}"] = x_in.clone()
        model_output = 0.5 * x_in + 0.001 * t.to(torch.float32)
        kwargs = {}
        if "generator" in sig:
            kwargs["generator"] = g
        if sampler_cls == "DDIMScheduler":
            kwargs["eta"] = 0.0
        n_lms = len(probes.get("lms", []))
        x = sched.step(model_output, t, x, **kwargs).prev_sample
        tensors[f"{name}/step{k}"] = x.clone()
        if "lms" in probes:
            info["lms_coefficients"] = [c for (_, _, _, c) in probes["lms"][n_lms:]]
            info["lms_order"] = probes["lms"][-1][1]
        if hasattr(sched, "this_order"):
            info["unipc_this_order"] = int(sched.this_order)
        calls.append(float(t))
        per_call.append(info)
    if "orders" in probes:
        rec["dpm_solver_orders"] = probes["orders"]
    rec["noise_draws_after_x0"] = count_draws(g, len(calls) + 2)
    rec["model_calls"] = len(calls)
    rec["model_call_timesteps"] = calls
    rec["calls"] = per_call
    rec["final_std"] = float(x.std())
    return rec


def count_draws(g: torch.Generator, limit: int):
    """How many randn((1,4,8,8)) draws the generator made after the initial latents."""
    ref = torch.Generator("cpu").manual_seed(7)
    torch.randn((1, 4, 8, 8), generator=ref)
    for n in range(limit + 1):
        if torch.equal(ref.get_state(), g.get_state()):
            return n
        torch.randn((1, 4, 8, 8), generator=ref)
    return None


def scheduler_cases() -> list[tuple[str, str, object, object, int]]:
    """(base, sampler, schedule, spacing, steps)."""
    cases = []
    for sampler in SAMPLERS:
        # config's own spacing
        for steps in (1, 4, 6, 20):
            cases.append(("sd21", sampler, None, None, steps))
        for spacing in SPACINGS[1:]:
            for steps in (4, 20):
                cases.append(("sd21", sampler, None, spacing, steps))
        cases.append(("sd21", sampler, None, "trailing", 1))
        cases.append(("sd21", sampler, None, "trailing", 6))  # 1000/6 not whole: DDIM's t - 1000//N shows
        for schedule in ("karras", "exponential"):
            if sampler in ("ddim", "pndm", "euler_ancestral"):  # no such option: diffusers ignores it
                cases.append(("sd21", sampler, schedule, None, 4))
                continue
            for steps in (4, 20):
                cases.append(("sd21", sampler, schedule, None, steps))
            cases.append(("sd21", sampler, schedule, "trailing", 4))
    for steps in (4, 6):
        cases.append(("sd21", "model", None, None, steps))
    # karras / exponential under an explicit spacing (does the spacing still matter?)
    for sampler in ("euler", "dpmpp_2m", "uni_pc", "lms", "heun"):
        for spacing in ("leading", "linspace"):
            cases.append(("sd21", sampler, "karras", spacing, 6))
    for sampler in ("euler", "dpmpp_2m"):
        cases.append(("sd21", sampler, "karras", None, 6))
        cases.append(("sd21", sampler, "exponential", None, 6))
    # v-prediction
    for sampler in SAMPLERS:
        cases.append(("sd21v", sampler, None, None, 4))
    for sampler in ("euler", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc"):
        cases.append(("sd21v", sampler, "karras", None, 4))
    for sampler in ("euler_ancestral", "dpmpp_2m", "ddim"):
        cases.append(("sd21v", sampler, None, "trailing", 4))
    cases.append(("sd21v", "model", None, None, 4))
    # SDXL base 1.0 (Euler, leading) and SDXL-Turbo (Euler a, trailing)
    for sampler in SAMPLERS:
        cases.append(("sdxl", sampler, None, None, 4))
    cases += [("sdxl", "model", None, None, 4), ("sdxl", "model", None, None, 20),
              ("sdxl", "dpmpp_2m", "karras", None, 20), ("sdxl", "euler", "karras", None, 4)]
    for steps in (1, 4):
        for sampler in ("model", "euler_ancestral", "euler", "dpmpp_2m", "ddim"):
            cases.append(("sdxl_turbo", sampler, None, None, steps))
    cases.append(("sdxl_turbo", "euler", None, "leading", 4))
    return cases


def case_name(base, sampler, schedule, spacing, steps) -> str:
    return "_".join([base, sampler, schedule or "plain", spacing or "cfg", f"{steps}"])


def make_schedulers(mf) -> None:
    from safetensors.torch import save_file

    bases = base_configs(mf)
    model_scheds = {b: model_scheduler(p) for b, p in bases.items()}
    tensors: dict[str, torch.Tensor] = {}
    entries, seen = [], set()
    for base, sampler, schedule, spacing, steps in scheduler_cases():
        name = case_name(base, sampler, schedule, spacing, steps)
        assert name not in seen, name
        seen.add(name)
        entry = {"name": name, "base": base, "sampler": sampler, "schedule": schedule,
                 "timestep_spacing_override": spacing, "steps": steps}
        try:
            sched, cls_name, ov, logs, ignored = build(model_scheds[base], sampler, schedule, spacing)
        except Exception as e:  # noqa: BLE001 - recorded as refused
            entry.update({"refused": True, "stage": "from_config", "error": f"{type(e).__name__}: {e}"})
            entries.append(entry)
            print(f"  {name}: refused at from_config: {e}")
            continue
        entry.update({"class": cls_name, "overrides": ov, "config": jsonable(dict(sched.config)),
                      "class_order_attr": getattr(sched, "order", None)})
        if logs:
            entry["diffusers_warnings"] = logs
        if ignored:
            entry["ignored_overrides"] = ignored
        case_tensors: dict = {}
        try:
            rec = run_trajectory(sched, cls_name, steps, case_tensors, name)
        except Exception as e:  # noqa: BLE001 - recorded as refused
            entry.update({"refused": True, "stage": "set_timesteps/step", "error": f"{type(e).__name__}: {e}"})
            entries.append(entry)
            print(f"  {name}: refused during the run: {type(e).__name__}: {e}")
            continue
        entry["refused"] = False
        entry.update(rec)
        if not all(torch.isfinite(v).all() for v in case_tensors.values()):
            entry["non_finite"] = True
        tensors.update(case_tensors)
        entries.append(entry)
    od = out_dir(mf)
    od.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(od / "schedulers.safetensors"))
    doc = {
        "about": "diffusers scheduler trajectories with the toy model out = 0.5 * x_in + 0.001 * t; see "
                 "scripts/fixture_samplers.py. Tensor keys {name}/x0, {name}/in{k}, {name}/step{k} in "
                 "schedulers.safetensors (k = model call index).",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "base_configs": {b: str(p.relative_to(mf.REPO) / "scheduler_config.json") for b, p in bases.items()},
        "base_model_scheduler_config": {b: jsonable(dict(s.config)) for b, s in model_scheds.items()},
        "notes": observations(entries),
        "cases": entries,
    }
    write_strict(mf, od / "schedulers.json", doc)
    ok = sum(1 for e in entries if not e["refused"])
    print(f"wrote {od.relative_to(mf.REPO)}/schedulers.json: {ok} cases run, {len(entries) - ok} refused; "
          f"{len(tensors)} tensors, {(od / 'schedulers.safetensors').stat().st_size / 1e6:.2f} MB")


def observations(entries: list[dict]) -> list[str]:
    """Non-obvious facts, computed from the recorded cases."""
    notes = []
    by = {e["name"]: e for e in entries}

    def get(base, sampler, schedule, spacing, steps):
        return by.get(case_name(base, sampler, schedule, spacing, steps))

    for sampler in ("euler", "euler_ancestral", "heun", "lms"):
        parts = []
        for spacing in SPACINGS:
            e = get("sd21", sampler, None, spacing, 20)
            if e and not e["refused"]:
                parts.append(f"{spacing or 'config'}: spacing {e['config']['timestep_spacing']}, first t "
                             f"{e['timesteps'][0]:g}, init_noise_sigma {e['init_noise_sigma']:.6f}, sigma_max "
                             f"{max(e['sigmas']):.6f}")
        notes.append(f"{sampler} (SD2.1 config, 20 steps) start noise per spacing: " + "; ".join(parts))
    for sampler in ("dpmpp_2m", "uni_pc", "euler", "lms", "heun"):
        for schedule in ("karras", "exponential"):
            e = get("sd21", sampler, schedule, None, 20)
            if e and not e["refused"]:
                ts = e["timesteps"]
                frac = any(abs(t - round(t)) > 0 for t in ts)
                notes.append(f"{sampler} {schedule} 20 steps: timesteps dtype {e['timesteps_dtype']}, "
                             f"{'fractional' if frac else 'integral'}; first {ts[:3]}, last {ts[-2:]}")
    for sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        for steps in (4, 20):
            e = get("sd21", sampler, None, None, steps)
            if e and not e["refused"]:
                notes.append(f"{sampler} {steps} steps: solver orders per step {e.get('dpm_solver_orders')}")
    for steps in (4, 20):
        e = get("sd21", "uni_pc", None, None, steps)
        if e and not e["refused"]:
            notes.append(f"uni_pc {steps} steps: this_order per step {[c['unipc_this_order'] for c in e['calls']]}")
    for sampler in ("heun", "pndm"):
        for steps in (4, 20):
            e = get("sd21", sampler, None, None, steps)
            if e and not e["refused"]:
                notes.append(f"{sampler} {steps} steps: {e['model_calls']} model calls, timesteps {e['timesteps'][:6]}...")
    one = {k: (get("sd21", k, None, None, 1) or {}).get("timesteps") for k in SAMPLERS}
    notes.append(f"1 step at the config's spacing (SD2.1 config): timesteps {one}. With linspace the Euler "
                 "family's single timestep is 0 (np.linspace(0, 999, 1)), so it starts and ends at sigma(0) = "
                 f"{(get('sd21', 'euler', None, None, 1) or {}).get('init_noise_sigma')}; DPM-Solver/UniPC use "
                 "linspace(0, 999, N+1)[::-1][:-1] and start at 999")
    for sampler in ("dpmpp_2m", "uni_pc"):
        e = get("sd21", sampler, "exponential", None, 4)
        if e and not e["refused"]:
            notes.append(f"{sampler} exponential 4 steps: timesteps {e['timesteps']} (truncated, so the first is "
                         "998 not 999, and the last two can both be 0); sigmas "
                         f"{[round(x, 6) for x in e['sigmas']]}")
    for sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        e = get("sd21", sampler, None, None, 4)
        if e and not e["refused"]:
            notes.append(f"{sampler} 4 steps: {e['noise_draws_after_x0']} noise draws after the initial latents "
                         "(one per step, the last included although its noise is multiplied by 0)")
    e = get("sd21", "heun", None, None, 4)
    if e and not e["refused"]:
        notes.append("heun 4 steps: per call (t, first-order call?) "
                     f"{[(c['t'], c['heun_first_order_call']) for c in e['calls']]}")
    ignored = sorted({(e["sampler"], o) for e in entries if not e["refused"] for o in e.get("ignored_overrides", [])})
    if ignored:
        notes.append("overrides diffusers IGNORES silently (not an __init__ argument of the class: from_config "
                     "drops the kwarg without any log message, returning it only with return_unused_kwargs=True; "
                     f"the case is kept, its trajectory equals the plain one): {ignored}")
    refused = sorted({(e["sampler"], e["schedule"], e["timestep_spacing_override"], e["steps"], e["error"])
                      for e in entries if e["refused"]})
    if refused:
        notes.append(f"refused by diffusers: {refused}")
    return notes


# --------------------------------------------------------------------------------------------------
# Part 3: facts.json
# --------------------------------------------------------------------------------------------------

FACT_KEYS = ("timestep_spacing", "steps_offset", "prediction_type", "solver_order", "lower_order_final",
             "final_sigmas_type", "euler_at_final", "use_lu_lambdas", "algorithm_type", "solver_type",
             "predict_x0", "disable_corrector", "thresholding", "lambda_min_clipped", "variance_type",
             "timestep_type", "interpolation_type", "set_alpha_to_one", "skip_prk_steps", "clip_sample",
             "use_karras_sigmas", "use_exponential_sigmas", "sigma_min", "sigma_max", "rescale_betas_zero_snr",
             "final_sigmas_type", "use_flow_sigmas", "flow_shift")


def make_facts(mf) -> None:
    from scipy import integrate

    bases = base_configs(mf)
    model = model_scheduler(bases["sd21"])
    facts: dict = {
        "about": "Printed from diffusers 0.42.1 scheduler objects built as Class.from_config(<tiny-sd "
                 "scheduler (SD 2.1-base's 2022 PNDM file)>.config, **overrides); see scripts/fixture_samplers.py.",
        "model_config": jsonable(dict(model.config)),
        "samplers": {},
    }
    for sampler in SAMPLERS:
        sched, cls_name, ov, logs, ignored = build(model, sampler, None, None)
        cfg = sched.config
        f = {"class": cls_name, "overrides": ov, "class_order_attr": sched.order,
             "config_subset": {k: jsonable(cfg[k]) for k in FACT_KEYS if k in cfg},
             "accepts_karras": "use_karras_sigmas" in cfg, "accepts_exponential": "use_exponential_sigmas" in cfg,
             "step_takes_generator": "generator" in inspect.signature(sched.step).parameters}
        per = {}
        for spacing in SPACINGS:
            s, *_ = build(model, sampler, None, spacing)
            for steps in (1, 4, 6, 20):
                s.set_timesteps(steps)
                per[f"{spacing or 'config'}/{steps}"] = {
                    "spacing": s.config.timestep_spacing,
                    "init_noise_sigma": float(s.init_noise_sigma),
                    "timesteps": f64list(s.timesteps),
                    **({"sigma_first": float(s.sigmas[0]), "sigma_last": float(s.sigmas[-1]),
                        "n_sigmas": len(s.sigmas)} if isinstance(getattr(s, "sigmas", None), torch.Tensor) else {}),
                }
        f["per_spacing_steps"] = per
        for schedule in ("karras", "exponential"):
            s, _, _, logs2, ign = build(model, sampler, schedule, None)
            if ign:
                f[schedule] = ("silently ignored by diffusers: not an __init__ argument of the class, from_config "
                               "drops it without a log message")
                continue
            try:
                s.set_timesteps(20)
            except Exception as e:  # noqa: BLE001
                f[schedule] = f"refused: {type(e).__name__}: {e}"
                continue
            ts = f64list(s.timesteps)
            # the unrounded sigma -> t map, replayed with the object's own methods on the very inputs
            # set_timesteps uses, to tell rounding from truncation
            raw_t = None
            if sampler in ("dpmpp_2m", "dpmpp_2m_sde", "uni_pc"):
                table = np.array(((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)
                log_sigmas = np.log(table)
                conv = s._convert_to_karras if schedule == "karras" else s._convert_to_exponential
                src = conv(in_sigmas=np.flip(table).copy(), num_inference_steps=20)
                raw_t = [float(s._sigma_to_t(x, log_sigmas)) for x in src]
            f[schedule] = {"timesteps_20": ts, "timesteps_dtype": str(s.timesteps.dtype),
                           "sigmas_20": f64list(s.sigmas), "init_noise_sigma": float(s.init_noise_sigma)}
            if raw_t is not None:
                f[schedule]["unrounded_t"] = raw_t
                f[schedule]["rule"] = (
                    "round (numpy, half to even)" if all(t == np.round(r) for t, r in zip(ts, raw_t)) else
                    "truncate (astype int64)" if all(t == math.trunc(r) for t, r in zip(ts, raw_t)) else
                    "neither (see unrounded_t)")
        facts["samplers"][sampler] = f
    # LMS coefficients: quad on an f32-torch integrand vs an f64 integrand
    s, *_ = build(model, "lms", None, None)
    s.set_timesteps(20)
    sig64 = s.sigmas.to(torch.float64).numpy()
    worst = 0.0
    for t in range(20):
        order = min(t + 1, 4)
        for cur in range(order):
            c = s.get_lms_coefficient(order, t, cur)

            def d64(tau, order=order, t=t, cur=cur):
                p = 1.0
                for k in range(order):
                    if k != cur:
                        p *= (tau - sig64[t - k]) / (sig64[t - cur] - sig64[t - k])
                return p

            c64 = integrate.quad(d64, sig64[t], sig64[t + 1], epsrel=1e-4)[0]
            worst = max(worst, abs(c - c64) / max(abs(c64), 1e-12))
    facts["lms_note"] = (
        "LMSDiscreteScheduler.get_lms_coefficient integrates a Lagrange basis polynomial with "
        "scipy.integrate.quad(epsrel=1e-4) between sigmas[t] and sigmas[t+1]; the integrand's sigmas are "
        "0-d float32 torch tensors, so each evaluation is float32 arithmetic. step() uses order = min(step+1, 4) "
        "(the pipeline never passes order). Worst relative difference of the coefficients (20 steps) from the "
        f"same quad on float64 sigmas: {worst:.3g}. The exact integral of a polynomial of degree <= 3 is what "
        "quad returns (Gauss-Kronrod 21 is exact there), so closed-form integration matches to f32 rounding.")
    facts["summary"] = summary(mf, facts)
    od = out_dir(mf)
    write_strict(mf, od / "facts.json", facts)
    print(f"wrote {(od / 'facts.json').relative_to(mf.REPO)}")


def ddim_prev_rule(mf, doc: dict) -> dict:
    """Which previous timestep DDIM's step used, told apart on the recorded trailing-6 trajectory by
    replaying the DDIM (eta 0) update in float64 under both hypotheses."""
    from safetensors.torch import load_file

    tens = load_file(str(out_dir(mf) / "schedulers.safetensors"))
    e = next(c for c in doc["cases"] if c["name"] == case_name("sd21", "ddim", None, "trailing", 6))
    sched = diffusers.DDIMScheduler.from_config(e["config"])
    ac = sched.alphas_cumprod.to(torch.float64)
    final = float(sched.final_alpha_cumprod)
    ts = [int(t) for t in e["timesteps"]]
    worst = {"t - num_train_timesteps // N": 0.0, "next entry of timesteps": 0.0}
    x = tens[f"{e['name']}/x0"].to(torch.float64)
    for k, t in enumerate(ts):
        eps = 0.5 * x + 0.001 * t
        a_t = ac[t]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        want = tens[f"{e['name']}/step{k}"].to(torch.float64)
        for rule in worst:
            prev = t - 1000 // len(ts) if rule.startswith("t -") else (ts[k + 1] if k + 1 < len(ts) else -1)
            a_prev = ac[prev] if prev >= 0 else torch.tensor(final, dtype=torch.float64)
            got = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            worst[rule] = max(worst[rule], float((got - want).abs().max()))
        x = want
    return {"timesteps": ts, "max_abs_diff_of_float64_replay": worst}


def summary(mf, facts: dict) -> dict:
    doc = json.loads((out_dir(mf) / "schedulers.json").read_text())
    by = {c["name"]: c for c in doc["cases"]}
    sam = facts["samplers"]
    out: dict = {}
    out["resolved_timestep_spacing"] = {k: v["config_subset"]["timestep_spacing"] for k, v in sam.items()}
    fam = {}
    for k in ("euler", "euler_ancestral", "heun", "lms"):
        row = {}
        for sp in ("leading", "linspace", "trailing"):
            p = sam[k]["per_spacing_steps"][f"{sp}/20"]
            row[sp] = {"init_noise_sigma": p["init_noise_sigma"], "sigma_max": p["sigma_first"],
                       "equals_sqrt_sigma_max2_plus_1": math.isclose(
                           p["init_noise_sigma"], math.sqrt(p["sigma_first"] ** 2 + 1), rel_tol=1e-6),
                       "equals_sigma_max": math.isclose(p["init_noise_sigma"], p["sigma_first"], rel_tol=1e-6)}
        fam[k] = row
    out["euler_family_init_noise_sigma_20_steps"] = fam
    out["first_timesteps_20_steps"] = {
        k: {sp: v["per_spacing_steps"][f"{sp}/20"]["timesteps"][:3] for sp in ("config", "leading", "linspace", "trailing")}
        for k, v in sam.items()}
    out["timesteps_1_step_config_spacing"] = {k: v["per_spacing_steps"]["config/1"]["timesteps"] for k, v in sam.items()}
    out["init_noise_sigma_1_step_config_spacing"] = {
        k: v["per_spacing_steps"]["config/1"]["init_noise_sigma"] for k, v in sam.items()}
    out["karras_exponential"] = {
        k: {sch: (v[sch] if isinstance(v[sch], str) else
                  {"timesteps_dtype": v[sch]["timesteps_dtype"], "rule": v[sch].get("rule", "fractional (not rounded)"),
                   "first": v[sch]["timesteps_20"][:2], "last": v[sch]["timesteps_20"][-2:]})
            for sch in ("karras", "exponential")}
        for k, v in sam.items()}
    out["solver_fields"] = {k: {f: v["config_subset"][f] for f in (
        "solver_order", "lower_order_final", "final_sigmas_type", "euler_at_final", "use_lu_lambdas", "algorithm_type",
        "solver_type", "predict_x0", "disable_corrector", "lambda_min_clipped") if f in v["config_subset"]}
        for k, v in sam.items() if k in ("dpmpp_2m", "dpmpp_2m_sde", "uni_pc")}
    calls = {}
    for k in SAMPLERS:
        for steps in (4, 20):
            c = by[case_name("sd21", k, None, None, steps)]
            calls[f"{k}/{steps}"] = {"model_calls": c["model_calls"], "noise_draws_after_x0": c["noise_draws_after_x0"],
                                     **({"orders": c["dpm_solver_orders"]} if "dpm_solver_orders" in c else {}),
                                     **({"orders": [x["unipc_this_order"] for x in c["calls"]]}
                                        if k == "uni_pc" else {})}
    out["model_calls_noise_draws_orders"] = calls
    out["ddim_previous_timestep"] = ddim_prev_rule(mf, doc)
    out["timestep_dtype_fed_to_unet"] = {k: by[case_name("sd21", k, None, None, 4)]["timesteps_dtype"] for k in SAMPLERS}
    out["step_takes_generator"] = {k: v["step_takes_generator"] for k, v in sam.items()}
    return out


def main(mf, only: str) -> None:
    torch.set_num_threads(2)
    if only in ("samplers", "samplers-schedulers"):
        make_schedulers(mf)
        make_facts(mf)
    if only in ("samplers", "samplers-images"):
        make_images(mf)


# --------------------------------------------------------------------------------------------------
# Part 2: whole-pipeline images on the committed tiny SD 2.1-base fixture
# --------------------------------------------------------------------------------------------------

PROMPT = "a corgi on a beach"
NEGATIVE = "blurry, low quality"
IMG_STEPS = 6
IMG_GUIDANCE = 7.5


def image_cases() -> list[dict]:
    """Case dicts: make_fixtures.py's image keys plus sampler, schedule, timestep_spacing, num_images."""
    cases = []

    def add(name, sampler, width, height, mode="default", schedule=None, spacing=None, steps=IMG_STEPS,
            guidance=IMG_GUIDANCE, negative=None, seeds=(42,), pipeline="sd", views=None):
        files = [f"{name}.png"] if len(seeds) == 1 else [f"{name}_{i}.png" for i in range(len(seeds))]
        c = {"file": files[0], "prompt": PROMPT, "negative_prompt": negative, "width": width, "height": height,
             "steps": steps, "guidance": guidance, "seed": seeds[0], "mode": mode, "sampler": sampler,
             "schedule": schedule, "timestep_spacing": spacing, "num_images": len(seeds)}
        if len(seeds) > 1:
            c.update({"files": files, "seeds": list(seeds),
                      "generators": "one torch.Generator per image: generator=[manual_seed(s) for s in seeds]"})
        if pipeline == "panorama":
            c.update({"pipeline": "StableDiffusionPanoramaPipeline", "views": views, "circular": False,
                      "view_batch_size": 1})
        c["latents_key"] = name
        cases.append(c)

    for sampler in SAMPLERS:
        for (w, h) in ((128, 128), (192, 160)):
            for mode in ("default", "entropy"):
                add(f"{sampler}_{w}x{h}_{mode}", sampler, w, h, mode)
    for sampler, schedule in (("dpmpp_2m", "karras"), ("dpmpp_2m", "exponential"), ("euler", "karras"),
                              ("heun", "karras"), ("lms", "karras"), ("uni_pc", "karras"),
                              ("dpmpp_2m_sde", "karras"), ("euler", "exponential")):
        add(f"{sampler}_{schedule}_192x160", sampler, 192, 160, schedule=schedule)
    for sampler in ("euler_ancestral", "euler", "dpmpp_2m", "ddim"):
        for steps in (1, 4):
            add(f"{sampler}_trailing_g0_{steps}step_128x128", sampler, 128, 128, spacing="trailing", steps=steps,
                guidance=0.0)
    add("dpmpp_2m_negative_128x128", "dpmpp_2m", 128, 128, negative=NEGATIVE)
    add("euler_ancestral_batch2_128x128", "euler_ancestral", 128, 128, seeds=(42, 43))
    add("dpmpp_2m_sde_batch2_128x128", "dpmpp_2m_sde", 128, 128, seeds=(42, 43))
    # MultiDiffusion, 256 wide x 128 high (latents 16x32), the existing `--only multidiffusion` window 64 /
    # stride 8 view rules: "original" (the paper's code: 15 crops of varied size here) and "diffusers"
    # (one view covering everything at this size)
    for sampler in ("dpmpp_2m", "euler_ancestral", "pndm"):
        add(f"md_{sampler}_256x128", sampler, 256, 128, pipeline="panorama", views="original")
    add("md_dpmpp_2m_256x128_diffusers_views", "dpmpp_2m", 256, 128, pipeline="panorama", views="diffusers")
    return cases


class UNetCounter:
    """Counts UNet forward calls and records the timestep each got."""

    def __init__(self, unet):
        self.calls: list[float] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append(float(t) if not isinstance(t, torch.Tensor) else float(t.flatten()[0]))

    def close(self):
        self.handle.remove()


@torch.no_grad()
def render_case(mf, pipe, md, model_sched, case: dict):
    """Returns (list of PIL images, final latents, UNet call timesteps, views or None)."""
    sched, *_ = build(model_sched, case["sampler"], case["schedule"], case["timestep_spacing"])
    seeds = case.get("seeds", [case["seed"]])
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    generator = gens[0] if len(gens) == 1 else gens
    final = {}

    def grab(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    views = None
    if case.get("pipeline") == "StableDiffusionPanoramaPipeline":
        target = md
        mf.set_attention_mode(md.unet, md.vae, case["mode"])
        if case["views"] == "original":
            md.get_views = mf.original_get_views
        else:
            md.__dict__.pop("get_views", None)
        views = [list(v) for v in md.get_views(case["height"], case["width"], circular_padding=False)]
        extra = {"view_batch_size": 1, "circular_padding": False}
    else:
        target = pipe
        mf.set_attention_mode(pipe.unet, pipe.vae, case["mode"])
        extra = {"num_images_per_prompt": len(seeds)}
    target.scheduler = sched
    counter = UNetCounter(target.unet)
    try:
        images = target(
            case["prompt"],
            negative_prompt=case["negative_prompt"],
            height=case["height"],
            width=case["width"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            generator=generator,
            callback_on_step_end=grab,
            **extra,
        ).images
    finally:
        counter.close()
        md.__dict__.pop("get_views", None)
    return images, final["latents"], counter.calls, views


def make_images(mf) -> None:
    from safetensors.torch import save_file

    od = out_dir(mf)
    od.mkdir(parents=True, exist_ok=True)
    pipe = mf.load_pipeline(mf.TINY_DIR)
    md = mf.panorama_pipeline(pipe)
    model_sched = model_scheduler(mf.TINY_DIR / "scheduler")
    entries, latents = [], {}
    for case in image_cases():
        start = time.perf_counter()
        torch.set_num_threads(2)
        images, lat, calls, views = render_case(mf, pipe, md, model_sched, case)
        torch.set_num_threads(1)
        images1, lat1, calls1, _ = render_case(mf, pipe, md, model_sched, case)
        torch.set_num_threads(2)
        assert calls == calls1
        files = case.get("files", [case["file"]])
        assert len(images) == len(files)
        diffs = [mf.image_diff(a, b) for a, b in zip(images, images1)]
        for img, f in zip(images, files):
            img.save(od / f)
        latents[case["latents_key"]] = lat
        entry = {**case, "unet_calls": len(calls), "unet_call_timesteps": calls,
                 "thread_spread": {"what": "the same case rendered with torch.set_num_threads(1) vs 2 (the PNGs are "
                                           "the 2-thread run); levels of 255 over all its images",
                                   "mean": max(m for m, _ in diffs), "max": max(x for _, x in diffs),
                                   "latents_max_abs": float((lat - lat1).abs().max())}}
        if views is not None:
            entry["view_list"] = views
        entries.append(entry)
        print(f"  {case['latents_key']}: {len(calls)} UNet calls, thread spread mean {entry['thread_spread']['mean']:.4f} "
              f"max {entry['thread_spread']['max']:.0f}, std {float(np.asarray(images[0], dtype=np.float64).std()):.1f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    save_file({k: v.contiguous() for k, v in latents.items()}, str(od / "latents.safetensors"))
    checks = image_checks(mf, od, entries)
    # one diffusers view covers the whole 256x128 panorama: it must match the plain pipeline
    md_case = next(e for e in entries if e["latents_key"] == "md_dpmpp_2m_256x128_diffusers_views")
    assert md_case["view_list"] == [[0, 64, 0, 64]], md_case["view_list"]
    plain = {k: v for k, v in md_case.items() if k not in ("pipeline", "views", "circular", "view_batch_size")}
    _, plain_lat, _, _ = render_case(mf, pipe, md, model_sched, plain)
    d = float((plain_lat - latents[md_case["latents_key"]]).abs().max())
    checks["md_single_view_vs_plain_pipeline_latents_max_abs"] = d
    assert d <= 1e-6, d
    write_strict(mf, od / "images.json", entries)
    write_strict(mf, od / "images_checks.json", checks)
    total = sum((od / f).stat().st_size for e in entries for f in e.get("files", [e["file"]]))
    print(f"wrote {od.relative_to(mf.REPO)}/images.json: {len(entries)} cases, PNGs {total / 1e6:.2f} MB")


def image_checks(mf, od: Path, entries: list[dict]) -> dict:
    """Entropy == default at the training size under every sampler; entropy != default at 192x160."""
    from PIL import Image

    def load(f):
        with Image.open(od / f) as im:
            return im.convert("RGB")

    out = {"training_size_entropy_vs_default": {}, "non_training_size_entropy_vs_default": {}}
    for sampler in SAMPLERS:
        for key, (w, h) in (("training_size_entropy_vs_default", (128, 128)),
                            ("non_training_size_entropy_vs_default", (192, 160))):
            m, x = mf.image_diff(load(f"{sampler}_{w}x{h}_default.png"), load(f"{sampler}_{w}x{h}_entropy.png"))
            out[key][sampler] = {"mean": m, "max": x}
    bad = {k: v for k, v in out["training_size_entropy_vs_default"].items() if v["max"] != 0}
    assert not bad, f"entropy != default at the training size: {bad}"
    same = {k: v for k, v in out["non_training_size_entropy_vs_default"].items() if v["mean"] < 0.5}
    assert not same, f"entropy == default at 192x160: {same}"
    return out
