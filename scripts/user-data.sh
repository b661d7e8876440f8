#!/bin/bash
# EC2 user-data: install spotd on boot, write its config, start it and the training job.
#
# Edit the variables below (scripts/launch-spot.sh fills them for you). cloud-init runs user-data once
# per instance; after a spot stop/start the enabled units come back by themselves, and on a fresh
# instance launched with it this script runs again. Re-running it by
# hand is safe: every step checks before it changes anything.
#
# SPOTD_PIP_SPEC must pin spotd. spotd is not on the public index: `pip install spotd` would install
# whatever someone registers under that name, as root, on every instance. So a bare name is refused;
# give one of
#   https://HOST/spotd-0.1.0-py3-none-any.whl#sha256=HEX   a wheel you built (pip wheel --no-deps .) and
#                                                        host; pip checks the hash after the #
#   git+https://HOST/ORG/spotd.git@COMMIT                 a full 40-hex commit, never a branch or tag
#   /PATH/spotd-0.1.0-py3-none-any.whl                    a wheel already on the image
#   --index-url https://YOUR-INDEX/simple spotd==0.1.0    an index you own (--extra-index-url is not
#                                                        enough: pip takes the highest version anywhere)
#
# Log: /var/log/spotd-user-data.log (and the journal, tag spotd-user-data).

SPOTD_BUCKET="my-checkpoint-bucket"          # S3 bucket; the store is s3://BUCKET/spotd
SPOTD_STORE_URI=""                           # or a full store URI (s3://bucket/prefix); wins over the bucket
SPOTD_JOB_ID="my-job"                        # stable across instances: names the store prefix and unit
SPOTD_CHECKPOINT_DIR="/opt/ml/checkpoints"   # where the trainer saves and spotd restores
SPOTD_PIP_SPEC=""                            # REQUIRED: a pinned wheel URL, git URL at a commit (see above)
SPOTD_TRAIN_CMD=""                           # e.g. "/opt/venv/bin/python train.py"; empty: spotd only
SPOTD_TRAIN_USER="root"                      # e.g. ubuntu on Ubuntu AMIs, ec2-user on Amazon Linux
SPOTD_TRAIN_DIR="/"                          # the training job's working directory
SPOTD_TRAIN_PYTHON=""                        # the training environment's python, which gets spotd too (for
                                             # `from spotd.torch import ...`); empty: the python beside the
                                             # first word of SPOTD_TRAIN_CMD, e.g. /opt/venv/bin/python
SPOTD_PYTHON=""                              # python >= 3.11 for spotd's own venv; empty: found or installed
SPOTD_VENV="/opt/spotd"                      # spotd.service runs $SPOTD_VENV/bin/spotd

set -euo pipefail
umask 022

LOG=/var/log/spotd-user-data.log
exec > >(tee -a "$LOG" | logger -t spotd-user-data) 2>&1
echo "== spotd user-data start $(date -u +%Y-%m-%dT%H:%M:%SZ)"

fatal() {
    echo "FATAL: $*"
    exit 1
}

# A bare name (or name==version) would come from the public index; see the top of this file.
pinned_spec() {
    local -a words
    read -r -a words <<<"$1"
    ((${#words[@]})) || return 1
    local word commit_re='^[0-9a-f]{40}(#.*)?$'
    for word in "${words[@]}"; do
        case "$word" in -i | --index-url | --index-url=*) return 0 ;; esac
    done
    word="${words[-1]}"
    case "$word" in
    git+*@*) [[ "${word##*@}" =~ $commit_re ]] ;;
    https://*.whl* | file://*.whl* | /*.whl) return 0 ;;
    *) return 1 ;;
    esac
}
pinned_spec "$SPOTD_PIP_SPEC" ||
    fatal "SPOTD_PIP_SPEC=\"$SPOTD_PIP_SPEC\" does not pin spotd; set it to a wheel URL (https://HOST/spotd-0.1.0-py3-none-any.whl#sha256=HEX), git+https://HOST/ORG/spotd.git@<40-hex commit>, a wheel path, or --index-url <your index> spotd==VERSION"

