"""The pinned vendor root certificates, and the extra roots a policy may add (tests, private PKIs).

One store for every vendor the verifiers know: "intel" (TDX and SGX quotes: the Intel SGX Root CA),
"amd" (SEV-SNP: the ARKs) and "aws" (Nitro: the Nitro Enclaves root). A root is trusted by the
SHA-256 fingerprint of its DER encoding, nothing else: a chain that does not end at one of these
exact certificates fails, whatever its subject says.

Each root is kept twice: its PEM text (`ROOT_PEMS[vendor][name]`) and the SHA-256 of its DER
(`ROOT_SHA256[vendor][name]`). `pinned_roots(vendor)` parses the PEMs and raises if one does not hash
to its pinned fingerprint, so an edit to a PEM text cannot silently change which root is trusted
(tests/unit/test_tdx_sgx.py and test_snp.py check them all).

`policy.roots[vendor]` may name extra root certificates: a PEM path, or a list of PEM paths (each
file may hold several certificates). They are for test chains and private deployments only.
`trusted_roots(vendor, policy)` is what a verifier trusts: the pinned roots, then the policy's.

Provenance
----------
AMD ARKs (AMD Root Keys, self-signed RSA-4096, RSASSA-PSS/SHA-384; one per product line; the
Siena parts chain to ARK-Genoa). Published by AMD's Key Distribution Service at
https://kdsintf.amd.com/vcek/v1/{Milan,Genoa,Turin}/cert_chain (the second certificate of each).
Copied from public verifiers that embed them:
  - ARK-Milan: edgelesssys/constellation (internal/attestation/azure, `arkPEM`, "Received from the
    AMD Key Distribution System API (KDS)") and veehaitch/routex-client-lua
    (routex-client/attestation/vcek.lua).
  - ARK-Genoa: google/go-sev-guest verify/trust/ask_ark_genoa_vlek.pem (second certificate) and
    veehaitch/routex-client-lua.
  - ARK-Turin: google/go-sev-guest verify/trust/ask_ark_turin_vlek.pem (second certificate) and
    veehaitch/routex-client-lua.
  The VLEK and VCEK chains of a product share its ARK (same certificate, serial 0x{01,02,03}0000).
  Each ARK's self-signature verifies (checked in tests/unit/test_snp.py), which also rules out a
  transcription error; each DER fingerprint below equals the one pinned by several unrelated
  public verifiers that fetched the ARKs from the KDS themselves; and a genuine Google Cloud Milan
  report (tests/fixtures/tee/amd.py) verifies VCEK <- SEV-Milan ASK <- the pinned ARK-Milan.

AWS Nitro Enclaves Root G1 (self-signed ECDSA P-384, CN=aws.nitro-enclaves, valid 2019-10-28 to
2049-10-28), from https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip (root.pem),
as documented at https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html; identical in the
many public verifiers that embed it. NOTE: the value AWS publishes,
8cf60e2b2efca96c6a9e71e851d00c1b6991cc09eadbe64a6a1d1b1eb9faff7c, is the SHA-256 of that ZIP
archive, not of the certificate. The SHA-256 of the root certificate's DER is
641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b (computed here from the PEM and
matching what other verifiers pin); that is what is pinned below. Two genuine NSM documents
(tests/fixtures/tee/nitro.py) carry this exact certificate as cabundle[0] and verify against it.

Intel SGX Root CA (CN=Intel SGX Root CA, O=Intel Corporation, L=Santa Clara, ST=CA, C=US; valid
2018-05-21 10:45:10 to 2049-12-31 23:59:59 UTC; ECDSA P-256, self-signed). It anchors every PCK
certificate chain of SGX and TDX DCAP quotes. Copied from google/go-tdx-guest
verify/trusted_root.pem (commit 94908f59660eaacb11d2a746474fc73b10458327); the same bytes ship in
edgelesssys/go-tdx-qpl (verification/pcs) and Phala-Network/dcap-qvl sample quotes, and Intel
publishes the DER at https://certificates.trustedservices.intel.com/IntelSGXRootCA.der.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

if TYPE_CHECKING:
    from .policy import Policy

__all__ = [
    "AMD_ARK_PEMS",
    "AMD_ARK_SHA256",
    "AWS_NITRO_ROOT_G1_ZIP_SHA256",
    "AWS_NITRO_ROOT_PEMS",
    "AWS_NITRO_ROOT_SHA256",
    "INTEL_SGX_ROOT_CA_PEM",
    "INTEL_SGX_ROOT_CA_SHA256",
    "ROOT_PEMS",
    "ROOT_SHA256",
    "Root",
    "RootsError",
    "extra_roots",
    "fingerprint",
    "is_pinned",
    "pinned_roots",
    "trusted_roots",
]


class RootsError(ValueError):
    """An extra root named by the policy cannot be read or parsed."""


class Root(NamedTuple):
    """A trusted root certificate and what to call it (unpacks as `name, cert`)."""

    name: str
    cert: x509.Certificate

    @property
    def sha256(self) -> str:
        return fingerprint(self.cert)


# The PEM texts (provenance in the module docstring); their pins are in ROOT_SHA256 below.
INTEL_SGX_ROOT_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

AMD_ARK_MILAN_PEM = """-----BEGIN CERTIFICATE-----
MIIGYzCCBBKgAwIBAgIDAQAAMEYGCSqGSIb3DQEBCjA5oA8wDQYJYIZIAWUDBAIC
BQChHDAaBgkqhkiG9w0BAQgwDQYJYIZIAWUDBAICBQCiAwIBMKMDAgEBMHsxFDAS
BgNVBAsMC0VuZ2luZWVyaW5nMQswCQYDVQQGEwJVUzEUMBIGA1UEBwwLU2FudGEg
Q2xhcmExCzAJBgNVBAgMAkNBMR8wHQYDVQQKDBZBZHZhbmNlZCBNaWNybyBEZXZp
Y2VzMRIwEAYDVQQDDAlBUkstTWlsYW4wHhcNMjAxMDIyMTcyMzA1WhcNNDUxMDIy
MTcyMzA1WjB7MRQwEgYDVQQLDAtFbmdpbmVlcmluZzELMAkGA1UEBhMCVVMxFDAS
BgNVBAcMC1NhbnRhIENsYXJhMQswCQYDVQQIDAJDQTEfMB0GA1UECgwWQWR2YW5j
ZWQgTWljcm8gRGV2aWNlczESMBAGA1UEAwwJQVJLLU1pbGFuMIICIjANBgkqhkiG
9w0BAQEFAAOCAg8AMIICCgKCAgEA0Ld52RJOdeiJlqK2JdsVmD7FktuotWwX1fNg
W41XY9Xz1HEhSUmhLz9Cu9DHRlvgJSNxbeYYsnJfvyjx1MfU0V5tkKiU1EesNFta
1kTA0szNisdYc9isqk7mXT5+KfGRbfc4V/9zRIcE8jlHN61S1ju8X93+6dxDUrG2
SzxqJ4BhqyYmUDruPXJSX4vUc01P7j98MpqOS95rORdGHeI52Naz5m2B+O+vjsC0
60d37jY9LFeuOP4Meri8qgfi2S5kKqg/aF6aPtuAZQVR7u3KFYXP59XmJgtcog05
gmI0T/OitLhuzVvpZcLph0odh/1IPXqx3+MnjD97A7fXpqGd/y8KxX7jksTEzAOg
bKAeam3lm+3yKIcTYMlsRMXPcjNbIvmsBykD//xSniusuHBkgnlENEWx1UcbQQrs
+gVDkuVPhsnzIRNgYvM48Y+7LGiJYnrmE8xcrexekBxrva2V9TJQqnN3Q53kt5vi
Qi3+gCfmkwC0F0tirIZbLkXPrPwzZ0M9eNxhIySb2npJfgnqz55I0u33wh4r0ZNQ
eTGfw03MBUtyuzGesGkcw+loqMaq1qR4tjGbPYxCvpCq7+OgpCCoMNit2uLo9M18
fHz10lOMT8nWAUvRZFzteXCm+7PHdYPlmQwUw3LvenJ/ILXoQPHfbkH0CyPfhl1j
WhJFZasCAwEAAaN+MHwwDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBSFrBrRQ/fI
rFXUxR1BSKvVeErUUzAPBgNVHRMBAf8EBTADAQH/MDoGA1UdHwQzMDEwL6AtoCuG
KWh0dHBzOi8va2RzaW50Zi5hbWQuY29tL3ZjZWsvdjEvTWlsYW4vY3JsMEYGCSqG
SIb3DQEBCjA5oA8wDQYJYIZIAWUDBAICBQChHDAaBgkqhkiG9w0BAQgwDQYJYIZI
AWUDBAICBQCiAwIBMKMDAgEBA4ICAQC6m0kDp6zv4Ojfgy+zleehsx6ol0ocgVel
ETobpx+EuCsqVFRPK1jZ1sp/lyd9+0fQ0r66n7kagRk4Ca39g66WGTJMeJdqYriw
STjjDCKVPSesWXYPVAyDhmP5n2v+BYipZWhpvqpaiO+EGK5IBP+578QeW/sSokrK
dHaLAxG2LhZxj9aF73fqC7OAJZ5aPonw4RE299FVarh1Tx2eT3wSgkDgutCTB1Yq
zT5DuwvAe+co2CIVIzMDamYuSFjPN0BCgojl7V+bTou7dMsqIu/TW/rPCX9/EUcp
KGKqPQ3P+N9r1hjEFY1plBg93t53OOo49GNI+V1zvXPLI6xIFVsh+mto2RtgEX/e
pmMKTNN6psW88qg7c1hTWtN6MbRuQ0vm+O+/2tKBF2h8THb94OvvHHoFDpbCELlq
HnIYhxy0YKXGyaW1NjfULxrrmxVW4wcn5E8GddmvNa6yYm8scJagEi13mhGu4Jqh
3QU3sf8iUSUr09xQDwHtOQUVIqx4maBZPBtSMf+qUDtjXSSq8lfWcd8bLr9mdsUn
JZJ0+tuPMKmBnSH860llKk+VpVQsgqbzDIvOLvD6W1Umq25boxCYJ+TuBoa4s+HH
CViAvgT9kf/rBq1d+ivj6skkHxuzcxbk1xv6ZGxrteJxVH7KlX7YRdZ6eARKwLe4
AFZEAwoKCQ==
-----END CERTIFICATE-----
"""

AMD_ARK_GENOA_PEM = """-----BEGIN CERTIFICATE-----
MIIGYzCCBBKgAwIBAgIDAgAAMEYGCSqGSIb3DQEBCjA5oA8wDQYJYIZIAWUDBAIC
BQChHDAaBgkqhkiG9w0BAQgwDQYJYIZIAWUDBAICBQCiAwIBMKMDAgEBMHsxFDAS
BgNVBAsMC0VuZ2luZWVyaW5nMQswCQYDVQQGEwJVUzEUMBIGA1UEBwwLU2FudGEg
Q2xhcmExCzAJBgNVBAgMAkNBMR8wHQYDVQQKDBZBZHZhbmNlZCBNaWNybyBEZXZp
Y2VzMRIwEAYDVQQDDAlBUkstR2Vub2EwHhcNMjIwMTI2MTUzNDM3WhcNNDcwMTI2
MTUzNDM3WjB7MRQwEgYDVQQLDAtFbmdpbmVlcmluZzELMAkGA1UEBhMCVVMxFDAS
BgNVBAcMC1NhbnRhIENsYXJhMQswCQYDVQQIDAJDQTEfMB0GA1UECgwWQWR2YW5j
ZWQgTWljcm8gRGV2aWNlczESMBAGA1UEAwwJQVJLLUdlbm9hMIICIjANBgkqhkiG
9w0BAQEFAAOCAg8AMIICCgKCAgEA3Cd95S/uFOuRIskW9vz9VDBF69NDQF79oRhL
/L2PVQGhK3YdfEBgpF/JiwWFBsT/fXDhzA01p3LkcT/7LdjcRfKXjHl+0Qq/M4dZ
kh6QDoUeKzNBLDcBKDDGWo3v35NyrxbA1DnkYwUKU5AAk4P94tKXLp80oxt84ahy
HoLmc/LqsGsp+oq1Bz4PPsYLwTG4iMKVaaT90/oZ4I8oibSru92vJhlqWO27d/Rx
c3iUMyhNeGToOvgx/iUo4gGpG61NDpkEUvIzuKcaMx8IdTpWg2DF6SwF0IgVMffn
vtJmA68BwJNWo1E4PLJdaPfBifcJpuBFwNVQIPQEVX3aP89HJSp8YbY9lySS6PlV
EqTBBtaQmi4ATGmMR+n2K/e+JAhU2Gj7jIpJhOkdH9firQDnmlA2SFfJ/Cc0mGNz
W9RmIhyOUnNFoclmkRhl3/AQU5Ys9Qsan1jT/EiyT+pCpmnA+y9edvhDCbOG8F2o
xHGRdTBkylungrkXJGYiwGrR8kaiqv7NN8QhOBMqYjcbrkEr0f8QMKklIS5ruOfq
lLMCBw8JLB3LkjpWgtD7OpxkzSsohN47Uom86RY6lp72g8eXHP1qYrnvhzaG1S70
vw6OkbaaC9EjiH/uHgAJQGxon7u0Q7xgoREWA/e7JcBQwLg80Hq/sbRuqesxz7wB
WSY254cCAwEAAaN+MHwwDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBSfXfn+Ddjz
WtAzGiXvgSlPvjGoWzAPBgNVHRMBAf8EBTADAQH/MDoGA1UdHwQzMDEwL6AtoCuG
KWh0dHBzOi8va2RzaW50Zi5hbWQuY29tL3ZjZWsvdjEvR2Vub2EvY3JsMEYGCSqG
SIb3DQEBCjA5oA8wDQYJYIZIAWUDBAICBQChHDAaBgkqhkiG9w0BAQgwDQYJYIZI
AWUDBAICBQCiAwIBMKMDAgEBA4ICAQAdIlPBC7DQmvH7kjlOznFx3i21SzOPDs5L
7SgFjMC9rR07292GQCA7Z7Ulq97JQaWeD2ofGGse5swj4OQfKfVv/zaJUFjvosZO
nfZ63epu8MjWgBSXJg5QE/Al0zRsZsp53DBTdA+Uv/s33fexdenT1mpKYzhIg/cK
tz4oMxq8JKWJ8Po1CXLzKcfrTphjlbkh8AVKMXeBd2SpM33B1YP4g1BOdk013kqb
7bRHZ1iB2JHG5cMKKbwRCSAAGHLTzASgDcXr9Fp7Z3liDhGu/ci1opGmkp12QNiJ
uBbkTU+xDZHm5X8Jm99BX7NEpzlOwIVR8ClgBDyuBkBC2ljtr3ZSaUIYj2xuyWN9
5KFY49nWxcz90CFa3Hzmy4zMQmBe9dVyls5eL5p9bkXcgRMDTbgmVZiAf4afe8DL
dmQcYcMFQbHhgVzMiyZHGJgcCrQmA7MkTwEIds1wx/HzMcwU4qqNBAoZV7oeIIPx
dqFXfPqHqiRlEbRDfX1TG5NFVaeByX0GyH6jzYVuezETzruaky6fp2bl2bczxPE8
HdS38ijiJmm9vl50RGUeOAXjSuInGR4bsRufeGPB9peTa9BcBOeTWzstqTUB/F/q
aZCIZKr4X6TyfUuSDz/1JDAGl+lxdM0P9+lLaP9NahQjHCVf0zf1c1salVuGFk2w
/wMz1R1BHg==
-----END CERTIFICATE-----
"""

AMD_ARK_TURIN_PEM = """-----BEGIN CERTIFICATE-----
MIIGYzCCBBKgAwIBAgIDAwAAMEYGCSqGSIb3DQEBCjA5oA8wDQYJYIZIAWUDBAIC
BQChHDAaBgkqhkiG9w0BAQgwDQYJYIZIAWUDBAICBQCiAwIBMKMDAgEBMHsxFDAS
BgNVBAsMC0VuZ2luZWVyaW5nMQswCQYDVQQGEwJVUzEUMBIGA1UEBwwLU2FudGEg
Q2xhcmExCzAJBgNVBAgMAkNBMR8wHQYDVQQKDBZBZHZhbmNlZCBNaWNybyBEZXZp
Y2VzMRIwEAYDVQQDDAlBUkstVHVyaW4wHhcNMjMwNTE1MjAwMzEyWhcNNDgwNTE1
MjAwMzEyWjB7MRQwEgYDVQQLDAtFbmdpbmVlcmluZzELMAkGA1UEBhMCVVMxFDAS
BgNVBAcMC1NhbnRhIENsYXJhMQswCQYDVQQIDAJDQTEfMB0GA1UECgwWQWR2YW5j
ZWQgTWljcm8gRGV2aWNlczESMBAGA1UEAwwJQVJLLVR1cmluMIICIjANBgkqhkiG
9w0BAQEFAAOCAg8AMIICCgKCAgEAwaAriB7EIuVc4ZB1wD3YfDxL+9eyS7+izm0J
j3W772NINCWl8Bj3w/JD2ZjmbRxWdIq/4d9iarCKorXloJUB1jRdgxqccTx1aOoi
g4+2w1XhVVJT7K457wT5ZLNJgQaxqa9Etkwjd6+9sOhlCDE9l43kQ0R2BikVJa/u
yyVOSwEk5w5tXKOuG9jvq6QtAMJasW38wlqRDaKEGtZ9VUgGon27ZuL4sTJuC/az
z9/iQBw8kEilzOl95AiTkeY5jSEBDWbAqnZk5qlM7kISKG20kgQm14mhNKDI2p2o
ua+zuAG7i52epoRF2GfU0TYk/yf+vCNB2tnechFQuP2e8bLk95ZdqPi9/UWw4JXj
tdEA4u2JYplSSUPQVAXKt6LVqujtJcM59JKr2u0XQ75KwxcMp15gSXhBfInvPAwu
AY4dEwwGqT8oIg4esPHwEsmChhYeDIxPG9R4fx9O0q6p8Gb+HXlTiS47P9YNeOpi
dOUKzDl/S1OvyhDtSL8LJc24QATFydo/iD/KUdvFTRlD0crkAMkZLoWQ8hLDGc6B
ZJXsdd7Zf2e4UW3tI/1oh/2t23Ot3zyhTcv5gDbABu0LjVe98uRnS15SMwK//lJt
9e5BqKvgABkSoABf+B4VFtPVEX0ygrYaFaI9i5ABrxnVBmzXpRb21iI1NlNCfOGU
PIhVpWECAwEAAaN+MHwwDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBRkoF9x4wwK
ZNg7deUBWZ4r7gYDRDAPBgNVHRMBAf8EBTADAQH/MDoGA1UdHwQzMDEwL6AtoCuG
KWh0dHBzOi8va2RzaW50Zi5hbWQuY29tL3ZjZWsvdjEvVHVyaW4vY3JsMEYGCSqG
SIb3DQEBCjA5oA8wDQYJYIZIAWUDBAICBQChHDAaBgkqhkiG9w0BAQgwDQYJYIZI
AWUDBAICBQCiAwIBMKMDAgEBA4ICAQA/i6Mz4IETMK8YU/HxP7Bfej5i4aXhenJo
TuiDX0nqx5CDJm9ELhskxAkJ/oLA1O92UoLybfFk4gEpKFtyfiUYex9LogZj5ix0
sb2qfSSy9CRnOktGqfpel4e3KAhLgF5n2qZrqyq/8EPPldtSjEXn78sZMlIlUcQK
SnnNCQZVFpktDfDiEiGNuitux3ghHUrcVuxSbZcrXDbsbMF7NDdfLUUS9TijrL33
lrCXJs7m8kggGyCusiRQKHli1AEswiA4xU+8xsZrByYTopiGYtbJK8s0UCCXylyO
uKSubvdAnMDJ5GDD0+DX46LSfv7fgGNSG+LOBWdif7KoQf9cIhKJtxGxZCn/tvHm
wMzu4Jnx8N2vRnT+8DpBqhxtNvdXmrZUelSeQakx4djMKvmTR8Gd25EnC4RppCkj
bmPxY3zPd1X7raalTn34EOF9DeLsC9JfzkDuojxpHWMm30wKnDo20mlDQk/zKCDa
2Zc+YjtsTZCrTbvdgCukTKNZOUUVlWRu+sO/OwrmS2p16seHTIqHEbE1LntPv3gk
CcHGDSUAKx9c0Aol+Dj9xpb2nmGqoDeJ59Ja6REkHCdw5TduXyqqMqfD1AX0/QDN
devCMKlWBRCQ7DFlog3H1a+r/kuMUZ/Ij9yyKlSgYZMJ4VgNKDgTQdcsAL0MCEMr
zpacMwFusA==
-----END CERTIFICATE-----
"""

AWS_NITRO_ROOT_G1_PEM = """-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
INTEL_SGX_ROOT_PEMS: dict[str, str] = {"Intel SGX Root CA": INTEL_SGX_ROOT_CA_PEM}
INTEL_SGX_ROOT_SHA256: dict[str, str] = {"Intel SGX Root CA": INTEL_SGX_ROOT_CA_SHA256}

