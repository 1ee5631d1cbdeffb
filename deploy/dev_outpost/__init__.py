"""Provide a development JupyterHub Outpost that starts real local jupyterhub-singleuser processes.

Run it with ``python -m jupyterhub_outpost_mq.deploy.dev_outpost --help``; the HTTP behaviour is in
:mod:`~jupyterhub_outpost_mq.deploy.dev_outpost.app`, process management in
:mod:`~jupyterhub_outpost_mq.deploy.dev_outpost.services`.
"""
