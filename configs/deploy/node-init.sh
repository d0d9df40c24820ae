#!/usr/bin/env bash
# Host-side set-up of one Ray node, run by the cluster launcher before Docker starts
# (`initialization_commands` in cluster.yaml and configs/deploy/cluster-gcp.yaml run on the
# host, outside the container). The launcher syncs this file to the host first, to
# /tmp/ray_tmp_mount/<cluster_name>/opt/ephemera/node-init.sh
# (ray.autoscaler.sdk.get_docker_host_mount_location; a unit test checks the path).
#
#   node-init.sh secrets-aws REGION SECRET_ID GCP_CREDENTIALS_SECRET_ID
#   node-init.sh secrets-gcp PROJECT SECRET_NAME
#   node-init.sh lb-aws REGION TARGET_GROUP_NAME PORT
#   node-init.sh lb-gcp INSTANCE_GROUP_NAME
#   node-init.sh wait-gpu MIN_DRIVER_MAJOR TIMEOUT_S
#
# secrets-*: read the node's secret (a JSON object of environment variables, see
# configs/deploy/k8s/secrets.md) from AWS Secrets Manager or GCP Secret Manager with the
# node's own identity (instance profile / service account; no key on disk), check that
# every required variable is there, and write it as a Docker env file, secrets.env, into
# $EPHEMERA_SECRETS_DIR (default /run/ephemera). That folder must be on tmpfs (refused
# otherwise), mode 0700, its files 0600, owned by the user that runs `docker run` (the
# launcher's ssh user, who reads --env-file): secrets never touch a disk and leave with the
# machine. secrets-aws also writes gcp-credentials.json (the GCS credential configuration,
# workload identity federation preferred) for GOOGLE_APPLICATION_CREDENTIALS.
# Idempotent: a rerun replaces the files atomically. Prints variable names, never values.
#
# lb-*: put this node in the load balancer's backend (an ALB target group / an unmanaged
# instance group), so the Serve proxy on its port 8000 takes traffic. A terminated
# instance leaves the backend with the machine; a draining node's proxy answers 503 on
# /-/healthz, which the health check sees first.
#
# wait-gpu: wait for the NVIDIA driver (the GCP image installs it on first boot) and refuse
# a driver older than MIN_DRIVER_MAJOR (the image's CUDA 13 needs R580 or newer).
set -euo pipefail

SECRETS_DIR="${EPHEMERA_SECRETS_DIR:-/run/ephemera}"
REQUIRED_COMMON="EPHEMERA_API_TOKEN EPHEMERA_ACCOUNT_SECRET EPHEMERA_AGGREGATE_SECRET EPHEMERA_TLOG_SIGNING_KEY EPHEMERA_METRICS_TOKEN RAY_AUTH_TOKEN"

die() { echo "node-init: $*" >&2; exit 1; }

prepare_dir() {
  if [ ! -d "$SECRETS_DIR" ]; then
    mkdir -m 700 "$SECRETS_DIR" 2>/dev/null \
      || sudo install -d -m 700 -o "$(id -u)" -g "$(id -g)" "$SECRETS_DIR"
  fi
  local fs
  fs="$(stat -f -c %T "$SECRETS_DIR")"
  case "$fs" in
    tmpfs|ramfs) ;;
    *) die "$SECRETS_DIR is on $fs, not tmpfs: secrets must never reach a disk" ;;
  esac
  chmod 700 "$SECRETS_DIR"
}

# Reads the secret's JSON on stdin, writes KEY=VALUE lines to $1; $2: required names.
write_env_file() {
  local target="$1" required="$2" tmp
  tmp="$(mktemp "$SECRETS_DIR/.secrets.XXXXXX")"
  if ! python3 -c '
import json, re, sys
required = sys.argv[2].split()
try:
    values = json.load(sys.stdin)
except ValueError:
    sys.exit("node-init: the secret is not a JSON object of environment variables")
if not isinstance(values, dict):
    sys.exit("node-init: the secret is not a JSON object of environment variables")
missing = [name for name in required if not values.get(name)]
if missing:
    sys.exit("node-init: the secret lacks " + ", ".join(missing) + " (see configs/deploy/k8s/secrets.md)")
with open(sys.argv[1], "w") as out:
    for name, value in sorted(values.items()):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            sys.exit(f"node-init: secret key {name!r} is not an environment variable name")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            sys.exit(f"node-init: secret value of {name} must be a one-line string")
        out.write(f"{name}={value}\n")
print("node-init: wrote " + " ".join(sorted(values)))
' "$tmp" "$required"; then
    rm -f "$tmp"
    exit 1
  fi
  chmod 600 "$tmp"
  mv -f "$tmp" "$target"
}

