"""Transcription jobs, in-process: submit, poll with real progress, fetch the result."""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from polargrid import errors as sdk
from polargrid.types import (
    AsyncTranscriptionJobAccepted,
    AsyncTranscriptionMetadata,
    TranscriptionJobInfo,
    TranscriptionJobListResponse,
    TranscriptionJobResult,
    TranscriptionJobStatus,
)

from ..audio.decode import AudioInput
from ..errors import as_server_error, invalid

MAX_JOBS = 1000


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class TranscriptionJobs:
    """Jobs run on their own threads against the STT worker; the newest MAX_JOBS are kept.

    ``check(request)`` refuses a bad request (or a full queue) before a job is accepted; ``transcribe(data,
    request, on_progress=...)`` does the work and returns a verbose transcription."""

    def __init__(self, check: Callable[[dict[str, Any]], None], transcribe: Callable[..., Any]) -> None:
        self.check = check
        self.transcribe = transcribe
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, file: AudioInput, model: str = "stt-1b-en_fr", language: str | None = None,
               prompt: str | None = None, response_format: str = "json",
               temperature: float | None = None) -> AsyncTranscriptionJobAccepted:
        data = _read(file)
        request = {"model": model, "language": language, "prompt": prompt, "response_format": "verbose_json",
                   "temperature": temperature}
        self.check(dict(request, response_format=response_format))  # bad input and full queues are refused now
        job_id = f"job_{uuid.uuid4().hex[:20]}"
        name = Path(getattr(file, "name", "") or (str(file) if isinstance(file, (str, Path)) else "audio")).name
        metadata = AsyncTranscriptionMetadata(filename=name, file_size_mb=round(len(data) / 1e6, 3),
                                              audio_format=Path(name).suffix.lstrip(".") or "unknown",
                                              estimated_duration_seconds=0.0, model=model)
        job = {"job_id": job_id, "status": TranscriptionJobStatus.ACCEPTED, "created_at": _now(),
               "updated_at": _now(), "progress": 0.0, "metadata": metadata.model_dump(), "result": None}
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, data, request), name=f"polargrid-{job_id}", daemon=True).start()
        return AsyncTranscriptionJobAccepted(job_id=job_id, status="accepted", message="transcription job accepted",
                                             metadata=metadata, poll_url=f"/v1/audio/transcriptions?job_id={job_id}",
                                             result_url=f"/v1/audio/transcriptions?job_id={job_id}")

    def _update(self, job: dict[str, Any], **fields: Any) -> None:
        with self._lock:
            job.update(fields, updated_at=_now())

    def _run(self, job: dict[str, Any], data: bytes, request: dict[str, Any]) -> None:
        self._update(job, status=TranscriptionJobStatus.PROCESSING, started_at=_now())
        try:
            result = self.transcribe(data, request, on_progress=lambda p: self._update(job, progress=p))
        except BaseException as exc:  # recorded on the job, as a remote job would
            error = exc if isinstance(exc, sdk.PolarGridError) else as_server_error(exc, "transcription")
            self._update(job, status=TranscriptionJobStatus.FAILED, error=error.message,
                         error_code=type(error).__name__, completed_at=_now())
            return
        metadata = dict(job["metadata"], estimated_duration_seconds=result.duration)
        self._update(job, status=TranscriptionJobStatus.COMPLETED, progress=1.0, completed_at=_now(),
                     metadata=metadata, result=result)

    def _get(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise sdk.NotFoundError(f"Transcription job {job_id!r} not found")
            return dict(job)

    def info(self, job_id: str) -> TranscriptionJobInfo:
        job = self._get(job_id)
        done = job["status"] == TranscriptionJobStatus.COMPLETED
        return TranscriptionJobInfo(
            job_id=job_id, status=job["status"], created_at=job["created_at"], updated_at=job["updated_at"],
            started_at=job.get("started_at"), completed_at=job.get("completed_at"),
            progress=round(job["progress"], 3), metadata=job["metadata"], has_result=done, error=job.get("error"),
            error_code=job.get("error_code"), poll_interval_ms=250,
            result_url=f"/v1/audio/transcriptions?job_id={job_id}")

    def result(self, job_id: str) -> TranscriptionJobResult:
        job = self._get(job_id)
        if job["status"] != TranscriptionJobStatus.COMPLETED:
            detail = f": {job.get('error')}" if job.get("error") else ""
            raise invalid(f"Transcription job {job_id} is {job['status'].value}{detail}; poll until it is completed")
        result = job["result"]
        return TranscriptionJobResult(job_id=job_id, status="completed", text=result.text, language=result.language,
                                      duration=result.duration)

    def list(self, status: str | None = None, limit: int = 50) -> TranscriptionJobListResponse:
        if limit < 1:
            raise invalid("limit must be at least 1", field="limit")
        with self._lock:
            ids = list(reversed(self._jobs))
        infos = [self.info(i) for i in ids]
        if status:
            infos = [j for j in infos if j.status.value == status]
        infos = infos[:limit]
        return TranscriptionJobListResponse(jobs=infos, count=len(infos))


def _read(file: AudioInput) -> bytes:
    if isinstance(file, (bytes, bytearray, memoryview)):
        return bytes(file)
    if isinstance(file, (str, Path)):
        path = Path(file)
        if not path.is_file():
            raise invalid(f"Audio file not found: {path}", field="file")
        return path.read_bytes()
    if hasattr(file, "read"):
        return file.read()
    raise invalid(f"file must be a path, bytes or a binary file object, not {type(file).__name__}", field="file")