AMD_ARK_PEMS: dict[str, str] = {
    "ARK-Milan": AMD_ARK_MILAN_PEM,
    "ARK-Genoa": AMD_ARK_GENOA_PEM,
    "ARK-Turin": AMD_ARK_TURIN_PEM,
}
AMD_ARK_SHA256: dict[str, str] = {
    "ARK-Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "ARK-Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "ARK-Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}

AWS_NITRO_ROOT_PEMS: dict[str, str] = {"aws.nitro-enclaves (G1)": AWS_NITRO_ROOT_G1_PEM}
AWS_NITRO_ROOT_SHA256: dict[str, str] = {
    "aws.nitro-enclaves (G1)": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
}
AWS_NITRO_ROOT_G1_ZIP_SHA256 = "8cf60e2b2efca96c6a9e71e851d00c1b6991cc09eadbe64a6a1d1b1eb9faff7c"
"""What AWS publishes: the hash of the ZIP download, not of the certificate (kept for reference)."""

# vendor -> root name -> PEM text, and -> SHA-256 (lowercase hex) of its DER: the pins.
ROOT_PEMS: dict[str, dict[str, str]] = {"intel": INTEL_SGX_ROOT_PEMS, "amd": AMD_ARK_PEMS, "aws": AWS_NITRO_ROOT_PEMS}
ROOT_SHA256: dict[str, dict[str, str]] = {
    "intel": INTEL_SGX_ROOT_SHA256,
    "amd": AMD_ARK_SHA256,
    "aws": AWS_NITRO_ROOT_SHA256,
}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@cache
def pinned_roots(vendor: str) -> tuple[Root, ...]:
    """The built-in roots of `vendor` (none for a vendor without any), each PEM checked against its
    pinned fingerprint: RuntimeError if one does not match."""
    pems: Mapping[str, str] = ROOT_PEMS.get(vendor, {})
    prints: Mapping[str, str] = ROOT_SHA256.get(vendor, {})
    out = []
    for name, pem in pems.items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        if fingerprint(cert) != prints.get(name):
            raise RuntimeError(f"pinned root {name}: PEM does not match its pinned SHA-256 fingerprint")
        out.append(Root(name, cert))
    return tuple(out)


def is_pinned(vendor: str, sha256: str) -> bool:
    """Whether `sha256` (lowercase hex) is the fingerprint of one of `vendor`'s pinned roots."""
    return any(root.sha256 == sha256 for root in pinned_roots(vendor))


def extra_roots(vendor: str, policy: Policy | None) -> list[Root]:
    """Roots named by `policy.roots[vendor]` (a PEM path or a list of them; a file may hold several
    certificates), each named "policy root PATH". None named: []. RootsError when one cannot be read or
    holds no certificate: a policy that names a root must get it."""
    roots: Mapping[str, object] = getattr(policy, "roots", None) or {}
    spec = roots.get(vendor)
    if not spec:
        return []
    paths = [spec] if isinstance(spec, (str, Path)) else spec
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in paths):
        raise RootsError(f"policy roots.{vendor} must be a PEM path or a list of PEM paths")
    out: list[Root] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise RootsError(f"policy roots.{vendor}: cannot read {p}: {e.strerror}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except (ValueError, x509.InvalidVersion):
            raise RootsError(f"policy roots.{vendor}: {p} holds no PEM certificate") from None
        out += [Root(f"policy root {p}", c) for c in certs]
    return out


def trusted_roots(vendor: str, policy: Policy | None) -> list[Root]:
    """What a verifier trusts for `vendor`: the pinned roots, then the policy's extra roots (RootsError
    when one of those is unusable)."""
    return [*pinned_roots(vendor), *extra_roots(vendor, policy)]
