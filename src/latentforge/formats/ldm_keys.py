"""Key maps between our (= diffusers') parameter names and the original CompVis/Stability layout.

A single-file Stable Diffusion checkpoint (what A1111 and ComfyUI read and write) stores the three
networks under the prefixes of the original LDM code:

    model.diffusion_model.*       the UNet        (input_blocks / middle_block / output_blocks)
    first_stage_model.*           the VAE         (encoder.down.i.block.j / decoder.up.i …)
    cond_stage_model.transformer.*  SD 1.x text encoder (transformers' CLIPTextModel, names unchanged)
    cond_stage_model.model.*        SD 2.x text encoder (OpenCLIP ViT-H; q, k, v fused into in_proj)
    conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*   SDXL's two (CLIP ViT-L, OpenCLIP
                                    ViT-bigG with its text_projection); the UNet's `label_emb.0` is the
                                    micro-conditioning MLP (our `add_embedding`)

Each map here is data: a list of `Rule(ours, theirs, renames)` — a key prefix on each side and a
table of renamed pieces below it — built from the network's config, because where a block sits in
`input_blocks.N` depends on the number of levels and layers. `map_state` applies a map in either
direction (`to_theirs`: one key, ours -> theirs); the reshapes (VAE attention: Linear ⇄ 1×1 conv; OpenCLIP: q/k/v ⇄ in_proj) live in
single_file.py. The names are those of the CompVis code (VAE resnets: `nin_shortcut`), checked against the
complete key lists of full-size SD 1.5 / 2.1 / SDXL files written by diffusers' repo scripts
(tests/test_ldm_key_lists.py) and against diffusers' in-library converter (tests/test_single_file.py, which
accepts more than one spelling, so it alone cannot catch a wrong name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: CLIP ViT-L/14, transformers' own key names
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L/14, as SD 1.x
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG/14 + its text_projection

# Pieces renamed below a block prefix: ours -> theirs.
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                  ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"),
                  # q, k, v are one `attn.in_proj_*` tensor in the file; single_file.py splits and fuses them
                  ("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                  ("self_attn.v_proj", "attn.v_proj"))


@dataclass(frozen=True)
class Rule:
    """Keys `ours + rest` ⇄ `theirs + rest'`, where rest' is rest with the first matching rename applied."""

    ours: str
    theirs: str
    renames: Tuple[Tuple[str, str], ...] = ()


KeyMap = List[Rule]


def _rename(rest: str, renames, forward: bool) -> str:
    for a, b in renames:
        src, dst = (a, b) if forward else (b, a)
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def _apply(key: str, rules: KeyMap, forward: bool) -> Optional[str]:
    best = None
    for r in rules:
        src = r.ours if forward else r.theirs
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, r)
    if best is None:
        return None
    src, r = best
    return (r.theirs if forward else r.ours) + _rename(key[len(src):], r.renames, forward)


def to_theirs(key: str, rules: KeyMap) -> Optional[str]:
    """Our key -> the single-file key (None if no rule covers it)."""
    return _apply(key, rules, True)


# --------------------------------------------------------------------------- the UNet


def unet_rules(levels: int, layers: int, attention: Sequence[bool]) -> KeyMap:
    """UNet2DConditionModel ⇄ LDM `openaimodel.UNetModel`. Down level b, layer j is input block
    1 + b(L+1) + j (its downsampler the block after the last layer); up level u, layer j is output
    block u(L+1) + j (its upsampler follows the attention, at index 2, or the resnet, at index 1)."""
    p = UNET_PREFIX
    rules = [Rule("time_embedding.linear_1.", p + "time_embed.0."), Rule("time_embedding.linear_2.", p + "time_embed.2."),
             Rule("conv_in.", p + "input_blocks.0.0."), Rule("conv_norm_out.", p + "out.0."),
             Rule("conv_out.", p + "out.2."),
             Rule("add_embedding.linear_1.", p + "label_emb.0.0."), Rule("add_embedding.linear_2.", p + "label_emb.0.2.")]
    for b in range(levels):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            rules.append(Rule(f"down_blocks.{b}.resnets.{j}.", f"{p}input_blocks.{i}.0.", UNET_RESNET))
            rules.append(Rule(f"down_blocks.{b}.attentions.{j}.", f"{p}input_blocks.{i}.1."))
        if b < levels - 1:
            rules.append(Rule(f"down_blocks.{b}.downsamplers.0.conv.", f"{p}input_blocks.{1 + b * (layers + 1) + layers}.0.op."))
    rules += [Rule("mid_block.resnets.0.", p + "middle_block.0.", UNET_RESNET),
              Rule("mid_block.attentions.0.", p + "middle_block.1."),
              Rule("mid_block.resnets.1.", p + "middle_block.2.", UNET_RESNET)]
    for u in range(levels):
        for j in range(layers + 1):
            o = u * (layers + 1) + j
            rules.append(Rule(f"up_blocks.{u}.resnets.{j}.", f"{p}output_blocks.{o}.0.", UNET_RESNET))
            rules.append(Rule(f"up_blocks.{u}.attentions.{j}.", f"{p}output_blocks.{o}.1."))
        if u < levels - 1:
            o = u * (layers + 1) + layers
            at = 2 if attention[levels - 1 - u] else 1
            rules.append(Rule(f"up_blocks.{u}.upsamplers.0.conv.", f"{p}output_blocks.{o}.{at}.conv."))
    return rules


