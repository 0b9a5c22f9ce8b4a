"""Evidence formats, canonical encodings and the client-side verifiers.

Importable without any server dependency: clients install this package, its own distribution
(`appliance-attestation`: attestation/pyproject.toml, attestation/README.md), to verify what an
appliance says. It needs cryptography, http-message-signatures, http-sf and cbor2; the verifying
openai client (`attestation.client`) also openai 3.x and httpx2, the `[openai]` extra.
"""
