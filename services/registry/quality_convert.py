"""Pure conversions between the registry's data set messages (evaluation.proto) and domain types."""

from __future__ import annotations

from aiaas.eval.formats import DatasetFormat
from aiaas.registry.v1 import evaluation_pb2 as epb
from services.registry.convert import timestamp
from services.registry.entities import Dataset, DatasetSpec

ROLE_TO_PB = {"input": epb.COLUMN_ROLE_INPUT, "label": epb.COLUMN_ROLE_LABEL, "feature": epb.COLUMN_ROLE_FEATURE}


def dataset_spec(header: epb.UploadDatasetHeader) -> DatasetSpec:
    return DatasetSpec(
        name=header.name, format=DatasetFormat.from_pb(header.format).value, sha256=header.sha256, size=header.size,
        label_columns=tuple(header.label_columns), model=header.model, model_version=header.model_version,
        model_alias=header.model_alias, description=header.description, actor=header.actor,
    )


def dataset(found: Dataset) -> epb.Dataset:
    return epb.Dataset(
        name=found.name, format=DatasetFormat.parse(found.format).pb, sha256=found.sha256, size=found.size,
        num_rows=found.num_rows,
        columns=[epb.DatasetColumn(name=c.name, datatype=c.datatype, shape=c.shape, role=ROLE_TO_PB[c.role],
                                   split=c.split) for c in found.columns],
        model=found.model, model_version=found.model_version, description=found.description,
        created_by=found.created_by, create_time=timestamp(found.create_time),
    )
