"""`make_fixtures.py --only eval`: references for `sdscale eval` (FID and CLIP score), written to
tests/fixtures/eval/ and nothing else.

FID: pytorch-fid 0.3.0's own `InceptionV3([3])` (FID blocks FIDInceptionA/C/E_1/E_2, bilinear resize to
299x299, inputs scaled to [-1, 1], pool3 features) with every parameter and buffer set by `formula_value`
below, a counter-based hash of (tensor name, element index) that the Rust test computes too. So the
95 MB network is rebuilt on both sides and never committed. The weights reach pytorch-fid through its own
loading code (`fid_inception_v3` → `load_state_dict`, strict), and also go through
scripts/convert_inception.py, whose output must hold exactly the formula's tensors under the names and
shapes in inception_layout.json, which the Rust test writes. References: the 2048-d activations of every
image (pytorch-fid's `get_activations`, images read as PIL RGB → ToTensor), and
`calculate_frechet_distance` on their statistics.

CLIP score: torchmetrics 1.9.0's `CLIPScore` on a tiny random transformers `CLIPModel` (tiny-clip/, in
the Hugging Face layout of openai/clip-vit-large-patch14: config.json, model.safetensors, vocab.json +
merges.txt, tokenizer and preprocessor configs). Two adjustments, both through CLIPScore's documented
`model_name_or_path=callable` hook, leave its formula untouched:
  - transformers 5's `get_image_features` / `get_text_features` return an output object; torchmetrics
    1.9.0 (the newest) expects the projected embeddings tensor that transformers 4 returned. A thin
    adapter returns `.pooler_output`, which is that tensor.
  - the processor's image half is `CLIPImageProcessorPil`, the PIL backend: transformers 4's
    `CLIPImageProcessor` (PIL bicubic resize). transformers 5 defaults to a torchvision backend whose
    uint8 antialiased bicubic differs from PIL by 1-2 levels on ~1% of pixels.
Images are passed as uint8 CHW tensors of the PNG's RGB pixels, one prompt each.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "eval"
TINY_SD_TOKENIZER = REPO / "tests" / "fixtures" / "tiny-sd" / "tokenizer"

# --------------------------------------------------------------------------------------------
# The formula weights (src/eval tests compute the same numbers; keep the two in step)
# --------------------------------------------------------------------------------------------

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = FNV_OFFSET
    for byte in text.encode():
        h = ((h ^ byte) * FNV_PRIME) & MASK
    return h


def uniform01(name: str, count: int) -> np.ndarray:
    """u[i] in [0, 1): splitmix64 of (fnv1a64(name) + (i + 1) * golden), top 53 bits."""
    with np.errstate(over="ignore"):
        index = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + index * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def formula_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values for one tensor, by what it is: He-uniform convolutions, BatchNorm statistics
    near the identity (variance positive), a small classifier."""
    count = int(np.prod(shape)) if shape else 1
    u = uniform01(name, count)
    if name.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        values = (2.0 * u - 1.0) * math.sqrt(6.0 / fan_in)
    elif name.endswith("bn.weight") or name.endswith("bn.running_var"):
        values = 0.5 + u
    elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
        values = 0.1 * (2.0 * u - 1.0)
    elif name == "fc.weight":
        values = (2.0 * u - 1.0) / math.sqrt(shape[1])
    elif name == "fc.bias":
        values = 0.01 * (2.0 * u - 1.0)
    else:
        raise ValueError(f"no formula for {name}")
    return values.astype(np.float32).reshape(shape)


def formula_state(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(formula_value(name, tuple(t.shape)))
        for name, t in template.items()
        if t.is_floating_point()
    }


def pytorch_fid_model():
    """pytorch-fid's InceptionV3([3]) loading the formula weights through its own code path: the
    download is replaced by a function that fills in every tensor of the network it is asked for."""
    import pytorch_fid.inception as fid_inception

    def load_formula(url, progress=True):
        # Called inside fid_inception_v3, whose local `inception` is the network about to load.
        network = inspect.currentframe().f_back.f_locals["inception"]
        return formula_state(network.state_dict())

    saved = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = load_formula
    try:
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid_inception.load_state_dict_from_url = saved
    return model.eval()


