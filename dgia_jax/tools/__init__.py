"""The command-line programs besides the main job (`dgia_jax.main`): `python -m dgia_jax.tools.<name>`.

Each is thin: flags, then one call into a library module. None is imported by the libraries.
"""
