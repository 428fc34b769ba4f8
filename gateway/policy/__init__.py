"""Who may spend what: the configuration schema, the directory of principals, budget windows."""
