"""OCI images and registries: the one image source of a build.

    reference  Reference, Digest, Platform: validated value types
    manifest   media types, descriptors, manifest/index/config parsing, size limits
    kernel     kernel artifacts: the manifest ``kernel push`` writes, its parsing
    blobs      BlobCache: verified blobs by digest, temp roots for gc
    options    RegistryOptions: mirrors, insecure hosts, timeouts, retries, low speed
    auth       credentials from the Docker config, challenges, per-scope tokens
    failure    Failure: the one internal failure type, translated at the boundary
    wire       bounded HTTP: retries budget, low-speed meter, headers deadline, failures
    transport  Endpoint: one base URL, every request through one retry loop
    remote     Remote: a registry and its mirrors; manifests, blobs, push
    source     Source: manifest, config, blob -- cache first, the remote on need

Importing this package imports nothing; only ``wire``, ``transport`` and
``remote`` import oras, requests and urllib3, and ``source`` imports
``remote`` only when the cache cannot answer.
"""
