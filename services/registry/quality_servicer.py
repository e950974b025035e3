"""The registry servicer with the data set and evaluation RPCs (evaluation.proto): convert, call
`RegistryCore.quality` in a thread, convert back. Uploads and downloads stream as artifacts do."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from aiaas.registry.v1 import evaluation_pb2 as epb
from services.common.authz import audit_actor
from services.common.errors import InvalidArgument
from services.registry import quality_convert as convert
from services.registry.core import MAX_UPLOAD_HEADER_BYTES
from services.registry.servicer import RegistryServicer, UploadStream, receive_upload, run


class QualityServicer(RegistryServicer):
    """`RegistryServicer` plus data sets and evaluation results."""

    async def UploadDataset(self, request_iterator: AsyncIterator[epb.UploadDatasetRequest],
                            context: Any) -> epb.UploadDatasetResponse:
        with self.core.upload_slots.hold():
            stream = UploadStream(request_iterator, self.limits)  # type: ignore[arg-type]
            first: Any = await stream.next()
            if first is None or not first.HasField("header"):
                raise InvalidArgument("the upload stream must start with a header message, then send chunks")
            if (size := first.header.ByteSize()) > MAX_UPLOAD_HEADER_BYTES:
                raise InvalidArgument(f"the upload header is {size} bytes; the limit is {MAX_UPLOAD_HEADER_BYTES}")
            spec = dataclasses.replace(convert.dataset_spec(first.header), actor=audit_actor(first.header.actor))
            upload = await run(self.core.quality.begin_dataset_upload, spec)
            found, deduplicated = await receive_upload(stream, upload)
        return epb.UploadDatasetResponse(dataset=convert.dataset(found), deduplicated=deduplicated)

    async def GetDataset(self, request: epb.GetDatasetRequest, context: Any) -> epb.GetDatasetResponse:
        return epb.GetDatasetResponse(dataset=convert.dataset(await run(self.core.quality.get_dataset, request.name)))

    async def ListDatasets(self, request: epb.ListDatasetsRequest, context: Any) -> epb.ListDatasetsResponse:
        page = await run(self.core.quality.list_datasets, request.page_size, request.page_token)
        return epb.ListDatasetsResponse(datasets=[convert.dataset(d) for d in page.items],
                                        next_page_token=page.next_token)

    async def DownloadDataset(self, request: epb.DownloadDatasetRequest,
                              context: Any) -> AsyncIterator[epb.DownloadDatasetResponse]:
        found, chunks = await run(self.core.quality.read_dataset, request.name, request.chunk_size)
        try:
            yield epb.DownloadDatasetResponse(dataset=convert.dataset(found))
            while (chunk := await run(next, chunks, None)) is not None:
                yield epb.DownloadDatasetResponse(chunk=chunk)
        finally:
            chunks.close()  # type: ignore[attr-defined]

    async def DeleteDataset(self, request: epb.DeleteDatasetRequest, context: Any) -> epb.DeleteDatasetResponse:
        await run(self.core.quality.delete_dataset, request.name, audit_actor(request.actor))
        return epb.DeleteDatasetResponse()

    async def PutEvaluation(self, request: epb.PutEvaluationRequest, context: Any) -> epb.PutEvaluationResponse:
        stored = await run(self.core.quality.put_evaluation, request.result, audit_actor(request.actor))
        return epb.PutEvaluationResponse(result=stored)

    async def GetEvaluation(self, request: epb.GetEvaluationRequest, context: Any) -> epb.GetEvaluationResponse:
        found = await run(self.core.quality.get_evaluation, request.model, request.version, request.name)
        return epb.GetEvaluationResponse(result=found)

    async def ListEvaluations(self, request: epb.ListEvaluationsRequest,
                              context: Any) -> epb.ListEvaluationsResponse:
        page = await run(self.core.quality.list_evaluations, request.model, request.version, request.page_size,
                         request.page_token)
        return epb.ListEvaluationsResponse(results=page.items, next_page_token=page.next_token)