def check_conversion(state: dict[str, torch.Tensor]) -> list:
    """The formula state, saved as the .pth pytorch-fid downloads and run through
    convert_inception.py, gives exactly the formula tensors; returns that file's layout."""
    sys.path.insert(0, str(REPO / "scripts"))
    import convert_inception

    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "pt_inception-2015-12-05-6726825d.pth"
        with_counters = dict(state)
        for name in [n for n in state if n.endswith("bn.running_var")]:
            with_counters[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
        torch.save(with_counters, pth)
        out = Path(tmp) / "inception.safetensors"
        sys.argv = ["convert_inception.py", str(pth), str(out)]
        convert_inception.main()
        converted = load_file(out)
    assert sorted(converted) == sorted(state), "converted names differ from the formula's"
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name]), name
    return [[name, list(converted[name].shape)] for name in sorted(converted)]


# --------------------------------------------------------------------------------------------
# Images and prompts
# --------------------------------------------------------------------------------------------

# (width, height): differing sizes, below and above Inception's 299 and CLIP's 224.
GENERATED_SIZES = [(64, 64), (48, 80), (96, 64), (72, 72), (320, 256), (56, 40)]
REFERENCE_SIZES = [(64, 48), (100, 75), (50, 50), (90, 60), (64, 64), (40, 88)]
PROMPTS = [
    "a corgi on a beach",
    "A photograph of an astronaut riding a horse",
    "red",
    "a bowl of fruit, oil painting, highly detailed",
    # Longer than 77 tokens for the tiny vocabulary: CLIPScore cuts the ids at 77 (no end token).
    "an extremely long prompt about a lighthouse on a rocky coast at dusk with waves crashing and gulls "
    "circling above while fishing boats return to the harbour under a sky of orange and violet clouds",
    "café, naïve art — 100% ünïcödé!",
]


def smooth_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A few random sinusoids per channel plus a little noise: varied, yet small as a PNG."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        value = np.zeros((height, width))
        for _ in range(3):
            fx, fy, phase = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0, 2 * np.pi)
            value += rng.uniform(0.3, 1.0) * np.sin(fx * x + fy * y + phase)
        channels.append(value)
    pixels = np.stack(channels, -1)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min() + 1e-9) * 255
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


def write_images() -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(13)
    folders = {"generated": GENERATED_SIZES, "reference": REFERENCE_SIZES}
    written = {}
    for folder, sizes in folders.items():
        (OUT / folder).mkdir(parents=True)
        written[folder] = []
        for index, (width, height) in enumerate(sizes):
            path = OUT / folder / f"{index}.png"
            smooth_image(width, height, rng).save(path, optimize=True)
            written[folder].append(path)
    return written["generated"], written["reference"]


# --------------------------------------------------------------------------------------------
# Tiny CLIP (the layout of openai/clip-vit-large-patch14)
# --------------------------------------------------------------------------------------------

# The first merges of CLIP's BPE (from the tiny SD model's tokenizer, CLIP's full vocabulary): the
# vocabulary is built as OpenAI's simple_tokenizer builds it, so ids stay small.
CLIP_MERGES = 256


def write_tiny_clip(folder: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    sys.path.insert(0, str(REPO / "scripts"))
    from make_fixtures import bytes_to_unicode

    folder.mkdir(parents=True)
    merges = TINY_SD_TOKENIZER.joinpath("merges.txt").read_text(encoding="utf-8").split("\n")[1 : 1 + CLIP_MERGES]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge.split(" ")) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, indent=2) + "\n")

    # Seed 9: per-image scores of both signs and a positive mean, so the clamp on the mean is not hit.
    torch.manual_seed(9)
    # openai/clip-vit-large-patch14's shape in miniature; its legacy eos_token_id 2 (pooling at the
    # argmax id) and quick_gelu kept.
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", projection_dim=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    # transformers initialises CLIP's layer norms and biases as constants; perturb them so every
    # tensor's mapping is exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)
    for extra in ["tokenizer.json", "generation_config.json"]:
        (folder / extra).unlink(missing_ok=True)
    # What CLIPScore loads: the saved folder, read back.
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return model, tokenizer, CLIPImageProcessorPil.from_pretrained(folder)


