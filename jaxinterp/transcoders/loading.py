"""Loading transcoders from the files users hold, refusing bad input in one line.

- circuit-tracer's transcoder set: a `config.yaml` with `model_kind: transcoder_set`,
  `feature_input_hook`, `feature_output_hook`, optional `scan`, and `transcoders:` (one path per
  layer, in layer order; relative paths are read from the config's directory). Each `.safetensors`
  holds `W_enc [F, d_model]`, `W_dec [F, d_model]`, `b_enc [F]`, `b_dec [d_model]`, and optionally
  `W_skip [d_model, d_model]` (applied as `x @ W_skip.T`) and `activation_function.threshold [F]`
  (JumpReLU). A path ending in `.npz` is a Gemma Scope `params.npz` (`W_enc [d_model, F]`,
  `W_dec [F, d_model]`, `b_enc`, `b_dec`, `threshold`).
- circuit-tracer's cross-layer transcoder: `model_kind: cross_layer_transcoder`, with
  `W_enc_{i}.safetensors` (`W_enc_{i} [F, d_model]`, `b_enc_{i}`, `b_dec_{i}`, optional
  `threshold_{i}`) and `W_dec_{i}.safetensors` (`W_dec_{i} [F, L - i, d_model]`) next to it.

Given the model's config, `load` also checks the transcoders against it: d_model, one transcoder per
layer, and hook names that are sites of this model (`hooks.sites_for`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxinterp.models.config import ModelConfig
from jaxinterp.transcoders import hooks, safetensors_file
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.plt import PerLayerTranscoders

Transcoders = PerLayerTranscoders | CrossLayerTranscoder


def read_config(path: str | os.PathLike) -> dict:
  """circuit-tracer's `config.yaml` as a dict, with its required keys checked."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.yaml")
  if not os.path.isfile(path):
    raise TranscoderError(f"{path}: no such transcoder config")
  try:
    with open(path) as fh:
      conf = yaml.safe_load(fh)
  except yaml.YAMLError as e:
    raise TranscoderError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(conf, dict):
    raise TranscoderError(f"{path}: expected a YAML mapping with model_kind, feature_input_hook, "
                          "feature_output_hook")
  for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
    if key not in conf:
      raise TranscoderError(f"{path}: no {key!r}")
  if conf["feature_input_hook"] not in hooks.INPUT_HOOKS:
    raise TranscoderError(f"{path}: unknown feature_input_hook {conf['feature_input_hook']!r}; "
                          f"known: {', '.join(hooks.INPUT_HOOKS)}")
  if conf["feature_output_hook"] not in hooks.OUTPUT_HOOKS:
    raise TranscoderError(f"{path}: unknown feature_output_hook {conf['feature_output_hook']!r}; "
                          f"known: {', '.join(hooks.OUTPUT_HOOKS)}")
  conf["_dir"] = os.path.dirname(os.path.abspath(path))
  conf["_path"] = path
  return conf


def _get(tensors: dict, name: str, path: str) -> np.ndarray:
  if name not in tensors:
    raise TranscoderError(f"{path}: no tensor {name!r} (has {', '.join(sorted(tensors))})")
  return tensors[name]


def _finite_threshold(t: np.ndarray, path: str) -> np.ndarray:
  if not np.all(np.isfinite(np.asarray(t, np.float32))):
    raise TranscoderError(f"{path}: the JumpReLU threshold has non-finite values")
  return t


