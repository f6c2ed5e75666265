#!/usr/bin/env bash
# One-time AWS IAM set-up for cluster.yaml: S3 access for the worker nodes. Run it once per AWS
# account, with the AWS CLI and the credentials you give `ray up`; running it again changes nothing.
#
#   bash scripts/aws_iam.sh
#
# `ray up` gives the head node the instance profile ray-autoscaler-v1 (role of the same name with
# AmazonEC2FullAccess and AmazonS3FullAccess), creating it on first use, but gives worker nodes
# none: a fold could then neither read s3:// images nor write the run dir. This script
#   1. creates the role and instance profile kfold-ray-worker with AmazonS3FullAccess: the worker
#      node types of cluster.yaml launch with it (IamInstanceProfile: {Name: kfold-ray-worker});
#   2. creates ray-autoscaler-v1 as `ray up` would, unless it exists;
#   3. lets that head role hand kfold-ray-worker to the workers it launches (iam:PassRole) and
#      resolve the AMI from AWS's public SSM parameter (AmazonSSMReadOnlyAccess).
# To keep workers to one bucket, replace AmazonS3FullAccess on the kfold-ray-worker role with a
# policy for that bucket.
set -euo pipefail
WORKER=kfold-ray-worker
HEAD=ray-autoscaler-v1   # Ray's default (ray/autoscaler/_private/aws/config.py)
TRUST='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'

# Role and instance profile named $1, the role in the profile; prints the profile's role.
ensure_profile() {
  local name=$1 role
  if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam wait instance-profile-exists --instance-profile-name "$name"
  fi
  role=$(aws iam get-instance-profile --instance-profile-name "$name" \
           --query 'InstanceProfile.Roles[0].RoleName' --output text)
  if [ -z "$role" ] || [ "$role" = None ]; then
    role=$name
    if ! aws iam get-role --role-name "$role" >/dev/null 2>&1; then
      aws iam create-role --role-name "$role" --assume-role-policy-document "$TRUST" >/dev/null
      aws iam wait role-exists --role-name "$role"
    fi
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$role"
  fi
  echo "$role"
}
attach() { aws iam attach-role-policy --role-name "$1" --policy-arn "arn:aws:iam::aws:policy/$2"; }

account=$(aws sts get-caller-identity --query Account --output text)
worker_role=$(ensure_profile "$WORKER")
attach "$worker_role" AmazonS3FullAccess
head_role=$(ensure_profile "$HEAD")
attach "$head_role" AmazonEC2FullAccess
attach "$head_role" AmazonS3FullAccess
attach "$head_role" AmazonSSMReadOnlyAccess
aws iam put-role-policy --role-name "$head_role" --policy-name kfold-ray-pass-worker-role \
  --policy-document "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iam:PassRole\",\"Resource\":\"arn:aws:iam::$account:role/$worker_role\"}]}"
echo "[aws_iam] workers: instance profile $WORKER (role $worker_role, S3); head: $HEAD (role $head_role) may pass it on" >&2
