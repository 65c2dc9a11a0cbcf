"""Optional integrations with other packages, each imported only by projects that use it."""
