"""Training configurations, one module per benchmark (`get_config(method)`), shipped with the
package: `--config gta2cs.py:daformer` reads the installed file where no `gta2cs.py` is in the
working directory (`pgpc_jax.cli.resolve_config`)."""
