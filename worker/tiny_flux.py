"""Tiny FLUX pipelines: offline test doubles for ``tiny-schnell`` and ``tiny-dev``.

No model hub is reachable here, so tests and the demo run the real diffusers
``FluxPipeline`` code path on pipelines built from tiny configs with seeded random weights.
Their images are random-weight texture patterns, not portraits.

They are built to differ the way FLUX.1-schnell differs from FLUX.1-dev: for the same
prompt and seed the student gives a closely related picture with its fine detail smoothed
away. Random weights cannot be distilled, so the double gets there by construction:
- ``tiny-dev`` (the teacher): its own transformer with guidance embeddings, run at 28 steps
  with guidance 3.5; CLIP + T5 text encoders, tokenizers and a VAE like FLUX's.
- ``tiny-schnell`` (the student): the teacher's transformer with guidance 3.5 folded into
  its timestep embedding (as a guidance-distilled model has it built in), so it runs
  without guidance, at 4 steps; the same text encoders and tokenizers; and the teacher's
  VAE with one change the real pair lacks: its decoder's last convolution also applies a
  fixed 3x3 Gaussian low-pass (``STUDENT_BLUR_SIGMA`` px). That blur is the detail the
  student loses; the step count and scheduler change the rest a little.
The low-pass is folded into weights the config already has: the shared decoder's output
convolution only uses its kernel's centre tap (a per-pixel projection), so the student's
copy can hold that projection times the Gaussian in the same 3x3 kernel, with no new module
or config key. ``benchmarks/doubles.py`` measures what this gives.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from refiner.building import BUILDING

# Fixed seeds: building twice (in any process, same library versions) gives identical weights.
SHARED_SEED = 1234

# Bump whenever a change here changes the doubles' weights or images: the model cache keys
# its directories by it, so a cache built by an older version is never silently reused.
BUILD_VERSION = 2


@dataclass(frozen=True)
class TransformerSpec:
    seed: int
    guidance_embeds: bool  # dev-like (uses guidance) or schnell-like
    num_layers: int = 1
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16


TRANSFORMERS = {
    "tiny-dev": TransformerSpec(seed=2002, guidance_embeds=True),
    # For benchmarks: a schnell-like transformer large enough that one 256x256 image costs
    # a few hundred ms on a 2-core CPU, the regime where real jobs (seconds each) live.
    "bench-schnell": TransformerSpec(
        seed=2003,
        guidance_embeds=False,
        num_layers=3,
        num_single_layers=6,
        num_attention_heads=4,
        attention_head_dim=64,
    ),
}


@dataclass(frozen=True)
class StudentSpec:
    """A student double derived from a teacher double (see the module docstring)."""

    teacher: str  # whose transformer weights it runs
    baked_guidance: float  # the guidance scale folded into its timestep embedding
    blur_sigma: float  # px: the fixed Gaussian low-pass in its VAE decoder's last convolution


# The mildest loss whose FID gap clears 5x the sampling floor with margin at 512 images a
# side (benchmarks/doubles.py sweeps sigma; the 3x3 kernel caps the loss near sigma 1).
STUDENT_BLUR_SIGMA = 0.8
STUDENTS = {"tiny-schnell": StudentSpec(teacher="tiny-dev", baked_guidance=3.5, blur_sigma=STUDENT_BLUR_SIGMA)}
TINY_PRESETS = sorted({*TRANSFORMERS, *STUDENTS})

HIDDEN = 32  # CLIP hidden size = T5 d_model = the transformer's text dims
LATENT_CHANNELS = 16  # as real FLUX's VAE
CLIP_MAX_LENGTH = 77  # the pipeline pads CLIP input to the tokenizer's model_max_length
T5_MAX_LENGTH = 512

# Special tokens first, in T5's order (pad 0, eos 1, unk 2); CLIP pools at the first </s>.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]

# Words a portrait prompt is made of; anything else becomes <unk>.
PORTRAIT_WORDS = """
a an the of with and in on at for by from to or her his their is are wearing looking
person people man woman men women boy girl male female nonbinary androgynous
baby infant child kid teen teenager young adult middle aged elderly old senior year years age
african american asian east south southeast european caucasian white black hispanic latino
latina latinx middle eastern arab indian pakistani bangladeshi chinese japanese korean
vietnamese filipino thai indonesian indigenous native pacific islander mixed race nordic
scandinavian mediterranean slavic irish italian greek turkish persian ethiopian nigerian
kenyan ghanaian brazilian mexican
hair hairstyle short long medium shoulder length bald balding buzz cut crew pixie bob
ponytail bun braid braids braided curly wavy straight coily kinky afro dreadlocks locs
shaved undercut fringe bangs messy tousled slicked back parted side blonde blond brunette
brown red ginger auburn gray grey silver dyed highlights beard bearded stubble mustache
moustache goatee clean shaven sideburns eyebrows eyelashes
skin complexion fair pale light olive tan tanned dark deep freckles freckled wrinkles
wrinkled smooth pores texture blemishes acne scar mole dimples rosy cheeks weathered
glowing oily dry makeup lipstick eyeliner mascara natural
eyes eye hazel amber iris catchlight catchlights glasses eyeglasses sunglasses spectacles
round square oval face facial features jawline chin nose lips mouth teeth forehead ears
earrings piercing ring tattoo tattoos freckle
expression smiling smile grinning laughing serious neutral calm pensive thoughtful sad
happy joyful confident shy surprised angry stern relaxed gentle soft warm friendly away
gaze contact closed open slight subtle
shirt t tshirt blouse sweater hoodie jacket leather denim coat suit tie blazer dress
turtleneck scarf hat cap beanie hijab headscarf turban uniform lab scrubs apron vest
collar button collared casual formal business knitted wool cotton silk linen patterned
striped plain necklace
orange yellow green blue navy purple violet pink beige cream gold teal maroon colorful
lighting lit hard daylight sunlight sunlit golden hour window studio rim key fill
butterfly rembrandt split loop dramatic diffuse diffused overcast cinematic moody low high
contrast shadows shadow backlit backlight cool neon candlelight ambient softbox flash
photo photograph photography portrait headshot close closeup up shot shoulders head bust
upper body half full camera lens mm f aperture bokeh depth field shallow sharp focus
detailed detail resolution 4k 8k dslr mirrorless canon nikon sony fujifilm leica kodak
portra film grain analog raw hdr realistic photorealistic hyperrealistic professional
candid editorial fashion magazine quality
background backdrop solid seamless blurred blurry outdoor outdoors indoor indoors street
city urban park garden forest beach office cafe library kitchen room wall brick wood
concrete sky sunset night trees nature mountains
"""
PUNCTUATION = list(",.-/:;()'\"!?&+")
NUMBERS = [str(n) for n in range(100)] + ["105", "135", "200"]


def _vocab() -> dict[str, int]:
    # dict.fromkeys keeps first occurrences in order, so ids never depend on set ordering.
    tokens = dict.fromkeys([*SPECIAL_TOKENS, *PORTRAIT_WORDS.split(), *PUNCTUATION, *NUMBERS])
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(vocab: dict[str, int], template: str, max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Split on whitespace, then every punctuation mark on its own ("25-year-old", "f/1.8").
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # An explicit </s> at the end: CLIP pools at it and T5 is trained with it.
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )


def _shared_components() -> dict:
    vocab = _vocab()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks: a VAE scale factor of 8, like real FLUX.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        # Real FLUX's VAE: no quant convs, and its latent scaling and shift.
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    # The decoder's output convolution as a per-pixel projection: only its 3x3 kernel's
    # centre tap is used (x3 keeps the output's scale of nine random taps). The earlier
    # convolutions still make the texture; this leaves room for the student's low-pass.
    with torch.no_grad():
        weight = vae.decoder.conv_out.weight  # (3, C, 3, 3)
        centre = weight[:, :, 1, 1] * 3
        weight.zero_()
        weight[:, :, 1, 1] = centre
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=HIDDEN,
            hidden_act="gelu",
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=HIDDEN,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            pad_token_id=vocab["<pad>"],
            eos_token_id=vocab["</s>"],
        )
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": _tokenizer(vocab, "<s> $A </s>", CLIP_MAX_LENGTH),
        "tokenizer_2": _tokenizer(vocab, "$A </s>", T5_MAX_LENGTH),
    }


def _transformer(spec: TransformerSpec) -> FluxTransformer2DModel:
    head = spec.attention_head_dim
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # the pipeline packs latents into 2x2 patches
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=head,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        guidance_embeds=spec.guidance_embeds,
        # RoPE axes (text position, row, column) must add up to the head size.
        axes_dims_rope=(head // 4, head // 4, head // 2),
    )


def _gaussian_3x3(sigma: float) -> torch.Tensor:
    """A normalised 3x3 Gaussian kernel, (3, 3)."""
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma**2))
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def low_passed(vae: AutoencoderKL, sigma: float) -> AutoencoderKL:
    """A copy of ``vae`` whose decoder output is Gaussian-blurred (3x3, ``sigma`` px).

    The shared decoder's output convolution uses only its centre tap, a projection P per
    pixel; P times the kernel in the same 3x3 weights computes blur(P x) + bias exactly
    (zero padding at the borders). Same config, same modules: only those weights differ.
    """
    student = copy.deepcopy(vae)
    with torch.no_grad():
        weight = student.decoder.conv_out.weight  # (3, C, 3, 3)
        assert torch.count_nonzero(weight[:, :, [0, 0, 2, 2], [0, 2, 0, 2]]) == 0, "shared conv_out must be centre-only"
        weight.copy_(weight[:, :, 1:2, 1:2] * _gaussian_3x3(sigma).to(weight))
    return student


def _without_guidance(teacher: FluxTransformer2DModel, guidance: float) -> FluxTransformer2DModel:
    """The teacher's transformer as a schnell-like one: no guidance embedder, with the
    embedding of ``guidance`` added to the timestep embedder's output bias instead.

    The teacher's conditioning is timestep_emb(t) + guidance_emb(g) + text_emb, so for
    g = ``guidance`` the student's is the same vector (up to float rounding), with no
    guidance input: guidance built in, as distillation builds it into schnell.
    """
    config = {**teacher.config, "guidance_embeds": False}
    student = _seeded(0, lambda: FluxTransformer2DModel.from_config(config))  # weights replaced below
    embed = teacher.time_text_embed
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("time_text_embed.guidance_embedder.")}
    with torch.no_grad():
        # The transformer scales guidance by 1000 before embedding it, as it does timesteps.
        guidance_emb = embed.guidance_embedder(embed.time_proj(torch.tensor([guidance * 1000.0])))[0]
        bias = "time_text_embed.timestep_embedder.linear_2.bias"
        state[bias] = state[bias] + guidance_emb
    student.load_state_dict(state, strict=True)
    return student


def _scheduler(schnell_like: bool) -> FlowMatchEulerDiscreteScheduler:
    # The real checkpoints' scheduler configs: schnell a fixed shift, dev resolution-dependent.
    if schnell_like:
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _seeded(seed: int, build):
    # Module initialisers draw from torch's global RNG, so two builds in threads (a Celery
    # threads pool loading schnell and dev) would interleave draws and get different
    # weights: BUILDING holds them one at a time. The generation path never uses the global
    # RNG (it takes explicit generators). fork_rng: seeding must not disturb the caller's
    # global RNG stream.
    with BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_pipeline(name: str) -> FluxPipeline:
    """Build ``tiny-schnell``, ``tiny-dev`` or ``bench-schnell`` in memory, identically on every call."""
    if name not in TINY_PRESETS:
        raise ValueError(f"not a tiny preset: {name!r} (expected one of {TINY_PRESETS})")
    components = _seeded(SHARED_SEED, _shared_components)
    if name in STUDENTS:
        student = STUDENTS[name]
        spec = TRANSFORMERS[student.teacher]
        teacher = _seeded(spec.seed, lambda: _transformer(spec))
        transformer = _without_guidance(teacher, student.baked_guidance)
        components["vae"] = low_passed(components["vae"], student.blur_sigma)
    else:
        spec = TRANSFORMERS[name]
        transformer = _seeded(spec.seed, lambda: _transformer(spec))
    scheduler = _scheduler(schnell_like=not transformer.config.guidance_embeds)
    pipe = FluxPipeline(scheduler=scheduler, transformer=transformer, **components)
    # Built from configs, modules start in training mode: T5's dropout would make
    # the same seed give different images.
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        module.eval()
    return pipe


def ensure_tiny_pipeline_saved(name: str, cache_dir: Path) -> Path:
    """Save the tiny pipeline ``name`` under ``cache_dir`` once; return its directory.

    The directory is ``{name}-v{BUILD_VERSION}``: a cache written by an older build of this
    module sits under another name and is left alone, never loaded. Written into a
    temporary directory beside the target and renamed into place, so a process racing this
    one sees either no directory or a complete one. An existing directory is trusted as is.
    """
    target = Path(cache_dir) / f"{name}-v{BUILD_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_pipeline(name).save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its complete copy first; theirs is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
