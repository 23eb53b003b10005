"""Transport: one transfer of bytes to or from a kind of store (http, file, s3, oci)."""
