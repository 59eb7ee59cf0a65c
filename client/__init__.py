"""Hospital side of the federation (installed as ``tdamil.client``)."""
