"""Kept for compatibility: circuit graphs now live in the `jaxinterp.circuits` package.

`from jaxinterp.graph import Graph`, `jaxinterp.graph.cpr` and the other public names keep working;
new code should import `jaxinterp.circuits` (or its modules `layout`, `graph`, `selection`, `io`,
`mib`).
"""

from jaxinterp.circuits import *  # noqa: F401,F403  (re-exports `jaxinterp.circuits.__all__`)
from jaxinterp.circuits import __all__  # noqa: F401
