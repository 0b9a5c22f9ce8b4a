import hashlib
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from appliance.settings import ConfigError, load_settings
from appliance.trust.tls import make_attested_tls


def test_key_and_certificate_live_in_memory_and_match_the_claimed_digest(tmp_path):
    tls = make_attested_tls("10.0.0.5")
    assert tls.certfile.startswith("/proc/self/fd/") and tls.keyfile.startswith("/proc/self/fd/")
    assert "memfd:" in os.readlink(tls.keyfile)  # anonymous memory, no file on any disk
    cert = x509.load_pem_x509_certificate(open(tls.certfile, "rb").read())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).hexdigest() == tls.spki_sha256
    key = load_pem_private_key(open(tls.keyfile, "rb").read(), None)
    assert key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == spki
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.certfile, tls.keyfile)  # what gunicorn does with them
    assert "spki" not in repr(tls).lower().replace("spki_sha256", "") and "/proc" not in repr(tls)


def test_tls_setting_is_validated(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[server]\ntls = "yes"\n')
    try:
        load_settings(p)
    except ConfigError as e:
        assert str(e).startswith("server.tls")
    else:
        raise AssertionError("tls = 'yes' accepted")
