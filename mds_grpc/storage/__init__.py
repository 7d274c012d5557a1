"""Where models live: a blob store for files and a metadata store for records."""
