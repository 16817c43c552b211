"""Reading a corpus into a Ray Dataset of documents: {id: string, data: binary, error: string}.

Inputs are files or directories, local or s3://; by extension: .jsonl/.json (one
document per line), .parquet, anything else is a plain-text file whose path is its id.
Decoding and validation happen later, per document, so a bad document becomes a
failure record instead of failing the read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from ctxtree.store import filesystem_for
from ctxtree.pipelines.ray_compat import READ_CPUS, map_with_tasks

JSON_EXT = (".jsonl", ".json")
PARQUET_EXT = (".parquet",)


@dataclass(frozen=True)
class SourceSpec:
    inputs: tuple[str, ...]
    id_column: str = "id"
    text_column: str = "text"


@dataclass(frozen=True)
class InputFiles:
    filesystem: pafs.FileSystem
    jsonl: tuple[str, ...]
    parquet: tuple[str, ...]
    text: tuple[tuple[str, str], ...]   # (path in the filesystem, document id)

    @property
    def count(self) -> int:
        return len(self.jsonl) + len(self.parquet) + len(self.text)


def expand_inputs(spec: SourceSpec) -> InputFiles:
    if not spec.inputs:
        raise ValueError("no inputs given")
    fs0, jsonl, parquet, text = None, [], [], []
    for uri in spec.inputs:
        fs, path = filesystem_for(uri)
        if fs0 is not None and fs.type_name != fs0.type_name:
            raise ValueError("all inputs of one job must be on the same filesystem (all local or all s3://)")
        fs0 = fs
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {uri}")
        if info.type == pafs.FileType.Directory:
            found = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File and not any(p.startswith(".") for p in i.path.split("/"))]
            entries = [(i.path, uri.rstrip("/") + i.path[len(path.rstrip("/")):]) for i in found]
        else:
            entries = [(path, uri)]
        for fs_path, doc_id in sorted(entries):
            if fs_path.endswith(JSON_EXT):
                jsonl.append(fs_path)
            elif fs_path.endswith(PARQUET_EXT):
                parquet.append(fs_path)
            else:
                text.append((fs_path, doc_id))
    files = InputFiles(fs0, tuple(jsonl), tuple(parquet), tuple(text))
    if files.count == 0:
        raise ValueError(f"no input files under {', '.join(spec.inputs)}")
    return files


def _records(batch: pa.Table, id_column: str, text_column: str) -> pa.Table:
    """Normalize a jsonl/parquet batch to {id, data, error}; a missing field is an error row."""
    names = set(batch.column_names)
    n = batch.num_rows
    ids = batch.column(id_column).to_pylist() if id_column in names else [None] * n
    texts = batch.column(text_column).to_pylist() if text_column in names else [None] * n
    out_ids, data, errors = [], [], []
    for row, (doc_id, text) in enumerate(zip(ids, texts)):
        error = ""
        if doc_id is None or str(doc_id) == "":
            error = f"no {id_column!r} field"
        elif not isinstance(text, str):
            error = f"no {text_column!r} string field"
        out_ids.append(str(doc_id) if doc_id is not None else f"<row without {id_column}>")
        data.append(text.encode("utf-8") if isinstance(text, str) else b"")
        errors.append(error)
    return pa.table({"id": pa.array(out_ids, pa.string()), "data": pa.array(data, pa.binary()),
                     "error": pa.array(errors, pa.string())})


def _text_records(batch: pa.Table, ids: dict[str, str]) -> pa.Table:
    paths = batch.column("path").to_pylist()
    return pa.table({"id": pa.array([ids.get(p, p) for p in paths], pa.string()),
                     "data": batch.column("bytes").cast(pa.binary()),
                     "error": pa.array([""] * len(paths), pa.string())})


def read_documents(files: InputFiles, spec: SourceSpec) -> ray.data.Dataset:
    parts = []
    if files.text:
        ids = dict(files.text)
        ds = ray.data.read_binary_files([p for p, _ in files.text], include_paths=True, filesystem=files.filesystem,
                                        num_cpus=READ_CPUS)
        parts.append(map_with_tasks(ds, _text_records, (ids,), None, READ_CPUS))
    if files.jsonl:
        # pyarrow reads JSON lines (Ray refuses `filesystem` together with lines=True)
        ds = ray.data.read_json(list(files.jsonl), filesystem=files.filesystem, num_cpus=READ_CPUS)
        parts.append(map_with_tasks(ds, _records, (spec.id_column, spec.text_column), None, READ_CPUS))
    if files.parquet:
        ds = ray.data.read_parquet(list(files.parquet), filesystem=files.filesystem, num_cpus=READ_CPUS)
        parts.append(map_with_tasks(ds, _records, (spec.id_column, spec.text_column), None, READ_CPUS))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
