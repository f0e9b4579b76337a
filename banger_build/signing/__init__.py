"""Signatures of store paths: keys, statements, DSSE envelopes, verification.

    keys.py       Ed25519 keys in Nix's ``NAME:BASE64`` format; key files
    statement.py  the in-toto Statement v1 a signature signs (``statement_for``)
    dsse.py       DSSE envelopes: PAE, ``sign``, ``verify``
    attach.py     ``sign_and_attach``: sign a pushed store path, attach it as a referrer
    content.py    re-hash a store path's files, read a bundle strictly
    verify.py     ``verify_store_path``, ``verify_reference``: findings and Nix's exit bits

Where signatures live in a registry is ``banger_build.oci.referrers``.
"""
