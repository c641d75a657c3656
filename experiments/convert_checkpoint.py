"""Convert a HuggingFace checkpoint directory into jaxinterp's orbax format, once.

    python -m experiments.convert_checkpoint --model=/path/to/hf_dir --out=/path/to/converted

Later `models.from_pretrained(out)` (and every experiment's `--model=out`) restores the params with
orbax directly, skipping the name mapping. `--out` gets `DONE` once the conversion is complete;
converting the same model into it again is reported complete, anything else held there is refused
unless `--overwrite`.
The library calls are `models.from_pretrained` and `models.save_converted`.
"""

from __future__ import annotations

import os

from absl import app, logging

from jaxinterp import models
from jaxinterp.experiments import cli, common
from jaxinterp.runtime import files, inputs

cli.define("string", "model", None, "HF checkpoint directory (config.json + weights).")
cli.define("string", "out", None, "Output directory for the orbax conversion.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
OUTPUTS = (models.pretrained.CONVERTED_CONFIG, models.pretrained.CONVERTED_PARAMS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  model_dir, out = cli.value("model", None), cli.value("out", None)
  if not model_dir or not out:
    raise app.UsageError("--model and --out are required")
  if os.path.realpath(model_dir) == os.path.realpath(out):
    raise app.UsageError(f"--out={out} is --model's own directory; choose another")
  record = files.RunRecord("convert_checkpoint", {"model": os.path.realpath(model_dir)},
                           ("model",))
  with inputs.run_dir(out, record=record, overwrite=cli.value("overwrite", False)) as held:
    if held.complete:
      inputs.already_complete(out, record)
      return
    try:
      m = models.from_pretrained(model_dir)
    except (models.CheckpointError, models.ConfigError) as e:
      raise app.UsageError(f"--model={model_dir}: {e}") from None
    with held.writing(OUTPUTS):
      models.save_converted(m, out)
  logging.info("converted %s (%s, %d layers) to %s", model_dir, m.cfg.family, m.cfg.n_layers, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
