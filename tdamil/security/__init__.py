"""Transport security, site authentication and differential privacy for the federation.

* :mod:`tdamil.security.config`     ``tls:``, ``auth:``, ``privacy:`` YAML sections
* :mod:`tdamil.security.certs`      ``tdamil-certs``: consortium CA, server certificate, site keys, checks
* :mod:`tdamil.security.nodeauth`   register site keys with the SuperLink (loopback Control API)
* :mod:`tdamil.security.preflight`  TLS / key checks with clear advice before Flower starts
* :mod:`tdamil.security.dp`         site-level DP (Flower clipping mod + noise) and the RDP accountant
* :mod:`tdamil.security.integrity`  checkpoint sha256 against the audit log before ``--resume``
"""