def read_plt_layer(path: str) -> dict[str, np.ndarray]:
  """One layer's arrays in our `x @ W` convention (W_enc [d_model, F], W_skip [d_model, d_model]).

  A `.npz` path is read as Gemma Scope's `params.npz`, anything else as circuit-tracer's
  safetensors.
  """
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise TranscoderError(f"{path}: no such file")
    try:
      with np.load(path) as z:
        t = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
      raise TranscoderError(f"{path}: unreadable npz ({str(e).splitlines()[0]})") from None
    out = {k: _get(t, k, path) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    out["threshold"] = _finite_threshold(out["threshold"], path)
    return out
  t = safetensors_file.read(path)
  out = {"W_enc": _get(t, "W_enc", path).T, "W_dec": _get(t, "W_dec", path),
         "b_enc": _get(t, "b_enc", path), "b_dec": _get(t, "b_dec", path)}
  if "W_skip" in t:
    out["W_skip"] = t["W_skip"].T
  if "activation_function.threshold" in t:
    thr = t["activation_function.threshold"]
    out["threshold"] = _finite_threshold(np.broadcast_to(thr, out["b_enc"].shape), path)
  return out


def _stack(layers: list[dict], paths: list[str], dtype) -> dict[str, jnp.ndarray]:
  d, F = layers[0]["W_enc"].shape
  shapes = {"W_enc": (d, F), "W_dec": (F, d), "b_enc": (F,), "b_dec": (d,), "threshold": (F,),
            "W_skip": (d, d)}
  for i, (lay, path) in enumerate(zip(layers, paths, strict=True)):
    if set(lay) != set(layers[0]):
      raise TranscoderError(f"{path}: layer {i} has {sorted(lay)}, layer 0 has {sorted(layers[0])}"
                            " (every layer needs the same activation and skip connection)")
    for k, a in lay.items():
      if tuple(a.shape) != shapes[k]:
        raise TranscoderError(f"{path}: {k} has shape {tuple(a.shape)}, expected {shapes[k]} (from"
                              f" layer 0's d_model {d} and {F} features)")
  # stacked and cast on the host, then put on the device: no compiled program per shape
  return {k: jax.device_put(np.asarray(np.stack([lay[k] for lay in layers]), dtype))
          for k in layers[0]}


def _resolve(conf: dict, p) -> str:
  p = str(p)
  if p.startswith("hf://"):
    raise TranscoderError(f"{conf['_path']}: {p} is on the Hugging Face Hub; download the files "
                          "and list their local paths")
  return p if os.path.isabs(p) else os.path.join(conf["_dir"], p)


def _load_plt(conf: dict, dtype) -> PerLayerTranscoders:
  paths = conf.get("transcoders")
  if not isinstance(paths, list) or not paths:
    raise TranscoderError(f"{conf['_path']}: 'transcoders' must list one file per layer")
  paths = [_resolve(conf, p) for p in paths]
  arrays = _stack([read_plt_layer(p) for p in paths], paths, dtype)
  return PerLayerTranscoders(**arrays, input_hook=conf["feature_input_hook"],
                             output_hook=conf["feature_output_hook"],
                             scan=conf.get("scan")).validate()


def load_clt_files(directory: str, dtype=jnp.float32, *, input_hook: str = "hook_resid_mid",
                   output_hook: str = "hook_mlp_out",
                   scan: str | None = None) -> CrossLayerTranscoder:
  """A cross-layer transcoder from circuit-tracer's `W_enc_{i}` / `W_dec_{i}` safetensors files."""
  n = 0
  while os.path.isfile(os.path.join(directory, f"W_enc_{n}.safetensors")):
    n += 1
  if n == 0:
    raise TranscoderError(f"{directory}: no W_enc_0.safetensors (a cross-layer transcoder's files)")
  enc = {k: [] for k in ("W_enc", "b_enc", "b_dec", "threshold")}
  W_dec = []
  for i in range(n):
    path = os.path.join(directory, f"W_enc_{i}.safetensors")
    t = safetensors_file.read(path)
    enc["W_enc"].append(_get(t, f"W_enc_{i}", path).T)
    enc["b_enc"].append(_get(t, f"b_enc_{i}", path))
    enc["b_dec"].append(_get(t, f"b_dec_{i}", path))
    if i and (f"threshold_{i}" in t) != bool(enc["threshold"]):
      raise TranscoderError(f"{path}: threshold_{i} is in some layers' files only")
    if f"threshold_{i}" in t:
      enc["threshold"].append(_finite_threshold(t[f"threshold_{i}"].reshape(-1), path))
    dec_path = os.path.join(directory, f"W_dec_{i}.safetensors")
    W_dec.append(_get(safetensors_file.read(dec_path), f"W_dec_{i}", dec_path))
  d, F = enc["W_enc"][0].shape
  for i in range(n):
    path = os.path.join(directory, f"W_enc_{i}.safetensors")
    for k, shape in (("W_enc", (d, F)), ("b_enc", (F,)), ("b_dec", (d,)), ("threshold", (F,))):
      if enc[k] and tuple(enc[k][i].shape) != shape:
        raise TranscoderError(f"{path}: {k}_{i} has shape {tuple(enc[k][i].shape)}, expected "
                              f"{shape}")
    if tuple(W_dec[i].shape) != (F, n - i, d):
      raise TranscoderError(f"{os.path.join(directory, f'W_dec_{i}.safetensors')}: W_dec_{i} has "
                            f"shape {tuple(W_dec[i].shape)}, expected {(F, n - i, d)}")
  arrays = {k: jax.device_put(np.asarray(np.stack(v), dtype)) for k, v in enc.items() if v}
  return CrossLayerTranscoder(**arrays,
                              W_dec=tuple(jax.device_put(np.asarray(w, dtype)) for w in W_dec),
                              input_hook=input_hook, output_hook=output_hook,
                              scan=scan).validate()


def check_model(tc: Transcoders, cfg: ModelConfig,
                source: str = "transcoders") -> hooks.TranscoderSites:
  """Check transcoders against a model (TranscoderError: one line); return their sites."""
  if tc.d_model != cfg.d_model:
    raise TranscoderError(f"{source}: d_model {tc.d_model}, the model's is {cfg.d_model}")
  if tc.n_layers < cfg.n_layers:
    raise TranscoderError(f"{source}: transcoders for {tc.n_layers} layers, the model has "
                          f"{cfg.n_layers} (layer {tc.n_layers} has none)")
  if tc.n_layers > cfg.n_layers:
    raise TranscoderError(f"{source}: transcoders for {tc.n_layers} layers, the model has only "
                          f"{cfg.n_layers}")
  try:
    return hooks.sites_for(cfg, tc.input_hook, tc.output_hook)
  except TranscoderError as e:
    raise TranscoderError(f"{source}: {e}") from None


def load(config: str | os.PathLike, cfg: ModelConfig | None = None,
         dtype=jnp.float32) -> Transcoders:
  """Transcoders from circuit-tracer's `config.yaml` (or the directory holding it).

  Args:
    config: the config file or its directory.
    cfg: the model's config; when given, the transcoders are checked against it (`check_model`).
    dtype: the arrays' dtype (jnp.float32, circuit-tracer's default, or jnp.bfloat16).

  Returns:
    `PerLayerTranscoders` for `model_kind: transcoder_set`, `CrossLayerTranscoder` for
    `cross_layer_transcoder`. Raises TranscoderError (one line) for anything it cannot use.
  """
  conf = read_config(config)
  kind = conf["model_kind"]
  if kind == "transcoder_set":
    tc = _load_plt(conf, dtype)
  elif kind == "cross_layer_transcoder":
    tc = load_clt_files(conf["_dir"], dtype, input_hook=conf["feature_input_hook"],
                        output_hook=conf["feature_output_hook"], scan=conf.get("scan"))
  else:
    raise TranscoderError(f"{conf['_path']}: unknown model_kind {kind!r}; known: transcoder_set, "
                          "cross_layer_transcoder")
  if cfg is not None:
    check_model(tc, cfg, conf["_path"])
  return tc


def load_gemma_scope(paths: list[str], cfg: ModelConfig | None = None, dtype=jnp.float32, *,
                     input_hook: str = "ln2.hook_normalized", output_hook: str = "hook_mlp_out",
                     scan: str | None = None) -> PerLayerTranscoders:
  """Per-layer JumpReLU transcoders from Gemma Scope's `params.npz` files, one per layer."""
  for h, known in ((input_hook, hooks.INPUT_HOOKS), (output_hook, hooks.OUTPUT_HOOKS)):
    if h not in known:
      raise TranscoderError(f"unknown hook name {h!r}; known: {', '.join(known)}")
  paths = [os.fspath(p) for p in paths]
  bad = [p for p in paths if not p.endswith(".npz")]
  if bad:
    raise TranscoderError(f"{bad[0]}: Gemma Scope's transcoders are params.npz files")
  tc = PerLayerTranscoders(**_stack([read_plt_layer(p) for p in paths], paths, dtype),
                           input_hook=input_hook, output_hook=output_hook, scan=scan).validate()
  if cfg is not None:
    check_model(tc, cfg, paths[0])
  return tc