write_file() {  # stdin to $1, atomically, 0600
  local target="$1" tmp
  tmp="$(mktemp "$SECRETS_DIR/.file.XXXXXX")"
  cat >"$tmp"
  [ -s "$tmp" ] || { rm -f "$tmp"; die "empty secret for $(basename "$target")"; }
  chmod 600 "$tmp"
  mv -f "$tmp" "$target"
}

imds_token() {
  curl -sf -X PUT http://169.254.169.254/latest/api/token \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 60"
}

cmd="${1:-}"
[ -n "$cmd" ] || die "usage: node-init.sh secrets-aws|secrets-gcp|lb-aws|lb-gcp|wait-gpu ARGS"
shift
case "$cmd" in
  secrets-aws)
    [ $# -eq 3 ] || die "usage: node-init.sh secrets-aws REGION SECRET_ID GCP_CREDENTIALS_SECRET_ID"
    region="$1" secret_id="$2" gcp_secret_id="$3"
    prepare_dir
    aws secretsmanager get-secret-value --region "$region" --secret-id "$secret_id" \
        --query SecretString --output text \
      | write_env_file "$SECRETS_DIR/secrets.env" "$REQUIRED_COMMON"
    aws secretsmanager get-secret-value --region "$region" --secret-id "$gcp_secret_id" \
        --query SecretString --output text \
      | write_file "$SECRETS_DIR/gcp-credentials.json"
    ;;
  secrets-gcp)
    [ $# -eq 2 ] || die "usage: node-init.sh secrets-gcp PROJECT SECRET_NAME"
    project="$1" secret_name="$2"
    prepare_dir
    # On GCP the node's service account reaches GCS itself; S3 (outputs, models) needs
    # an access key of the IAM user in configs/deploy/iam/aws-storage-policy.json.
    gcloud secrets versions access latest --secret="$secret_name" --project="$project" \
      | write_env_file "$SECRETS_DIR/secrets.env" \
          "$REQUIRED_COMMON AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY"
    ;;
  lb-aws)
    [ $# -eq 3 ] || die "usage: node-init.sh lb-aws REGION TARGET_GROUP_NAME PORT"
    region="$1" group="$2" port="$3"
    token="$(imds_token)" || die "no instance metadata (IMDSv2) on this host"
    instance_id="$(curl -sf -H "X-aws-ec2-metadata-token: $token" \
      http://169.254.169.254/latest/meta-data/instance-id)"
    arn="$(aws elbv2 describe-target-groups --region "$region" --names "$group" \
      --query 'TargetGroups[0].TargetGroupArn' --output text)"
    aws elbv2 register-targets --region "$region" --target-group-arn "$arn" \
      --targets "Id=$instance_id,Port=$port"
    echo "node-init: $instance_id registered in target group $group on port $port"
    ;;
  lb-gcp)
    [ $# -eq 1 ] || die "usage: node-init.sh lb-gcp INSTANCE_GROUP_NAME"
    group="$1"
    meta=http://metadata.google.internal/computeMetadata/v1/instance
    name="$(curl -sf -H 'Metadata-Flavor: Google' "$meta/name")"
    zone="$(curl -sf -H 'Metadata-Flavor: Google' "$meta/zone")"
    zone="${zone##*/}"
    if gcloud compute instance-groups unmanaged list-instances "$group" --zone "$zone" \
        --format='value(instance.basename())' | grep -qx "$name"; then
      echo "node-init: $name already in instance group $group"
    else
      gcloud compute instance-groups unmanaged add-instances "$group" --zone "$zone" \
        --instances "$name"
      echo "node-init: $name added to instance group $group"
    fi
    ;;
  wait-gpu)
    [ $# -eq 2 ] || die "usage: node-init.sh wait-gpu MIN_DRIVER_MAJOR TIMEOUT_S"
    min_major="$1" deadline=$((SECONDS + $2))
    until version="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
        | head -n 1)" && [ -n "$version" ]; do
      [ "$SECONDS" -lt "$deadline" ] || die "no NVIDIA driver answered nvidia-smi within $2 s"
      sleep 10
    done
    major="${version%%.*}"
    [ "$major" -ge "$min_major" ] \
      || die "NVIDIA driver $version is older than R$min_major, which CUDA 13 needs: use a newer image"
    echo "node-init: NVIDIA driver $version"
    ;;
  *)
    die "unknown command $cmd"
    ;;
esac
