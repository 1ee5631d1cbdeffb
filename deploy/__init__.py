"""Deployment helpers: development services used by end-to-end tests and the local demo stack."""
