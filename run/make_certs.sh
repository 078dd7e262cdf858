#!/usr/bin/env bash
# TLS certificates and message authentication keys for a cross-silo gRPC job with K workers.
# Usage: bash run/make_certs.sh DIR K
#   DIR/tls/ca.crt             the CA every party trusts (give it to every party)
#   DIR/tls/ca.key             the CA's key: it signs party certificates; keep it off the parties' machines
#   DIR/tls/party<r>.crt|.key  party r's certificate (CN=party<r>, one name: DNS:party<r>) and key, r = 0 (server) .. K
#   DIR/keys/party<r>.key      HMAC keys (fedml-prism keys): party0.key is the server's master key
# Identity, not address: a gRPC channel to party r accepts only a certificate of this CA naming party<r>
# (grpc.ssl_target_name_override), so no host names or IPs go in the certificates, and a worker's
# certificate is of no use on the server's address. Key usages: the CA signs certificates only (CA:TRUE,
# pathlen:0, keyCertSign/cRLSign); a party certificate cannot sign certificates (CA:FALSE) and is for
# TLS only (digitalSignature), for serving and for connecting (serverAuth, clientAuth): in FedML's gRPC
# design every party, the server included, listens for messages and connects to send them.
# Env: DAYS (validity, default 825), BIN (folder holding fedml-prism, default .venv/bin of this checkout,
# else fedml-prism on PATH). CERT_SANS / CERT_SANS_<r> (host names, before) are no longer used.
# Key files are mode 600. An existing DIR/tls/ca.key is never overwritten (FORCE=1 replaces everything).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DIR K   (K = worker_num: ranks 0..K get certificates and keys)" >&2; exit 2; }
K="$2"
[[ "$K" =~ ^[1-9][0-9]*$ ]] || { echo "K=$K is invalid: allowed an integer >= 1 (worker_num)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl not found: apt-get install openssl" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
PRISM="$BIN/fedml-prism"
[ -x "$PRISM" ] || PRISM="$(command -v fedml-prism || true)"
[ -n "$PRISM" ] || { echo "fedml-prism not found: set BIN to the folder that holds it (pip install -e .)" >&2; exit 2; }
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
TLS="$DIR/tls"
if [ -e "$TLS/ca.key" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "$TLS/ca.key exists: certificates already issued from it would stop matching; FORCE=1 replaces everything" >&2
  exit 2
fi
DAYS="${DAYS:-825}"
umask 077
mkdir -p "$TLS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; chmod 600 "$1"; }

newkey "$TLS/ca.key"
openssl req -x509 -new -key "$TLS/ca.key" -sha256 -days "$DAYS" -subj "/CN=fedml-prism CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$TLS/ca.crt"
chmod 644 "$TLS/ca.crt"

if env | grep -q '^CERT_SANS'; then
  echo "note: CERT_SANS* is ignored: a channel checks the party name (DNS:party<r>), not the host it connects to" >&2
fi
for r in $(seq 0 "$K"); do
  newkey "$TLS/party$r.key"
  openssl req -new -key "$TLS/party$r.key" -subj "/CN=party$r" -out "$work/party$r.csr"
  printf '%s\n' "subjectAltName=DNS:party$r" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" > "$work/party$r.ext"
  openssl x509 -req -in "$work/party$r.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -sha256 -days "$DAYS" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/party$r.ext" -out "$TLS/party$r.crt" 2>/dev/null
  chmod 644 "$TLS/party$r.crt"
done

"$PRISM" keys --out "$DIR/keys" --workers "$K" >/dev/null
chmod 600 "$DIR"/keys/party*.key

cat <<EOF
Wrote a CA, certificates for party0..party$K (CN=party<r>, DNS:party<r>) and their keys in $TLS,
and message authentication keys in $DIR/keys. Put in the job's yaml (paths may be relative to it):

security_args:
  auth_key_file: "$DIR/keys/party{rank}.key"
  require_auth: true
  tls_ca: "$TLS/ca.crt"
  tls_cert: "$TLS/party{rank}.crt"
  tls_key: "$TLS/party{rank}.key"
  tls_mutual: true

Party r needs tls/ca.crt, tls/party<r>.crt, tls/party<r>.key and keys/party<r>.key (the server, r = 0,
holds the master key). tls/ca.key stays with whoever issues certificates.
EOF
