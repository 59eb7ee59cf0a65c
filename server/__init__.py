"""Coordinator side of the federation (installed as ``tdamil.server``)."""
