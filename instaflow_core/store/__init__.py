"""Storage: one code path for local folders and S3 (`Store`), LanceDB tables and tensor columns on top."""

from instaflow_core.store.tables import (
    append_rows,
    create_table,
    export_parquet,
    from_tensor_column,
    get_metadata,
    list_versions,
    merge_rows,
    open_ref,
    open_table,
    set_metadata,
    table_ref,
    tensor_field,
    tensor_shape,
    to_arrow,
    to_tensor_column,
)
from instaflow_core.store.uri import Store, StoreNotFoundError, translate_error

__all__ = [
    "Store",
    "StoreNotFoundError",
    "append_rows",
    "create_table",
    "export_parquet",
    "from_tensor_column",
    "get_metadata",
    "list_versions",
    "merge_rows",
    "open_ref",
    "open_table",
    "set_metadata",
    "table_ref",
    "tensor_field",
    "tensor_shape",
    "to_arrow",
    "to_tensor_column",
    "translate_error",
]
