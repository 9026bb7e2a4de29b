"""A Python workload using py-spiffe, unchanged, against the meshid agent.

Reads SPIFFE_ENDPOINT_SOCKET like any SPIFFE client. Writes the default
X509-SVID (chain + key) and its trust domain's bundle as PEM into OUT_DIR,
fetches a JWT-SVID for AUDIENCE, has the agent validate it, validates it
locally against the JWT bundle, and prints a JSON summary on stdout.

Usage: spiffe_client.py OUT_DIR AUDIENCE
"""

import json
import sys
from importlib.metadata import version

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient
from spiffe.workloadapi.errors import ValidateJwtSvidError


def main() -> None:
    out_dir, audience = sys.argv[1], sys.argv[2]
    with WorkloadApiClient(default_timeout=10) as client:
        x509 = client.fetch_x509_context()
        svid = x509.default_svid
        svid.save(f"{out_dir}/svid.pem", f"{out_dir}/svid.key", serialization.Encoding.PEM)
        td = svid.spiffe_id.trust_domain

        bundles = client.fetch_x509_bundles()
        bundles.get_bundle_for_trust_domain(td).save(
            f"{out_dir}/bundle.pem", serialization.Encoding.PEM
        )

        jwt_svid = client.fetch_jwt_svid(audience={audience})
        by_agent = client.validate_jwt_svid(jwt_svid.token, audience)
        jwt_bundles = client.fetch_jwt_bundles()
        locally = JwtSvid.parse_and_validate(
            jwt_svid.token, jwt_bundles.get_bundle_for_trust_domain(td), {audience}
        )
        try:
            client.validate_jwt_svid(jwt_svid.token, "not-" + audience)
            wrong_audience_refused = False
        except ValidateJwtSvidError:
            wrong_audience_refused = True

    key_matches = svid.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    print(
        json.dumps(
            {
                "grpcio": grpc.__version__,
                "spiffe": version("spiffe"),
                "x509_spiffe_id": str(svid.spiffe_id),
                "x509_svids": len(x509.x509_svids),
                "key_matches_leaf": key_matches,
                "bundle_trust_domains": sorted(str(b.trust_domain) for b in bundles.bundles),
                "jwt_spiffe_id": str(jwt_svid.spiffe_id),
                "jwt_validated_by_agent": str(by_agent.spiffe_id),
                "jwt_validated_locally": str(locally.spiffe_id),
                "wrong_audience_refused": wrong_audience_refused,
            }
        )
    )


if __name__ == "__main__":
    main()
