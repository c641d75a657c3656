"""What runs around the science: files written atomically and run directories (`files`), phase and
compile timing (`timing`), JAX's persistent compilation cache (`compilation_cache`), device meshes
(`sharding`) and the clean/corrupted shared prompt prefix (`shared_prefix`).

Import the module you need (`from jaxinterp.runtime import files`); this package imports none of
them, so that each stays importable from below the packages that use it.
"""
