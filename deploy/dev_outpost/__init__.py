"""Provide a development JupyterHub Outpost that starts real local jupyterhub-singleuser processes.

Run it with ``python -m deploy.dev_outpost --help``; the HTTP behaviour is in
:mod:`deploy.dev_outpost.app`, process management in :mod:`deploy.dev_outpost.services`.
"""
