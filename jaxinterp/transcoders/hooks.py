"""Where transcoders read and write: circuit-tracer's hook names mapped onto our sites.

circuit-tracer names a transcoder set's input and output with TransformerLens hook names relative
to a block (`feature_input_hook`, `feature_output_hook`). Under circuit-tracer's TransformerLens
backend (`fold_ln=False`) they are:

- `mlp.hook_in`: the MLP's input, ln2's output -> `blocks.l.ln2.hook_normalized`;
- `ln2.hook_normalized`: ln2's input standardised, before ln2's gain and bias (TransformerLens's
  hook sits before `w` and `b`) -> `blocks.l.hook_resid_mid` passed through the norm's
  `standardize` (`TranscoderSites.standardize`);
- `hook_resid_mid`: the residual stream before ln2 -> `blocks.l.hook_resid_mid`;
- `hook_mlp_out`: the block's MLP output, after any post-norm -> `blocks.l.hook_mlp_out`;
- `mlp.hook_out`: the MLP's output before any post-norm -> `blocks.l.hook_mlp_out` (models without
  post-norms only).

Parallel blocks (GPT-NeoX) have no `hook_resid_mid`: ln2 reads `hook_resid_pre` there.
"""

from __future__ import annotations

import dataclasses

from jaxinterp.models.config import ModelConfig
from jaxinterp.transcoders.errors import TranscoderError

INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized", "hook_resid_mid")
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")


@dataclasses.dataclass(frozen=True)
class TranscoderSites:
  """The sites a transcoder set reads and writes in one model.

  Attributes:
    input_hook, output_hook: circuit-tracer's names.
    input_site: the site read, with `{layer}` for the layer (`.format(layer=l)`).
    output_site: the site written (the MLP output the transcoders replace), with `{layer}`.
    standardize: the input is `input_site` passed through ln2's standardisation (x - mean) / sigma
      (LayerNorm) or x / rms (RMSNorm), without ln2's gain and bias (`ln2.hook_normalized`).
  """

  input_hook: str
  output_hook: str
  input_site: str
  output_site: str
  standardize: bool = False

  def input_at(self, layer: int) -> str:
    """The input site's name at `layer`."""
    return self.input_site.format(layer=layer)

  def output_at(self, layer: int) -> str:
    """The output site's name at `layer`."""
    return self.output_site.format(layer=layer)


def sites_for(cfg: ModelConfig, input_hook: str, output_hook: str) -> TranscoderSites:
  """Map circuit-tracer's hook names onto this model's sites (TranscoderError: one line)."""
  if input_hook not in INPUT_HOOKS:
    raise TranscoderError(f"unknown feature_input_hook {input_hook!r}; known: "
                          f"{', '.join(INPUT_HOOKS)}")
  if output_hook not in OUTPUT_HOOKS:
    raise TranscoderError(f"unknown feature_output_hook {output_hook!r}; known: "
                          f"{', '.join(OUTPUT_HOOKS)}")
  ln2_input = ("blocks.{layer}.hook_resid_pre" if cfg.parallel_attn_mlp
               else "blocks.{layer}.hook_resid_mid")
  if input_hook == "hook_resid_mid" and cfg.parallel_attn_mlp:
    raise TranscoderError("feature_input_hook 'hook_resid_mid' does not exist in a model with "
                          "parallel attention and MLP blocks")
  if output_hook == "mlp.hook_out" and cfg.post_norms:
    raise TranscoderError("feature_output_hook 'mlp.hook_out' (the MLP output before the post-MLP "
                          "norm) is not a site of this model; use 'hook_mlp_out'")
  inp = {"mlp.hook_in": "blocks.{layer}.ln2.hook_normalized",
         "ln2.hook_normalized": ln2_input,
         "hook_resid_mid": "blocks.{layer}.hook_resid_mid"}[input_hook]
  return TranscoderSites(input_hook, output_hook, inp, "blocks.{layer}.hook_mlp_out",
                         standardize=input_hook == "ln2.hook_normalized")
