"""Evidence formats, canonical encodings and the client-side verifiers.

Importable without any server dependency: clients install this package (cryptography and
http-message-signatures) to verify what an appliance says.
"""
