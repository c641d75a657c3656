"""Writing transcoders in circuit-tracer's formats, so that circuit-tracer (and `loading.load`)
read them back.

A transcoder set becomes `config.yaml` plus `layer_{i}.safetensors` (the layout of circuit-tracer's
own cache; `transcoders:` lists the files relative to the config, which `loading.load` resolves
against the config's directory; circuit-tracer's `load_transcoders(config)` resolves them against
its working directory, and `load_transcoder_set({i: path})` takes any paths). A cross-layer
transcoder becomes `config.yaml` plus `W_enc_{i}.safetensors` and `W_dec_{i}.safetensors`.
"""

from __future__ import annotations

import os

import numpy as np
import yaml

from jaxinterp.transcoders import safetensors_file
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.plt import PerLayerTranscoders


def _config(tc, kind: str, model_name: str | None, files: list[str] | None) -> dict:
  conf = {"model_kind": kind, "feature_input_hook": tc.input_hook,
          "feature_output_hook": tc.output_hook}
  if model_name is not None:
    conf["model_name"] = model_name
  if tc.scan is not None:
    conf["scan"] = tc.scan
  if files is not None:
    conf["transcoders"] = files
  return conf


def _write_config(directory: str, conf: dict) -> str:
  path = os.path.join(directory, "config.yaml")
  with open(path, "w") as fh:
    yaml.safe_dump(conf, fh, sort_keys=False)
  return path


def save_transcoder_set(tc: PerLayerTranscoders, directory: str | os.PathLike,
                        model_name: str | None = None) -> str:
  """Write per-layer transcoders as circuit-tracer's transcoder set; return the config's path.

  Arrays keep their dtype (float32 or bfloat16). `model_name` is recorded as circuit-tracer's
  `model_name` key when given.
  """
  tc.validate()
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  files = []
  for layer in range(tc.n_layers):
    t = {"W_enc": np.asarray(tc.W_enc[layer]).T, "W_dec": np.asarray(tc.W_dec[layer]),
         "b_enc": np.asarray(tc.b_enc[layer]), "b_dec": np.asarray(tc.b_dec[layer])}
    if tc.threshold is not None:
      t["activation_function.threshold"] = np.asarray(tc.threshold[layer])
    if tc.W_skip is not None:
      t["W_skip"] = np.asarray(tc.W_skip[layer]).T
    name = f"layer_{layer}.safetensors"
    safetensors_file.write(os.path.join(directory, name), t)
    files.append(name)
  return _write_config(directory, _config(tc, "transcoder_set", model_name, files))


def save_clt(clt: CrossLayerTranscoder, directory: str | os.PathLike,
             model_name: str | None = None) -> str:
  """Write a cross-layer transcoder in circuit-tracer's files; return the config's path.

  circuit-tracer's CLT files have no skip connection, so one with `W_skip` is refused.
  """
  clt.validate()
  if clt.W_skip is not None:
    raise TranscoderError("circuit-tracer's cross-layer transcoder files hold no skip connection")
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  for i in range(clt.n_layers):
    enc = {f"W_enc_{i}": np.asarray(clt.W_enc[i]).T, f"b_enc_{i}": np.asarray(clt.b_enc[i]),
           f"b_dec_{i}": np.asarray(clt.b_dec[i])}
    if clt.threshold is not None:
      enc[f"threshold_{i}"] = np.asarray(clt.threshold[i])
    safetensors_file.write(os.path.join(directory, f"W_enc_{i}.safetensors"), enc)
    safetensors_file.write(os.path.join(directory, f"W_dec_{i}.safetensors"),
                           {f"W_dec_{i}": np.asarray(clt.W_dec[i])})
  return _write_config(directory, _config(clt, "cross_layer_transcoder", model_name, None))
