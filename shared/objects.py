"""S3 storage for inputs and results (AWS, MinIO, moto: anything boto3 speaks to).

Result keys derive from the job id alone, and results are written once (``put(once=True)``):
a redelivered job finds what an earlier attempt of it stored instead of storing it again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Collection
from typing import TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.contract import parse_s3_uri
from shared.errors import InputNotFound, InvalidImage, InvalidInput, StorageUnavailable
from shared.settings import Settings

logger = logging.getLogger(__name__)

MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
# The bucket lifecycle rule this service owns; other rules in the bucket are left alone.
RETENTION_RULE_ID = "refinery-jobs-retention"
T = TypeVar("T")


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        secret = settings.s3_secret_access_key
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            # None lets boto3 read the standard AWS variables and profiles.
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
                connect_timeout=settings.s3_timeout_s,
                read_timeout=settings.s3_timeout_s,
            ),
        )

    def job_uri(self, job_id: str, name: str) -> str:
        return f"s3://{self.settings.s3_bucket}/{self.settings.s3_prefix}/jobs/{job_id}/{name}"

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.settings.s3_bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.settings.s3_bucket)

    def put(self, uri: str, data: bytes, content_type: str, *, once: bool = False) -> str:
        """Upload, retrying with backoff through an outage of up to ``s3_retry_budget_s``.

        ``once``, for a job's results: stored only where the object is absent (a conditional
        PUT, If-None-Match). Where an attempt of the same job already stored these bytes (a
        worker killed after its upload, a lease that ran out during an S3 outage, a reply
        lost and retried) they are kept as they are, so a result is stored once and never
        changes under a reader. Different bytes (the refiner channels moved between the
        attempts, a nondeterministic GPU kernel) replace the earlier ones, so that the object
        is the one the job's record describes."""
        bucket, key = parse_s3_uri(uri)
        if not once:
            self.retrying(
                f"upload of {uri}",
                lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type),
            )
            return uri
        # Hashed only here: the digest tells an earlier attempt's bytes from these.
        digest = hashlib.sha256(data).hexdigest()

        def upload(**conditions: str) -> None:
            self.client.put_object(
                Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata={"sha256": digest}, **conditions
            )

        try:
            self.retrying(f"upload of {uri}", lambda: upload(IfNoneMatch="*"), final={"PreconditionFailed"})
        except ClientError:  # PreconditionFailed: an earlier attempt stored it
            stored = self.retrying(f"read of {uri}", lambda: self.client.head_object(Bucket=bucket, Key=key))
            if stored.get("Metadata", {}).get("sha256") == digest:
                logger.info("%s: an earlier attempt of this job stored the same bytes; kept", uri)
                return uri
            logger.warning("%s: an earlier attempt of this job stored other bytes; replaced", uri)
            self.retrying(f"upload of {uri}", upload)
        return uri

    def retrying(self, what: str, call: Callable[[], T], *, final: Collection[str] = ()) -> T:
        """``call()``, retried with backoff through an outage of up to ``s3_retry_budget_s``;
        then StorageUnavailable. An error whose code is in ``final`` is an answer: raised as is."""
        deadline = time.monotonic() + self.settings.s3_retry_budget_s
        for attempt in itertools.count():
            try:
                return call()
            except (BotoCoreError, ClientError) as exc:
                if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in final:
                    raise
                pause = min(2.0**attempt * 0.25, 10.0)
                if time.monotonic() + pause > deadline:
                    raise StorageUnavailable(f"{what} failed: {exc}") from exc
                logger.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def delete_job_objects(self, job_id: str) -> None:
        prefix = f"{self.settings.s3_prefix}/jobs/{job_id}/"
        listed = self.client.list_objects_v2(Bucket=self.settings.s3_bucket, Prefix=prefix)
        for obj in listed.get("Contents", []):
            self.client.delete_object(Bucket=self.settings.s3_bucket, Key=obj["Key"])

    def delete(self, uri: str) -> None:
        bucket, key = parse_s3_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"delete of {uri} failed: {exc}") from exc

    # -- retention ------------------------------------------------------------------------

    def retention_rule(self) -> dict:
        """The lifecycle rule that expires every job's objects after ``retention_days``."""
        return {
            "ID": RETENTION_RULE_ID,
            "Filter": {"Prefix": f"{self.settings.s3_prefix}/jobs/"},
            "Status": "Enabled",
            "Expiration": {"Days": self.settings.retention_days},
        }

    def retention_in_place(self) -> dict | None:
        """The bucket's rule of this service as it stands, None when there is none."""
        return next((rule for rule in self._lifecycle_rules() if rule.get("ID") == RETENTION_RULE_ID), None)

    def apply_retention(self) -> None:
        """Put ``retention_rule`` in the bucket's lifecycle configuration, keeping its other rules."""
        others = [rule for rule in self._lifecycle_rules() if rule.get("ID") != RETENTION_RULE_ID]
        try:
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.settings.s3_bucket, LifecycleConfiguration={"Rules": [*others, self.retention_rule()]}
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"setting the lifecycle of s3://{self.settings.s3_bucket} failed: {exc}") from exc

    def _lifecycle_rules(self) -> list[dict]:
        try:
            found = self.client.get_bucket_lifecycle_configuration(Bucket=self.settings.s3_bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return []
            raise StorageUnavailable(f"reading the lifecycle of s3://{self.settings.s3_bucket} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"reading the lifecycle of s3://{self.settings.s3_bucket} failed: {exc}") from exc
        return list(found.get("Rules", []))

    def get(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """Read an object; only from the buckets refine-only inputs may come from."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="input_uri") from None
        if bucket not in self.settings.readable_buckets:
            raise InvalidInput(f"bucket {bucket!r} is not readable by this service", field="input_uri")
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            # The size is in the reply's headers: an object over the limit is never read.
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise InvalidImage(f"{response['ContentLength']} bytes exceeds the limit of {max_bytes}", field="input")
            return response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING:
                raise InputNotFound(f"no object at {uri}", field="input_uri") from None
            raise StorageUnavailable(f"download of {uri} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"download of {uri} failed: {exc}") from exc

    def presign(self, uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.settings.presign_expiry_s
        )
