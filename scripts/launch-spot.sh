#!/bin/bash
# Launch a GPU spot instance that installs spotd on boot (scripts/user-data.sh) and resumes training.
#
#   BUCKET=my-ckpt JOB_ID=mono-to-3d AMI_ID=ami-0123 SUBNET_ID=subnet-0abc SECURITY_GROUP_ID=sg-0abc \
#   PIP_SPEC="https://my-host/spotd-0.1.0-py3-none-any.whl#sha256=HEX" \
#   TRAIN_CMD="/opt/venv/bin/python train.py" TRAIN_USER=ubuntu TRAIN_DIR=/home/ubuntu \
#       scripts/launch-spot.sh
#
# PIP_SPEC pins the spotd the instance installs (a wheel URL with its hash, git+https://...@COMMIT, or
# --index-url of your own index): spotd is not on the public index; scripts/user-data.sh says more.
# DRY_RUN=1 asks EC2 to validate the request (--dry-run) without launching. CREATE_PROFILE=1 creates the
# IAM role and instance profile from docs/iam-policy.json first (its placeholders BUCKET and PREFIX
# become $BUCKET and spotd, the user-data's prefix). Needs the AWS CLI v2 and credentials allowed to
# run instances (and IAM, for CREATE_PROFILE).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BUCKET:?set BUCKET to the S3 bucket that keeps the checkpoints}"
: "${JOB_ID:?set JOB_ID to a stable name for the training job}"
: "${AMI_ID:?set AMI_ID (e.g. a Deep Learning AMI with Python >= 3.11)}"
: "${SUBNET_ID:?set SUBNET_ID}"
: "${SECURITY_GROUP_ID:?set SECURITY_GROUP_ID (allow TCP 9127 from Prometheus)}"
INSTANCE_TYPE="${INSTANCE_TYPE:-g5.xlarge}"
PROFILE_NAME="${PROFILE_NAME:-spotd-instance}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-/opt/ml/checkpoints}"
: "${PIP_SPEC:?set PIP_SPEC to a pinned spotd: a wheel URL (https://HOST/spotd-0.1.0-py3-none-any.whl#sha256=HEX), git+https://HOST/ORG/spotd.git@COMMIT, or --index-url URL spotd==VERSION}"
TRAIN_CMD="${TRAIN_CMD:-}"
TRAIN_USER="${TRAIN_USER:-root}"
TRAIN_DIR="${TRAIN_DIR:-/}"
TRAIN_PYTHON="${TRAIN_PYTHON:-}"
# A bare name or name==version would come from the public index (user-data.sh refuses it at boot, too
# late to save the launch).
case "$PIP_SPEC" in */*) ;; *)
    echo "launch-spot.sh: PIP_SPEC=$PIP_SPEC would install whatever owns that name on the public index; give a wheel URL, a git URL at a commit, or --index-url of your own index" >&2
    exit 2
    ;;
esac
KEY_NAME="${KEY_NAME:-}"
DRY_RUN="${DRY_RUN:-0}"
CREATE_PROFILE="${CREATE_PROFILE:-0}"

if [ "$CREATE_PROFILE" = 1 ]; then
    trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
    if ! aws iam get-role --role-name "$PROFILE_NAME" >/dev/null 2>&1; then
        aws iam create-role --role-name "$PROFILE_NAME" --assume-role-policy-document "$trust" >/dev/null
    fi
    policy="$(sed -e "s/BUCKET/${BUCKET}/g" -e "s|PREFIX|spotd|g" docs/iam-policy.json)"
    aws iam put-role-policy --role-name "$PROFILE_NAME" --policy-name spotd --policy-document "$policy"
    if ! aws iam get-instance-profile --instance-profile-name "$PROFILE_NAME" >/dev/null 2>&1; then
        aws iam create-instance-profile --instance-profile-name "$PROFILE_NAME" >/dev/null
        aws iam add-role-to-instance-profile --instance-profile-name "$PROFILE_NAME" --role-name "$PROFILE_NAME"
        # IAM is eventually consistent: if run-instances then calls the profile invalid, rerun in ~10 s.
        aws iam wait instance-profile-exists --instance-profile-name "$PROFILE_NAME"
    fi
fi

# Fill the variables at the top of user-data.sh. The values land inside double quotes in a shell script
# run by sed with '|' as delimiter: refuse what would need quoting there, escape sed's '&'.
fill() {
    local name="$1" value="$2"
    case "$value" in *[\|\"\$\`\\]*)
        echo "launch-spot.sh: $name may not contain | \" \$ \` or a backslash: $value" >&2
        exit 2
        ;;
    esac
    printf 's|^SPOTD_%s="[^"]*"|SPOTD_%s="%s"|\n' "$name" "$name" "${value//&/\\&}"
}
user_data="$(mktemp)"
trap 'rm -f "$user_data" "$user_data.sed"' EXIT
{
    fill BUCKET "$BUCKET"
    fill JOB_ID "$JOB_ID"
    fill CHECKPOINT_DIR "$CHECKPOINT_DIR"
    fill PIP_SPEC "$PIP_SPEC"
    fill TRAIN_CMD "$TRAIN_CMD"
    fill TRAIN_USER "$TRAIN_USER"
    fill TRAIN_DIR "$TRAIN_DIR"
    fill TRAIN_PYTHON "$TRAIN_PYTHON"
} >"$user_data.sed"
sed -f "$user_data.sed" scripts/user-data.sh >"$user_data"

# persistent + stop: on interruption EC2 stops the instance (EBS root and checkpoint_dir kept) and starts
# it again when capacity returns; the enabled units resume the job. Alternatives:
#   "InstanceInterruptionBehavior":"hibernate"  (needs a hibernation-capable AMI and encrypted root)
#   {"SpotInstanceType":"one-time","InstanceInterruptionBehavior":"terminate"}  (spotd restores from S3
#   on whatever instance you launch next; persistent requests cannot use terminate with run-instances)
market='{"MarketType":"spot","SpotOptions":{"SpotInstanceType":"persistent","InstanceInterruptionBehavior":"stop"}}'
# IMDSv2 only; hop limit 1 because spotd runs on the host, not in a container (use 2 if it does). A
# trainer in a container needs no IMDS at all: it only talks to spotd's socket.
metadata='HttpTokens=required,HttpEndpoint=enabled,HttpPutResponseHopLimit=1,HttpProtocolIpv6=enabled'

args=(
    --image-id "$AMI_ID"
    --instance-type "$INSTANCE_TYPE"
    --subnet-id "$SUBNET_ID"
    --security-group-ids "$SECURITY_GROUP_ID"
    --iam-instance-profile "Name=${PROFILE_NAME}"
    --instance-market-options "$market"
    --metadata-options "$metadata"
    --user-data "file://${user_data}"
    # The tags select scrape targets in docs/prometheus-scrape.yml, and scope what docs/iam-policy.json
    # lets policy.on_complete stop, terminate or cancel: instances and spot requests tagged spotd=enabled.
    --tag-specifications
    "ResourceType=instance,Tags=[{Key=Name,Value=spotd-${JOB_ID}},{Key=spotd,Value=enabled},{Key=spotd-job,Value=${JOB_ID}}]"
    "ResourceType=spot-instances-request,Tags=[{Key=spotd,Value=enabled},{Key=spotd-job,Value=${JOB_ID}}]"
    --count 1
)
if [ -n "$KEY_NAME" ]; then
    args+=(--key-name "$KEY_NAME")
fi
if [ "$DRY_RUN" = 1 ]; then
    args+=(--dry-run)
fi

aws ec2 run-instances "${args[@]}" --query 'Instances[0].[InstanceId,SpotInstanceRequestId]' --output text