# --------------------------------------------------------------------------- the VAE


def vae_rules(levels: int, layers: int) -> KeyMap:
    """AutoencoderKL ⇄ LDM `AutoencoderKL` (`layers` resnets per encoder level, one more per decoder level).
    The decoder's up levels are numbered from the bottom in the LDM code (`decoder.up.0` is the last,
    full-resolution one), ours from the top. One rule per resnet, so that the channel-changing shortcut's
    rename (`conv_shortcut` ⇄ `nin_shortcut`) applies right after the block index."""
    p = VAE_PREFIX
    rules = [Rule("quant_conv.", p + "quant_conv."), Rule("post_quant_conv.", p + "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in.", f"{p}{part}.conv_in."), Rule(f"{part}.conv_out.", f"{p}{part}.conv_out."),
                  Rule(f"{part}.conv_norm_out.", f"{p}{part}.norm_out."),
                  Rule(f"{part}.mid_block.resnets.0.", f"{p}{part}.mid.block_1.", VAE_RESNET),
                  Rule(f"{part}.mid_block.resnets.1.", f"{p}{part}.mid.block_2.", VAE_RESNET),
                  Rule(f"{part}.mid_block.attentions.0.", f"{p}{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        rules += [Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"{p}encoder.down.{i}.block.{j}.", VAE_RESNET)
                  for j in range(layers)]
        rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"{p}encoder.down.{i}.downsample.conv."))
        k = levels - 1 - i
        rules += [Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"{p}decoder.up.{k}.block.{j}.", VAE_RESNET)
                  for j in range(layers + 1)]
        rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"{p}decoder.up.{k}.upsample.conv."))
    return rules


# --------------------------------------------------------------------------- text encoders


def clip_rules(prefix: str = CLIP_PREFIX) -> KeyMap:
    """SD 1.x (and SDXL's first encoder): transformers' CLIPTextModel keys under one prefix."""
    return [Rule("text_model.", prefix + "text_model.")]


def openclip_rules(layers: int, prefix: str = OPENCLIP_PREFIX, projection: bool = False) -> KeyMap:
    """SD 2.x: OpenCLIP's text tower ⇄ transformers' CLIPTextModel (q/k/v fused in the file, see
    single_file.py). `text_projection` and the final block SD 2.x does not use are not ours. SDXL's
    second encoder (`projection`): CLIPTextModelWithProjection, whose Linear `text_projection.weight` is the
    file's `text_projection` matrix transposed (single_file.py)."""
    p = prefix
    rules = [Rule("text_model.embeddings.token_embedding.", p + "token_embedding."),
             Rule("text_model.embeddings.position_embedding.weight", p + "positional_embedding"),
             Rule("text_model.final_layer_norm.", p + "ln_final.")]
    if projection:
        rules.append(Rule("text_projection.weight", p + "text_projection"))
    for i in range(layers):
        rules.append(Rule(f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}.", OPENCLIP_LAYER))
    return rules


def map_state(state: Dict[str, "object"], rules: KeyMap, forward: bool) -> Tuple[Dict[str, "object"], List[str]]:
    """Rename every key of `state`; -> (renamed state, keys no rule covers)."""
    out, unmapped = {}, []
    for k, v in state.items():
        new = _apply(k, rules, forward)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped
