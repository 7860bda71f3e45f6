#!/usr/bin/env bash
# Baseline for the benchmark: the init coordination of the first control
# plane as a bootstrap script written with the AWS CLI (v1) did it before the
# agent replaced it. kubeadm is not run: the script writes what
# `kubeadm init --config <out>/kubeadm-init.yaml --upload-certs` would be
# given and takes the cluster CA from --pki-dir as if kubeadm had made it.
#
#   init.sh --table NAME --cluster NAME --instance-id ID --out DIR \
#           --pki-dir DIR --endpoint HOST:PORT
#
# Seven AWS calls on the happy path:
#   1. dynamodb put-item CLUSTER#<cluster>/LOCK#init, on condition that there
#      is no lock or it has expired (`expires_at`, epoch seconds); refused:
#      sleep and try again;
#   2. dynamodb get-item (consistent) of CLUSTER#<cluster>/STATE: initialized
#      already means this node joins instead (the lock is released, exit 0);
#   3. secretsmanager create-secret kubeboot/<cluster>/join: the bootstrap
#      token and the certificate key, JSON (put-secret-value if it exists);
#   4. ssm put-parameter --overwrite /kubeboot/<cluster>/ca-cert-hashes: the
#      CA pin, sha256 of the CA's DER public key (as the kubeadm docs do);
#   5. dynamodb put-item CLUSTER#<cluster>/MEMBER#<instance-id>: the etcd member;
#   6. dynamodb update-item of STATE: phase `initialized`, the endpoint, by
#      whom, generation + 1;
#   7. dynamodb delete-item of the lock, on condition that we own it.
# A failure after 1 releases the lock (trap) unless it was step 7 itself.
#
# Names are the agent's (agent/src/table.rs, registry/, join_material/,
# config defaults), so bench/baseline/worker-join.sh joins the cluster this
# initialized, and would join one the agent initialized too. The attribute
# sets are simpler than the agent's; the script's cluster is its own.
#
# AWS endpoints, region and credentials come from the environment only
# (AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SSM,
# AWS_ENDPOINT_URL_SECRETS_MANAGER, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY); the CLI is ${AWS_CLI:-aws}. Prints nothing on
# stdout; diagnostics go to stderr. Exit 0 done, 1 failed, 2 usage.
set -euo pipefail
umask 077

aws=${AWS_CLI:-aws}
# The init lock's lease (kubeadm init takes minutes), how long to wait for
# it, and how often to try.
lease_seconds=900
wait_seconds=1200
poll_seconds=5

log() { printf 'init: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() {
  printf 'usage: %s --table NAME --cluster NAME --instance-id ID --out DIR --pki-dir DIR --endpoint HOST:PORT\n' "${0##*/}" >&2
  exit 2
}

table='' cluster='' instance_id='' out='' pki_dir='' endpoint=''
while [ $# -gt 0 ]; do
  case $1 in
    --table | --cluster | --instance-id | --out | --pki-dir | --endpoint)
      [ $# -ge 2 ] || usage
      case $1 in
        --table) table=$2 ;;
        --cluster) cluster=$2 ;;
        --instance-id) instance_id=$2 ;;
        --out) out=$2 ;;
        --pki-dir) pki_dir=$2 ;;
        --endpoint) endpoint=$2 ;;
      esac
      shift 2
      ;;
    *) usage ;;
  esac
done
for v in "$table" "$cluster" "$instance_id" "$out" "$pki_dir" "$endpoint"; do
  [ -n "$v" ] || usage
