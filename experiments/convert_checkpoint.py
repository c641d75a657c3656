"""Convert a HuggingFace checkpoint directory into jaxinterp's orbax format, once.

    python -m experiments.convert_checkpoint --model=/path/to/hf_dir --out=/path/to/converted

Later `models.from_pretrained(out)` (and every experiment's `--model=out`) restores the params with
orbax directly, skipping the name mapping. `--out` gets `DONE` once the conversion is complete.
"""

import os

from absl import app, flags, logging

from jaxinterp import models
from jaxinterp.experiments import cli, common

FLAGS = flags.DEFINE_string("model", None, "HF checkpoint directory (config.json + weights).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the orbax conversion.")
OUTPUTS = (models.pretrained.CONVERTED_CONFIG, models.pretrained.CONVERTED_PARAMS)


def convert(model_dir: str, out: str) -> models.Model:
  """Load `model_dir` and write its orbax conversion to `out`."""
  m = models.from_pretrained(model_dir)
  models.save_converted(m, out)
  return m


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.value or not _OUT.value:
    raise app.UsageError("--model and --out are required")
  if os.path.realpath(FLAGS.value) == os.path.realpath(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} is --model's own directory; choose another")
  with common.run_dir(_OUT.value) as held:
    try:
      m = models.from_pretrained(FLAGS.value)
    except (models.CheckpointError, models.ConfigError) as e:
      raise app.UsageError(f"--model={FLAGS.value}: {e}") from None
    with held.writing(OUTPUTS):
      models.save_converted(m, _OUT.value)
  logging.info("converted %s (%s, %d layers) to %s", FLAGS.value, m.cfg.family, m.cfg.n_layers,
               _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
