#!/usr/bin/env bash
# Baseline for the benchmark: the worker-join coordination as a bootstrap
# script written with the AWS CLI (v1) did it before the agent replaced it.
# kubeadm is not run: the script stops where it would call
# `kubeadm join --config <out>/kubeadm-join.yaml`.
#
#   worker-join.sh --table NAME --cluster NAME --instance-id ID --out DIR
#
# Four AWS calls on the happy path:
#   1. dynamodb get-item (consistent) of CLUSTER#<cluster>/STATE: wait until
#      its phase is `initialized`; take the API endpoint from it;
#   2. ssm get-parameter /kubeboot/<cluster>/ca-cert-hashes: the CA pins;
#   3. secretsmanager get-secret-value kubeboot/<cluster>/join: the token;
#   4. dynamodb put-item CLUSTER#<cluster>/NODE#<instance-id>: this node.
#
# Names and formats are the agent's (agent/src/table.rs, registry/,
# join_material/, config defaults): the STATE record's `phase` and
# `endpoint`, the SSM parameter the agent writes (comma-separated
# `sha256:<hex>` pins) and the `token` field of the JSON body of the join
# secret. So it joins a cluster that bench/baseline/init.sh initialized and
# reads what the agent publishes just as well; the NODE# record is the
# script's own (the agent records no worker in the table).
#
# AWS endpoints, region and credentials come from the environment only
# (AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SSM,
# AWS_ENDPOINT_URL_SECRETS_MANAGER, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY); the CLI is ${AWS_CLI:-aws}. Prints nothing on
# stdout; diagnostics go to stderr. Exit 0 joined, 1 failed, 2 usage.
set -euo pipefail
umask 077

aws=${AWS_CLI:-aws}
# How long to wait for another node to initialize the cluster, and how often to look.
wait_seconds=900
poll_seconds=5

log() { printf 'worker-join: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() {
  printf 'usage: %s --table NAME --cluster NAME --instance-id ID --out DIR\n' "${0##*/}" >&2
  exit 2
}

table='' cluster='' instance_id='' out=''
while [ $# -gt 0 ]; do
  case $1 in
    --table | --cluster | --instance-id | --out)
      [ $# -ge 2 ] || usage
      case $1 in
        --table) table=$2 ;;
        --cluster) cluster=$2 ;;
        --instance-id) instance_id=$2 ;;
        --out) out=$2 ;;
      esac
      shift 2
      ;;
    *) usage ;;
  esac
done
for v in "$table" "$cluster" "$instance_id" "$out"; do
  [ -n "$v" ] || usage
done
# The values go into JSON and YAML below unquoted: refuse anything unusual.
[[ $table =~ ^[A-Za-z0-9_.-]{3,255}$ ]] || usage
[[ $cluster =~ ^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$ ]] || usage
[[ $instance_id =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || usage

pk="CLUSTER#$cluster"
secret_id="kubeboot/$cluster/join"
parameter="/kubeboot/$cluster/ca-cert-hashes"
mkdir -p "$out"

# 1. The cluster must be initialized.
key=$(printf '{"pk":{"S":"%s"},"sk":{"S":"STATE"}}' "$pk")
deadline=$((SECONDS + wait_seconds))
while :; do
  state=$("$aws" dynamodb get-item --table-name "$table" --key "$key" --consistent-read \
    --query 'Item.[phase.S, endpoint.S]' --output text)
  read -r phase endpoint <<<"$state"
  [ "$phase" = initialized ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "cluster $cluster is still not initialized after ${wait_seconds}s (phase: $phase)"
  log "cluster $cluster not initialized yet (phase: $phase); waiting"
  sleep "$poll_seconds"
done
[[ $endpoint =~ ^[A-Za-z0-9.-]+:[0-9]{1,5}$ ]] || die "the STATE record of $cluster has no usable endpoint: $endpoint"

# 2. The CA pins.
hashes=$("$aws" ssm get-parameter --name "$parameter" --query Parameter.Value --output text)
IFS=, read -r -a pins <<<"$hashes"
[ ${#pins[@]} -gt 0 ] || die "SSM parameter $parameter is empty"
for pin in "${pins[@]}"; do
  [[ $pin =~ ^sha256:[0-9a-f]{64}$ ]] || die "SSM parameter $parameter holds something other than sha256:<hex> pins"
done

# 3. The bootstrap token (never printed).
body=$("$aws" secretsmanager get-secret-value --secret-id "$secret_id" --query SecretString --output text)
[[ $body =~ \"token\":\ *\"([a-z0-9]{6}\.[a-z0-9]{16})\" ]] || die "secret $secret_id has no bootstrap token of kubeadm's shape"
token=${BASH_REMATCH[1]}
unset body

# What kubeadm join would be given (mode 600: it holds the token).
tmp=$(mktemp "$out/.kubeadm-join.XXXXXX")
{
  printf 'apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\n'
  printf 'discovery:\n  bootstrapToken:\n'
  printf '    apiServerEndpoint: "%s"\n' "$endpoint"
  printf '    token: "%s"\n' "$token"
  printf '    caCertHashes:\n'
  printf '      - "%s"\n' "${pins[@]}"
  printf 'nodeRegistration:\n  name: "%s"\n' "$instance_id"
} >"$tmp"
mv -f "$tmp" "$out/kubeadm-join.yaml"
log "wrote $out/kubeadm-join.yaml for $endpoint; kubeadm join would run here"

# 4. Register this node.
item=$(printf '{"pk":{"S":"%s"},"sk":{"S":"NODE#%s"},"instance_id":{"S":"%s"},"role":{"S":"worker"},"joined_at":{"N":"%s"}}' \
  "$pk" "$instance_id" "$instance_id" "$(date +%s%3N)")
"$aws" dynamodb put-item --table-name "$table" --item "$item" >/dev/null
log "node $instance_id registered in cluster $cluster"