# Python >= 3.11 whose venv works: Debian and Ubuntu ship ensurepip (what `python -m venv` needs to put pip
# in the venv) only in python3.X-venv, so `import venv` alone proves nothing (Ubuntu 24.04).
has_venv() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_venv "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ -n "$SPOTD_PYTHON" ]; then
    PYTHON="$SPOTD_PYTHON"
    has_venv "$PYTHON" ||
        fatal "SPOTD_PYTHON=$PYTHON is not Python >= 3.11 with venv and ensurepip; install its venv package (apt-get install python3.X-venv) or clear SPOTD_PYTHON"
elif ! PYTHON="$(find_python)"; then
    echo "no python >= 3.11 with venv and ensurepip found; installing one"
    if command -v apt-get >/dev/null 2>&1; then
        # Ubuntu 24.04 has python3.12 without its venv package; Ubuntu 22.04 has python3.10 as python3
        # and python3.11 in universe; Debian 12 has python3.11.
        apt_pkgs=(python3.11 python3.11-venv)
        for candidate in python3.13 python3.12 python3.11; do
            if command -v "$candidate" >/dev/null 2>&1; then
                apt_pkgs=("$candidate-venv")
                break
            fi
        done
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_pkgs[@]}"
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y python3.11
    fi
    PYTHON="$(find_python)" ||
        fatal "spotd needs Python >= 3.11 with venv; install python3.11 and python3.11-venv (or set SPOTD_PYTHON), or use a newer AMI"
fi
echo "python: $PYTHON"

# No pip in the venv means an earlier run failed half-way (ensurepip missing): make it again.
if [ ! -x "$SPOTD_VENV/bin/pip" ]; then
    "$PYTHON" -m venv --clear "$SPOTD_VENV"
fi
# The spec may carry options (--index-url URL spotd); split it into words on purpose.
read -r -a pip_args <<<"$SPOTD_PIP_SPEC"
"$SPOTD_VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "${pip_args[@]}"
"$SPOTD_VENV/bin/spotd" --version

# The training script imports spotd.client or spotd.torch from its own environment, not from spotd's
# venv. Those modules need only the standard library (and torch, which that environment has), hence
# --no-deps: the daemon's dependencies stay out of the training environment.
train_python="$SPOTD_TRAIN_PYTHON"
if [ -z "$train_python" ] && [ -n "$SPOTD_TRAIN_CMD" ]; then
    read -r train_first _ <<<"$SPOTD_TRAIN_CMD"
    case "$train_first" in */*)
        if [ -x "${train_first%/*}/python" ]; then
            train_python="${train_first%/*}/python"
        fi
        ;;
    esac
    if [ -z "$train_python" ]; then
        echo "WARNING: cannot tell which python runs SPOTD_TRAIN_CMD; set SPOTD_TRAIN_PYTHON (e.g. /opt/venv/bin/python) or run: PYTHON -m pip install --no-deps $SPOTD_PIP_SPEC"
    fi
fi
if [ -n "$train_python" ]; then
    "$train_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        fatal "the training environment's $train_python is not Python >= 3.11, which spotd.client needs; build that environment with python3.11 or newer"
    # By prefix: two venvs made from one interpreter resolve to the same python binary.
    train_prefix="$("$train_python" -c 'import sys; print(sys.prefix)')"
    if [ "$(readlink -f "$train_prefix")" = "$(readlink -f "$SPOTD_VENV")" ]; then
        echo "training environment: spotd's own venv"
    else
        # As the environment's owner, so that user can still upgrade or remove it later.
        train_site="$("$train_python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
        as_owner=()
        if [ "$(stat -c %U "$train_site")" != root ]; then
            as_owner=(runuser -u "$(stat -c %U "$train_site")" --)
        fi
        "${as_owner[@]}" "$train_python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade "${pip_args[@]}" ||
            fatal "could not install spotd into the training environment of $train_python; if that is the system python, train in a venv (python3 -m venv /opt/venv) or set SPOTD_TRAIN_PYTHON to one"
        "$train_python" -I -c 'import spotd.client' ||
            fatal "$train_python cannot import spotd.client after installing it; see the pip output above"
        echo "training environment: $train_python has spotd"
    fi
fi

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
