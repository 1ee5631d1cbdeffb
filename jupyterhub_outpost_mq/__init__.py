"""jupyterhub-outpost-mq: a JupyterHub spawner that drives JupyterHub Outposts through RabbitMQ,
and the bridge service that carries its commands out.

The one import package of the distribution. Its parts keep their folders at the top of the
repository (``spawner/``, ``bridge/``, ``schemas/``) and are installed as subpackages of this
one (``pyproject.toml`` maps them), so nothing generic such as ``schemas`` or ``deploy`` lands
in a virtualenv's top level. In a source checkout the links beside this file make the same
names importable without an install; ``deploy`` (the development Outpost, the stack launcher,
the reference generator) exists only there, never in a wheel.

- :mod:`jupyterhub_outpost_mq.spawner`: the hub side (extra ``[hub]``).
- :mod:`jupyterhub_outpost_mq.bridge`: the bridge service (extra ``[bridge]``).
- :mod:`jupyterhub_outpost_mq.schemas`: the wire contract both share.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jupyterhub-outpost-mq")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
