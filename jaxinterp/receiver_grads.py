"""Compatibility alias: the receiver-gradient kernel now lives in `jaxinterp.attribution.receiver_grads`.

`import jaxinterp.receiver_grads` gives that module itself (so setting its attributes, as tests do
with `SCAN_MAX_FRACTION`, takes effect).
"""

import sys

from jaxinterp.attribution import receiver_grads as _receiver_grads

sys.modules[__name__] = _receiver_grads