class FeaturesAdapter(torch.nn.Module):
    """transformers 4's get_*_features contract (the projected embeddings as a tensor) over a
    transformers 5 CLIPModel, for torchmetrics 1.9.0."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def make_eval() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPProcessor
    import pytorch_fid
    import torchmetrics

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    generated, reference = write_images()

    # ---- FID -------------------------------------------------------------------------------
    model = pytorch_fid_model()
    layout = check_conversion(pytorch_fid_model_state())
    write_json(OUT / "inception_layout.json", layout)

    # Images of differing sizes: one per batch, as pytorch-fid would need for them.
    act_generated = get_activations([str(p) for p in generated], model, batch_size=1, dims=2048, device="cpu")
    act_reference = get_activations([str(p) for p in reference], model, batch_size=1, dims=2048, device="cpu")
    mu1, sigma1 = np.mean(act_generated, axis=0), np.cov(act_generated, rowvar=False)
    mu2, sigma2 = np.mean(act_reference, axis=0), np.cov(act_reference, rowvar=False)
    fid = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    save_file({"generated": torch.from_numpy(act_generated.astype(np.float32)),
               "reference": torch.from_numpy(act_reference.astype(np.float32))},
              str(OUT / "inception_features.safetensors"))
    print(f"FID {fid:.6f}; features: mean |x| {np.abs(act_generated).mean():.4f}, "
          f"per-feature std across images {act_generated.std(axis=0).mean():.4f}")

    # ---- CLIP score -------------------------------------------------------------------------
    clip_dir = OUT / "tiny-clip"
    clip_model, tokenizer, image_processor = write_tiny_clip(clip_dir)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous()
              for p in generated]
    metric = CLIPScore(model_name_or_path=lambda: (FeaturesAdapter(clip_model), processor))
    metric.update(images, PROMPTS)
    clip_score = float(metric.compute())

    # Per-image values, to locate a mismatch: the same computation torchmetrics does, one at a time.
    per_image = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            score, _ = _clip_score_update(
                [image], [prompt], FeaturesAdapter(clip_model), processor)
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            ids = processor(text=[prompt], return_tensors="pt", padding=True)["input_ids"][0, :77]
            per_image.append({"prompt": prompt, "input_ids": ids.tolist(), "score": float(score[0]),
                              "pixel_mean": float(pixels.double().mean()),
                              "pixel_abs_sum": float(pixels.double().abs().sum())})
    # Every 7th row and column of the 224x224 pixel values (the whole would be 3.6 MB); the sums above
    # cover every pixel.
    save_file({f"pixel_values_{i}": processor(images=[im], return_tensors="pt")["pixel_values"][0, :, ::7, ::7]
               .contiguous() for i, im in enumerate(images)}, str(OUT / "clip_pixels.safetensors"))
    mean = sum(item["score"] for item in per_image) / len(per_image)
    print(f"CLIP score {clip_score:.6f} (per image {[round(i['score'], 3) for i in per_image]}, mean {mean:.6f})")

    write_json(OUT / "eval.json", {
        "versions": {"torch": torch.__version__, "pytorch_fid": pytorch_fid.__version__,
                     "torchmetrics": torchmetrics.__version__},
        "generated": [p.name for p in generated],
        "reference": [p.name for p in reference],
        "prompts": PROMPTS,
        # A few formula values, for the Rust test to check its formula bit for bit.
        "formula_samples": {name: [float(v) for v in formula_value(name, shape).reshape(-1)[:4]]
                            for name, shape in layout
                            if name in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var",
                                        "Mixed_6e.branch7x7dbl_5.bn.bias", "fc.weight")},
        "fid": fid,
        "clip_score": clip_score,
        "clip_per_image": per_image,
    })
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT.relative_to(REPO)} ({total / 1e6:.2f} MB)")


def pytorch_fid_model_state() -> dict[str, torch.Tensor]:
    """The formula weights under the .pth's names (torchvision Inception3's, as pytorch-fid loads them)."""
    import pytorch_fid.inception as fid_inception

    captured = {}

    def capture(url, progress=True):
        network = inspect.currentframe().f_back.f_locals["inception"]
        captured.update(formula_state(network.state_dict()))
        return captured

    saved = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = capture
    try:
        fid_inception.fid_inception_v3()
    finally:
        fid_inception.load_state_dict_from_url = saved
    return captured


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
