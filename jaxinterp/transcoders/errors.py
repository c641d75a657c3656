"""The one error type of the transcoders package."""

from __future__ import annotations


class TranscoderError(ValueError):
  """Transcoders, their files or a graph that cannot be used as given.

  The message is one line that names the file or value and what is wrong with it, so that a binary
  can print it as is (as `models.ConfigError` and `runtime.inputs.InputError` are printed).
  """
