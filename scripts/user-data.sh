#!/bin/bash
# EC2 user-data: install spotd on boot, write its config, start it and the training job.
#
# Edit the variables below (scripts/launch-spot.sh fills them for you). cloud-init runs user-data once
# per instance; after a spot stop/start the enabled units come back by themselves, and on a fresh
# instance launched with it this script runs again. Re-running it by
# hand is safe: every step checks before it changes anything.
#
# Log: /var/log/spotd-user-data.log (and the journal, tag spotd-user-data).

SPOTD_BUCKET="my-checkpoint-bucket"          # S3 bucket; the store is s3://BUCKET/spotd
SPOTD_STORE_URI=""                           # or a full store URI (s3://bucket/prefix); wins over the bucket
SPOTD_JOB_ID="my-job"                        # stable across instances: names the store prefix and unit
SPOTD_CHECKPOINT_DIR="/opt/ml/checkpoints"   # where the trainer saves and spotd restores
SPOTD_PIP_SPEC="spotd"                       # a pip spec, a wheel URL, or "--index-url URL spotd"
SPOTD_TRAIN_CMD=""                           # e.g. "/opt/venv/bin/python train.py"; empty: spotd only
SPOTD_TRAIN_USER="root"                      # e.g. ubuntu on Ubuntu AMIs, ec2-user on Amazon Linux
SPOTD_TRAIN_DIR="/"                          # the training job's working directory
SPOTD_VENV="/opt/spotd"                      # spotd.service runs $SPOTD_VENV/bin/spotd

set -euo pipefail
umask 022

LOG=/var/log/spotd-user-data.log
exec > >(tee -a "$LOG" | logger -t spotd-user-data) 2>&1
echo "== spotd user-data start $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# Python 3.11+ with venv: prefer what the AMI has, install it otherwise.
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PYTHON="$(find_python)"; then
    echo "no python >= 3.11 with venv found; installing one"
    if command -v dnf >/dev/null 2>&1; then
        dnf install -y python3.11
    elif command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv
    fi
    PYTHON="$(find_python)" || { echo "FATAL: spotd needs Python >= 3.11 with venv; use a newer AMI"; exit 1; }
fi
echo "python: $PYTHON"

if [ ! -x "$SPOTD_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$SPOTD_VENV"
fi
# The spec may carry options (--index-url URL spotd); split it into words on purpose.
read -r -a pip_args <<<"$SPOTD_PIP_SPEC"
"$SPOTD_VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "${pip_args[@]}"
"$SPOTD_VENV/bin/spotd" --version

store_uri="${SPOTD_STORE_URI:-s3://${SPOTD_BUCKET}/spotd}"
install_args=(
    --store-uri "$store_uri"
    --job-id "$SPOTD_JOB_ID"
    --checkpoint-dir "$SPOTD_CHECKPOINT_DIR"
    --spotd-bin "$SPOTD_VENV/bin/spotd"
)
if [ -n "$SPOTD_TRAIN_CMD" ]; then
    install_args+=(--train-cmd "$SPOTD_TRAIN_CMD" --train-user "$SPOTD_TRAIN_USER" --train-dir "$SPOTD_TRAIN_DIR")
fi
# Writes the units and /etc/spotd/spotd.toml (only if absent), creates the spotd user, enables the units.
"$SPOTD_VENV/bin/spotd" install "${install_args[@]}"

# spotd restores the newest committed checkpoint before it reports READY; the training unit is ordered
# after it, so `start` of both returns with the job resuming from that checkpoint.
units=(spotd.service)
if [ -n "$SPOTD_TRAIN_CMD" ]; then
    units+=("spotd-train@${SPOTD_JOB_ID}.service")
fi
systemctl start "${units[@]}"
systemctl --no-pager --lines=0 status "${units[@]}" || true
echo "== spotd user-data done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
