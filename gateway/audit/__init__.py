"""The tamper-evident audit log and the tools that read it: verify, report, reconcile."""
