"""The trust layer: the appliance's identity, response signing, request authentication, limits."""