done
# The values go into JSON and YAML below unquoted: refuse anything unusual.
[[ $table =~ ^[A-Za-z0-9_.-]{3,255}$ ]] || usage
[[ $cluster =~ ^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$ ]] || usage
[[ $instance_id =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || usage
[[ $endpoint =~ ^[A-Za-z0-9.-]+:[0-9]{1,5}$ ]] || usage
[ -r "$pki_dir/ca.crt" ] || { log "no readable $pki_dir/ca.crt"; usage; }

pk="CLUSTER#$cluster"
secret_id="kubeboot/$cluster/join"
parameter="/kubeboot/$cluster/ca-cert-hashes"
lock_key=$(printf '{"pk":{"S":"%s"},"sk":{"S":"LOCK#init"}}' "$pk")
state_key=$(printf '{"pk":{"S":"%s"},"sk":{"S":"STATE"}}' "$pk")
mkdir -p "$out"

lock_held=0
secret_file=''

release_lock() {
  "$aws" dynamodb delete-item --table-name "$table" --key "$lock_key" \
    --condition-expression '#o = :me' \
    --expression-attribute-names '{"#o":"owner"}' \
    --expression-attribute-values "$(printf '{":me":{"S":"%s"}}' "$instance_id")" >/dev/null
}

on_exit() {
  local rc=$?
  [ -z "$secret_file" ] || rm -f "$secret_file"
  if [ "$lock_held" = 1 ]; then
    log "failed (exit $rc): releasing the init lock"
    release_lock || log "could not release the init lock; it expires with its lease"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. The init lock.
deadline=$((SECONDS + wait_seconds))
while :; do
  now=$(date +%s)
  item=$(printf '{"pk":{"S":"%s"},"sk":{"S":"LOCK#init"},"owner":{"S":"%s"},"acquired_at":{"N":"%s"},"expires_at":{"N":"%s"}}' \
    "$pk" "$instance_id" "$now" "$((now + lease_seconds))")
  if err=$("$aws" dynamodb put-item --table-name "$table" --item "$item" \
    --condition-expression 'attribute_not_exists(pk) OR expires_at < :now' \
    --expression-attribute-values "$(printf '{":now":{"N":"%s"}}' "$now")" 2>&1 >/dev/null); then
    lock_held=1
    break
  fi
  case $err in
    *ConditionalCheckFailedException*) ;;
    *) die "cannot take the init lock: $err" ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || die "the init lock of $cluster is still held after ${wait_seconds}s"
  log "the init lock of $cluster is held by another node; waiting"
  sleep "$poll_seconds"
done
log "init lock of $cluster taken"

# 2. Init or join?
state=$("$aws" dynamodb get-item --table-name "$table" --key "$state_key" --consistent-read \
  --query 'Item.[phase.S, initialized_by.S]' --output text)
read -r phase initialized_by <<<"$state"
if [ "$phase" = initialized ]; then
  log "cluster $cluster was initialized by $initialized_by; this node joins it instead"
  release_lock
  lock_held=0
  exit 0
fi

# The join secrets, generated here: a bootstrap token [a-z0-9]{6}.[a-z0-9]{16}
# and a certificate key (32 random bytes, hex).
chars=''
while [ ${#chars} -lt 22 ]; do
  chars+=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'a-z0-9')
done
token="${chars:0:6}.${chars:6:16}"
certificate_key=$(openssl rand -hex 32)
unset chars

# What kubeadm init would be given (mode 600: it holds both secrets).
tmp=$(mktemp "$out/.kubeadm-init.XXXXXX")
{
  printf 'apiVersion: kubeadm.k8s.io/v1beta3\nkind: InitConfiguration\n'
  printf 'bootstrapTokens:\n  - token: "%s"\n    ttl: 24h0m0s\n' "$token"
  printf 'certificateKey: "%s"\n' "$certificate_key"
  printf 'nodeRegistration:\n  name: "%s"\n' "$instance_id"
  printf -- '---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\n'
  printf 'clusterName: "%s"\ncontrolPlaneEndpoint: "%s"\n' "$cluster" "$endpoint"
} >"$tmp"
mv -f "$tmp" "$out/kubeadm-init.yaml"
log "wrote $out/kubeadm-init.yaml; kubeadm init --upload-certs would run here"

# The CA pin, as the kubeadm docs compute it (pkey reads RSA and EC keys).
ca_hash=$(openssl x509 -pubkey -noout -in "$pki_dir/ca.crt" |
  openssl pkey -pubin -outform der 2>/dev/null |
  openssl dgst -sha256 -hex | sed 's/^.* //')
[[ $ca_hash =~ ^[0-9a-f]{64}$ ]] || die "cannot compute the CA pin of $pki_dir/ca.crt"

# 3. The join secret (from a mode-600 file: never on a command line).
secret_file=$(mktemp "$out/.join-secret.XXXXXX")
printf '{"token":"%s","certificate_key":"%s"}' "$token" "$certificate_key" >"$secret_file"
unset token certificate_key
if ! err=$("$aws" secretsmanager create-secret --name "$secret_id" \
  --description "kubeboot baseline: bootstrap token and certificate key of $cluster" \
  --secret-string "file://$secret_file" 2>&1 >/dev/null); then
  case $err in
    *ResourceExistsException*)
      "$aws" secretsmanager put-secret-value --secret-id "$secret_id" \
        --secret-string "file://$secret_file" >/dev/null
      ;;
    *) die "cannot store the join secret $secret_id: $err" ;;
  esac
fi
rm -f "$secret_file"
secret_file=''
log "join secret $secret_id stored"

# 4. The discovery parameter.
"$aws" ssm put-parameter --name "$parameter" --type String --value "sha256:$ca_hash" \
  --overwrite >/dev/null
log "CA pin published in $parameter"

# 5. The etcd member (kubeadm's stacked etcd on this node).
now_ms=$(date +%s%3N)
item=$(printf '{"pk":{"S":"%s"},"sk":{"S":"MEMBER#%s"},"instance_id":{"S":"%s"},"name":{"S":"%s"},"confirmed_at":{"N":"%s"}}' \
  "$pk" "$instance_id" "$instance_id" "$instance_id" "$now_ms")
"$aws" dynamodb put-item --table-name "$table" --item "$item" >/dev/null

# 6. The cluster is initialized.
"$aws" dynamodb update-item --table-name "$table" --key "$state_key" \
  --update-expression 'SET #phase = :phase, #ep = :ep, #by = :by, #at = :at ADD #gen :one' \
  --expression-attribute-names '{"#phase":"phase","#ep":"endpoint","#by":"initialized_by","#at":"updated_at","#gen":"generation"}' \
  --expression-attribute-values "$(printf '{":phase":{"S":"initialized"},":ep":{"S":"%s"},":by":{"S":"%s"},":at":{"N":"%s"},":one":{"N":"1"}}' \
    "$endpoint" "$instance_id" "$now_ms")" >/dev/null
log "cluster $cluster initialized with endpoint $endpoint"

# 7. Release the lock.
release_lock
lock_held=0
log "init lock of $cluster released"
