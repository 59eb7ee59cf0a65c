"""``tdamil-certs``: consortium certificates and site keys, built on ``cryptography``.

The federation uses one private certificate authority (CA) run by the coordinator:

* ``tdamil-certs init`` creates the CA and the coordinator's TLS server certificate. Its subject
  alternative names (SAN) list every DNS name and IP address sites dial, and always ``localhost``
  and ``127.0.0.1`` (local runs, the loopback Control API, the reverse proxy's upstream).
* ``tdamil-certs issue --site site_a`` creates what one hospital needs: the CA certificate to trust
  and the site's ECDSA P-384 key pair for SuperNode authentication, in OpenSSH format (the format
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` expects).
  The public key is also copied into ``<pki>/site_keys/<site>.pub``, the folder the coordinator's
  ``auth.site_public_keys`` points at. Better still, a hospital runs ``issue --ca ca.pem`` on its own
  machine so the private key never leaves the site, and sends only ``<site>.pub``.
* ``tdamil-certs check`` verifies a certificate against the CA, its validity dates, the host name or
  IP it must cover and the private key it must match, and says what to do when something is wrong.

Layout written by ``init`` / ``issue`` (paths as in :class:`tdamil.security.config.TLSConfig`)::

    certs/ca.pem  certs/ca.key                      consortium CA (keep ca.key offline)
    certs/server.pem  certs/server.key              coordinator:  tls.cert, tls.key, tls.ca_cert=ca.pem
    certs/site_keys/site_a.pub                    coordinator:  auth.site_public_keys=certs/site_keys
    certs/sites/site_a/ca.pem                     site:         tls.ca_cert
    certs/sites/site_a/site_a.key  site_a.pub     site:         auth.private_key (and the public half)

Private keys are written with mode 0600 and never overwritten unless ``--force`` is given.
The work is done in :mod:`tdamil.security.pki` (issuing) and :mod:`tdamil.security.certcheck`
(checking, with cryptography's path validation); this module is the command line and the one
import point for both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from tdamil.logs import setup_logging
from tdamil.security.certcheck import (
    CertReport,
    CertsError,
    check_certificate,
    check_site_key,
    load_site_public_key,
    public_key_fingerprint,
)
from tdamil.security.pki import PkiPaths, SiteBundle, init_pki, issue_site

__all__ = [
    "CertsError",
    "PkiPaths",
    "SiteBundle",
    "CertReport",
    "init_pki",
    "issue_site",
    "check_certificate",
    "check_site_key",
    "load_site_public_key",
    "public_key_fingerprint",
    "main",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdamil-certs",
        description="Consortium CA, coordinator TLS certificate and site keys for tdamil-fl.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("init", help="create the consortium CA and the coordinator's server certificate")
    pi.add_argument("--out", required=True, type=Path,
                    help="folder to write (e.g. certs/); site public keys go to <out>/site_keys/")
    pi.add_argument("--server-name", action="append", default=[], required=True,
                    help="DNS name sites dial (repeat for several); localhost is always added")
    pi.add_argument("--ip", action="append", default=[], help="IP address sites dial (repeatable); 127.0.0.1 is always added")
    pi.add_argument("--org", default="tdamil-fl consortium", help="organisation name in the certificates")
    pi.add_argument("--ca-days", type=int, default=3650, help="CA validity in days (default 3650)")
    pi.add_argument("--server-days", type=int, default=397, help="server certificate validity in days (default 397)")
    pi.add_argument("--force", action="store_true", help="replace existing files (invalidates what sites hold)")

    ps = sub.add_parser("issue", help="create a site's key pair and copy the CA certificate it trusts")
    ps.add_argument("--site", required=True, help="site name, e.g. site_a")
    ps.add_argument("--pki", type=Path, default=None,
                    help="the folder made by 'init' (default: pki if it exists); the public key is also copied to "
                         "<pki>/site_keys/<site>.pub, the folder auth.site_public_keys names")
    ps.add_argument("--ca", type=Path, default=None, help="the consortium ca.pem (at a hospital, without the PKI folder)")
    ps.add_argument("--out", type=Path, default=None, help="where the site's files go (default <pki>/sites/<site>)")
    ps.add_argument("--force", action="store_true", help="replace an existing key (it must then be registered again)")

    pc = sub.add_parser("check", help="verify a certificate (chain, expiry, host coverage, key) or a site key")
    pc.add_argument("--cert", type=Path, help="certificate to check (e.g. pki/server.pem)")
    pc.add_argument("--ca", type=Path, help="CA certificate that must have signed it")
    pc.add_argument("--host", action="append", default=[], help="name or IP the certificate must cover (repeatable)")
    pc.add_argument("--key", type=Path, help="private key that must match --cert")
    pc.add_argument("--site-key", type=Path, help="a site's private key to check (OpenSSH ECDSA, mode 0600)")
    pc.add_argument("--site-pub", type=Path, help="the registered public key --site-key must match")
    pc.add_argument("--warn-days", type=int, default=30, help="warn when fewer days are left (default 30)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tdamil-certs``; returns the exit status (0 ok, 1 a check failed, 2 usage)."""
    setup_logging()
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            paths = init_pki(
                args.out, args.server_name, args.ip, organisation=args.org,
                ca_days=args.ca_days, server_days=args.server_days, force=args.force,
            )
            print(f"CA certificate:      {paths.ca_cert}   (give to every site)")
            print(f"CA key:              {paths.ca_key}   (keep offline)")
            print(f"server certificate:  {paths.server_cert}")
            print(f"server key:          {paths.server_key}")
            print(f"site keys folder:    {paths.site_keys}   (auth.site_public_keys)")
        elif args.command == "issue":
            pki = args.pki
            if pki is None and args.ca is None and Path("pki/ca.pem").is_file():
                pki = Path("pki")
            b = issue_site(args.site, pki=pki, ca_cert=args.ca, out=args.out, force=args.force)
            print(f"site {b.site}: folder {b.folder}")
            print(f"  tls.ca_cert:      {b.ca_cert}")
            print(f"  auth.private_key: {b.private_key}   (stays on site, mode 0600)")
            print(f"  public key:       {b.public_key}   fingerprint {public_key_fingerprint(b.public_key)}")
            if b.registered_copy:
                print(f"  copied to:        {b.registered_copy}   (register with the SuperLink)")
        else:
            if not args.cert and not args.site_key:
                print("tdamil-certs check: give --cert (with --ca) and/or --site-key.", file=sys.stderr)
                return 2
            if args.cert:
                if not args.ca:
                    print("tdamil-certs check: --cert needs --ca (the consortium ca.pem).", file=sys.stderr)
                    return 2
                report = None
                for host in args.host or [None]:
                    report = check_certificate(args.cert, args.ca, host=host, key=args.key, warn_days=args.warn_days)
                assert report is not None
                print(f"OK: {args.cert} is signed by {args.ca}, valid, "
                      + (f"covers {', '.join(args.host)}" if args.host else "no host checked")
                      + (f", matches {args.key}" if args.key else ""))
                print(report.summary())
            if args.site_key:
                fp = check_site_key(args.site_key, args.site_pub)
                print(f"OK: site key {args.site_key} ({fp})" + (f" matches {args.site_pub}" if args.site_pub else ""))
    except CertsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console script wrapper (``tdamil-certs``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
